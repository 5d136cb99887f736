"""Streaming segmentation metrics from logits: confusion matrix, mean IoU and
pixel accuracy, plus a printable per-class IoU table."""

import math

import keras
import numpy as np
from keras import ops

from kseg.data.labels import IGNORE_LABEL
from kseg.training.losses import (
    check_ignore_label,
    check_num_classes,
    pixel_sample_weights,
    resize_logits_to_labels,
    standardize_labels,
    valid_pixels,
)


def _count_dtype():
    """float64 where the backend has it: float32 counts stop being exact at
    2^24 pixels per cell, which one Cityscapes validation pass exceeds. JAX
    without x64 falls back to float32 (its int32 would overflow instead)."""
    if keras.backend.backend() == "jax":
        import jax

        if not jax.config.jax_enable_x64:
            return "float32"
    return "float64"


@keras.saving.register_keras_serializable(package="kseg")
class SegmentationConfusionMatrix(keras.metrics.Metric):
    """Streaming `C × C` confusion matrix of a segmentation model, from logits.

    Each update takes integer labels `(N, H, W)` or `(N, H, W, 1)` and logits
    `(N, h, w, C)`; logits at another resolution are resized bilinearly to the
    label size (as the loss does) before the argmax. Pixels labelled
    `ignore_label` (or any label outside `[0, C)`) are not counted.
    `confusion_matrix[i, j]` is the (sample-weighted) number of pixels of
    ground-truth class `i` predicted as class `j`.

    The matrix is a non-trainable variable aggregated by sum: under
    `tf.distribute` each replica counts its part of the batch, and reading the
    metric outside the replicas returns the sum over replicas, i.e. the counts
    of the global batch. `result()` returns the matrix; subclasses reduce it
    to `SegmentationMeanIoU` and `SegmentationPixelAccuracy`, and every
    instance offers `per_class_iou()`, `mean_iou()` and `pixel_accuracy()`.

    Example:
    >>> metric = SegmentationConfusionMatrix(num_classes=2)
    >>> labels = np.array([[[0, 1], [1, 255]]])
    >>> logits = np.array([[[[1, 0], [0, 1]], [[1, 0], [0, 1]]]], "float32")
    >>> metric.update_state(labels, logits)
    >>> np.asarray(metric.result())
    array([[1., 0.],
           [1., 1.]], dtype=float32)

    Args:
        num_classes: int. Number of classes `C`.
        ignore_label: int. Label of pixels that are not scored; must not be in
            `[0, C)`. Defaults to `IGNORE_LABEL` (255).
        name: str. Metric name. Defaults to `"confusion_matrix"`.
        dtype: Dtype of `result()`. Defaults to `None` (float32).
    """

    def __init__(
        self,
        num_classes,
        ignore_label=IGNORE_LABEL,
        name="confusion_matrix",
        dtype=None,
    ):
        super().__init__(name=name, dtype=dtype)
        self.num_classes = check_num_classes(num_classes)
        self.ignore_label = check_ignore_label(ignore_label, self.num_classes)
        self.total_confusion_matrix = self.add_variable(
            shape=(self.num_classes, self.num_classes),
            initializer="zeros",
            dtype=_count_dtype(),
            aggregation="sum",
            name="total_confusion_matrix",
        )

    def update_state(self, y_true, y_pred, sample_weight=None):
        """Adds the pixels of one batch to the confusion matrix.

        Args:
            y_true: integer labels `(N, H, W)` or `(N, H, W, 1)`.
            y_pred: logits `(N, h, w, C)`.
            sample_weight: optional weights `(N,)`, `(N, H, W)` or
                `(N, H, W, 1)`.
        """
        labels = standardize_labels(ops.convert_to_tensor(y_true))
        logits = resize_logits_to_labels(ops.convert_to_tensor(y_pred), labels)
        if logits.shape[-1] != self.num_classes:
            raise ValueError(
                f"logits have {logits.shape[-1]} channels but num_classes="
                f"{self.num_classes}"
            )
        predictions = ops.cast(ops.argmax(logits, axis=-1), "int32")
        valid = valid_pixels(labels, self.num_classes, self.ignore_label)
        cells = ops.where(valid, labels * self.num_classes + predictions, 0)
        cells = ops.reshape(cells, (-1,))
        if sample_weight is None:
            # Integer counts stay exact beyond 2^24 pixels in one batch.
            weights = ops.cast(valid, "int32")
        else:
            weights = ops.cast(valid, "float32") * pixel_sample_weights(
                sample_weight, labels
            )
        counts = ops.segment_sum(
            ops.reshape(weights, (-1,)), cells, num_segments=self.num_classes**2
        )
        self.total_confusion_matrix.assign_add(
            ops.reshape(
                ops.cast(counts, self.total_confusion_matrix.dtype),
                (self.num_classes, self.num_classes),
            )
        )

    @property
    def confusion_matrix(self):
        """Accumulated counts `(C, C)`: rows ground truth, columns prediction."""
        return ops.convert_to_tensor(self.total_confusion_matrix)

    def per_class_iou(self):
        """IoU of each class, `TP / (TP + FP + FN)`; NaN for a class that is
        neither in the labels nor in the predictions (union 0)."""
        matrix = self.confusion_matrix
        intersection, union = _intersection_and_union(matrix)
        iou = intersection / ops.where(union > 0, union, 1)
        return ops.cast(ops.where(union > 0, iou, float("nan")), self.dtype)

    def mean_iou(self):
        """Mean IoU over the classes with a non-empty union (labelled or
        predicted at least once); 0 before any pixel was counted."""
        intersection, union = _intersection_and_union(self.confusion_matrix)
        present = union > 0
        iou = ops.where(present, intersection / ops.where(present, union, 1), 0)
        count = ops.sum(ops.cast(present, iou.dtype))
        return ops.cast(ops.sum(iou) / ops.maximum(count, 1), self.dtype)

    def pixel_accuracy(self):
        """Fraction of counted pixels predicted correctly; 0 before any pixel
        was counted."""
        matrix = self.confusion_matrix
        total = ops.sum(matrix)
        correct = ops.sum(ops.diagonal(matrix))
        return ops.cast(correct / ops.maximum(total, 1), self.dtype)

    def result(self):
        return ops.cast(self.confusion_matrix, self.dtype)

    def get_config(self):
        return {
            **super().get_config(),
            "num_classes": self.num_classes,
            "ignore_label": self.ignore_label,
        }


