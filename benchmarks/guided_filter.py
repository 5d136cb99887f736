"""Benchmark: kseg's XLA-compiled `guided_filter` against OpenCV on CPU.

A 512×512 RGB guide (0–255) and a 21-channel float32 input (class
probabilities), radius 2, 8 and 32, ε = 1. kseg runs under
`tf.function(jit_compile=True)` (TensorFlow backend). OpenCV builds one
`cv2.ximgproc.GuidedFilter` per call and filters all 21 channels in that one
call: the guide statistics are shared by all channels, as in kseg, and this is
faster than one `cv2.ximgproc.guidedFilter` call per 4-channel chunk. Both
use every CPU core. Each time is the median of `--runs` calls after a warm-up
call; "cpu" is the process CPU time (all threads), which is steadier than wall
time on a shared machine.

    python benchmarks/guided_filter.py [--runs 7] [--size 512] [--channels 21]
"""

import argparse
import os
import time

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from kseg.layers.guided_filter import guided_filter  # noqa: E402

RADII = (2, 8, 32)
EPSILON = 1.0


def _median_ms(fn, runs):
    """Median wall and CPU milliseconds of `fn()` after one warm-up call."""
    fn()
    wall, cpu = [], []
    for _ in range(runs):
        start_wall, start_cpu = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - start_wall)
        cpu.append(time.process_time() - start_cpu)
    return 1e3 * float(np.median(wall)), 1e3 * float(np.median(cpu))


def _opencv(guide, inputs, radius):
    return cv2.ximgproc.createGuidedFilter(guide, radius, EPSILON).filter(inputs)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--channels", type=int, default=21)
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    guide = rng.uniform(0, 255, (args.size, args.size, 3)).astype("float32")
    logits = rng.normal(size=(args.size, args.size, args.channels))
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    probs = probs.astype("float32")
    guide_t, probs_t = tf.constant(guide[None]), tf.constant(probs[None])

    rows = []
    for radius in RADII:
        compiled = tf.function(
            lambda g, p, r=radius: guided_filter(g, p, r, EPSILON), jit_compile=True
        )
        ours = compiled(guide_t, probs_t).numpy()[0]
        # OpenCV reflects at the border, which reaches 2r pixels into q.
        m = 2 * radius
        diff = np.abs(ours - _opencv(guide, probs, radius))[m:-m, m:-m].max()
        kseg = _median_ms(lambda c=compiled: c(guide_t, probs_t).numpy(), args.runs)
        opencv = _median_ms(lambda r=radius: _opencv(guide, probs, r), args.runs)
        rows.append((radius, kseg, opencv, diff))

    print(
        f"guided filter: {args.size}x{args.size} RGB guide, {args.channels} "
        f"float32 channels, eps={EPSILON}, median of {args.runs} runs, "
        f"{os.cpu_count()} CPUs, OpenCV {cv2.__version__}, TF {tf.__version__}"
    )
    print(
        f"{'radius':>6} | {'kseg ms':>8} {'OpenCV ms':>10} {'ratio':>6} | "
        f"{'kseg cpu':>9} {'OpenCV cpu':>11} {'ratio':>6} | {'max |diff|':>10}"
    )
    for radius, (k_wall, k_cpu), (o_wall, o_cpu), diff in rows:
        print(
            f"{radius:>6} | {k_wall:>8.1f} {o_wall:>10.1f} {k_wall / o_wall:>6.2f} | "
            f"{k_cpu:>9.1f} {o_cpu:>11.1f} {k_cpu / o_cpu:>6.2f} | {diff:>10.2e}"
        )
    (_, first, _, _), (_, last, _, _) = rows[0], rows[-1]
    print(
        f"kseg r{RADII[-1]}/r{RADII[0]}: wall {last[0] / first[0]:.2f}, "
        f"cpu {last[1] / first[1]:.2f}"
    )


if __name__ == "__main__":
    main()
