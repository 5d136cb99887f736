import keras
import numpy as np
import pytest

from kseg.backbones import build_resnet
from kseg.data import IMAGENET_MEAN
from kseg.inference import PAN_TTA_SCALES, Prediction, predict, sliding_windows
from kseg.models import PAN
from kseg.testing import numpy_bilinear_resize

NUM_CLASSES = 4


def _image(height, width, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (height, width, 3)).astype(np.uint8)


def _model(outputs_fn):
    inputs = keras.Input((None, None, 3))
    return keras.Model(inputs, {"logits": outputs_fn(inputs)})


def _pointwise_model():
    """Logits depend on each pixel alone: 1×1 conv → ReLU → 1×1 conv."""
    hidden = keras.layers.Conv2D(6, 1, activation="relu")
    classifier = keras.layers.Conv2D(NUM_CLASSES, 1)
    model = _model(lambda x: classifier(hidden(x)))
    rng = np.random.default_rng(1)
    hidden.set_weights([rng.normal(0, 0.02, (1, 1, 3, 6)), rng.normal(0, 1, 6)])
    classifier.set_weights(
        [rng.normal(0, 1, (1, 1, 6, NUM_CLASSES)), rng.normal(0, 1, NUM_CLASSES)]
    )
    return model, hidden, classifier


def _pointwise_numpy(model_parts, image):
    hidden, classifier = model_parts
    w1, b1 = hidden.get_weights()
    w2, b2 = classifier.get_weights()
    x = np.maximum(image.astype(np.float64) @ w1[0, 0] + b1, 0.0)
    return x @ w2[0, 0] + b2


def _conv3x3_model(symmetric):
    """A 3×3 conv classifier; with `symmetric` kernels (equal under a
    left-right mirror) it commutes with a horizontal flip."""
    conv = keras.layers.Conv2D(NUM_CLASSES, 3, padding="same")
    model = _model(conv)
    rng = np.random.default_rng(2)
    kernel = rng.normal(0, 0.01, (3, 3, 3, NUM_CLASSES))
    if symmetric:
        kernel = (kernel + kernel[:, ::-1]) / 2
    conv.set_weights([kernel, rng.normal(0, 1, NUM_CLASSES)])
    return model


def _softmax(logits):
    logits = logits - logits.max(axis=-1, keepdims=True)
    exp = np.exp(logits)
    return exp / exp.sum(axis=-1, keepdims=True)


def _forward(model, image):
    logits = model(image[None].astype(np.float32), training=False)["logits"]
    return np.asarray(keras.ops.convert_to_numpy(logits), np.float64)[0]


def _bilinear_numpy(image, size):
    """`numpy_bilinear_resize` of one `(H, W, C)` image."""
    return numpy_bilinear_resize(image[None], size)[0]


def test_single_scale_without_flip_is_a_plain_forward_pass():
    model = _conv3x3_model(symmetric=False)
    image = _image(20, 24)
    result = predict(model, image)
    assert isinstance(result, Prediction)
    expected = _softmax(_forward(model, image))
    assert result.probabilities.dtype == np.float32
    assert result.class_map.dtype == np.int32
    np.testing.assert_allclose(result.probabilities, expected, atol=1e-6)
    np.testing.assert_array_equal(result.class_map, expected.argmax(-1))


def test_flip_on_a_mirror_equivariant_model_changes_nothing():
    model = _conv3x3_model(symmetric=True)
    image = _image(20, 24)
    plain = predict(model, image).probabilities
    flipped = predict(model, image, flip=True).probabilities
    np.testing.assert_allclose(flipped, plain, atol=1e-6)


def test_flip_averages_the_unflipped_probabilities_of_the_mirror():
    model = _conv3x3_model(symmetric=False)
    image = _image(20, 24)
    plain = _softmax(_forward(model, image))
    mirrored = _softmax(_forward(model, image[:, ::-1]))[:, ::-1]
    result = predict(model, image, flip=True).probabilities
    np.testing.assert_allclose(result, (plain + mirrored) / 2, atol=1e-6)
    assert np.abs(result - plain).max() > 1e-3


def test_multi_scale_averages_probabilities_resized_back():
    model, *parts = _pointwise_model()
    image = _image(13, 18)
    flip = True
    result = predict(model, image, scales=PAN_TTA_SCALES, flip=flip)
    assert result.probabilities.shape == (13, 18, NUM_CLASSES)
    assert result.class_map.shape == (13, 18)
    np.testing.assert_allclose(result.probabilities.sum(-1), 1.0, atol=1e-5)

    expected = np.zeros((13, 18, NUM_CLASSES))
    for scale in PAN_TTA_SCALES:
        size = (round(13 * scale), round(18 * scale))
        scaled = _bilinear_numpy(image, size)
        for variant in (scaled, scaled[:, ::-1]):
            probabilities = _softmax(_pointwise_numpy(parts, variant))
            if variant is not scaled:
                probabilities = probabilities[:, ::-1]
            expected += _bilinear_numpy(probabilities, (13, 18))
    expected /= 2 * len(PAN_TTA_SCALES)
    np.testing.assert_allclose(result.probabilities, expected, atol=1e-5)
    np.testing.assert_array_equal(result.class_map, expected.argmax(-1))


