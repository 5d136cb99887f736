"""Pixel-wise cross-entropy for semantic segmentation, with ignore label, class
weights and online hard example mining (OHEM).

The loss settings follow TF Model Garden's segmentation loss
(`ignore_label=255`, `class_weights`, `top_k_percent_pixels`); SegModel
(Shen et al., CVPR 2017) trains with OHEM keeping the 50% of pixels with the
largest loss.
"""

import math
import numbers
from collections.abc import Mapping

import keras
from keras import ops

from kseg.data.labels import IGNORE_LABEL
from kseg.layers.common import check_channels, resize

# Keys of pixels that carry no weight; real keys `w·ce` are never negative.
_NO_PIXEL = -1.0


def standardize_labels(labels):
    """Returns integer labels `(N, H, W)` from `(N, H, W)` or `(N, H, W, 1)`."""
    shape = labels.shape
    if len(shape) == 4 and shape[-1] == 1:
        labels = ops.squeeze(labels, axis=-1)
    elif len(shape) != 3:
        raise ValueError(
            f"labels must have shape (N, H, W) or (N, H, W, 1), got shape={shape}"
        )
    return ops.cast(labels, "int32")


def resize_logits_to_labels(logits, labels):
    """Casts `(N, h, w, C)` logits to float32 and resizes them bilinearly to
    the `(H, W)` of `labels` `(N, H, W)` unless the sizes are statically equal.

    The logits are resized, never the labels: nearest-neighbour label
    downsampling would drop thin structures from the loss and the metric.
    """
    if len(logits.shape) != 4:
        raise ValueError(
            f"logits must have rank 4 (N, H, W, C), got shape={logits.shape}"
        )
    logits = ops.cast(logits, "float32")
    logit_size, label_size = tuple(logits.shape[1:3]), tuple(labels.shape[1:3])
    if logit_size == label_size and None not in label_size:
        return logits
    label_shape = ops.shape(labels)
    return resize(logits, (label_shape[1], label_shape[2]))


def valid_pixels(labels, num_classes, ignore_label):
    """Boolean mask of pixels whose label is a class in `[0, num_classes)`.

    The ignore label is never in that range (the constructors check it); other
    out-of-range labels are masked too, because they cannot be scored.
    """
    return (
        ops.not_equal(labels, ignore_label)
        & ops.greater_equal(labels, 0)
        & ops.less(labels, num_classes)
    )


def pixel_sample_weights(sample_weight, labels):
    """Float32 weights of shape `(N, H, W)` from a Keras `sample_weight` of
    shape `(N,)`, `(N, H, W)` or `(N, H, W, 1)` (`None` gives ones)."""
    if sample_weight is None:
        return ops.ones_like(labels, dtype="float32")
    sample_weight = ops.cast(ops.convert_to_tensor(sample_weight), "float32")
    rank = len(sample_weight.shape)
    if rank == 4 and sample_weight.shape[-1] == 1:
        sample_weight = ops.squeeze(sample_weight, axis=-1)
    elif rank == 1:
        sample_weight = ops.reshape(sample_weight, (-1, 1, 1))
    elif rank != 3:
        raise ValueError(
            "sample_weight must have shape (N,), (N, H, W) or (N, H, W, 1), "
            f"got shape={sample_weight.shape}"
        )
    return ops.broadcast_to(sample_weight, ops.shape(labels))


def check_ignore_label(ignore_label, num_classes):
    """Returns `ignore_label` as an int; it must not be a class index."""
    if isinstance(ignore_label, bool) or not isinstance(ignore_label, numbers.Integral):
        raise ValueError(f"ignore_label must be an int, got {ignore_label!r}")
    if num_classes is not None and 0 <= ignore_label < num_classes:
        raise ValueError(
            f"ignore_label={ignore_label} is a class index for "
            f"num_classes={num_classes}; pick a label outside [0, {num_classes})"
        )
    return int(ignore_label)


def check_num_classes(num_classes):
    """Returns `num_classes` as an int >= 1."""
    if (
        isinstance(num_classes, bool)
        or not isinstance(num_classes, numbers.Integral)
        or num_classes < 1
    ):
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    return int(num_classes)


