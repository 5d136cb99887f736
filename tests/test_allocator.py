"""kseg's allocator settings: applied to every `kseg` command, off with
KSEG_MALLOC=off, and one call for library users."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kseg import tune_cpu_allocator
from kseg.allocator import ENVIRONMENT, tuned_environment


def test_tuned_environment_adds_the_settings_and_keeps_the_users():
    tuned = tuned_environment({"PATH": "/bin", "MALLOC_TOP_PAD_": "1"})
    assert tuned["PATH"] == "/bin"
    assert tuned["MALLOC_TOP_PAD_"] == "1"
    assert tuned["MALLOC_MMAP_THRESHOLD_"] == str(32 << 20)
    assert tuned["MALLOC_TRIM_THRESHOLD_"] == str(2 << 30)
    assert tuned_environment({**ENVIRONMENT}) is None
    for off in ("off", "0", "False"):
        assert tuned_environment({"KSEG_MALLOC": off}) is None


@pytest.mark.skipif(sys.platform != "linux", reason="glibc mallopt")
def test_tune_cpu_allocator_applies_the_settings_with_mallopt():
    assert tune_cpu_allocator() is True


_START = "import sys; from kseg.cli import main; sys.argv = ['kseg', 'recipes']; main()"


def _environment_of_running_command(env, reexecuted):
    """The environment of a running `kseg recipes` (started as the console
    script starts it), read from /proc once it re-executed itself (or after
    a second, when it is not expected to)."""
    process = subprocess.Popen(
        [sys.executable, "-c", _START],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    proc = Path(f"/proc/{process.pid}")
    try:
        deadline = time.monotonic() + 60
        if reexecuted:
            while b"-m\0kseg.cli" not in (proc / "cmdline").read_bytes():
                assert time.monotonic() < deadline, "never re-executed"
                assert process.poll() is None, "ended before re-executing"
                time.sleep(0.02)
        else:
            time.sleep(1.0)
            assert b"-m\0kseg.cli" not in (proc / "cmdline").read_bytes()
        environ = (proc / "environ").read_bytes()
        return dict(
            item.split("=", 1) for item in environ.decode().split("\0") if "=" in item
        )
    finally:
        process.kill()
        process.wait()


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs /proc")
def test_every_kseg_command_runs_with_the_settings_unless_turned_off():
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env.pop("KSEG_MALLOC", None)
    tuned = _environment_of_running_command(env, reexecuted=True)
    for name, value in ENVIRONMENT.items():
        assert tuned.get(name) == value
    plain = _environment_of_running_command(
        {**env, "KSEG_MALLOC": "off"}, reexecuted=False
    )
    assert not any(name in plain for name in ENVIRONMENT)