def _intersection_and_union(matrix):
    intersection = ops.diagonal(matrix)
    union = ops.sum(matrix, axis=0) + ops.sum(matrix, axis=1) - intersection
    return intersection, union


@keras.saving.register_keras_serializable(package="kseg")
class SegmentationMeanIoU(SegmentationConfusionMatrix):
    """Streaming mean intersection-over-union of a segmentation model, from
    logits.

    `result()` is the mean of `IoU_c = TP_c / (TP_c + FP_c + FN_c)` over the
    classes with a non-empty union (present in the labels or the predictions
    of all pixels seen since the last reset), as in the PASCAL VOC and
    Cityscapes benchmarks; classes absent from both are skipped rather than
    counted as 0 or 1. Updates, ignore label, resizing and the distributed
    aggregation are those of `SegmentationConfusionMatrix`; `per_class_iou()`
    and `pixel_accuracy()` are available too.

    Example:
    >>> metric = SegmentationMeanIoU(num_classes=2)
    >>> labels = np.array([[[0, 1], [1, 255]]])
    >>> logits = np.array([[[[1, 0], [0, 1]], [[1, 0], [0, 1]]]], "float32")
    >>> metric.update_state(labels, logits)
    >>> float(metric.result())  # class 0: 1/2, class 1: 1/2
    0.5

    Args:
        num_classes: int. Number of classes `C`.
        ignore_label: int. Label of pixels that are not scored; must not be in
            `[0, C)`. Defaults to `IGNORE_LABEL` (255).
        name: str. Metric name. Defaults to `"mean_iou"`.
        dtype: Dtype of `result()`. Defaults to `None` (float32).
    """

    def __init__(
        self, num_classes, ignore_label=IGNORE_LABEL, name="mean_iou", dtype=None
    ):
        super().__init__(num_classes, ignore_label=ignore_label, name=name, dtype=dtype)

    def result(self):
        return self.mean_iou()