def _replica_context():
    """The `tf.distribute` replica context when this code runs as one of
    several replicas, else `None`.

    Only TensorFlow splits a global batch into per-replica calls of the loss;
    JAX (`keras.distribution`) computes it on the sharded global arrays, which
    needs nothing here.
    """
    if keras.backend.backend() != "tensorflow":
        return None
    import tensorflow as tf

    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return None
    return context


def _sum_over_replicas(x):
    context = _replica_context()
    return x if context is None else context.all_reduce("sum", x)


def _gather_over_replicas(x):
    context = _replica_context()
    return x if context is None else context.all_gather(x, axis=0)


def _top_k_keep_weights(keys, fraction):
    """Per-pixel keep weights in `[0, 1]` selecting the `k` largest `keys`.

    `keys` holds `w·ce` for pixels with weight `w > 0` and `_NO_PIXEL` for the
    rest. With `V` such pixels (over the global batch), `k = ceil(fraction·V)`
    (at least 1 when `V > 0`; a small tolerance keeps float32 round-off such
    as `0.3·10 = 3.0000001` from adding a pixel). Pixels above the k-th
    largest key `t` get weight 1; the `n_eq` pixels equal to `t` share the
    remaining `k − n_gt` slots evenly, weight `(k − n_gt)/n_eq` each. Tied
    pixels have equal keys, so the kept loss sum equals that of any top-k
    tie-break, and the result does not depend on pixel order or on how the
    batch is split over replicas.
    """
    keys = ops.stop_gradient(ops.reshape(keys, (-1,)))
    all_keys = _gather_over_replicas(keys)
    num_valid = ops.sum(ops.cast(ops.greater_equal(all_keys, 0.0), "float32"))
    k = ops.ceil(fraction * num_valid - 1e-3)
    k = ops.minimum(ops.maximum(k, 1.0), num_valid)
    # A leading sentinel keeps the sort and index valid for an empty batch.
    sorted_keys = ops.sort(
        ops.concatenate([ops.convert_to_tensor([_NO_PIXEL]), all_keys], axis=0)
    )
    size = ops.shape(sorted_keys)[0]
    index = ops.clip(size - ops.cast(k, "int32"), 0, size - 1)
    threshold = ops.take(sorted_keys, index)
    num_greater = ops.sum(ops.cast(ops.greater(all_keys, threshold), "float32"))
    num_equal = ops.sum(ops.cast(ops.equal(all_keys, threshold), "float32"))
    tie_weight = ops.divide_no_nan(k - num_greater, num_equal)
    keep = ops.where(
        ops.greater(keys, threshold),
        1.0,
        ops.where(ops.equal(keys, threshold), tie_weight, 0.0),
    )
    return keep * ops.cast(ops.greater_equal(keys, 0.0), "float32")


