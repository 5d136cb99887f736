import math
import textwrap

import keras
import numpy as np
import pytest

from kseg.testing import numpy_logits_at_label_size, run_mirrored_cpu_script
from kseg.training import (
    SegmentationConfusionMatrix,
    SegmentationCrossEntropy,
    SegmentationMeanIoU,
    SegmentationPixelAccuracy,
    format_iou_table,
)

IGNORE = 255


def reference_confusion_matrix(logits, labels, num_classes, sample_weight=None):
    logits, labels = numpy_logits_at_label_size(logits, labels)
    matrix = np.zeros((num_classes, num_classes))
    for n, i, j in np.ndindex(*labels.shape):
        if labels[n, i, j] != IGNORE:
            weight = 1.0 if sample_weight is None else sample_weight[n, i, j]
            matrix[labels[n, i, j], np.argmax(logits[n, i, j])] += weight
    return matrix


def reference_scores(matrix):
    """Per-class IoU (NaN where the union is empty), mean IoU, pixel accuracy."""
    per_class = []
    for c in range(len(matrix)):
        union = matrix[c].sum() + matrix[:, c].sum() - matrix[c, c]
        per_class.append(matrix[c, c] / union if union > 0 else math.nan)
    per_class = np.array(per_class)
    present = ~np.isnan(per_class)
    mean_iou = per_class[present].mean() if present.any() else 0.0
    accuracy = np.trace(matrix) / matrix.sum() if matrix.sum() else 0.0
    return per_class, mean_iou, accuracy


def random_batch(seed, shape=(2, 6, 8), num_classes=4, logits_size=None):
    rng = np.random.default_rng(seed)
    size = shape[1:] if logits_size is None else logits_size
    logits = rng.normal(size=(shape[0], *size, num_classes)).astype("float32")
    labels = rng.integers(0, num_classes, size=shape)
    labels[rng.random(shape) < 0.25] = IGNORE
    return logits, labels


def assert_matches_reference(metric, expected_matrix):
    per_class, mean_iou, accuracy = reference_scores(expected_matrix)
    np.testing.assert_allclose(
        np.asarray(metric.confusion_matrix), expected_matrix, rtol=1e-6
    )
    np.testing.assert_allclose(np.asarray(metric.per_class_iou()), per_class, 1e-6)
    np.testing.assert_allclose(float(metric.mean_iou()), mean_iou, rtol=1e-6)
    np.testing.assert_allclose(float(metric.pixel_accuracy()), accuracy, rtol=1e-6)


@pytest.mark.parametrize(
    "label_rank, logits_size", [(3, None), (4, None), (3, (3, 4)), (4, (3, 4))]
)
def test_matches_numpy_reference(label_rank, logits_size):
    logits, labels = random_batch(0, logits_size=logits_size)
    if label_rank == 4:
        labels = labels[..., None]
    metric = SegmentationMeanIoU(num_classes=4)
    metric.update_state(labels, logits)
    expected = reference_confusion_matrix(logits, labels, 4)
    assert expected.sum() > 0
    assert_matches_reference(metric, expected)
    np.testing.assert_allclose(
        float(metric.result()), reference_scores(expected)[1], rtol=1e-6
    )


def test_sample_weight_weighs_pixels():
    logits, labels = random_batch(1)
    weights = np.random.default_rng(2).random(labels.shape).astype("float32")
    metric = SegmentationConfusionMatrix(num_classes=4)
    metric.update_state(labels, logits, sample_weight=weights)
    assert_matches_reference(
        metric, reference_confusion_matrix(logits, labels, 4, sample_weight=weights)
    )


def test_result_of_each_metric():
    logits, labels = random_batch(3)
    expected = reference_confusion_matrix(logits, labels, 4)
    _, mean_iou, accuracy = reference_scores(expected)
    for metric, value in [
        (SegmentationConfusionMatrix(4), expected),
        (SegmentationMeanIoU(4), mean_iou),
        (SegmentationPixelAccuracy(4), accuracy),
    ]:
        metric.update_state(labels, logits)
        np.testing.assert_allclose(np.asarray(metric.result()), value, rtol=1e-6)
        assert keras.backend.standardize_dtype(metric.result().dtype) == "float32"


