"""Keeping freed memory in the process: the allocator kseg's commands run with.

glibc returns large freed blocks to the kernel (blocks over the mmap
threshold are unmapped, the heap top is trimmed, emptied thread heaps are
unmapped), and TensorFlow frees and allocates its large tensor buffers every
step, so each step faults the same memory in again: on a 2-core machine a
third of a small model's training step went to the kernel, and PANet's step
more. Measured in `benchmarks/allocator.py`:

- tcmalloc (Debian/Ubuntu `libtcmalloc-minimal4`, preloaded) keeps freed
  memory in its own caches: the fastest everywhere measured, and the only
  setting that removes PANet's page faults (its thread heaps map and unmap
  1-28 MB buffers that glibc's thresholds do not cover);
- glibc with a 32 MiB mmap threshold, a 2 GiB trim threshold and a 256 MiB
  top pad (`MALLOC_*` variables, or `mallopt`): most of the gain for the
  semantic models, with nothing to install.

Every `kseg` command re-executes itself once at start (both act from the
first allocation) with `KSEG_MALLOC`'s choice:

- `auto` (the default): tcmalloc when its library is installed, else the
  glibc settings;
- `tcmalloc`: tcmalloc, an error naming the package when it is missing;
- `glibc`: the glibc settings only;
- `off` (or `0`, `false`, `no`): the process's own allocator, untouched.

Library users call `kseg.tune_cpu_allocator()` (one line, the glibc settings
through `mallopt`) before building their model, or start Python with
`LD_PRELOAD` naming `tcmalloc_library()`.
"""

import ctypes
import ctypes.util
import os
import sys
from pathlib import Path

ENV = "KSEG_MALLOC"
OFF = ("0", "off", "false", "no")
CHOICES = ("auto", "tcmalloc", "glibc", "off")

MMAP_THRESHOLD = 32 << 20
TRIM_THRESHOLD = 2 << 30
TOP_PAD = 256 << 20

# glibc's variable names (the trailing underscore is theirs) and mallopt ids.
ENVIRONMENT = {
    "MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD),
    "MALLOC_TRIM_THRESHOLD_": str(TRIM_THRESHOLD),
    "MALLOC_TOP_PAD_": str(TOP_PAD),
}
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3

TCMALLOC_NAME = "libtcmalloc_minimal.so.4"
TCMALLOC_PACKAGE = "libtcmalloc-minimal4"
# Where Debian, Ubuntu and Fedora install it (multiarch folders first).
_LIBRARY_DIRS = (
    "/usr/lib/{arch}-linux-gnu",
    "/usr/lib64",
    "/usr/lib",
    "/usr/local/lib",
)
# tcmalloc prints a line for each allocation over 1 GiB by default (a 64 MP
# image's buffers); kseg raises the threshold unless the user set one.
TCMALLOC_REPORT = {"TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD": str(1 << 40)}


class AllocatorError(RuntimeError):
    """`KSEG_MALLOC` asks for something this machine cannot give."""


def choice(environ=None):
    """`KSEG_MALLOC`'s value as one of `CHOICES` (`auto` when unset)."""
    environ = os.environ if environ is None else environ
    value = environ.get(ENV, "auto").strip().lower() or "auto"
    if value in OFF:
        return "off"
    if value == "on":
        return "auto"
    if value not in CHOICES:
        raise AllocatorError(
            f"{ENV}={environ[ENV]!r} is not one of {', '.join(CHOICES)} "
            "(auto: tcmalloc when installed, else glibc settings)"
        )
    return value


def enabled(environ=None):
    """Whether the kseg commands tune the allocator (`KSEG_MALLOC` not off)."""
    return choice(environ) != "off"


def tcmalloc_library():
    """The path of tcmalloc's shared library, or `None` when not installed."""
    arch = os.uname().machine if hasattr(os, "uname") else ""
    for folder in _LIBRARY_DIRS:
        path = Path(folder.format(arch=arch)) / TCMALLOC_NAME
        if path.is_file():
            return str(path)
    return None


