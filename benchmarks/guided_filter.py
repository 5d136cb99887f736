"""Benchmark: kseg's XLA-compiled `guided_filter` against OpenCV on CPU.

A 512×512 RGB guide (0–255) and a 21-channel float32 input (class
probabilities), radius 2, 8 and 32, ε = 1. kseg runs under
`tf.function(jit_compile=True)` (TensorFlow backend). OpenCV builds one
`cv2.ximgproc.GuidedFilter` per call and filters all 21 channels in that one
call: the guide statistics are shared by all channels, as in kseg, and this is
faster than one `cv2.ximgproc.guidedFilter` call per 4-channel chunk. Both
use every CPU core.

The calls alternate — kseg forward, OpenCV, kseg forward + backward (the
gradient of `sum(q · t)` with respect to the input, as in training) — so that
a load from other processes falls on all three alike; each time is the median
of `--runs` rounds after a warm-up round. "cpu" is the process CPU time (all
threads), steadier than wall time on a shared machine. The load average is
printed before and after: ratios measured under load are not idle figures.

Both run with kseg's allocator (`--allocator kseg`, the default: tcmalloc
when installed); it halves both times here. Measured on the 2-core machine
(load 0.6-1.0, 5 rounds), CPU-time ratio kseg / OpenCV, forward and
forward + backward, at r = 2 / 8 / 32: with tcmalloc 1.21 / 1.17 / 1.14 and
1.58 / 1.51 / 1.45 (kseg 243-254 ms CPU, 166-182 ms wall); with glibc
malloc 1.64 / 1.41 / 1.44 and 1.91 / 1.74 / 1.52.

    python benchmarks/guided_filter.py [--runs 7] [--size 512] [--channels 21]
        [--allocator kseg|process]
"""

import argparse
import os
import sys
import time

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from kseg.allocator import active_allocator, restart_with_allocator  # noqa: E402
from kseg.layers.guided_filter import guided_filter  # noqa: E402

RADII = (2, 8, 32)
EPSILON = 1.0


def _timed(fn):
    start_wall, start_cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - start_wall, time.process_time() - start_cpu


def _alternating_ms(fns, runs):
    """Median wall and CPU milliseconds of each of `fns`, called in turn
    `runs` times after one warm-up round."""
    for fn in fns:
        fn()
    times = [[] for _ in fns]
    for _ in range(runs):
        for fn, out in zip(fns, times, strict=True):
            out.append(_timed(fn))
    return [tuple(1e3 * np.median(np.array(t), axis=0)) for t in times]


def _opencv(guide, inputs, radius):
    return cv2.ximgproc.createGuidedFilter(guide, radius, EPSILON).filter(inputs)


def _load():
    return "load average " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--channels", type=int, default=21)
    parser.add_argument(
        "--allocator",
        default="kseg",
        choices=("kseg", "process"),
        help="kseg: restart with kseg's allocator (tcmalloc when installed, as "
        "every kseg command; OpenCV runs in the same process); process: "
        "this Python's own malloc",
    )
    args = parser.parse_args()
    if args.allocator == "kseg":
        restart_with_allocator(sys.argv)

    rng = np.random.default_rng(0)
    guide = rng.uniform(0, 255, (args.size, args.size, 3)).astype("float32")
    logits = rng.normal(size=(args.size, args.size, args.channels))
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    probs = probs.astype("float32")
    target = rng.normal(size=probs.shape).astype("float32")
    guide_t, probs_t = tf.constant(guide[None]), tf.constant(probs[None])
    target_t = tf.constant(target[None])

    load_before = _load()
    rows = []
    for radius in RADII:
        forward = tf.function(
            lambda g, p, r=radius: guided_filter(g, p, r, EPSILON), jit_compile=True
        )

        @tf.function(jit_compile=True)
        def backward(g, p, r=radius):
            with tf.GradientTape() as tape:
                tape.watch(p)
                loss = tf.reduce_sum(guided_filter(g, p, r, EPSILON) * target_t)
            return tape.gradient(loss, p)

        ours = forward(guide_t, probs_t).numpy()[0]
        # OpenCV reflects at the border, which reaches 2r pixels into q.
        m = 2 * radius
        diff = np.abs(ours - _opencv(guide, probs, radius))[m:-m, m:-m].max()
        times = _alternating_ms(
            [
                lambda f=forward: f(guide_t, probs_t).numpy(),
                lambda r=radius: _opencv(guide, probs, r),
                lambda b=backward: b(guide_t, probs_t).numpy(),
            ],
            args.runs,
        )
        rows.append((radius, *times, diff))

    print(
        f"guided filter: {args.size}x{args.size} RGB guide, {args.channels} "
        f"float32 channels, eps={EPSILON}, median of {args.runs} alternating "
        f"rounds, {os.cpu_count()} CPUs, OpenCV {cv2.__version__}, "
        f"TF {tf.__version__}"
    )
    print(f"before: {load_before}; after: {_load()}; allocator: {active_allocator()}")
    print(
        f"{'radius':>6} | {'kseg ms':>8} {'OpenCV ms':>10} {'ratio':>6} "
        f"{'fwd+bwd ms':>10} {'ratio':>6} | {'kseg cpu':>9} {'OpenCV cpu':>11} "
        f"{'ratio':>6} {'fwd+bwd cpu':>11} {'ratio':>6} | {'max |diff|':>10}"
    )
    for radius, (kw, kc), (ow, oc), (bw, bc), diff in rows:
        print(
            f"{radius:>6} | {kw:>8.1f} {ow:>10.1f} {kw / ow:>6.2f} "
            f"{bw:>10.1f} {bw / ow:>6.2f} | {kc:>9.1f} {oc:>11.1f} "
            f"{kc / oc:>6.2f} {bc:>11.1f} {bc / oc:>6.2f} | {diff:>10.2e}"
        )


if __name__ == "__main__":
    main()
