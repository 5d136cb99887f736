"""`prepend_normalization`: input normalization inside an encoder."""

import keras
import numpy as np
import pytest

from kseg.backbones import build_resnet, prepend_normalization

MEAN = (123.675, 116.28, 103.53)
STD = (58.395, 57.12, 57.375)
STAGES = ("res2", "res3", "res4", "res5")


def _encoder(seed=0):
    keras.utils.set_random_seed(seed)
    return build_resnet((1, 1, 1, 1), (4, 4, 4, 4), stem_width=4)


def _images(seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (2, 16, 20, 3)).astype("float32")


def _numpy(features):
    return {k: keras.ops.convert_to_numpy(v) for k, v in features.items()}


def test_normalizes_inside_the_same_encoder():
    encoder = _encoder()
    normalized = prepend_normalization(encoder, MEAN, STD, name="norm")
    assert normalized.name == encoder.name
    assert normalized.inputs[0].name == encoder.inputs[0].name
    assert [layer.name for layer in normalized.layers[:2]] == ["image", "norm"]
    # The encoder's own layer objects, so the weights are shared.
    assert all(
        a is b for a, b in zip(normalized.layers[2:], encoder.layers[1:], strict=True)
    )
    assert [w.path for w in normalized.weights] == [w.path for w in encoder.weights]
    assert not any(isinstance(layer, keras.Model) for layer in normalized.layers)

    images = _images()
    # Float64 reference of (x − mean) / std.
    reference = (images.astype("float64") - np.array(MEAN)) / np.array(STD)
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(normalized.get_layer("norm")(images)),
        reference,
        rtol=1e-6,
        atol=1e-6,
    )
    got = _numpy(normalized(images, training=False))
    expected = _numpy(encoder(reference.astype("float32"), training=False))
    assert sorted(got) == sorted(STAGES)
    for stage in STAGES:
        np.testing.assert_allclose(got[stage], expected[stage], atol=1e-5)


def test_encoder_weight_files_load_either_way(tmp_path):
    images = _images(1)
    source = _encoder(1)
    source.save_weights(tmp_path / "bare.weights.h5")
    target = prepend_normalization(_encoder(2), MEAN, STD)
    target.load_weights(tmp_path / "bare.weights.h5")
    for got, want in zip(target.get_weights(), source.get_weights(), strict=True):
        np.testing.assert_array_equal(got, want)

    target.save_weights(tmp_path / "normalized.weights.h5")
    bare = _encoder(3)
    bare.load_weights(tmp_path / "normalized.weights.h5")
    got = _numpy(bare(images / 255.0, training=False))
    want = _numpy(source(images / 255.0, training=False))
    for stage in STAGES:
        np.testing.assert_array_equal(got[stage], want[stage])


def test_keras_file_round_trip(tmp_path):
    normalized = prepend_normalization(_encoder(), MEAN, STD)
    normalized.save(tmp_path / "encoder.keras")
    loaded = keras.saving.load_model(tmp_path / "encoder.keras")
    assert loaded.name == normalized.name
    images = _images(2)
    got = _numpy(loaded(images, training=False))
    want = _numpy(normalized(images, training=False))
    for stage in STAGES:
        np.testing.assert_allclose(got[stage], want[stage], atol=1e-6)


def test_mixed_precision_encoder():
    keras.config.set_dtype_policy("mixed_float16")
    try:
        normalized = prepend_normalization(_encoder(), MEAN, STD)
    finally:
        keras.config.set_dtype_policy("float32")
    features = normalized(_images(), training=False)
    assert normalized.get_layer("input_normalization").compute_dtype == "float16"
    assert all(
        keras.backend.standardize_dtype(f.dtype) == "float16" for f in features.values()
    )


def test_bad_arguments():
    encoder = _encoder()
    with pytest.raises(ValueError, match="one value per input channel"):
        prepend_normalization(encoder, MEAN[:2], STD)
    with pytest.raises(ValueError, match="one value per input channel"):
        prepend_normalization(encoder, MEAN, STD + (1.0,))
    with pytest.raises(ValueError, match="std must be positive"):
        prepend_normalization(encoder, MEAN, (1.0, 0.0, 1.0))
    sequential = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Conv2D(2, 1)])
    with pytest.raises(ValueError, match="functional keras.Model"):
        prepend_normalization(sequential, MEAN, STD)
    with pytest.raises(ValueError, match="functional keras.Model"):
        prepend_normalization(keras.layers.Conv2D(2, 1), MEAN, STD)
    first, second = keras.Input((8, 8, 3)), keras.Input((8, 8, 3))
    two_inputs = keras.Model([first, second], keras.layers.Add()([first, second]))
    with pytest.raises(ValueError, match="one image input"):
        prepend_normalization(two_inputs, MEAN, STD)
    flat = keras.Input((8, 3))
    with pytest.raises(ValueError, match=r"\(batch, height, width, channels\)"):
        prepend_normalization(keras.Model(flat, flat), MEAN, STD)
