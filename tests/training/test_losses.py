import math
import textwrap

import keras
import numpy as np
import pytest

from kseg.testing import (
    input_gradients,
    numpy_logits_at_label_size,
    run_mirrored_cpu_script,
)
from kseg.training import SegmentationCrossEntropy, segmentation_losses

IGNORE = 255


def reference_loss(
    logits, labels, class_weights=None, top_k=1.0, sample_weight=None, ignore=IGNORE
):
    """Slow float64 reference: loop over pixels, sort the hard ones stably."""
    logits, labels = numpy_logits_at_label_size(logits, labels)
    num_classes = logits.shape[-1]
    cw = np.ones(num_classes) if class_weights is None else np.asarray(class_weights)
    sw = np.ones(labels.shape) if sample_weight is None else sample_weight
    ces, weights = [], []
    for n, i, j in np.ndindex(*labels.shape):
        y = labels[n, i, j]
        if y == ignore:
            continue
        z = logits[n, i, j]
        log_sum_exp = z.max() + math.log(np.exp(z - z.max()).sum())
        w = cw[y] * sw[n, i, j]
        if w > 0:
            ces.append(log_sum_exp - z[y])
            weights.append(w)
    if not ces:
        return 0.0
    ces, weights = np.array(ces), np.array(weights)
    if top_k < 1.0:
        k = max(1, math.ceil(top_k * len(ces)))
        hardest = np.argsort(-(weights * ces), kind="stable")[:k]
        ces, weights = ces[hardest], weights[hardest]
    return float(np.sum(weights * ces) / np.sum(weights))


def random_batch(seed, shape=(2, 6, 8), num_classes=4, ignore_fraction=0.25):
    rng = np.random.default_rng(seed)
    logits = rng.normal(scale=2.0, size=(*shape, num_classes)).astype("float32")
    labels = rng.integers(0, num_classes, size=shape)
    labels[rng.random(shape) < ignore_fraction] = IGNORE
    return logits, labels


CASES = {
    "plain": {},
    "ohem_half": {"top_k_percent_pixels": 0.5},
    "ohem_0.3": {"top_k_percent_pixels": 0.3},
    "class_weights": {"class_weights": [1.0, 2.0, 0.5, 0.0]},
    "class_weights_ohem": {
        "class_weights": [0.2, 1.0, 3.0, 1.5],
        "top_k_percent_pixels": 0.5,
    },
}


@pytest.mark.parametrize("case", CASES)
def test_matches_numpy_reference(case):
    kwargs = CASES[case]
    logits, labels = random_batch(1)
    loss = SegmentationCrossEntropy(num_classes=4, **kwargs)
    expected = reference_loss(
        logits,
        labels,
        class_weights=kwargs.get("class_weights"),
        top_k=kwargs.get("top_k_percent_pixels", 1.0),
    )
    np.testing.assert_allclose(float(loss(labels, logits)), expected, rtol=1e-5)


def test_ignore_label_pixels_do_not_contribute():
    logits, labels = random_batch(2)
    loss = SegmentationCrossEntropy()
    changed = logits.copy()
    changed[labels == IGNORE] = 100.0 * np.sign(changed[labels == IGNORE])
    np.testing.assert_allclose(
        float(loss(labels, changed)), float(loss(labels, logits)), rtol=1e-6
    )
    valid = labels != IGNORE
    expected = reference_loss(logits[valid][None, None], labels[valid][None, None])
    np.testing.assert_allclose(float(loss(labels, logits)), expected, rtol=1e-5)


@pytest.mark.parametrize("top_k", [1.0, 0.5])
def test_labels_with_trailing_channel(top_k):
    logits, labels = random_batch(3)
    loss = SegmentationCrossEntropy(top_k_percent_pixels=top_k)
    np.testing.assert_allclose(
        float(loss(labels[..., None], logits)),
        float(loss(labels, logits)),
        rtol=1e-6,
    )
    np.testing.assert_allclose(
        float(loss(labels[..., None], logits)),
        reference_loss(logits, labels[..., None], top_k=top_k),
        rtol=1e-5,
    )


@pytest.mark.parametrize("top_k", [1.0, 0.5])
def test_half_resolution_logits_are_resized_to_the_labels(top_k):
    logits, _ = random_batch(4, shape=(2, 3, 4))
    _, labels = random_batch(5, shape=(2, 6, 8))
    loss = SegmentationCrossEntropy(num_classes=4, top_k_percent_pixels=top_k)
    expected = reference_loss(logits, labels, top_k=top_k)
    np.testing.assert_allclose(float(loss(labels, logits)), expected, rtol=1e-5)


