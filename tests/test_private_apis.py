"""Every private Keras / TensorFlow entry point kseg uses, exercised the way
kseg uses it, so that an upgrade that moves or changes one fails here with a
message naming it (and the file that needs it).

Each entry point is commented where kseg reaches for it, with the public API
that is missing.
"""

import contextlib
import inspect

import keras
import numpy as np
import pytest

from kseg.testing import numpy_bilinear_resize

tf = pytest.importorskip("tensorflow")

pytestmark = pytest.mark.skipif(
    keras.backend.backend() != "tensorflow",
    reason="the private entry points are those of the TensorFlow backend",
)


@contextlib.contextmanager
def private_api(name, user):
    """Turns any failure inside into one that names the entry point."""
    try:
        yield
    except Exception as error:
        pytest.fail(
            f"the private entry point {name} (used by {user}) no longer works "
            f"as kseg expects on Keras {keras.version()} / TensorFlow "
            f"{tf.__version__}: {type(error).__name__}: {error}"
        )


def test_keras_backend_image_resize_takes_a_traced_size():
    with private_api("keras.src.backend.image.resize", "kseg/layers/common.py"):
        from keras.src import backend as keras_backend

        @tf.function(input_signature=[tf.TensorSpec((1, None, None, 1))])
        def upsample(x):
            size = tf.shape(x)[1:3] * 2
            return keras_backend.image.resize(
                x,
                (size[0], size[1]),
                interpolation="bilinear",
                antialias=False,
                data_format="channels_last",
            )

        x = np.arange(6, dtype="float32").reshape(1, 2, 3, 1)
        np.testing.assert_allclose(
            upsample(x), numpy_bilinear_resize(x, (4, 6)), atol=1e-6
        )


def test_tensorflow_xla_context_query():
    name = (
        "tensorflow.python.framework.ops.get_default_graph + "
        "tensorflow.python.ops.control_flow_util.GraphOrParentsInXlaContext"
    )
    with private_api(name, "kseg/layers/guided_filter.py"):
        from tensorflow.python.framework import ops as tf_ops
        from tensorflow.python.ops import control_flow_util

        from kseg.layers.guided_filter import _matmul_scans

        def in_xla():
            return control_flow_util.GraphOrParentsInXlaContext(
                tf_ops.get_default_graph()
            )

        seen = {}

        def record(key):
            seen[key] = (in_xla(), _matmul_scans())
            return tf.constant(0.0)

        record("eager")
        tf.function(lambda: record("graph"))()
        tf.function(lambda: record("xla"), jit_compile=True)()
        assert seen == {
            "eager": (False, True),
            "graph": (False, True),
            "xla": (True, False),
        }, seen


def _frozen_tflite_converter():
    """A TFLite converter of a one-conv model, built as kseg's
    `convert_function` builds it."""
    from tensorflow.python.framework.convert_to_constants import (
        convert_variables_to_constants_v2,
    )

    conv = keras.layers.Conv2D(2, 3, padding="same", name="conv")
    conv.build((1, 8, 8, 1))
    function = tf.function(
        lambda images: conv(images),
        input_signature=[tf.TensorSpec((1, 8, 8, 1), name="images")],
        autograph=False,
    )
    concrete = function.get_concrete_function()
    frozen = convert_variables_to_constants_v2(concrete)
    assert not frozen.graph.variables
    converter = tf.lite.TFLiteConverter.from_concrete_functions([frozen])
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    images = np.random.default_rng(0).normal(size=(4, 1, 8, 8, 1))
    converter.representative_dataset = lambda: (
        [image.astype("float32")] for image in images
    )
    return converter


def test_convert_variables_to_constants_v2():
    name = (
        "tensorflow.python.framework.convert_to_constants."
        "convert_variables_to_constants_v2"
    )
    with private_api(name, "kseg/export/tflite.py"):
        _frozen_tflite_converter()


