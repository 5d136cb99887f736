"""kseg's allocator: tcmalloc (when installed) or glibc settings applied to
every `kseg` command, chosen and turned off with KSEG_MALLOC, and one call
for library users."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kseg import allocator, tune_cpu_allocator
from kseg.allocator import ENVIRONMENT, AllocatorError, tuned_environment

TCMALLOC = "/opt/lib/libtcmalloc_minimal.so.4"


def test_auto_preloads_tcmalloc_when_installed():
    tuned = tuned_environment({"PATH": "/bin", "LD_PRELOAD": "/x/libfoo.so"}, TCMALLOC)
    assert tuned["PATH"] == "/bin"
    assert tuned["LD_PRELOAD"] == f"{TCMALLOC} /x/libfoo.so"
    assert int(tuned["TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD"]) >= 1 << 40
    # Applied once: a process started with it is not started again.
    assert tuned_environment(tuned, TCMALLOC) is None
    # Another allocator the user preloads is left alone.
    jemalloc = {"LD_PRELOAD": "/usr/lib/libjemalloc.so.2"}
    assert tuned_environment(jemalloc, TCMALLOC) is None


def test_glibc_settings_without_tcmalloc_or_when_asked(monkeypatch):
    monkeypatch.setattr(allocator, "tcmalloc_library", lambda: None)
    for environ in ({"MALLOC_TOP_PAD_": "1"}, {"KSEG_MALLOC": "glibc"}):
        tuned = tuned_environment({**environ, "MALLOC_TOP_PAD_": "1"})
        assert "LD_PRELOAD" not in tuned
        assert tuned["MALLOC_TOP_PAD_"] == "1"  # the user's value is kept
        assert tuned["MALLOC_MMAP_THRESHOLD_"] == str(32 << 20)
        assert tuned["MALLOC_TRIM_THRESHOLD_"] == str(2 << 30)
        assert tuned_environment({**environ, **ENVIRONMENT}) is None
    glibc = tuned_environment({"KSEG_MALLOC": "glibc"}, TCMALLOC)
    assert "LD_PRELOAD" not in glibc and "MALLOC_TOP_PAD_" in glibc


def test_off_unknown_and_missing_tcmalloc(monkeypatch):
    for off in ("off", "0", "False", "no"):
        assert tuned_environment({"KSEG_MALLOC": off}, TCMALLOC) is None
    with pytest.raises(AllocatorError, match="KSEG_MALLOC='tcmaloc' is not one of"):
        tuned_environment({"KSEG_MALLOC": "tcmaloc"})
    monkeypatch.setattr(allocator, "tcmalloc_library", lambda: None)
    with pytest.raises(AllocatorError, match="apt-get install libtcmalloc-minimal4"):
        tuned_environment({"KSEG_MALLOC": "tcmalloc"})


def test_tcmalloc_library_finds_the_installed_file(tmp_path, monkeypatch):
    folder = tmp_path / "lib"
    folder.mkdir()
    monkeypatch.setattr(allocator, "_LIBRARY_DIRS", (str(folder),))
    assert allocator.tcmalloc_library() is None
    (folder / allocator.TCMALLOC_NAME).write_bytes(b"")
    assert allocator.tcmalloc_library() == str(folder / allocator.TCMALLOC_NAME)


@pytest.mark.skipif(sys.platform != "linux", reason="glibc mallopt")
def test_tune_cpu_allocator_applies_the_settings_with_mallopt():
    assert tune_cpu_allocator() is True


# The file pip writes for the `kseg` console script.
_CONSOLE_SCRIPT = """import re
import sys
from kseg.cli import main
if __name__ == '__main__':
    sys.argv[0] = re.sub(r'(-script\\.pyw|\\.exe)?$', '', sys.argv[0])
    sys.exit(main())