def test_sample_weight_multiplies_pixel_weights():
    logits, labels = random_batch(6)
    pixel_weights = np.random.default_rng(7).random(labels.shape).astype("float32")
    loss = SegmentationCrossEntropy(class_weights=[1.0, 2.0, 1.0, 0.5])
    expected = reference_loss(
        logits, labels, class_weights=[1.0, 2.0, 1.0, 0.5], sample_weight=pixel_weights
    )
    got = loss(labels, logits, sample_weight=pixel_weights[..., None])
    np.testing.assert_allclose(float(got), expected, rtol=1e-5)
    per_image = np.array([0.0, 1.0], "float32")
    np.testing.assert_allclose(
        float(loss(labels, logits, sample_weight=per_image)),
        reference_loss(logits[1:], labels[1:], class_weights=[1.0, 2.0, 1.0, 0.5]),
        rtol=1e-5,
    )


def test_ohem_splits_ties_evenly():
    # All logits equal: every valid pixel has loss log(C). With V = 5 valid
    # pixels and k = ceil(0.5·5) = 3, each valid pixel keeps weight 3/5.
    labels = np.full((1, 2, 4), IGNORE)
    labels[0, 0, :] = [0, 1, 2, 0]
    labels[0, 1, 0] = 1
    logits = np.zeros((1, 2, 4, 3), "float32")
    loss = SegmentationCrossEntropy(top_k_percent_pixels=0.5)
    np.testing.assert_allclose(float(loss(labels, logits)), math.log(3), rtol=1e-6)

    (grad,) = input_gradients(lambda z: loss(labels, z), logits)
    one_hot = np.eye(3)[np.where(labels == IGNORE, 0, labels)]
    expected = (np.full(logits.shape, 1 / 3) - one_hot) / 5
    expected[labels == IGNORE] = 0.0
    np.testing.assert_allclose(grad, expected, atol=1e-6)


@pytest.mark.parametrize("top_k", [1.0, 0.5])
def test_no_valid_pixel_gives_zero_loss_and_gradient(top_k):
    logits, _ = random_batch(8)
    labels = np.full((2, 6, 8), IGNORE)
    loss = SegmentationCrossEntropy(top_k_percent_pixels=top_k)
    assert float(loss(labels, logits)) == 0.0
    (grad,) = input_gradients(lambda z: loss(labels, z), logits)
    np.testing.assert_array_equal(grad, np.zeros_like(logits))


def test_float16_logits_give_float32_loss():
    logits, labels = random_batch(9)
    loss = SegmentationCrossEntropy(top_k_percent_pixels=0.5)
    value = loss(labels, keras.ops.cast(logits, "float16"))
    assert keras.backend.standardize_dtype(value.dtype) == "float32"
    expected = reference_loss(logits.astype("float16"), labels, top_k=0.5)
    np.testing.assert_allclose(float(value), expected, rtol=1e-4)


def test_serialization_round_trip():
    loss = SegmentationCrossEntropy(
        num_classes=4,
        ignore_label=254,
        class_weights=[1.0, 2.0, 0.5, 1.0],
        top_k_percent_pixels=0.5,
        name="seg_ce",
    )
    config = keras.saving.serialize_keras_object(loss)
    assert config["registered_name"] == "kseg>SegmentationCrossEntropy"
    restored = keras.saving.deserialize_keras_object(config)
    assert isinstance(restored, SegmentationCrossEntropy)
    assert restored.get_config() == loss.get_config()
    logits, labels = random_batch(10)
    labels[labels == IGNORE] = 254
    np.testing.assert_allclose(
        float(restored(labels, logits)), float(loss(labels, logits)), rtol=1e-7
    )


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"top_k_percent_pixels": 0.0}, "top_k_percent_pixels"),
        ({"top_k_percent_pixels": 1.5}, "top_k_percent_pixels"),
        ({"num_classes": 0}, "num_classes"),
        ({"num_classes": 3, "class_weights": [1.0, 1.0]}, "class_weights"),
        ({"class_weights": [1.0, -1.0]}, "non-negative"),
        ({"num_classes": 256, "ignore_label": 255}, "ignore_label"),
        ({"ignore_label": "void"}, "ignore_label"),
        ({"reduction": "none"}, "reduction"),
    ],
)
def test_rejects_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SegmentationCrossEntropy(**kwargs)


@pytest.mark.parametrize(
    "loss, labels_shape, logits_shape, match",
    [
        (SegmentationCrossEntropy(num_classes=3), (1, 4, 4), (1, 4, 4, 4), "channels"),
        (
            SegmentationCrossEntropy(class_weights=[1.0, 1.0]),
            (1, 4, 4),
            (1, 4, 4, 3),
            "class_weights",
        ),
        (SegmentationCrossEntropy(), (1, 4, 4, 2), (1, 4, 4, 3), "labels"),
        (SegmentationCrossEntropy(), (4, 4), (1, 4, 4, 3), "labels"),
        (SegmentationCrossEntropy(), (1, 4, 4), (4, 4, 3), "logits"),
    ],
)
def test_rejects_bad_inputs(loss, labels_shape, logits_shape, match):
    with pytest.raises(ValueError, match=match):
        loss(np.zeros(labels_shape, "int32"), np.zeros(logits_shape, "float32"))