def test_tflite_calibrate_only_then_mlir_quantize_with_a_denylist():
    name = (
        "TFLiteConverter._experimental_calibrate_only + "
        "tensorflow.lite.python.convert.mlir_quantize(denylisted_nodes=...)"
    )
    with private_api(name, "kseg/export/tflite.py"):
        from tensorflow.lite.python.convert import mlir_quantize

        converter = _frozen_tflite_converter()
        converter._experimental_calibrate_only = True
        calibrated = converter.convert()
        quantized = mlir_quantize(calibrated, denylisted_nodes=[])
        assert isinstance(quantized, bytes) and len(quantized) > 0
        interpreter = tf.lite.Interpreter(model_content=quantized)
        interpreter.allocate_tensors()
        dtypes = {detail["dtype"] for detail in interpreter.get_tensor_details()}
        assert np.int8 in dtypes, dtypes


def test_keras_testing_test_case():
    with private_api("keras.src.testing.TestCase", "kseg/testing.py"):
        from keras.src import testing

        from kseg.testing import TestCase

        assert issubclass(TestCase, testing.TestCase)
        parameters = inspect.signature(testing.TestCase.run_layer_test).parameters
        for argument in (
            "layer_cls",
            "init_kwargs",
            "input_shape",
            "input_data",
            "expected_output_shape",
            "expected_num_trainable_weights",
            "run_training_check",
        ):
            assert argument in parameters, argument


def test_layer_flatten_layers_reaches_sublayers_built_in_build():
    with private_api(
        "keras.Layer._flatten_layers",
        "kseg/training/strategy.py, kseg/export/tflite.py",
    ):
        from kseg.layers import ConvBNReLU

        inputs = keras.Input((8, 8, 3))
        model = keras.Model(inputs, ConvBNReLU(4, 3, name="block")(inputs))
        names = [
            layer.name
            for layer in model._flatten_layers(include_self=False, recursive=True)
        ]
        assert "bn" in names and "block" in names, names
        assert model in list(model._flatten_layers())


def test_multi_worker_strategy_mode_query():
    name = "tf.distribute.MultiWorkerMirroredStrategy().extended._in_multi_worker_mode"
    with private_api(name, "kseg/training/strategy.py"):
        module = inspect.getmodule(tf.distribute.MultiWorkerMirroredStrategy)
        assert callable(module.CollectiveAllReduceExtended._in_multi_worker_mode)
        mirrored = tf.distribute.MirroredStrategy(["/cpu:0"])
        assert mirrored.extended._in_multi_worker_mode() is False


def test_keras_tensorflow_trainer_internals_patched_for_multi_worker_fit():
    from kseg.training import strategy

    version = tuple(int(part) for part in keras.version().split(".")[:2])
    if version >= strategy._MULTI_WORKER_FIT_BROKEN_BEFORE:
        pytest.skip(
            "multi_worker_fit patches nothing on this Keras: check the bound "
            "with the two-worker test and drop the patch"
        )
    name = (
        "keras.src.backend.tensorflow.trainer.reduce_per_replica, "
        "TensorFlowTrainer._maybe_symbolic_build, Trainer._symbolic_build, "
        "Trainer._distribute_strategy"
    )
    with private_api(name, "kseg/training/strategy.py"):
        from keras.src.backend.tensorflow import trainer as tf_trainer

        assert list(inspect.signature(tf_trainer.reduce_per_replica).parameters) == [
            "values",
            "strategy",
            "reduction",
        ]
        build = tf_trainer.TensorFlowTrainer._maybe_symbolic_build
        assert list(inspect.signature(build).parameters) == [
            "self",
            "iterator",
            "data_batch",
        ]
        default = tf.distribute.get_strategy()
        reduced = tf_trainer.reduce_per_replica(
            {"loss": tf.constant(2.0)}, default, "auto"
        )
        assert float(reduced["loss"]) == 2.0

        inputs = keras.Input((3,))
        model = keras.Model(inputs, keras.layers.Dense(2)(inputs))
        model.compile(loss="mse", metrics=["mae"])
        assert model._distribute_strategy is None
        batch = (np.zeros((2, 3), "float32"), np.zeros((2, 2), "float32"))
        model._symbolic_build(data_batch=batch)
        assert model.optimizer.built and model.optimizer.variables
