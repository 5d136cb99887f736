"""PANet as any Keras model: `fit` on NumPy arrays and on `tf.data` (any
batch size, a smaller last batch included), `evaluate` returning the five
losses, `fit(validation_data=...)` logging `val_` losses, `predict` at any
batch size. The same calls on the JAX backend run in a subprocess (slow)."""

import os
import textwrap

import keras
import numpy as np
import pytest

from kseg.backbones import build_resnet
from kseg.data import crop_instance_mask
from kseg.models.panet import LOSS_NAMES, PANet
from kseg.testing import run_on_jax

SIZE = 64


def small_panet():
    backbone = build_resnet((1, 1, 1, 1), (8, 16, 16, 16), input_shape=(SIZE, SIZE, 3))
    model = PANet(
        backbone,
        num_classes=3,
        filters=16,
        fc_units=32,
        max_detections=5,
        max_instances=3,
        rpn_pre_nms_top_k_train=64,
        rpn_post_nms_top_k_train=32,
        rpn_pre_nms_top_k_test=64,
        rpn_post_nms_top_k_test=32,
        rpn_batch_size=32,
        roi_batch_size=16,
        seed=0,
    )
    model.compile(optimizer=keras.optimizers.Adam(1e-3))
    return model


def arrays(count, seed=0):
    """`count` images with one or two rectangles of classes 1..3."""
    rng = np.random.default_rng(seed)
    images = rng.uniform(0, 60, (count, SIZE, SIZE, 3)).astype("float32")
    y = {
        "boxes": np.zeros((count, 3, 4), "float32"),
        "classes": np.zeros((count, 3), "int32"),
        "masks": np.zeros((count, 3, 56, 56), "uint8"),
    }
    for i in range(count):
        for m in range(1 + i % 2):
            top, left = rng.integers(0, SIZE - 24, 2)
            h, w = rng.integers(10, 24, 2)
            full = np.zeros((SIZE, SIZE), "uint8")
            full[top : top + h, left : left + w] = 1
            images[i, top : top + h, left : left + w] = 200.0
            box = [top, left, top + h, left + w]
            y["boxes"][i, m] = box
            y["classes"][i, m] = 1 + (i + m) % 3
            y["masks"][i, m] = crop_instance_mask(full, box, size=56)
    return images, y


def dataset(images, y, batch_size, drop_remainder=False):
    import tensorflow as tf

    return tf.data.Dataset.from_tensor_slices((images, y)).batch(
        batch_size, drop_remainder=drop_remainder
    )


@pytest.mark.slow  # the tf.data twin below runs in the default suite
def test_fit_on_arrays_with_a_smaller_last_batch_and_validation():
    model = small_panet()
    images, y = arrays(5)
    history = model.fit(
        images, y, batch_size=2, validation_data=arrays(3, seed=2), verbose=0
    ).history
    for name in ("loss",) + LOSS_NAMES:
        assert np.isfinite(history[name][0]), name
        assert np.isfinite(history["val_" + name][0]), "val_" + name


def test_fit_on_tf_data_with_a_smaller_last_batch_and_validation():
    model = small_panet()
    images, y = arrays(5)
    history = model.fit(
        dataset(images, y, 2),
        validation_data=dataset(*arrays(3, seed=1), 2),
        epochs=1,
        verbose=0,
    ).history
    for name in ("loss",) + LOSS_NAMES:
        assert np.isfinite(history[name][0]), name
        assert np.isfinite(history["val_" + name][0]), "val_" + name


def test_evaluate_returns_the_five_losses():
    model = small_panet()
    images, y = arrays(5)
    for data in ((images, y), (dataset(images, y, 2),)):
        if len(data) == 2:
            result = model.evaluate(*data, batch_size=2, verbose=0, return_dict=True)
        else:
            result = model.evaluate(data[0], verbose=0, return_dict=True)
        assert sorted(result) == sorted(("loss",) + LOSS_NAMES), result
        total = sum(result[name] for name in LOSS_NAMES)
        np.testing.assert_allclose(result["loss"], total, rtol=1e-4)
        assert all(np.isfinite(v) for v in result.values()), result


def test_evaluate_matches_the_loss_of_the_same_weights():
    # Evaluation runs the training graph in inference mode: the same losses
    # as `compute_loss` on inference-mode training outputs, and it does not
    # change any weight.
    model = small_panet()
    images, y = arrays(2)
    before = [w.numpy().copy() for w in model.weights if "seed" not in w.path]
    model.evaluate(images, y, batch_size=2, verbose=0)
    after = [w.numpy() for w in model.weights if "seed" not in w.path]
    for a, b in zip(before, after, strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("batch_size", [1, 2, 3])
def test_predict_at_any_batch_size(batch_size):
    model = small_panet()
    images, _ = arrays(5)
    out = model.predict(images, batch_size=batch_size, verbose=0)
    assert out["boxes"].shape == (5, 5, 4)
    assert out["masks"].shape == (5, 5, 28, 28)
    one = model.predict(images[:1], verbose=0)
    np.testing.assert_array_equal(out["classes"][:1], one["classes"])
    np.testing.assert_allclose(out["boxes"][:1], one["boxes"], atol=1e-3)


@pytest.mark.slow
def test_keras_api_on_jax_backend():
    # JAX compiles each batch shape once: minutes on a 2-core CPU.
    script = textwrap.dedent(
        """
        import sys
        sys.path.insert(0, {tests!r})
        import numpy as np
        from test_panet_keras_api import arrays, small_panet, LOSS_NAMES
        model = small_panet()
        images, y = arrays(5)
        history = model.fit(
            images, y, batch_size=2, epochs=1, verbose=0,
            validation_data=arrays(3, seed=1),
        ).history
        assert all(np.isfinite(history["val_" + n][0]) for n in LOSS_NAMES)
        result = model.evaluate(images, y, batch_size=2, verbose=0, return_dict=True)
        assert sorted(result) == sorted(("loss",) + LOSS_NAMES), result
        out = model.predict(images, batch_size=2, verbose=0)
        assert out["masks"].shape == (5, 5, 28, 28)
        print("OK")
        """
    ).format(tests=os.path.dirname(__file__))
    assert "OK" in run_on_jax(script, timeout=1500)