def test_class_absent_from_labels_and_predictions_is_skipped():
    labels = np.array([[[0, 1], [1, IGNORE]]])
    logits = np.zeros((1, 2, 2, 3), "float32")
    logits[..., 0] = np.array([[1.0, 0.0], [0.0, 0.0]])
    logits[..., 1] = np.array([[0.0, 1.0], [1.0, 0.0]])
    metric = SegmentationMeanIoU(num_classes=3)
    metric.update_state(labels, logits)
    per_class = np.asarray(metric.per_class_iou())
    np.testing.assert_allclose(per_class[:2], [1.0, 1.0])
    assert np.isnan(per_class[2])
    assert float(metric.result()) == 1.0


def test_streaming_equals_one_shot_and_reset():
    batches = [random_batch(seed) for seed in (4, 5, 6)]
    streaming = SegmentationMeanIoU(num_classes=4)
    for logits, labels in batches:
        streaming.update_state(labels, logits)
    one_shot = SegmentationMeanIoU(num_classes=4)
    one_shot.update_state(
        np.concatenate([b[1] for b in batches]), np.concatenate([b[0] for b in batches])
    )
    np.testing.assert_array_equal(
        np.asarray(streaming.confusion_matrix), np.asarray(one_shot.confusion_matrix)
    )
    np.testing.assert_allclose(float(streaming.result()), float(one_shot.result()))
    expected = sum(reference_confusion_matrix(lg, lb, 4) for lg, lb in batches)
    assert_matches_reference(streaming, expected)

    streaming.reset_state()
    np.testing.assert_array_equal(np.asarray(streaming.confusion_matrix), 0.0)
    assert float(streaming.result()) == 0.0
    assert float(streaming.pixel_accuracy()) == 0.0


def test_config_round_trip():
    metric = SegmentationMeanIoU(num_classes=5, ignore_label=-1, name="miou")
    config = keras.saving.serialize_keras_object(metric)
    assert config["registered_name"] == "kseg>SegmentationMeanIoU"
    restored = keras.saving.deserialize_keras_object(config)
    assert isinstance(restored, SegmentationMeanIoU)
    assert restored.get_config() == metric.get_config()
    assert restored.get_config()["ignore_label"] == -1


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"num_classes": 0}, "num_classes"),
        ({"num_classes": 2.5}, "num_classes"),
        ({"num_classes": 256}, "ignore_label"),
        ({"num_classes": 3, "ignore_label": 1}, "ignore_label"),
    ],
)
def test_rejects_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SegmentationMeanIoU(**kwargs)


@pytest.mark.parametrize(
    "labels_shape, logits_shape, match",
    [
        ((1, 4, 4), (1, 4, 4, 3), "channels"),
        ((1, 4, 4, 2), (1, 4, 4, 4), "labels"),
        ((1, 4, 4), (1, 4, 4), "logits"),
    ],
)
def test_rejects_bad_inputs(labels_shape, logits_shape, match):
    metric = SegmentationMeanIoU(num_classes=4)
    with pytest.raises(ValueError, match=match):
        metric.update_state(
            np.zeros(labels_shape, "int32"), np.zeros(logits_shape, "float32")
        )


@pytest.mark.parametrize(
    "jit_compile", [False, pytest.param(True, marks=pytest.mark.slow)]
)
def test_compile_fit_and_evaluate(jit_compile):
    inputs = keras.Input((6, 8, 3))
    hidden = keras.layers.Conv2D(4, 3, padding="same", activation="relu")(inputs)
    logits = keras.layers.Conv2D(3, 1)(keras.layers.AveragePooling2D(2)(hidden))
    model = keras.Model(inputs, logits)
    model.compile(
        optimizer=keras.optimizers.SGD(0.1),
        loss=SegmentationCrossEntropy(num_classes=3, top_k_percent_pixels=0.5),
        metrics=[SegmentationMeanIoU(3), SegmentationPixelAccuracy(3)],
        jit_compile=jit_compile,
    )
    rng = np.random.default_rng(7)
    x = rng.normal(size=(4, 6, 8, 3)).astype("float32")
    y = rng.integers(0, 3, size=(4, 6, 8, 1))
    y[:, :, :2] = IGNORE
    history = model.fit(x, y, batch_size=2, epochs=1, verbose=0)
    assert set(history.history) == {"loss", "mean_iou", "pixel_accuracy"}

    logs = model.evaluate(x, y, batch_size=2, verbose=0, return_dict=True)
    matrix = reference_confusion_matrix(model.predict(x, verbose=0), y, 3)
    _, mean_iou, accuracy = reference_scores(matrix)
    np.testing.assert_allclose(logs["mean_iou"], mean_iou, rtol=1e-6)
    np.testing.assert_allclose(logs["pixel_accuracy"], accuracy, rtol=1e-6)


