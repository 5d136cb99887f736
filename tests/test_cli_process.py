"""The `kseg` process itself: it ends after an error (every time, with the
message and a non-zero status), a closed stdout does not stop training,
and TensorFlow's start-up lines stay out of programs that import kseg."""

import os
import re
import subprocess
import sys
import time

import pytest

from kseg import testing

TINY = [
    "--set=model.kwargs.filters=8",
    "--set=backbone.kwargs.widths=[4, 4, 4, 4]",
    "--set=backbone.kwargs.stem_width=4",
    "--set=data.image_size=32",
    "--set=data.crop_size=[32, 32]",
    "--set=train.batch_size=4",
    "--set=train.epochs=1",
    "--set=train.steps_per_epoch=2",
    "--set=train.log_images=0",
    "--set=eval.batch_size=4",
]
# Far above a tiny run's time on a loaded 2-core machine (20-60 s); a hung
# process never ends.
RUN_TIMEOUT = 240


def _environment(**extra):
    environment = {
        key: value for key, value in os.environ.items() if key != "TF_CPP_MIN_LOG_LEVEL"
    }
    environment.update(extra)
    return environment


def _folder_with_a_corrupt_training_image(root):
    testing.folder_dataset_with_a_corrupt_image(root)
    return [
        "--set=data.dataset=folder",
        "--set=data.num_classes=6",
        f"--set=data.root={root}",
        "--set=data.scale_range=[1.0, 1.0]",
    ]


def _train_on_a_corrupt_image_until_it_ends(tmp_path, runs):
    """`kseg train` on a dataset with one corrupt training image, `runs`
    times in a row; returns the runs that hung (killed at RUN_TIMEOUT)."""
    data = _folder_with_a_corrupt_training_image(tmp_path / "data")
    hung = []
    for index in range(runs):
        command = [sys.executable, "-m", "kseg.cli", "train", *TINY, *data]
        command += ["--run-dir", str(tmp_path / f"run{index}")]
        try:
            result = subprocess.run(
                command,
                capture_output=True,
                text=True,
                env=_environment(),
                timeout=RUN_TIMEOUT,
            )
        except subprocess.TimeoutExpired:
            hung.append(index)
            continue
        assert result.returncode == 1, result.stderr[-3000:]
        # The error is the last line: nothing after it, nothing lost.
        last = result.stderr.splitlines()[-1]
        assert re.fullmatch(
            r"kseg train: error: .*train/images/train1\.png: not a decodable "
            r"image \(.*\); replace or remove the file, or set "
            r"data\.skip_corrupt=true to skip bad samples",
            last,
        ), result.stderr[-3000:]
    return hung


def test_an_error_in_training_ends_the_process(tmp_path):
    # Before: the error was printed, then the process hung at shutdown in
    # about half the runs (tf.data iterators destroyed holding the GIL).
    assert _train_on_a_corrupt_image_until_it_ends(tmp_path, runs=1) == []


@pytest.mark.slow
def test_an_error_in_training_ends_the_process_20_times_in_a_row(tmp_path):
    assert _train_on_a_corrupt_image_until_it_ends(tmp_path, runs=20) == []


def test_nothing_left_at_shutdown_can_hold_the_kseg_process():
    # The command ends through os._exit once its status and messages are
    # out: an exit handler that never returns (as the tf.data teardown did)
    # is never reached. Checked with a usage error: no TensorFlow, fast.
    code = (
        "import atexit, sys, time\n"
        "from kseg.cli import main\n"
        "atexit.register(time.sleep, 600)\n"
        "sys.argv = ['kseg', 'no-such-command']\n"
        "sys.exit(main())\n"
    )
    start = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=_environment(KSEG_MALLOC="off"),
        timeout=120,
    )
    assert time.monotonic() - start < 60
    assert result.returncode == 2
    assert "invalid choice: 'no-such-command'" in result.stderr


