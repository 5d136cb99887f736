"""Training targets and losses of the PANet system, in `keras.ops`.

RPN anchor targets and sampling, RoI sampling, box and mask targets and the
five losses, as `../shared/SPEC.md` ("The PANet system") defines them and
averaged as Detectron2 does. Everything is batched with static shapes:
ground truth is padded to `M` rows (class 0 = padding), so the same code runs
under XLA and on the JAX backend. Random sampling draws from a
`keras.random.SeedGenerator`.
"""

import keras
from keras import ops

from kseg.layers.detection import (
    ROI_BOX_WEIGHTS,
    RPN_BOX_WEIGHTS,
    encode_boxes,
    pairwise_iou,
)


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


def rpn_targets(
    anchors, gt_boxes, gt_valid, seed, batch_size=256, positive_fraction=0.5
):
    """Sampled RPN labels and box targets.

    IoU `>= 0.7` with a ground-truth box is positive, and so is every anchor
    whose IoU with some ground-truth box is that box's highest (ties included,
    Detectron2's low-quality matches; not for IoU 0); `< 0.3` negative;
    `batch_size` anchors per image are sampled with at most
    `positive_fraction` positive.

    Returns:
        `(labels (B, K) float32, sampled (B, K) bool, positive (B, K) bool,
        box_targets (B, K, 4))`.
    """
    iou = masked_iou(
        ops.broadcast_to(anchors, (ops.shape(gt_boxes)[0],) + tuple(anchors.shape)),
        gt_boxes,
        gt_valid,
    )
    matched, labels = match(iou, 0.3, 0.7)
    best = ops.max(iou, axis=1, keepdims=True)
    low_quality = ops.logical_and(
        ops.equal(iou, best), ops.logical_and(gt_valid[:, None, :], best > 0.0)
    )
    labels = ops.where(ops.any(low_quality, axis=2), 1, labels)
    positive = labels == 1
    max_positive = int(batch_size * positive_fraction)
    positive = sample_mask(positive, max_positive, seed)
    num_positive = ops.sum(ops.cast(positive, "int32"), axis=1)
    negative = sample_mask(labels == 0, batch_size - num_positive, seed)
    matched_boxes = ops.take_along_axis(gt_boxes, matched[..., None], axis=1)
    box_targets = encode_boxes(matched_boxes, anchors[None], RPN_BOX_WEIGHTS)
    sampled = ops.logical_or(positive, negative)
    return ops.cast(positive, "float32"), sampled, positive, box_targets


def sample_rois(
    proposals,
    proposal_valid,
    gt_boxes,
    gt_classes,
    gt_valid,
    seed,
    batch_size=512,
    positive_fraction=0.25,
):
    """RoI sampling for the box and mask heads (ground truth boxes added).

    A proposal with IoU `>= 0.5` with a ground-truth box is foreground (that
    box's class and box), else background; `batch_size` RoIs per image with
    at most `positive_fraction` foreground. The sampled RoIs are returned
    foreground first, so the first `int(batch_size · positive_fraction)`
    rows hold every foreground RoI.

    Returns:
        dict of `rois (B, S, 4)`, `valid (B, S)`, `foreground (B, S)` bool,
        `classes (B, S)` int32 (0 background), `matched (B, S)` int32 index
        of the matched ground-truth row, `box_targets (B, S, 4)`, with
        `S = min(batch_size, P + M)`.
    """
    rois = ops.concatenate([proposals, ops.cast(gt_boxes, "float32")], axis=1)
    valid = ops.concatenate([proposal_valid, gt_valid], axis=1)
    iou = masked_iou(rois, gt_boxes, gt_valid)
    matched, labels = match(iou, 0.5, 0.5)
    foreground = ops.logical_and(valid, labels == 1)
    background = ops.logical_and(valid, labels != 1)
    foreground = sample_mask(foreground, int(batch_size * positive_fraction), seed)
    num_foreground = ops.sum(ops.cast(foreground, "int32"), axis=1)
    background = sample_mask(background, batch_size - num_foreground, seed)
    count = min(batch_size, rois.shape[1])
    # Foreground first, then background, then the rest: top_k of a rank key.
    key = ops.cast(foreground, "float32") * 2.0 + ops.cast(background, "float32")
    key = key - ops.cast(ops.arange(rois.shape[1]), "float32") / rois.shape[1]
    _, index = ops.top_k(key, count)
    take = lambda x: ops.take_along_axis(x, index, axis=1)  # noqa: E731
    sampled_rois = ops.take_along_axis(rois, index[..., None], axis=1)
    sampled_fg = take(foreground)
    sampled_valid = ops.logical_or(sampled_fg, take(background))
    sampled_matched = take(matched)
    classes = ops.take_along_axis(
        ops.cast(gt_classes, "int32"), sampled_matched, axis=1
    )
    classes = ops.where(sampled_fg, classes, 0)
    matched_boxes = ops.take_along_axis(gt_boxes, sampled_matched[..., None], axis=1)
    return {
        "rois": ops.stop_gradient(sampled_rois),
        "valid": sampled_valid,
        "foreground": sampled_fg,
        "classes": classes,
        "matched": sampled_matched,
        "box_targets": encode_boxes(matched_boxes, sampled_rois, ROI_BOX_WEIGHTS),
    }


