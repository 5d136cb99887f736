"""Exporting and running exported files print only what kseg says: no
quantizer settings, no LiteRT delegate line, no TensorFlow v1 deprecation
warnings from tf2onnx (issue 20)."""

import os
import subprocess
import sys

# TensorFlow and LiteRT print each of these lines once per process (the
# deprecation warnings once per call site), so a fresh process shows them.
SCRIPT = """
import sys
import kseg
import numpy as np
import tensorflow as tf
from kseg.export import TFLiteSegmenter, convert_function

@tf.function(input_signature=[tf.TensorSpec((1, 8, 8, 3), tf.uint8, name="images")])
def segment(images):
    weights = tf.constant(np.linspace(-1, 1, 6, dtype=np.float32).reshape(1, 1, 3, 2))
    logits = tf.nn.conv2d(tf.cast(images, tf.float32), weights, 1, "SAME")
    return {"class_map": tf.argmax(logits, axis=-1, output_type=tf.int32)}

rng = np.random.default_rng(0)
calibration = [[rng.integers(0, 256, (1, 8, 8, 3), dtype=np.uint8)] for _ in range(4)]
flatbuffer = convert_function(segment, "int8", calibration)
print("converted", flush=True)
runner = TFLiteSegmenter(flatbuffer)
runner(np.zeros((1, 8, 8, 3), np.uint8))
print("ran", flush=True)
if sys.argv[1] == "onnx":
    from kseg.export.onnx import convert_function_to_onnx

    convert_function_to_onnx(segment)
    print("onnx", flush=True)
"""


def _environment():
    return {
        key: value for key, value in os.environ.items() if key != "TF_CPP_MIN_LOG_LEVEL"
    }


def _run(*steps):
    return subprocess.run(
        [sys.executable, "-c", SCRIPT, *steps],
        capture_output=True,
        text=True,
        env=_environment(),
        timeout=300,
    )


def test_int8_conversion_tflite_inference_and_onnx_print_nothing():
    # Before: "fully_quantize: 0, inference_type: 6, ...", "INFO: Created
    # TensorFlow Lite XNNPACK delegate for CPU." and, for ONNX, 12-16 lines
    # of "convert_variables_to_constants ... is deprecated".
    try:
        import tf2onnx  # noqa: F401

        steps = ["onnx"]
    except ImportError:
        steps = ["tflite"]
    result = _run(*steps)
    assert result.returncode == 0, result.stderr[-3000:]
    expected = "converted\nran\n" + ("onnx\n" if steps == ["onnx"] else "")
    assert result.stdout == expected
    assert result.stderr == ""


def test_quieted_native_output_comes_back_when_the_block_fails():
    code = (
        "import os\n"
        "from kseg.console import native_output_quieted\n"
        "with native_output_quieted():\n"
        "    os.write(2, b'a line from C++ code\\n')\n"
        "try:\n"
        "    with native_output_quieted():\n"
        "        os.write(2, b'why it failed\\n')\n"
        "        raise RuntimeError('conversion failed')\n"
        "except RuntimeError:\n"
        "    pass\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=_environment(),
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == "why it failed\n"
