"""Matching and sampling shared by PANet's two stages, in `keras.ops`.

Everything is batched with static shapes: ground truth is padded to `M` rows
(class 0 = padding), so the same code runs under XLA and on the JAX backend.
Random sampling draws from a `keras.random.SeedGenerator`.
"""

import keras
from keras import ops

from kseg.layers.boxes import pairwise_iou
from kseg.layers.common import check_positive_int


def check_sampling(batch_size_per_image, positive_fraction):
    """`(int, float)`: a positive sample count per image and a positive
    (foreground) share in (0, 1]; `ValueError` naming the wrong one."""
    count = check_positive_int(batch_size_per_image, "batch_size_per_image")
    fraction = float(positive_fraction)
    if not 0.0 < fraction <= 1.0:
        raise ValueError(
            f"positive_fraction must be in (0, 1], got {positive_fraction}"
        )
    return count, fraction


def masked_iou(boxes, gt_boxes, gt_valid):
    """IoU `(B, N, M)` of boxes with the ground truth, −1 for padding rows
    (lower than any real IoU, so an argmax never picks them)."""
    iou = pairwise_iou(boxes, gt_boxes)
    return ops.where(gt_valid[:, None, :], iou, -1.0)


def sample_mask(candidates, limit, seed):
    """Keeps at most `limit` (per row) randomly chosen `True` entries.

    Args:
        candidates: bool `(B, N)`.
        limit: int or int32 `(B,)`.
        seed: `keras.random.SeedGenerator`.

    Returns:
        bool `(B, N)`, a subset of `candidates`, uniformly random.
    """
    keys = keras.random.uniform(ops.shape(candidates), seed=seed)
    keys = ops.where(candidates, keys, -1.0)
    # The rank of each entry in a random order of the candidates.
    rank = ops.argsort(ops.argsort(-keys, axis=1), axis=1)
    count = ops.sum(ops.cast(candidates, "int32"), axis=1)
    keep = ops.minimum(count, ops.cast(limit, "int32"))
    return ops.logical_and(candidates, rank < keep[:, None])


def match(iou, low, high):
    """keras-hub `BoxMatcher` on `(B, N, M)` IoU: `(matched (B, N) int32,
    label (B, N) int32)` with label 1 for max IoU `>= high`, 0 for `< low`,
    −1 between."""
    from keras_hub.layers import BoxMatcher

    if low == high:
        matcher = BoxMatcher(thresholds=[high], match_values=[0, 1])
    else:
        matcher = BoxMatcher(thresholds=[low, high], match_values=[0, -1, 1])
    matched, labels = matcher(iou)
    return ops.cast(matched, "int32"), ops.cast(labels, "int32")


def smooth_l1(x, beta):
    """Huber-style smooth L1 (Detectron2's `smooth_l1_loss`), elementwise."""
    x = ops.abs(x)
    if beta == 0:
        return x
    return ops.where(x < beta, 0.5 * x * x / beta, x - 0.5 * beta)