@keras.saving.register_keras_serializable(package="kseg")
class SegmentationCrossEntropy(keras.losses.Loss):
    """Pixel-wise softmax cross-entropy from logits, with ignore label, class
    weights and online hard example mining.

    For logits `z` `(N, h, w, C)` and integer labels `y` `(N, H, W)` (or
    `(N, H, W, 1)`), the logits are cast to float32 and, if `(h, w) != (H, W)`,
    resized bilinearly (half-pixel centres, `kseg.layers.common.resize`) to
    the label size — so auxiliary heads at 1/2 or 1/4 resolution are trained
    against full-resolution labels. Per pixel `p`:

    - `ce_p = −log softmax(z_p)[y_p]`,
    - `w_p = class_weights[y_p] · sample_weight_p` for labels in `[0, C)`,
      `w_p = 0` for `ignore_label` (and any other label outside `[0, C)`).

    Pixels with `w_p > 0` are the valid pixels. With `top_k_percent_pixels=f <
    1` (OHEM), only the `k = ceil(f·V)` valid pixels with the largest weighted
    loss `w_p·ce_p` are kept, `V` counting the valid pixels of the whole
    (global) batch; pixels tied at the threshold share the remaining slots
    with fractional weights, so ties need no arbitrary order. The loss is

        L = Σ_kept w_p·ce_p / Σ_kept w_p

    — the weighted mean over the kept pixels of the batch (every pixel, not
    every image, counts once), and `0` when no pixel is kept.

    Under `tf.distribute` each replica returns its share
    `Σ_local w·ce / Σ_global w` (the `tf.nn.compute_average_loss` convention
    Keras expects: the gradients of the replicas are summed), with the
    denominator summed over replicas and the OHEM threshold taken over the
    gathered keys of all replicas. The loss and its gradient therefore equal
    a single device's on the same global batch up to float round-off. The
    return value is a scalar, which Keras's `"sum_over_batch_size"` reduction
    passes through unchanged. Keras `sample_weight`s of shape `(N,)`,
    `(N, H, W)` or `(N, H, W, 1)` multiply the pixel weights.

    Example:
    >>> loss = SegmentationCrossEntropy(num_classes=3, top_k_percent_pixels=0.5)
    >>> labels = np.full((1, 4, 4), 255)
    >>> labels[0, :2] = 1
    >>> float(loss(labels, np.zeros((1, 2, 2, 3))))  # log(3): logits resized
    1.0986...

    Args:
        num_classes: int or `None`. Number of classes `C`; checked against the
            logits' channel count. `None` takes `C` from the logits.
            Defaults to `None`.
        ignore_label: int. Label of pixels that contribute nothing.
            Defaults to `IGNORE_LABEL` (255).
        class_weights: list of `C` non-negative floats or `None`. Per-class
            pixel weights; `None` weighs all classes 1. Defaults to `None`.
        top_k_percent_pixels: float in `(0, 1]`. Fraction of the valid pixels
            kept by OHEM; `1.0` keeps all (no OHEM). SegModel uses `0.5`.
            Defaults to `1.0`.
        name: str. Name of the loss. Defaults to
            `"segmentation_cross_entropy"`.
        reduction: str. Only `"sum_over_batch_size"`: the normalisation above
            is the reduction. Defaults to `"sum_over_batch_size"`.
    """

    def __init__(
        self,
        num_classes=None,
        ignore_label=IGNORE_LABEL,
        class_weights=None,
        top_k_percent_pixels=1.0,
        name="segmentation_cross_entropy",
        reduction="sum_over_batch_size",
    ):
        if reduction != "sum_over_batch_size":
            raise ValueError(
                "SegmentationCrossEntropy always averages over the kept pixels "
                "of the batch; reduction must be 'sum_over_batch_size', got "
                f"{reduction!r}"
            )
        super().__init__(name=name, reduction=reduction, dtype="float32")
        if num_classes is not None:
            num_classes = check_num_classes(num_classes)
        if class_weights is not None:
            class_weights = [float(w) for w in class_weights]
            if not all(math.isfinite(w) and w >= 0 for w in class_weights):
                raise ValueError(
                    "class_weights must be finite and non-negative, got "
                    f"{class_weights}"
                )
            if num_classes is not None and len(class_weights) != num_classes:
                raise ValueError(
                    f"class_weights has {len(class_weights)} entries but "
                    f"num_classes={num_classes}"
                )
        if isinstance(top_k_percent_pixels, bool) or not (
            isinstance(top_k_percent_pixels, numbers.Real)
            and 0.0 < top_k_percent_pixels <= 1.0
        ):
            raise ValueError(
                "top_k_percent_pixels must be a fraction in (0, 1], got "
                f"{top_k_percent_pixels!r}"
            )
        self.num_classes = num_classes
        self.ignore_label = check_ignore_label(ignore_label, num_classes)
        self.class_weights = class_weights
        self.top_k_percent_pixels = float(top_k_percent_pixels)

    def __call__(self, y_true, y_pred, sample_weight=None):
        with keras.name_scope(self.name):
            return self.call(y_true, y_pred, sample_weight=sample_weight)

    def call(self, y_true, y_pred, sample_weight=None):
        logits = ops.convert_to_tensor(y_pred)
        labels = standardize_labels(ops.convert_to_tensor(y_true))
        logits = resize_logits_to_labels(logits, labels)
        num_classes = check_channels(logits.shape, "SegmentationCrossEntropy logits")
        if self.num_classes is not None and num_classes != self.num_classes:
            raise ValueError(
                f"logits have {num_classes} channels but num_classes={self.num_classes}"
            )
        if self.class_weights is not None and len(self.class_weights) != num_classes:
            raise ValueError(
                f"class_weights has {len(self.class_weights)} entries but the "
                f"logits have {num_classes} channels"
            )
        check_ignore_label(self.ignore_label, num_classes)

        valid = valid_pixels(labels, num_classes, self.ignore_label)
        safe_labels = ops.where(valid, labels, 0)
        log_probs = ops.log_softmax(logits, axis=-1)
        ce = -ops.take_along_axis(log_probs, safe_labels[..., None], axis=-1)[..., 0]

        weights = ops.cast(valid, "float32") * pixel_sample_weights(
            sample_weight, labels
        )
        if self.class_weights is not None:
            weights = weights * ops.take(
                ops.convert_to_tensor(self.class_weights, "float32"), safe_labels
            )
        if self.top_k_percent_pixels < 1.0:
            keys = ops.where(ops.greater(weights, 0.0), weights * ce, _NO_PIXEL)
            keep = _top_k_keep_weights(keys, self.top_k_percent_pixels)
            weights = ops.reshape(keep, ops.shape(weights)) * weights

        numerator = ops.sum(weights * ce)
        denominator = _sum_over_replicas(ops.stop_gradient(ops.sum(weights)))
        safe_denominator = ops.where(denominator > 0.0, denominator, 1.0)
        return numerator / safe_denominator

    def get_config(self):
        return {
            **super().get_config(),
            "num_classes": self.num_classes,
            "ignore_label": self.ignore_label,
            "class_weights": self.class_weights,
            "top_k_percent_pixels": self.top_k_percent_pixels,
        }