@keras.saving.register_keras_serializable(package="kseg")
class SegmentationPixelAccuracy(SegmentationConfusionMatrix):
    """Streaming pixel accuracy of a segmentation model, from logits.

    `result()` is the fraction of non-ignored pixels whose argmax equals the
    label, accumulated over all batches since the last reset (every pixel
    counts once). Updates, ignore label, resizing and the distributed
    aggregation are those of `SegmentationConfusionMatrix`.

    Example:
    >>> metric = SegmentationPixelAccuracy(num_classes=2)
    >>> labels = np.array([[[0, 1], [1, 255]]])
    >>> logits = np.array([[[[1, 0], [0, 1]], [[1, 0], [0, 1]]]], "float32")
    >>> metric.update_state(labels, logits)
    >>> float(metric.result())
    0.6666...

    Args:
        num_classes: int. Number of classes `C`.
        ignore_label: int. Label of pixels that are not scored; must not be in
            `[0, C)`. Defaults to `IGNORE_LABEL` (255).
        name: str. Metric name. Defaults to `"pixel_accuracy"`.
        dtype: Dtype of `result()`. Defaults to `None` (float32).
    """

    def __init__(
        self, num_classes, ignore_label=IGNORE_LABEL, name="pixel_accuracy", dtype=None
    ):
        super().__init__(num_classes, ignore_label=ignore_label, name=name, dtype=dtype)

    def result(self):
        return self.pixel_accuracy()


def format_iou_table(per_class_iou, class_names=None):
    """Formats per-class IoU as a plain-text table, in percent.

    One row per class (`n/a` for a NaN IoU: class neither labelled nor
    predicted), then a `mean` row averaging the non-NaN entries — the same
    mean as `SegmentationMeanIoU`.

    Example:
    >>> print(format_iou_table([0.9, float("nan")], ["road", "sky"]))
    class    IoU (%)
    -----  ---------
    road       90.00
    sky          n/a
    -----  ---------
    mean       90.00

    Args:
        per_class_iou: sequence or tensor of `C` IoU values in `[0, 1]`.
        class_names: sequence of `C` names, or `None` for `class 0`, ...

    Returns:
        The table as one string (no trailing newline).
    """
    ious = np.asarray(keras.ops.convert_to_numpy(per_class_iou), dtype="float64")
    if ious.ndim != 1:
        raise ValueError(
            f"per_class_iou must be a 1-D sequence, got shape={ious.shape}"
        )
    if class_names is None:
        class_names = [f"class {i}" for i in range(len(ious))]
    class_names = [str(name) for name in class_names]
    if len(class_names) != len(ious):
        raise ValueError(
            f"Got {len(class_names)} class names for {len(ious)} IoU values"
        )
    present = ~np.isnan(ious)
    mean = float(np.mean(ious[present])) if present.any() else math.nan

    def cell(value):
        return "n/a" if math.isnan(value) else f"{100.0 * value:.2f}"

    rows = [(name, cell(iou)) for name, iou in zip(class_names, ious, strict=True)]
    rows.append(("mean", cell(mean)))
    name_width = max(len("class"), *(len(name) for name, _ in rows))
    value_width = max(len("IoU (%)"), *(len(value) for _, value in rows))
    rule = f"{'-' * name_width}  {'-' * value_width}"
    lines = [f"{'class':<{name_width}}  {'IoU (%)':>{value_width}}", rule]
    lines += [f"{name:<{name_width}}  {value:>{value_width}}" for name, value in rows]
    lines.insert(len(lines) - 1, rule)
    return "\n".join(lines)
