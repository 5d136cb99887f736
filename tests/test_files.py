"""kseg.files: atomic writes and the run-directory lock."""

import errno
import os
import subprocess
import sys
import textwrap

import pytest

from kseg.files import (
    RunLock,
    RunLockedError,
    SymbolicLinkError,
    append_text,
    atomic_path,
    describe_os_error,
    make_folder,
    write_bytes,
)


def test_a_failed_write_keeps_the_previous_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "model.keras"
    path.write_bytes(b"good")
    with pytest.raises(RuntimeError), atomic_path(path) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("killed")
    assert path.read_bytes() == b"good"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.keras"]


def test_the_temporary_keeps_the_suffix_savers_check(tmp_path):
    with atomic_path(tmp_path / "epoch-0001.weights.h5") as tmp:
        assert tmp.name.endswith("epoch-0001.weights.h5")
        assert tmp.parent == tmp_path
        tmp.write_bytes(b"x")
    assert (tmp_path / "epoch-0001.weights.h5").read_bytes() == b"x"


def test_no_overwrite_refuses_an_existing_file(tmp_path):
    path = tmp_path / "a.tflite"
    write_bytes(path, b"first", overwrite=False)
    with pytest.raises(FileExistsError):
        write_bytes(path, b"second", overwrite=False)
    assert path.read_bytes() == b"first"
    assert [p.name for p in tmp_path.iterdir()] == ["a.tflite"]


def test_a_kill_during_a_write_never_leaves_a_partial_file(tmp_path):
    # A child writes 64 MB through write_bytes and is killed mid-write: the
    # final name either does not exist or holds the complete content.
    path = tmp_path / "big.bin"
    script = textwrap.dedent(
        f"""
        import os, signal
        from kseg.files import atomic_path
        with atomic_path({str(path)!r}) as tmp:
            with open(tmp, "wb") as f:
                f.write(b"x" * (32 << 20))
                f.flush()
                os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    result = subprocess.run([sys.executable, "-c", script], check=False)
    assert result.returncode == -9
    assert not path.exists()


def test_a_locked_run_is_refused_naming_the_holder(tmp_path):
    lock = RunLock(tmp_path).acquire()
    try:
        with pytest.raises(RunLockedError, match=f"process {os.getpid()} on "):
            RunLock(tmp_path).acquire()
        # Another process is refused too.
        script = textwrap.dedent(
            f"""
            from kseg.files import RunLock, RunLockedError
            try:
                RunLock({str(tmp_path)!r}).acquire()
            except RunLockedError as error:
                print(error)
            """
        )
        out = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, check=True
        ).stdout
        assert f"process {os.getpid()}" in out and "in use" in out
    finally:
        lock.release()
    # Released (and released by the kernel when a holder dies): free again.
    RunLock(tmp_path).acquire().release()


def test_a_lock_that_is_a_symbolic_link_is_refused_not_written_through(tmp_path):
    # A run directory from elsewhere may hold `.lock` -> a user's file, which
    # taking the lock truncated and overwrote.
    precious = tmp_path / "bashrc"
    precious.write_text("the user's settings\n")
    run = tmp_path / "run"
    run.mkdir()
    (run / RunLock.FILE).symlink_to(precious)
    with pytest.raises(SymbolicLinkError, match=r"run/\.lock is a symbolic link"):
        RunLock(run).acquire()
    assert precious.read_text() == "the user's settings\n"
    # A dangling link is not created through either.
    precious.unlink()
    with pytest.raises(SymbolicLinkError, match="remove the link"):
        RunLock(run).acquire()
    assert not precious.exists()


def test_appends_and_folders_never_follow_a_symbolic_link(tmp_path):
    precious = tmp_path / "notes.txt"
    precious.write_text("mine\n")
    (tmp_path / "epochs.jsonl").symlink_to(precious)
    with pytest.raises(SymbolicLinkError, match="epochs.jsonl is a symbolic link"):
        append_text(tmp_path / "epochs.jsonl", "{}\n")
    assert precious.read_text() == "mine\n"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "checkpoints").symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(SymbolicLinkError, match="checkpoints is a symbolic link"):
        make_folder(tmp_path / "checkpoints")
    append_text(tmp_path / "new.jsonl", "a\n")
    append_text(tmp_path / "new.jsonl", "b\n")
    assert (tmp_path / "new.jsonl").read_text() == "a\nb\n"
    make_folder(tmp_path / "made" / "deeper")
    make_folder(tmp_path / "made" / "deeper")
    assert (tmp_path / "made" / "deeper").is_dir()


def test_os_errors_are_described_in_words():
    error = PermissionError(errno.EACCES, "Permission denied", "/runs/x")
    assert describe_os_error(error, "write /runs/x/model.keras") == (
        "cannot write /runs/x/model.keras: permission denied (/runs/x)"
    )
    full = OSError(errno.ENOSPC, "No space left on device")
    assert "no space left" in describe_os_error(full, "write a checkpoint")


def test_leftover_temporaries_of_killed_writers_are_removed(tmp_path):
    from kseg.files import remove_temporaries

    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / ".tmp-123-last.keras").write_bytes(b"partial")
    (tmp_path / ".tmp-9-saved").mkdir()
    (tmp_path / ".tmp-9-saved" / "saved_model.pb").write_bytes(b"x")
    (tmp_path / "model.keras").write_bytes(b"complete")
    assert remove_temporaries(tmp_path) == 2
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["checkpoints", "model.keras"]