def test_format_iou_table():
    table = format_iou_table(
        np.array([0.5, float("nan"), 0.8125]), ["background", "cat", "person"]
    )
    assert table == "\n".join(
        [
            "class       IoU (%)",
            "----------  -------",
            "background    50.00",
            "cat             n/a",
            "person        81.25",
            "----------  -------",
            "mean          65.62",
        ]
    )
    assert format_iou_table([1.0]).splitlines()[2] == "class 0   100.00"


def test_format_iou_table_from_metric():
    logits, labels = random_batch(8)
    metric = SegmentationMeanIoU(num_classes=4)
    metric.update_state(labels, logits)
    table = format_iou_table(metric.per_class_iou(), ["a", "b", "c", "d"])
    assert table.splitlines()[-1].split()[-1] == f"{100 * float(metric.result()):.2f}"


@pytest.mark.parametrize(
    "ious, names, match",
    [
        ([0.1, 0.2], ["a"], "class names"),
        ([[0.1, 0.2]], ["a", "b"], "1-D"),
    ],
)
def test_format_iou_table_rejects_bad_input(ious, names, match):
    with pytest.raises(ValueError, match=match):
        format_iou_table(ious, names)


# Run by run_mirrored_cpu_script, on two logical CPUs.
MIRRORED_SCRIPT = textwrap.dedent(
    """
    import numpy as np
    import tensorflow as tf
    import keras

    from kseg.training import SegmentationCrossEntropy, SegmentationMeanIoU

    rng = np.random.default_rng(0)
    logits = rng.normal(size=(6, 4, 5, 3)).astype("float32")
    labels = rng.integers(0, 3, size=(6, 4, 5))
    labels[rng.random(labels.shape) < 0.3] = 255

    single = SegmentationMeanIoU(3)
    single.update_state(labels, logits)
    expected = single.confusion_matrix.numpy()

    mirrored = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    assert mirrored.num_replicas_in_sync == 2
    with mirrored.scope():
        metric = SegmentationMeanIoU(3)
    # Global batch 4 -> 2 images per replica; the last batch 2 -> 1 each.
    dataset = tf.data.Dataset.from_tensor_slices((labels, logits)).batch(4)

    @tf.function
    def update(batch):
        mirrored.run(metric.update_state, args=batch)

    for batch in mirrored.experimental_distribute_dataset(dataset):
        update(batch)
    per_replica = [v.numpy() for v in metric.total_confusion_matrix.value.values]
    assert all(0 < m.sum() < expected.sum() for m in per_replica), per_replica
    np.testing.assert_array_equal(metric.confusion_matrix.numpy(), expected)
    np.testing.assert_allclose(float(metric.result()), float(single.result()))

    with mirrored.scope():
        inputs = keras.Input((4, 5, 3))
        model = keras.Model(inputs, keras.layers.Identity()(inputs))
        model.compile(
            loss=SegmentationCrossEntropy(), metrics=[SegmentationMeanIoU(3)]
        )
    logs = model.evaluate(logits, labels, batch_size=4, verbose=0, return_dict=True)
    np.testing.assert_allclose(logs["mean_iou"], float(single.result()), rtol=1e-6)
    print("OK")
    """
)


@pytest.mark.skipif(
    keras.backend.backend() != "tensorflow", reason="tf.distribute is TF-only"
)
def test_confusion_matrix_is_summed_over_replicas():
    run_mirrored_cpu_script(MIRRORED_SCRIPT)