def test_segmentation_losses_trains_main_and_auxiliary_outputs():
    inputs = keras.Input((8, 8, 3))
    logits = keras.layers.Conv2D(4, 3, padding="same", name="logits")(inputs)
    pooled = keras.layers.AveragePooling2D(2)(inputs)
    aux = keras.layers.Conv2D(4, 1, name="aux_logits")(pooled)
    model = keras.Model(inputs, {"logits": logits, "aux_logits": aux})

    losses, weights = segmentation_losses(
        {"logits": 1.0, "aux_logits": 0.4}, num_classes=4, top_k_percent_pixels=0.5
    )
    assert weights == {"logits": 1.0, "aux_logits": 0.4}
    assert losses["aux_logits"].name == "aux_logits_loss"
    model.compile(
        optimizer=keras.optimizers.SGD(0.1), loss=losses, loss_weights=weights
    )

    rng = np.random.default_rng(11)
    x = rng.normal(size=(4, 8, 8, 3)).astype("float32")
    y = rng.integers(0, 4, size=(4, 8, 8))
    y[:, :2] = IGNORE
    targets = {"logits": y, "aux_logits": y}
    history = model.fit(x, targets, batch_size=2, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"]).all()

    outputs = model.predict(x, batch_size=4, verbose=0)
    main = reference_loss(outputs["logits"], y, top_k=0.5)
    auxiliary = reference_loss(outputs["aux_logits"], y, top_k=0.5)
    logs = model.evaluate(x, targets, batch_size=4, verbose=0, return_dict=True)
    np.testing.assert_allclose(logs["loss"], main + 0.4 * auxiliary, rtol=1e-5)


@pytest.mark.parametrize(
    "outputs, kwargs, match",
    [
        ({}, {}, "non-empty"),
        ({"logits": -1.0}, {}, "logits"),
        ({"logits": "1"}, {}, "logits"),
        ({"logits": 1.0}, {"name": "x"}, "names each loss"),
    ],
)
def test_segmentation_losses_rejects_bad_arguments(outputs, kwargs, match):
    with pytest.raises(ValueError, match=match):
        segmentation_losses(outputs, **kwargs)


# Run by run_mirrored_cpu_script, on two logical CPUs.
MIRRORED_SCRIPT = textwrap.dedent(
    """
    import numpy as np
    import tensorflow as tf
    import keras

    from kseg.training import SegmentationCrossEntropy

    rng = np.random.default_rng(0)
    x = rng.normal(size=(4, 6, 6, 3)).astype("float32")
    y = rng.integers(0, 3, size=(4, 6, 6))
    # Replica 0 gets images 0-1 (few valid pixels), replica 1 images 2-3: a
    # per-replica mean would weigh the two halves' pixels differently.
    y[:2, 1:] = 255
    x[:2] *= 5.0

    def build():
        # One head, two outputs: plain and OHEM losses checked in one pass.
        inputs = keras.Input((6, 6, 3))
        logits = keras.layers.Conv2D(3, 3, padding="same")(inputs)
        ohem = keras.layers.Identity()(logits)
        model = keras.Model(inputs, {"plain": logits, "ohem": ohem})
        model.set_weights(
            [np.linspace(-1, 1, 81).reshape(3, 3, 3, 3), np.zeros(3)]
        )
        return model

    def run(strategy):
        with strategy.scope():
            model = build()
            model.compile(
                optimizer=keras.optimizers.SGD(1.0),
                loss={
                    "plain": SegmentationCrossEntropy(),
                    "ohem": SegmentationCrossEntropy(top_k_percent_pixels=0.5),
                },
            )
        targets = {"plain": y, "ohem": y}
        logs = model.evaluate(x, targets, batch_size=4, verbose=0, return_dict=True)
        model.fit(x, targets, batch_size=4, epochs=1, verbose=0, shuffle=False)
        return logs, model.get_weights()

    mirrored = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    assert mirrored.num_replicas_in_sync == 2
    single_logs, single_weights = run(tf.distribute.get_strategy())
    multi_logs, multi_weights = run(mirrored)

    logits = build()(x)["plain"].numpy()
    for name, top_k in (("plain", 1.0), ("ohem", 0.5)):
        halves = [
            float(SegmentationCrossEntropy(top_k_percent_pixels=top_k)(
                y[i : i + 2], logits[i : i + 2]
            ))
            for i in (0, 2)
        ]
        # A batch where averaging per replica would be visibly wrong.
        single = single_logs[f"{name}_loss"]
        assert abs(np.mean(halves) - single) > 0.05, (halves, single)
        np.testing.assert_allclose(multi_logs[f"{name}_loss"], single, rtol=1e-5)
    np.testing.assert_allclose(multi_logs["loss"], single_logs["loss"], rtol=1e-5)
    assert np.abs(single_weights[0] - build().get_weights()[0]).max() > 1e-3
    for a, b in zip(multi_weights, single_weights, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)
    print("OK")
    """
)


@pytest.mark.skipif(
    keras.backend.backend() != "tensorflow", reason="tf.distribute is TF-only"
)
def test_two_replicas_match_one_replica():
    run_mirrored_cpu_script(MIRRORED_SCRIPT)
