"""Benchmark: the training input pipeline against the training step it feeds.

Measures, in one run and on the same machine, the images per second of

- the recipe's `tf.data` training pipeline alone (`kseg.training.trainer.
  train_pipeline`: shuffle, augmentation — scale, crop, flip — and
  batching), iterated without a model, and
- the recipe's training step alone (`model.fit` on one fixed batch repeated,
  so no input work is left in it).

The pipeline keeps the accelerator (here the CPU) fed when its rate is well
above the step rate; the target is 3× or more. Each rate is the median of
`--repeats` timed runs of `--batches` batches after one warm-up run.

    python benchmarks/input_pipeline.py [--recipe quickstart] [--set KEY=VALUE ...]
        [--batches 40] [--repeats 3]
"""

import argparse
import os
import time

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from kseg.cli import add_set_option  # noqa: E402
from kseg.training.recipe import apply_overrides, load_recipe  # noqa: E402
from kseg.training.semantic import (  # noqa: E402
    compile_model,
    dataset_info,
    output_names,
    read_split,
    train_pipeline,
)
from kseg.training.strategy import build_strategy  # noqa: E402
from kseg.training.task import build_model  # noqa: E402


def _median_rate(run, images_per_run, repeats):
    run()
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        rates.append(images_per_run / (time.perf_counter() - start))
    return float(np.median(rates))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="quickstart", help="recipe name or file")
    add_set_option(parser)
    parser.add_argument("--data", help="dataset directory (as `kseg train --data`)")
    parser.add_argument("--batches", type=int, default=40, help="batches per run")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs")
    args = parser.parse_args()

    recipe = apply_overrides(load_recipe(args.recipe), args.overrides)
    batch_size = recipe.train.batch_size
    strategy = build_strategy(recipe.train.strategy)
    info = dataset_info(recipe.data)
    pairs, _ = read_split(
        recipe.data, recipe.data.train_split, args.data, recipe.train.seed
    )
    with strategy.scope():
        model = build_model(recipe, info.num_classes)
        compile_model(model, recipe, info.num_classes, total_steps=10**6)
    pipeline = train_pipeline(
        pairs, recipe.data, batch_size, output_names(model), recipe.train.seed
    )
    batches = iter(pipeline)

    def iterate_pipeline():
        for _ in range(args.batches):
            next(batches)

    pipeline_rate = _median_rate(
        iterate_pipeline, args.batches * batch_size, args.repeats
    )

    fixed = tf.data.Dataset.from_tensors(next(batches)).repeat()

    def train_steps():
        model.fit(
            fixed, steps_per_epoch=args.batches, epochs=1, verbose=0, shuffle=False
        )

    step_rate = _median_rate(train_steps, args.batches * batch_size, args.repeats)

    crop = "x".join(map(str, recipe.data.crop_size))
    rows = [
        ("input pipeline (augment + batch)", pipeline_rate),
        (f"training step ({recipe.model.name}, fit)", step_rate),
    ]
    width = max(len(name) for name, _ in rows)
    print(
        f"recipe {recipe.name}: batch {batch_size}, crop {crop}, "
        f"{os.cpu_count()} CPU(s), {strategy.num_replicas_in_sync} replica(s)"
    )
    print(f"{'stage':<{width}}  {'images/s':>9}  {'ms/batch':>9}")
    print(f"{'-' * width}  {'-' * 9}  {'-' * 9}")
    for name, rate in rows:
        print(f"{name:<{width}}  {rate:>9.1f}  {1e3 * batch_size / rate:>9.1f}")
    ratio = pipeline_rate / step_rate
    verdict = "meets" if ratio >= 3.0 else "misses"
    print(f"pipeline / step = {ratio:.1f}x ({verdict} the 3x target)")


if __name__ == "__main__":
    main()