def segmentation_losses(outputs, **loss_kwargs):
    """Losses and loss weights for `model.compile` of a model with several
    segmentation outputs (main logits plus auxiliary heads).

    Every output gets its own `SegmentationCrossEntropy(**loss_kwargs)`, named
    `"<output>_loss"`; Keras then minimises `Σ weight_o · L_o`. Auxiliary
    outputs may have a lower resolution than the labels: the loss resizes
    their logits to the label size. The labels are passed once per output,
    e.g. `y={"logits": labels, "ecre_logits": labels}`.

    Example:
    >>> losses, weights = segmentation_losses(
    ...     {"logits": 1.0, "ecre_logits": 0.4}, top_k_percent_pixels=0.5
    ... )
    >>> model.compile(optimizer="sgd", loss=losses, loss_weights=weights)

    Args:
        outputs: dict. Output name → non-negative loss weight.
        **loss_kwargs: Arguments of `SegmentationCrossEntropy` (`num_classes`,
            `ignore_label`, `class_weights`, `top_k_percent_pixels`), shared
            by all outputs.

    Returns:
        `(losses, loss_weights)`: dicts keyed by output name.
    """
    if not isinstance(outputs, Mapping) or not outputs:
        raise ValueError(
            "outputs must be a non-empty dict of output name -> loss weight, "
            f"got {outputs!r}"
        )
    if "name" in loss_kwargs:
        raise ValueError("segmentation_losses names each loss after its output")
    losses, loss_weights = {}, {}
    for output, weight in outputs.items():
        if (
            isinstance(weight, bool)
            or not isinstance(weight, numbers.Real)
            or not math.isfinite(weight)
            or weight < 0
        ):
            raise ValueError(
                f"loss weight of output {output!r} must be a non-negative "
                f"number, got {weight!r}"
            )
        losses[output] = SegmentationCrossEntropy(name=f"{output}_loss", **loss_kwargs)
        loss_weights[output] = float(weight)
    return losses, loss_weights
