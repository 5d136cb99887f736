"""Every kseg model exports: the serving graph traces with dynamic height and
width and matches Keras, and the model converts to TFLite builtins.

PAN is covered in depth by test_saved_model.py / test_tflite.py and FCN's
SavedModel by test_commands.py (`kseg export`).
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

from kseg.export import (
    CLASS_MAP,
    PROBABILITIES,
    TFLiteSegmenter,
    convert_to_tflite,
    operator_names,
)
from kseg.export.saved_model import predict_images

MODELS = ("exfuse", "fcn", "gcn", "segmodel")
# int8 also for the model with both CRFs (its guidance CRF stays float32
# inside the int8 file); PAN's int8 is tested in depth in test_tflite.py.
INT8_MODELS = ("segmodel",)


@pytest.mark.parametrize("name", MODELS)
def test_model_exports(
    name, build_tiny_backbone, build_tiny_semantic_model, synthetic_train, synthetic_val
):
    keras.utils.set_random_seed(5)
    model = build_tiny_semantic_model[name](build_tiny_backbone)

    serve = tf.function(
        lambda images: predict_images(model, images),
        input_signature=[tf.TensorSpec([None, None, None, 3], tf.uint8)],
    )
    images = np.random.default_rng(0).integers(0, 256, (2, 40, 56, 3), np.uint8)
    outputs = serve(tf.constant(images))
    logits = model(images.astype(np.float32), training=False)["logits"]
    np.testing.assert_allclose(
        outputs[PROBABILITIES], keras.ops.softmax(logits), atol=1e-4
    )
    assert outputs[CLASS_MAP].shape == (2, 40, 56)

    expected = keras.ops.convert_to_numpy(
        model(synthetic_val.images.astype(np.float32), training=False)["logits"]
    ).argmax(-1)
    quantizations = ("float32", "int8") if name in INT8_MODELS else ("float32",)
    for quantization in quantizations:
        flatbuffer = convert_to_tflite(
            model, (64, 64), quantization, synthetic_train.images
        )
        assert not [n for n in operator_names(flatbuffer) if n.startswith("CUSTOM")]
        class_map = TFLiteSegmenter(flatbuffer)(synthetic_val.images)[CLASS_MAP]
        agreement = np.mean(class_map == expected)
        assert agreement >= (0.995 if quantization == "float32" else 0.5), agreement