def mask_targets(rois, matched, gt_boxes, gt_masks, roi_align):
    """28×28 mask targets: each ground-truth crop RoIAligned into the RoI.

    `gt_masks[b, m]` is instance `m`'s mask resampled inside its box
    (`crop_instance_mask`). The RoI is mapped into that crop's pixel
    coordinates and RoIAligned (`roi_align`, a stride-1 `RoIAlign` of the
    target size) from the crop padded by one zero pixel, so the mask is 0
    outside the ground-truth box; thresholded at 0.5.

    Args:
        rois: `(B, F, 4)` image pixels.
        matched: `(B, F)` int32 ground-truth rows.
        gt_boxes: `(B, M, 4)`.
        gt_masks: `(B, M, S, S)`.
        roi_align: `kseg.layers.RoIAlign` with `strides=1`.

    Returns:
        `(B, F, s, s)` float32 in {0, 1}.
    """
    batch, num_gt, size = ops.shape(gt_masks)[0], gt_masks.shape[1], gt_masks.shape[2]
    crops = ops.pad(ops.cast(gt_masks, "float32"), [[0, 0], [0, 0], [1, 1], [1, 1]])
    crops = ops.reshape(crops, (-1, size + 2, size + 2, 1))
    boxes = ops.take_along_axis(gt_boxes, matched[..., None], axis=1)
    scale_y = size / ops.maximum(boxes[..., 2] - boxes[..., 0], 1e-6)
    scale_x = size / ops.maximum(boxes[..., 3] - boxes[..., 1], 1e-6)
    scale = ops.stack([scale_y, scale_x, scale_y, scale_x], axis=-1)
    origin = ops.stack([boxes[..., 0], boxes[..., 1], boxes[..., 0], boxes[..., 1]], -1)
    local = (ops.cast(rois, "float32") - origin) * scale + 1.0
    count = rois.shape[1]
    index = ops.reshape(
        ops.arange(batch, dtype="int32")[:, None] * num_gt + matched, (-1,)
    )
    pooled = roi_align([crops, ops.reshape(local, (-1, 4)), index])
    out = roi_align.output_size[0]
    pooled = ops.reshape(pooled, (-1, count, out, out))
    return ops.cast(pooled >= 0.5, "float32")


def smooth_l1(x, beta):
    """Huber-style smooth L1 (Detectron2's `smooth_l1_loss`), elementwise."""
    x = ops.abs(x)
    if beta == 0:
        return x
    return ops.where(x < beta, 0.5 * x * x / beta, x - 0.5 * beta)


def rpn_losses(logits, deltas, labels, sampled, positive, box_targets, batch_size):
    """`(rpn_objectness, rpn_box)`: BCE over the sampled anchors and smooth-L1
    (β = 1/9) over the positive ones, both summed and divided by
    `batch_size · images` (Detectron2)."""
    images = ops.cast(ops.shape(logits)[0], "float32")
    normalizer = batch_size * images
    bce = ops.binary_crossentropy(labels, logits, from_logits=True)
    objectness = ops.sum(ops.where(sampled, bce, 0.0)) / normalizer
    box = ops.sum(smooth_l1(deltas - box_targets, 1.0 / 9.0), axis=-1)
    box = ops.sum(ops.where(positive, box, 0.0)) / normalizer
    return objectness, box


def box_losses(class_logits, box_deltas, samples, num_classes):
    """`(box_class, box_regression)`: softmax cross-entropy averaged over the
    sampled RoIs, smooth-L1 (β = 1) of the ground-truth class's deltas on the
    foreground RoIs, summed and divided by the number of sampled RoIs."""
    valid = ops.cast(samples["valid"], "float32")
    count = ops.maximum(ops.sum(valid), 1.0)
    ce = ops.sparse_categorical_crossentropy(
        samples["classes"], class_logits, from_logits=True
    )
    classification = ops.sum(ce * valid) / count
    batch, rois = ops.shape(box_deltas)[0], box_deltas.shape[1]
    deltas = ops.reshape(box_deltas, (batch, rois, num_classes, 4))
    pick = ops.one_hot(samples["classes"] - 1, num_classes)
    deltas = ops.sum(deltas * pick[..., None], axis=2)
    l1 = ops.sum(smooth_l1(deltas - samples["box_targets"], 1.0), axis=-1)
    regression = ops.sum(l1 * ops.cast(samples["foreground"], "float32")) / count
    return classification, regression


def mask_loss(mask_logits, classes, foreground, targets):
    """Mask BCE on the ground-truth class's mask, averaged over the pixels of
    the foreground RoIs (0 without any).

    Args:
        mask_logits: `(B, F, s, s, C)`.
        classes: `(B, F)` int32 in `1..C` for foreground.
        foreground: `(B, F)` bool.
        targets: `(B, F, s, s)`.
    """
    num_classes = mask_logits.shape[-1]
    pick = ops.one_hot(classes - 1, num_classes)
    logits = ops.sum(mask_logits * pick[:, :, None, None, :], axis=-1)
    bce = ops.binary_crossentropy(targets, logits, from_logits=True)
    weight = ops.cast(foreground, "float32")[:, :, None, None]
    pixels = ops.maximum(ops.sum(weight) * targets.shape[2] * targets.shape[3], 1.0)
    return ops.sum(bce * weight) / pixels
