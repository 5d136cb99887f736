"""A program that calls `train()` and catches the error of a bad sample ends:
the failed fit's tf.data iterators are destroyed before `train()` raises,
not at the interpreter's shutdown (where their destructor waited for
`py_function` decodes that never ran: the program hung after printing the
error in about half the runs)."""

import os
import re
import subprocess
import sys
import textwrap
import time

import pytest

from kseg import testing

# The program: it prints the error and which tf.data iterators are still
# alive. The collector is off, so nothing but `train()` itself frees the
# failed fit's iterators before the program exits.
PROGRAM = textwrap.dedent(
    """
    import gc
    import sys

    gc.disable()
    import tensorflow as tf
    from tensorflow.python.data.ops import multi_device_iterator_ops

    from kseg.training.recipe import apply_overrides, load_recipe
    from kseg.training.trainer import train

    recipe = apply_overrides(load_recipe("quickstart"), sys.argv[2:])
    try:
        train(recipe, run_dir=sys.argv[1], verbose=0)
    except ValueError as error:
        print("error:", error, flush=True)
    kinds = (
        tf.data.Iterator,
        tf.distribute.DistributedIterator,
        multi_device_iterator_ops.OwnedMultiDeviceIterator,
    )
    alive = [type(o).__name__ for o in gc.get_objects() if isinstance(o, kinds)]
    print("alive:", alive, flush=True)
    """
)
OVERRIDES = [
    "model.kwargs.filters=8",
    "backbone.kwargs.widths=[4, 4, 4, 4]",
    "backbone.kwargs.stem_width=4",
    "data.image_size=32",
    "data.crop_size=[32, 32]",
    "data.scale_range=[1.0, 1.0]",
    "data.dataset=folder",
    "data.num_classes=6",
    "train.batch_size=4",
    "train.epochs=1",
    "train.steps_per_epoch=2",
    "train.log_images=0",
    "eval.batch_size=4",
]
# Far above a tiny run's time on a loaded 2-core machine.
RUN_TIMEOUT = 240
# A process that has printed everything ends within seconds; the hung ones
# never did.
EXIT_TIMEOUT = 30


def _run_until_the_program_ends(tmp_path, index):
    """One run of PROGRAM; returns its output and whether it ended within
    EXIT_TIMEOUT of printing its last line."""
    program = tmp_path / "program.py"
    program.write_text(PROGRAM)
    data = tmp_path / "data"
    command = [sys.executable, str(program), str(tmp_path / f"run{index}")]
    command += [*OVERRIDES, f"data.root={data}"]
    environment = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=environment,
    )
    lines = []
    try:
        deadline = time.monotonic() + RUN_TIMEOUT
        # Read up to the last line the program prints (or its end).
        for line in process.stdout:
            lines.append(line)
            if line.startswith("alive:") or time.monotonic() > deadline:
                break
        try:
            process.wait(timeout=EXIT_TIMEOUT)
            ended = True
        except subprocess.TimeoutExpired:
            ended = False
    finally:
        process.kill()
        process.wait()
    return "".join(lines), ended


def _train_on_a_corrupt_image(tmp_path, runs):
    testing.folder_dataset_with_a_corrupt_image(tmp_path / "data")
    hung = []
    for index in range(runs):
        output, ended = _run_until_the_program_ends(tmp_path, index)
        errors = [line for line in output.splitlines() if line.startswith("error:")]
        assert len(errors) == 1, output[-3000:]
        assert re.fullmatch(
            r"error: .*train/images/train1\.png: not a decodable image \(.*\); "
            r"replace or remove the file, or set data\.skip_corrupt=true to skip "
            r"bad samples",
            errors[0],
        ), errors[0]
        # Before: the distributed, multi-device and tf.data iterators of
        # the failed fit, left to the collector at shutdown.
        assert output.splitlines()[-1] == "alive: []", output[-3000:]
        if not ended:
            hung.append(index)
    return hung


def test_a_program_that_catches_a_bad_sample_error_ends(tmp_path):
    assert _train_on_a_corrupt_image(tmp_path, runs=1) == []


@pytest.mark.slow
def test_a_program_that_catches_a_bad_sample_error_ends_20_times(tmp_path):
    assert _train_on_a_corrupt_image(tmp_path, runs=20) == []
