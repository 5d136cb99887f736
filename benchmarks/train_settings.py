"""Which execution settings make a small model's training step fastest on a CPU.

Runs `kseg train` (the quickstart recipe by default, same seed) in
subprocesses for each setting, alternating settings round by round so that
they see the same machine load, and prints per setting: the first epoch's
ms per step (tracing / XLA compilation included), the later epochs' ms per
step (steady state), user and system CPU seconds of the whole command, the
system share and the peak RSS. An epoch's time includes its validation
(50 images, one batch of the quickstart). Every run uses kseg's default
allocator (`kseg.allocator`; allocator variables inherited from the shell are
dropped; `benchmarks/allocator.py` compares allocators).

    python benchmarks/train_settings.py --steps 60 --epochs 3 --rounds 2
    python benchmarks/train_settings.py --recipe panet_quickstart --only xla

Settings:

- `graph`: the recipe as it is (a `tf.function` train step, one step per
  call);
- `xla`: `train.jit_compile=true`;
- `spe=8`: `train.steps_per_execution=8` (eight steps per call into the
  compiled function: fewer Python round trips);
- `xla+spe=8`: both;
- `intra=2,inter=1`: TensorFlow's thread pools sized for two cores
  (`TF_NUM_INTRAOP_THREADS=2`, `TF_NUM_INTEROP_THREADS=1`; by default both
  follow the core count).
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

from kseg.allocator import ENVIRONMENT

SETTINGS = {
    "graph": ({}, []),
    "xla": ({}, ["train.jit_compile=true"]),
    "spe=8": ({}, ["train.steps_per_execution=8"]),
    "xla+spe=8": ({}, ["train.jit_compile=true", "train.steps_per_execution=8"]),
    "intra=2,inter=1": (
        {"TF_NUM_INTRAOP_THREADS": "2", "TF_NUM_INTEROP_THREADS": "1"},
        [],
    ),
}


def run_training(recipe, env_changes, overrides, steps, epochs, workdir):
    """One `kseg train` subprocess; its per-epoch seconds and resource use."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    # Inherited allocator settings would blur the comparison.
    for name in (*ENVIRONMENT, "LD_PRELOAD", "KSEG_MALLOC"):
        env.pop(name, None)
    env.update(env_changes)
    run_dir = Path(tempfile.mkdtemp(dir=workdir)) / "run"
    command = [
        sys.executable, "-m", "kseg.cli", "train", "--recipe", recipe,
        "--run-dir", str(run_dir), "--quiet",
        "--set", f"train.epochs={epochs}", "--set", f"train.steps_per_epoch={steps}",
        "--set", "train.log_images=0", "--set", "data.num_val_images=50",
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
    lines = (run_dir / "epochs.jsonl").read_text().splitlines()
    seconds = [json.loads(line)["seconds"] for line in lines]
    return {
        "first_ms": 1000 * seconds[0] / steps,
        "steady_ms": 1000 * statistics.mean(seconds[1:]) / steps,
        "user": usage.ru_utime,
        "sys": usage.ru_stime,
        "wall": wall,
        "maxrss_mib": usage.ru_maxrss / 1024,
    }


def compare(settings, description):
    """Parses the command line, runs every setting of `settings` (`{name:
    (environment changes, recipe overrides)}`) round by round and prints
    the table."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--recipe", default="quickstart")
    parser.add_argument("--steps", type=int, default=64, help="steps per epoch")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--only", action="append", choices=list(settings))
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[],
        help="recipe override for every setting (repeatable)",
    )  # fmt: skip
    args = parser.parse_args()
    if args.epochs < 2:
        parser.error("--epochs must be at least 2 (the first one includes tracing)")
    names = args.only or list(settings)
    results = {name: [] for name in names}
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as workdir:
        for _ in range(args.rounds):
            for name in names:
                env, overrides = settings[name]
                results[name].append(
                    run_training(
                        args.recipe,
                        env,
                        [*args.overrides, *overrides],
                        args.steps,
                        args.epochs,
                        workdir,
                    )
                )
    print(
        f"{args.recipe}, {args.epochs} epochs x {args.steps} steps, "
        f"{args.rounds} round(s), load {load_before:.1f} -> {os.getloadavg()[0]:.1f}"
    )
    print(
        "| setting | first epoch ms/step | steady ms/step | user s | sys s | sys % "
        "| wall s | peak RSS MiB |\n|---|---|---|---|---|---|---|---|"
    )
    for name, runs in results.items():
        median = {key: statistics.median(r[key] for r in runs) for key in runs[0]}
        share = 100 * median["sys"] / (median["user"] + median["sys"])
        print(
            f"| {name} | {median['first_ms']:.0f} | {median['steady_ms']:.0f} "
            f"| {median['user']:.1f} | {median['sys']:.1f} | {share:.1f} "
            f"| {median['wall']:.1f} | {max(r['maxrss_mib'] for r in runs):.0f} |"
        )


if __name__ == "__main__":
    compare(SETTINGS, __doc__.split("\n\n")[0])
