"""Keeping freed memory in the process: glibc malloc settings for training.

glibc returns large freed blocks to the kernel (blocks over the mmap
threshold are unmapped, the heap top is trimmed), and TensorFlow frees and
allocates its large tensor buffers every step, so each step faults the same
memory in again: on a 2-core machine a third of a small model's training step
went to the kernel. Raising the mmap threshold to 32 MiB, the trim threshold
to 2 GiB and the top pad to 256 MiB keeps those buffers in the process
(measured in `benchmarks/allocator.py`).

- Every `kseg` command applies the settings through glibc's `MALLOC_*`
  environment variables, re-executing itself once at start (the variables
  act from the first allocation; measured faster than `mallopt` after
  start-up). `KSEG_MALLOC=off` turns this off.
- Library users call `kseg.tune_cpu_allocator()` (one line, `mallopt`
  through ctypes) before building their model.
"""

import ctypes
import ctypes.util
import os

# Off switch (any of these values) for the `kseg` commands.
ENV = "KSEG_MALLOC"
OFF = ("0", "off", "false", "no")

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


def enabled(environ=None):
    """Whether the kseg commands tune the allocator (`KSEG_MALLOC` not off)."""
    environ = os.environ if environ is None else environ
    return environ.get(ENV, "on").strip().lower() not in OFF


def tuned_environment(environ=None):
    """`environ` with kseg's `MALLOC_*` settings added (values the user set
    are kept), or `None` when nothing is to change (turned off, or already
    set)."""
    environ = dict(os.environ if environ is None else environ)
    if not enabled(environ) or all(name in environ for name in ENVIRONMENT):
        return None
    for name, value in ENVIRONMENT.items():
        environ.setdefault(name, value)
    return environ


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
