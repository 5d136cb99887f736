"""The effect of kseg's allocator settings (`kseg.allocator`) on training.

Runs `kseg train` (the quickstart recipe, a fixed number of steps, same seed)
in subprocesses, alternating allocator settings round by round so that both
see the same machine load, and prints per setting: ms per training step
(epoch time / steps, from the run's `epochs.jsonl`, trace included), the
user and system CPU seconds of the whole command, the system share of CPU
time and the peak RSS.

    python benchmarks/allocator.py --steps 120 --rounds 2
    python benchmarks/allocator.py --set train.jit_compile=true

Settings compared: glibc's defaults (`KSEG_MALLOC=off`), kseg's `MALLOC_*`
variables (the default of every `kseg` command), and, when Debian's
libtcmalloc-minimal4 / libjemalloc2 are installed, those allocators through
`LD_PRELOAD` (with kseg's variables off).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PRELOADS = {
    "tcmalloc": "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4",
    "jemalloc": "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2",
}


def _settings():
    settings = {"glibc defaults": {"KSEG_MALLOC": "off"}, "kseg MALLOC_*": {}}
    for name, path in PRELOADS.items():
        if Path(path).exists():
            settings[name] = {"KSEG_MALLOC": "off", "LD_PRELOAD": path}
    return settings


def _run(env_changes, steps, overrides, workdir):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", **env_changes}
    for name in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_"):
        env.pop(name, None)
    run_dir = Path(tempfile.mkdtemp(dir=workdir)) / "run"
    command = [
        sys.executable, "-m", "kseg.cli", "train", "--run-dir", str(run_dir),
        "--quiet", "--set", "train.epochs=1", "--set", f"train.steps_per_epoch={steps}",
        "--set", "train.log_images=0", "--set", "data.num_val_images=20",
        *[item for override in overrides for item in ("--set", override)],
    ]  # fmt: skip
    started = time.perf_counter()
    with tempfile.TemporaryFile() as errors:
        process = subprocess.Popen(
            command, env=env, stdout=subprocess.DEVNULL, stderr=errors
        )
        # wait4: this child's own CPU times and peak RSS.
        _, status, usage = os.wait4(process.pid, 0)
        wall = time.perf_counter() - started
        if status != 0:
            errors.seek(0)
            raise RuntimeError(errors.read().decode()[-2000:])
    epoch = json.loads((run_dir / "epochs.jsonl").read_text().splitlines()[0])
    return {
        "ms_per_step": 1000 * epoch["seconds"] / steps,
        "user": usage.ru_utime,
        "sys": usage.ru_stime,
        "wall": wall,
        "maxrss_mib": usage.ru_maxrss / 1024,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--only", help="measure one setting")
    args = parser.parse_args()
    settings = _settings()
    if args.only:
        settings = {args.only: settings[args.only]}
    results = {name: [] for name in settings}
    with tempfile.TemporaryDirectory() as workdir:
        for _ in range(args.rounds):
            for name, env in settings.items():
                results[name].append(_run(env, args.steps, args.overrides, workdir))
    load = os.getloadavg()[0]
    print(f"quickstart, {args.steps} steps, {args.rounds} round(s), load {load:.1f}")
    print(
        f"{'setting':<16} {'ms/step':>8} {'user s':>7} {'sys s':>6} {'sys %':>6} "
        f"{'wall s':>7} {'peak RSS MiB':>13}"
    )
    for name, runs in results.items():
        median = {key: statistics.median(r[key] for r in runs) for key in runs[0]}
        share = 100 * median["sys"] / (median["user"] + median["sys"])
        print(
            f"{name:<16} {median['ms_per_step']:>8.0f} {median['user']:>7.1f} "
            f"{median['sys']:>6.1f} {share:>5.1f}% {median['wall']:>7.1f} "
            f"{max(r['maxrss_mib'] for r in runs):>13.0f}"
        )


if __name__ == "__main__":
    main()