"""


def _console_script(folder):
    folder.mkdir(parents=True, exist_ok=True)
    script = folder / "kseg"
    script.write_text(_CONSOLE_SCRIPT)
    return script


def _tuned(environ):
    return "LD_PRELOAD" in environ or all(name in environ for name in ENVIRONMENT)


def _read_environ(proc):
    return dict(
        item.split("=", 1)
        for item in (proc / "environ").read_bytes().decode().split("\0")
        if "=" in item
    )


def _running_command(script, env, reexecuted):
    """The environment and mapped files of a running `kseg recipes
    quickstart` (which loads TensorFlow, so it runs long enough to be read),
    started as the console script starts it, read from /proc once it
    re-executed itself (or after a second, when it is not expected to)."""
    command = [sys.executable, str(script), "recipes", "quickstart"]
    process = subprocess.Popen(
        command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    proc = Path(f"/proc/{process.pid}")
    try:
        deadline = time.monotonic() + 60
        if reexecuted:
            preload = allocator.tcmalloc_library() and "KSEG_MALLOC" not in env
            while not _tuned(environ := _read_environ(proc)) or (
                preload and allocator.TCMALLOC_NAME not in (proc / "maps").read_text()
            ):
                assert time.monotonic() < deadline, "never re-executed"
                assert process.poll() is None, "ended before re-executing"
                time.sleep(0.02)
        else:
            time.sleep(1.0)
            environ = _read_environ(proc)
        # The restart runs the program the user started, as it was started.
        cmdline = (proc / "cmdline").read_bytes().decode().split("\0")[:-1]
        assert cmdline == command
        return environ, (proc / "maps").read_text()
    finally:
        process.kill()
        process.wait()


def _clean_environment(**changes):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    for name in ("KSEG_MALLOC", "LD_PRELOAD", "TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD"):
        env.pop(name, None)
    return {**env, **changes}


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs /proc")
def test_every_kseg_command_runs_with_the_allocator_unless_turned_off(tmp_path):
    script = _console_script(tmp_path)
    tcmalloc = allocator.tcmalloc_library()
    environ, maps = _running_command(script, _clean_environment(), reexecuted=True)
    if tcmalloc is not None:
        assert environ["LD_PRELOAD"].split()[0] == tcmalloc
        assert allocator.TCMALLOC_NAME in maps  # really loaded
    else:
        for name, value in ENVIRONMENT.items():
            assert environ.get(name) == value
    environ, _ = _running_command(
        script, _clean_environment(KSEG_MALLOC="glibc"), reexecuted=True
    )
    assert "LD_PRELOAD" not in environ
    for name, value in ENVIRONMENT.items():
        assert environ.get(name) == value
    environ, maps = _running_command(
        script, _clean_environment(KSEG_MALLOC="off"), reexecuted=False
    )
    assert not any(name in environ for name in ENVIRONMENT)
    assert "LD_PRELOAD" not in environ and allocator.TCMALLOC_NAME not in maps


def test_an_unknown_choice_is_a_clear_error(tmp_path):
    result = subprocess.run(
        [sys.executable, str(_console_script(tmp_path)), "recipes", "quickstart"],
        env=_clean_environment(KSEG_MALLOC="fast"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert (
        "KSEG_MALLOC='fast' is not one of auto, tcmalloc, glibc, off" in result.stderr
    )


def test_the_restart_never_runs_python_files_of_the_current_directory(tmp_path):
    # `python -m` would put the current directory first on `sys.path`: a
    # dataset folder's `argparse.py` would run with the user's rights.
    script = _console_script(tmp_path / "bin")
    folder = tmp_path / "dataset"
    folder.mkdir()
    ran = tmp_path / "ran.txt"
    for name in ("argparse", "numpy", "kseg"):
        (folder / f"{name}.py").write_text(f"open({str(ran)!r}, 'a').write('{name}')\n")
    env = _clean_environment()
    assert tuned_environment(env) is not None  # so the command restarts
    result = subprocess.run(
        [sys.executable, str(script), "--help"],
        cwd=folder,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert not ran.exists(), f"ran {ran.read_text()} from the current directory"
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: kseg")


def test_active_allocator_names_what_the_process_runs_with():
    assert allocator.active_allocator({"LD_PRELOAD": TCMALLOC}) == "tcmalloc"
    assert allocator.active_allocator({**ENVIRONMENT}).startswith("glibc with kseg")
    assert allocator.active_allocator({}) == "glibc malloc"


def test_a_script_restarts_itself_with_the_allocator(tmp_path):
    # How the benchmarks use it: first thing, restart with kseg's allocator.
    script = tmp_path / "script.py"
    script.write_text(
        "import sys\n"
        "from kseg.allocator import active_allocator, restart_with_allocator\n"
        "restart_with_allocator(sys.argv)\n"
        "print(active_allocator(), sys.argv[1:])\n"
    )
    expected = "tcmalloc" if allocator.tcmalloc_library() else "glibc with kseg"
    for env, name in (({}, expected), ({"KSEG_MALLOC": "off"}, "glibc malloc")):
        result = subprocess.run(
            [sys.executable, str(script), "--flag"],
            env=_clean_environment(**env),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith(name) and "['--flag']" in result.stdout
