"""`benchmarks/panet.py` runs: a clear error without torchvision's
environment, and (slow) the kseg rows at 128×128 without it."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "panet.py"


def run(*args):
    env = {k: v for k, v in os.environ.items() if k != "KSEG_TORCH_PYTHON"}
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )


def test_without_torch_python_explains_the_venv():
    result = run("--size", "128")
    assert result.returncode != 0
    assert "--torch-python" in result.stderr
    assert "pip install torch==" in result.stderr


@pytest.mark.slow
def test_kseg_rows_at_128():
    result = run(
        *("--size", "128", "--runs", "1", "--stage-runs", "1", "--warmup", "0"),
        *("--no-torch", "--no-xla", "--no-train"),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith("| kseg")]
    assert len(rows) == 2, result.stdout
    for row in rows:
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        shares = [float(cell.rstrip("%")) for cell in cells[4:8]]
        assert abs(sum(shares) - 100) <= 2, row


@pytest.mark.slow
def test_training_rows_and_stage_split_at_128():
    result = run(
        *("--size", "128", "--runs", "1", "--stage-runs", "1", "--warmup", "0"),
        *("--no-torch", "--no-xla", "--train-runs", "1"),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [
        line
        for line in result.stdout.splitlines()
        if line.startswith("| kseg") and "training step" in line
    ]
    assert len(rows) == 2, result.stdout
    for row in rows:
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        step, split = float(cells[2]), [float(cell) for cell in cells[5:12]]
        # Seven stages, none negative; the backbone's forward and backward
        # always cost something.
        assert min(split) >= 0 and split[0] > 0, row
        assert 0 < step, row