@pytest.mark.parametrize("overlap", [0.0, 1 / 3, 0.75])
def test_sliding_window_matches_the_whole_image_for_a_pointwise_model(overlap):
    model, *_ = _pointwise_model()
    image = _image(37, 53)
    whole = predict(model, image).probabilities
    windowed = predict(model, image, window=(16, 24), overlap=overlap, batch_size=3)
    np.testing.assert_allclose(windowed.probabilities, whole, atol=1e-6)


def test_sliding_window_with_scales_and_flip_matches_the_whole_image():
    model, *_ = _pointwise_model()
    image = _image(30, 41)
    options = dict(scales=(0.5, 1.0, 1.5), flip=True)
    whole = predict(model, image, **options).probabilities
    windowed = predict(model, image, window=20, **options).probabilities
    np.testing.assert_allclose(windowed, whole, atol=1e-6)


def test_sliding_window_averages_overlapping_windows():
    """A 3×3 conv sees the window border, so each window's probabilities
    differ near its edges; the result is their per-pixel mean."""
    model = _conv3x3_model(symmetric=False)
    image = _image(12, 20)
    window = (12, 8)
    corners = sliding_windows((12, 20), window, overlap=0.5)
    assert corners == [(0, 0), (0, 4), (0, 8), (0, 12)]
    sums = np.zeros((12, 20, NUM_CLASSES))
    counts = np.zeros((12, 20, 1))
    for top, left in corners:
        crop = image[top : top + 12, left : left + 8]
        sums[top : top + 12, left : left + 8] += _softmax(_forward(model, crop))
        counts[top : top + 12, left : left + 8] += 1
    result = predict(model, image, window=window, overlap=0.5, batch_size=3)
    np.testing.assert_allclose(result.probabilities, sums / counts, atol=1e-6)


@pytest.mark.parametrize(
    "size, window, overlap",
    [
        ((37, 53), (16, 24), 1 / 3),
        ((16, 24), (16, 24), 1 / 3),
        ((100, 7), (10, 3), 0.0),
        ((50, 50), (7, 9), 0.9),
        ((5, 60), (8, 8), 0.5),
    ],
)
def test_sliding_windows_cover_every_pixel(size, window, overlap):
    corners = sliding_windows(size, window, overlap)
    canvas = (max(size[0], window[0]), max(size[1], window[1]))
    counts = np.zeros(canvas, int)
    for top, left in corners:
        assert 0 <= top <= canvas[0] - window[0]
        assert 0 <= left <= canvas[1] - window[1]
        counts[top : top + window[0], left : left + window[1]] += 1
    assert counts.min() >= 1
    for axis in range(2):
        starts = sorted({corner[axis] for corner in corners})
        stride = max(1, round(window[axis] * (1 - overlap)))
        steps = np.diff(starts)
        assert starts[0] == 0
        assert starts[-1] == canvas[axis] - window[axis]
        assert np.all(steps[:-1] == stride)
        assert np.all((steps[-1:] > 0) & (steps[-1:] <= stride))
    assert len(corners) == len(set(corners))


def test_sliding_window_count_for_a_training_crop():
    corners = sliding_windows((1024, 2048), 768, overlap=1 / 3)
    assert sorted({top for top, _ in corners}) == [0, 256]
    assert sorted({left for _, left in corners}) == [0, 512, 1024, 1280]


def _global_mean_model():
    """Logits = the image's mean colour (so padding changes every pixel) plus
    the pixel itself."""
    inputs = keras.Input((None, None, 3))
    pooled = keras.layers.GlobalAveragePooling2D(keepdims=True)(inputs)
    logits = keras.layers.Add()([inputs * 0.01, pooled * 0.02])
    return keras.Model(inputs, {"logits": keras.layers.Conv2D(3, 1)(logits)})


def test_small_image_is_padded_with_the_mean_and_cropped_back():
    model = _global_mean_model()
    image = _image(9, 13)
    result = predict(model, image, window=(16, 20))
    assert result.probabilities.shape == (9, 13, 3)
    padded = np.empty((16, 20, 3))
    padded[...] = IMAGENET_MEAN
    padded[:9, :13] = image
    expected = _softmax(_forward(model, padded))[:9, :13]
    np.testing.assert_allclose(result.probabilities, expected, atol=1e-6)
    unpadded = _softmax(_forward(model, image))
    assert np.abs(expected - unpadded).max() > 1e-4


