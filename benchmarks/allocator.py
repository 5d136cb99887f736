"""The effect of the allocator (`kseg.allocator`) on training.

Runs `kseg train` (the quickstart recipe by default, same seed) in
subprocesses, alternating allocators round by round so that all see the same
machine load, and prints per allocator the first epoch's and the later
epochs' ms per step, the user and system CPU seconds of the whole command,
the system share of CPU time and the peak RSS (`train_settings.compare`).

    python benchmarks/allocator.py --steps 60 --epochs 2 --rounds 2
    python benchmarks/allocator.py --recipe panet_quickstart --steps 30 --epochs 2

Allocators compared: glibc's defaults (`KSEG_MALLOC=off`), kseg's glibc
`MALLOC_*` settings (`KSEG_MALLOC=glibc`), tcmalloc preloaded by kseg
(`KSEG_MALLOC=tcmalloc`, the default when Debian's libtcmalloc-minimal4 is
installed) and, when libjemalloc2 is installed, jemalloc through
`LD_PRELOAD` (with kseg's choice off).
"""

from pathlib import Path

from train_settings import compare

from kseg.allocator import tcmalloc_library

JEMALLOC = "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"


def allocator_settings():
    settings = {
        "glibc defaults": ({"KSEG_MALLOC": "off"}, []),
        "glibc MALLOC_*": ({"KSEG_MALLOC": "glibc"}, []),
    }
    if tcmalloc_library() is not None:
        settings["tcmalloc"] = ({"KSEG_MALLOC": "tcmalloc"}, [])
    if Path(JEMALLOC).exists():
        settings["jemalloc"] = ({"KSEG_MALLOC": "off", "LD_PRELOAD": JEMALLOC}, [])
    return settings


if __name__ == "__main__":
    compare(allocator_settings(), __doc__.split("\n\n")[0])