def test_an_unexpected_exception_still_shows_its_traceback(tmp_path):
    code = (
        "import sys\n"
        "import kseg.cli as cli\n"
        "def fail(args):\n"
        "    raise RuntimeError('something kseg does not handle')\n"
        "cli._recipes = fail\n"
        "sys.argv = ['kseg', 'recipes']\n"
        "sys.exit(cli.main())\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=_environment(KSEG_MALLOC="off"),
        timeout=120,
    )
    assert result.returncode == 1
    assert "Traceback (most recent call last)" in result.stderr
    assert result.stderr.endswith("RuntimeError: something kseg does not handle\n"), (
        result.stderr
    )


@pytest.mark.slow  # a real run; test_a_closed_stdout_is_no_error is the fast one
def test_training_goes_on_when_the_reader_of_its_output_stops(tmp_path):
    # `kseg train | head -1`: before, the first line after head exited
    # ended training with "Broken pipe", leaving only recipe.yaml.
    run = tmp_path / "run"
    process = subprocess.Popen(
        [sys.executable, "-m", "kseg.cli", "train", *TINY, "--run-dir", str(run)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=_environment(),
    )
    first = process.stdout.readline()
    process.stdout.close()
    try:
        _, err = process.communicate(timeout=RUN_TIMEOUT)
    finally:
        process.kill()
    assert first.startswith(b"run ")
    assert process.returncode == 0, err.decode()[-3000:]
    for name in ("model.keras", "result.json", "checkpoints/last.keras"):
        assert (run / name).is_file(), name


def test_a_closed_stdout_is_no_error():
    # A listing printed into a pipe closed before it was written: Python's
    # own shutdown flush failed (status 120, "Exception ignored ... Broken
    # pipe") before; now what the pipe cannot take is dropped.
    process = subprocess.Popen(
        [sys.executable, "-m", "kseg.cli", "recipes"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=_environment(KSEG_MALLOC="off"),
    )
    process.stdout.close()
    _, err = process.communicate(timeout=120)
    assert process.returncode == 0, err.decode()
    assert err == b""


def test_importing_kseg_prints_nothing():
    # Before: TensorFlow's start-up lines, twice (cudart_stub, cpu_feature
    # banner; on a machine with a CUDA driver, a cuInit error).
    code = "import kseg.models, kseg.data, keras\nkeras.ops.ones(2)\n"
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=_environment(),
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "" and result.stderr == ""
    # A level the user sets for TensorFlow's INFO lines is respected.
    loud = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=_environment(TF_CPP_MIN_LOG_LEVEL="0"),
        timeout=120,
    )
    assert loud.returncode == 0 and loud.stderr.strip() != ""


CONTROL_CHARACTERS = ("\x1b", "\b", "\r")


def test_progress_bars_print_plain_lines_off_a_terminal(tmp_path, capsys):
    # Before: Keras redrew its bars with backspaces and colour codes on any
    # POSIX system, so `kseg ... > log` filled the log with them.
    from kseg.cli import main

    options = ["--dataset", "synthetic", "--set=data.num_val_images=5"]
    options += ["--set=data.image_size=32", "--split", "val"]
    assert main(["data", "inspect", *options]) == 0
    prefix = tmp_path / "records" / "val"
    assert main(["data", "convert", *options, "--out", str(prefix)]) == 0
    captured = capsys.readouterr()
    for stream in (captured.out, captured.err):
        assert not any(c in stream for c in CONTROL_CHARACTERS), repr(stream)
    assert "\n5/5 - " in "\n" + captured.out
    assert "] 5/5\n" in captured.err


def test_every_progress_bar_is_made_by_progress_bar():
    """`kseg.console.progress_bar` chooses plain lines off a terminal; a
    Keras `Progbar` made elsewhere would not."""
    from pathlib import Path

    import kseg

    package = Path(kseg.__file__).parent
    makers = [
        str(path.relative_to(package))
        for path in package.rglob("*.py")
        if "Progbar(" in path.read_text()
    ]
    assert makers == ["console.py"]