def test_custom_pad_value():
    model = _global_mean_model()
    image = _image(9, 13)
    result = predict(model, image, window=(16, 20), mean=(0, 0, 0))
    padded = np.zeros((16, 20, 3))
    padded[:9, :13] = image
    expected = _softmax(_forward(model, padded))[:9, :13]
    np.testing.assert_allclose(result.probabilities, expected, atol=1e-6)


def test_image_smaller_than_the_window_along_one_side():
    model = _global_mean_model()
    image = _image(9, 30)
    window = (16, 12)
    canvas = np.empty((16, 30, 3))
    canvas[...] = IMAGENET_MEAN
    canvas[:9] = image
    sums = np.zeros((16, 30, 3))
    counts = np.zeros((16, 30, 1))
    for top, left in sliding_windows((16, 30), window):
        crop = canvas[top : top + 16, left : left + 12]
        sums[top : top + 16, left : left + 12] += _softmax(_forward(model, crop))
        counts[top : top + 16, left : left + 12] += 1
    result = predict(model, image, window=window)
    np.testing.assert_allclose(result.probabilities, (sums / counts)[:9], atol=1e-6)


def test_batch_size_does_not_change_the_result():
    model = _conv3x3_model(symmetric=False)
    image = _image(14, 25)
    options = dict(window=(10, 12), flip=True, scales=(1.0, 1.25))
    one = predict(model, image, batch_size=1, **options).probabilities
    many = predict(model, image, batch_size=7, **options).probabilities
    np.testing.assert_allclose(many, one, atol=1e-6)


def test_pan_with_tta_and_window():
    backbone = build_resnet(block_counts=(1, 1, 1, 1), widths=(8, 16, 32, 64))
    model = PAN(backbone, num_classes=5, filters=8)
    result = predict(
        model, _image(40, 52), scales=(0.75, 1.0), flip=True, window=(32, 32)
    )
    assert result.class_map.shape == (40, 52)
    assert result.probabilities.shape == (40, 52, 5)
    np.testing.assert_allclose(result.probabilities.sum(-1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(result.class_map, result.probabilities.argmax(-1))


def test_model_returning_a_tensor():
    inputs = keras.Input((None, None, 3))
    model = keras.Model(inputs, keras.layers.Conv2D(2, 1)(inputs))
    image = _image(6, 7)
    expected = _softmax(
        keras.ops.convert_to_numpy(model(image[None].astype("float32")))[0]
    )
    np.testing.assert_allclose(predict(model, image).probabilities, expected, atol=1e-6)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(image=np.zeros((4, 4))), r"image must have shape \(height, width, 3\)"),
        (dict(image=np.zeros((2, 4, 4, 3))), "image must have shape"),
        (dict(image=np.zeros((0, 4, 3))), "images must not be empty"),
        (dict(image=np.zeros((4, 4, 3), bool)), "integers or floats"),
        (dict(image=np.zeros((4, 4, 1))), "3 channels"),
        (dict(mean=(1.0, 2.0)), "mean must have one value"),
        (dict(scales=()), "scales"),
        (dict(scales=(1.0, 0.0)), "scales"),
        (dict(scales="big"), "scales"),
        (dict(flip="yes"), "flip must be a bool"),
        (dict(window=0), "window"),
        (dict(window=(4, 4, 4)), "window"),
        (dict(overlap=1.0), "overlap"),
        (dict(overlap=-0.1), "overlap"),
        (dict(batch_size=0), "batch_size"),
    ],
)
def test_bad_arguments_raise(kwargs, match):
    model, *_ = _pointwise_model()
    kwargs = {"image": _image(4, 4), **kwargs}
    with pytest.raises(ValueError, match=match):
        predict(model, **kwargs)


def test_model_without_logits_raises():
    inputs = keras.Input((None, None, 3))
    model = keras.Model(inputs, {"scores": keras.layers.Conv2D(2, 1)(inputs)})
    with pytest.raises(ValueError, match="'logits'"):
        predict(model, _image(4, 4))


def test_model_with_low_resolution_logits_raises():
    inputs = keras.Input((None, None, 3))
    logits = keras.layers.Conv2D(2, 1, strides=2)(inputs)
    model = keras.Model(inputs, {"logits": logits})
    with pytest.raises(ValueError, match="at the input size"):
        predict(model, _image(8, 8))


def test_sliding_windows_rejects_bad_arguments():
    with pytest.raises(ValueError, match="window"):
        sliding_windows((10, 10), (0, 4))
    with pytest.raises(ValueError, match="size"):
        sliding_windows((10,), 4)
    with pytest.raises(ValueError, match="overlap"):
        sliding_windows((10, 10), 4, overlap=1.5)
