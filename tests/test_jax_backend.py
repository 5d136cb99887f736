"""The layer tests again on the JAX backend: proves kseg.layers is keras.ops-only.

The default run repeats the numeric-reference and bad-input tests of every layer
(the tests that pin down what a layer computes); the slow stage repeats them all,
`run_layer_test` included, whose op-by-op JAX compilation costs minutes.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).parent
NUMERIC_TESTS = (
    "matches or reference or numpy or formula or brute or hand or shift"
    " or ordering or corner or identity or rejects or gradient"
)

pytest.importorskip("jax")


def _run_layer_tests_on_jax(*pytest_args):
    env = {
        **os.environ,
        "KERAS_BACKEND": "jax",
        "JAX_PLATFORMS": "cpu",
        "TF_CPP_MIN_LOG_LEVEL": "3",
    }
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", str(TESTS / "layers"), *pytest_args],
        env=env,
        capture_output=True,
        text=True,
        timeout=2400,
    )
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    assert " passed" in result.stdout
    return result.stdout


def test_layer_numeric_tests_pass_on_jax_backend():
    _run_layer_tests_on_jax("-k", NUMERIC_TESTS)


@pytest.mark.slow
def test_all_layer_tests_pass_on_jax_backend():
    _run_layer_tests_on_jax("-m", "not slow or slow")


def test_layers_do_not_import_tensorflow():
    code = "import sys, kseg.layers; sys.exit(1 if 'tensorflow' in sys.modules else 0)"
    env = {**os.environ, "KERAS_BACKEND": "jax", "JAX_PLATFORMS": "cpu"}
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, "kseg.layers imported tensorflow " + result.stderr
