"""Writing files so that a kill at any instant never leaves a damaged one.

Every file kseg writes (checkpoints, backups, models, results, exports) is
written under a temporary name in the same folder and renamed into place once
complete: `os.replace` is atomic on POSIX file systems, so a reader sees the
old file or the new one, never a part. A run directory is locked while a
process trains in it (`RunLock`).

Files a process opens in place (the lock, appended logs) and the folders it
writes into are never reached through a symbolic link (`open_no_follow`,
`make_folder`): a link planted in a run directory (`.lock` pointing at a
user's file) would otherwise have that file overwritten.
"""

import contextlib
import errno
import json
import os
import shutil
import socket
from pathlib import Path

# Temporary names start with this prefix, so leftovers of a killed process
# are recognised (and never taken for a finished file).
TEMPORARY_PREFIX = ".tmp-"


def temporary_path(path):
    """A temporary sibling of `path` that keeps its full name as a suffix
    (so `.keras` and `.weights.h5` savers accept it)."""
    path = Path(path)
    return path.with_name(f"{TEMPORARY_PREFIX}{os.getpid()}-{path.name}")


def _fsync_directory(folder):
    with contextlib.suppress(OSError):
        descriptor = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


@contextlib.contextmanager
def atomic_path(path, overwrite=True):
    """Yields a temporary path to write `path`'s content to; renames it into
    place when the block ends without an error, and removes it otherwise.

    Args:
        path: the final file or folder path.
        overwrite: bool. When `False`, an existing `path` raises
            `FileExistsError` (checked before and at the rename, for files).

    Example:
    >>> with atomic_path("runs/x/model.keras") as tmp:
    ...     model.save(tmp)
    """
    path = Path(path)
    if not overwrite and path.exists():
        raise FileExistsError(f"{path} already exists")
    tmp = temporary_path(path)
    _remove(tmp)
    try:
        yield tmp
        if tmp.is_file():
            with open(tmp, "rb+") as file:
                os.fsync(file.fileno())
        if not overwrite:
            if tmp.is_dir():
                # A folder renamed onto an existing empty folder would replace
                # it; rename refuses a non-empty one. Check first.
                if path.exists():
                    raise FileExistsError(f"{path} already exists")
            else:
                # link() fails if the target exists: exclusive creation.
                os.link(tmp, path)
                tmp.unlink()
                _fsync_directory(path.parent)
                return
        os.replace(tmp, path)
        _fsync_directory(path.parent)
    finally:
        _remove(tmp)


def _remove(path):
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def remove_temporaries(folder):
    """Removes the temporary files (and folders) of killed writers anywhere
    under `folder`; call it only while holding the folder's `RunLock`, when
    no other process can be writing there. Returns how many were removed."""
    leftovers = [
        path
        for path in Path(folder).rglob(f"{TEMPORARY_PREFIX}*")
        if path.name.startswith(TEMPORARY_PREFIX)
    ]
    for path in sorted(leftovers, key=lambda p: len(p.parts), reverse=True):
        _remove(path)
    return len(leftovers)


def write_bytes(path, data, overwrite=True):
    """Writes `data` to `path` atomically (temporary file, then rename)."""
    with atomic_path(path, overwrite=overwrite) as tmp:
        tmp.write_bytes(data)


def write_text(path, text, overwrite=True):
    """Writes `text` (UTF-8) to `path` atomically."""
    write_bytes(path, text.encode("utf-8"), overwrite=overwrite)


def write_json(path, value, overwrite=True):
    """Writes `value` as indented JSON to `path` atomically."""
    write_text(path, json.dumps(value, indent=2) + "\n", overwrite=overwrite)


class SymbolicLinkError(ValueError):
    """A file or folder kseg writes in place is a symbolic link."""


def _link_error(path):
    path = Path(path)
    try:
        target = f" (to {os.readlink(path)})"
    except OSError:
        target = ""
    return SymbolicLinkError(
        f"{path} is a symbolic link{target}; kseg writes its files there itself "
        "and never follows links in a run directory: remove the link"
    )


def refuse_link(path):
    """Raises `SymbolicLinkError` when `path` is a symbolic link."""
    if Path(path).is_symlink():
        raise _link_error(path)


def _no_follow_opener(path, flags):
    try:
        return os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise _link_error(path) from None
        raise


def open_no_follow(path, mode="r"):
    """`open(path, mode)` that refuses a symbolic link at `path` (a
    `SymbolicLinkError`) instead of opening its target."""
    return open(path, mode, encoding="utf-8", opener=_no_follow_opener)


def append_text(path, text):
    """Appends `text` (UTF-8) to `path`, created when missing; a symbolic
    link at `path` is refused (`SymbolicLinkError`)."""
    with open_no_follow(path, "a") as file:
        file.write(text)


def make_folder(path):
    """Creates the folder `path` (and its parents) unless it exists; a
    symbolic link at `path` is refused (`SymbolicLinkError`)."""
    refuse_link(path)
    Path(path).mkdir(parents=True, exist_ok=True)


def describe_os_error(error, action):
    """A one-line message for an `OSError` met while `action` (e.g. "write
    runs/x/model.keras"), naming the cause in words."""
    reasons = {
        errno.EACCES: "permission denied",
        errno.EPERM: "operation not permitted",
        errno.EROFS: "the file system is read-only",
        errno.ENOSPC: "no space left on the device",
        errno.EDQUOT: "disk quota exceeded",
    }
    reason = reasons.get(error.errno) or error.strerror or str(error)
    where = f" ({error.filename})" if error.filename else ""
    return f"cannot {action}: {reason}{where}"


class RunLockedError(RuntimeError):
    """Another process holds a run directory's lock."""


class RunLock:
    """An exclusive lock on a run directory, held while a process trains in
    it: a second `kseg train` (or `--resume`) of the same run is refused with
    a message naming the holder.

    `fcntl.flock` on `DIR/.lock`: the kernel releases it when the holder
    exits or is killed, so a crashed run never stays locked. The file holds
    the holder's host and process id, for the message; a symbolic link in
    its place is refused (`SymbolicLinkError`), never written through.

    Args:
        run_dir: the run directory.
    """

    FILE = ".lock"

    def __init__(self, run_dir):
        self.path = Path(run_dir) / self.FILE
        self._file = None

    def acquire(self):
        import fcntl

        file = open_no_follow(self.path, "a+")
        try:
            fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            file.seek(0)
            holder = file.read().strip() or "another process"
            file.close()
            raise RunLockedError(
                f"{self.path.parent} is in use: {holder} is training in it; "
                "wait for it to finish or stop it first"
            ) from None
        file.seek(0)
        file.truncate()
        file.write(f"process {os.getpid()} on {socket.gethostname()}\n")
        file.flush()
        self._file = file
        return self

    def release(self):
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc_info):
        self.release()