def _preloaded(environ):
    preload = environ.get("LD_PRELOAD", "")
    return any(name in preload for name in ("tcmalloc", "jemalloc", "mimalloc"))


def tuned_environment(environ=None, tcmalloc=None):
    """`environ` changed for `KSEG_MALLOC`'s choice, or `None` when nothing
    is to change (turned off; already tuned; another allocator preloaded).

    Args:
        environ: the environment (`os.environ` when `None`).
        tcmalloc: tcmalloc's library path (`tcmalloc_library()` when `None`).

    Raises:
        AllocatorError: an unknown `KSEG_MALLOC` value, or `tcmalloc` asked
            for and not installed.
    """
    environ = dict(os.environ if environ is None else environ)
    selected = choice(environ)
    if selected == "off" or _preloaded(environ):
        return None
    if selected in ("auto", "tcmalloc"):
        tcmalloc = tcmalloc or tcmalloc_library()
        if tcmalloc is not None:
            preload = environ.get("LD_PRELOAD", "")
            environ["LD_PRELOAD"] = f"{tcmalloc} {preload}".strip()
            for name, value in TCMALLOC_REPORT.items():
                environ.setdefault(name, value)
            return environ
        if selected == "tcmalloc":
            raise AllocatorError(
                f"{ENV}=tcmalloc, but {TCMALLOC_NAME} is not installed: install "
                f"it (apt-get install {TCMALLOC_PACKAGE}) or set {ENV}=glibc"
            )
    if all(name in environ for name in ENVIRONMENT):
        return None
    for name, value in ENVIRONMENT.items():
        environ.setdefault(name, value)
    return environ


def restart_with_allocator(arguments=None):
    """Replaces this process by the same program running with kseg's
    allocator (`tuned_environment`), once: in the restarted process, or with
    `KSEG_MALLOC=off`, it returns at once. Call it first thing (the
    allocator acts from a process's first allocation).

    Args:
        arguments: the interpreter's arguments (`python *arguments`), or
            `None` for the command line this process started with
            (`sys.orig_argv`): a console script restarts as that script, so
            its `sys.path` stays the script's and never gains the current
            directory (as `python -m` would give it, running a dataset
            folder's `argparse.py` or `numpy.py`).

    Example (a benchmark script restarting itself):
    >>> restart_with_allocator()  # doctest: +SKIP

    Raises:
        AllocatorError: see `tuned_environment`.
    """
    if arguments is None:
        arguments = sys.orig_argv[1:]
    environ = tuned_environment()
    if environ is None or not sys.executable or not arguments:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *arguments], environ)


def active_allocator(environ=None):
    """Which allocator this process started with, in words (for reports)."""
    environ = os.environ if environ is None else environ
    preload = environ.get("LD_PRELOAD", "")
    for name in ("tcmalloc", "jemalloc", "mimalloc"):
        if name in preload:
            return name
    if all(name in environ for name in ENVIRONMENT):
        return "glibc with kseg's MALLOC_* settings"
    return "glibc malloc"


def tune_cpu_allocator():
    """Applies kseg's malloc settings to this process with glibc's `mallopt`.

    Call it once, early (before building a model), in a training script that
    does not go through the `kseg` command:

    >>> import kseg
    >>> kseg.tune_cpu_allocator()  # doctest: +SKIP
    True

    Returns:
        `True` when glibc accepted every setting, `False` on a C library
        without `mallopt` (musl, macOS, Windows), where nothing changes.
    """
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    settings = (
        (_M_MMAP_THRESHOLD, MMAP_THRESHOLD),
        (_M_TRIM_THRESHOLD, min(TRIM_THRESHOLD, 2**31 - 1)),
        (_M_TOP_PAD, TOP_PAD),
    )
    return all(mallopt(option, value) == 1 for option, value in settings)
