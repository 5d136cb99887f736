"""The RoI heads of PANet: RoI sampling, the box head, the mask head (with
PANet's fully-connected fusion as a switch), their targets and losses, and
the detection post-processing (SPEC "The PANet system": RoI sampling, level
assignment, RoIAlign, box head, mask head, losses, inference).

He et al., "Mask R-CNN", ICCV 2017; Liu et al., "Path Aggregation Network for
Instance Segmentation", CVPR 2018, sections 3.2-3.3.
"""

import keras
from keras import ops

from kseg.layers.boxes import ROI_BOX_WEIGHTS, encode_boxes
from kseg.layers.common import KsegLayer, check_choice, check_positive_int
from kseg.layers.detection import DetectionLayer
from kseg.layers.heads import BoxHead, MaskHead
from kseg.layers.nms import detections_spec
from kseg.layers.panet import RoIAlign
from kseg.layers.roi_align import PyramidRoIAlign
from kseg.models.panet.sampling import (
    check_sampling,
    masked_iou,
    match,
    sample_mask,
    smooth_l1,
)

# SPEC: 7×7 box grids; the mask grid is half the mask side (the deconv doubles).
BOX_POOL_SIZE = 7
# Detectron2's box-head loss: smooth-L1 with beta 1.
BOX_SMOOTH_L1_BETA = 1.0


def sample_rois(
    proposals,
    proposal_valid,
    gt_boxes,
    gt_classes,
    gt_valid,
    seed,
    batch_size=512,
    positive_fraction=0.25,
    foreground_iou=0.5,
):
    """RoI sampling for the box and mask heads (ground truth boxes added).

    A proposal with IoU `>= foreground_iou` with a ground-truth box is
    foreground (that box's class and box), else background; `batch_size`
    RoIs per image with at most `positive_fraction` foreground. The sampled
    RoIs are returned foreground first, so the first
    `int(batch_size · positive_fraction)` rows hold every foreground RoI.

    Returns:
        dict of `rois (B, S, 4)`, `valid (B, S)`, `foreground (B, S)` bool,
        `classes (B, S)` int32 (0 background), `matched (B, S)` int32 index
        of the matched ground-truth row, `box_targets (B, S, 4)`, with
        `S = min(batch_size, P + M)`.
    """
    rois = ops.concatenate([proposals, ops.cast(gt_boxes, "float32")], axis=1)
    valid = ops.concatenate([proposal_valid, gt_valid], axis=1)
    iou = masked_iou(rois, gt_boxes, gt_valid)
    matched, labels = match(iou, foreground_iou, foreground_iou)
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

    def take(x):
        return ops.take_along_axis(x, index, axis=1)

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
    """Mask targets: each ground-truth crop RoIAligned into the RoI.

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
    index = ops.reshape(
        ops.arange(batch, dtype="int32")[:, None] * num_gt + matched, (-1,)
    )
    pooled = flat_mask_targets(
        ops.reshape(rois, (-1, 4)),
        index,
        ops.reshape(gt_boxes, (-1, 4)),
        ops.reshape(gt_masks, (-1, size, size)),
        roi_align,
    )
    out = roi_align.output_size[0]
    return ops.reshape(pooled, (-1, rois.shape[1], out, out))


def flat_mask_targets(rois, index, gt_boxes, gt_masks, roi_align):
    """`mask_targets` of `(N, 4)` RoIs matched to rows `index` `(N,)` of all
    the batch's `(G, 4)` ground-truth boxes and `(G, S, S)` crops:
    `(N, s, s)` float32 in {0, 1}."""
    size = gt_masks.shape[1]
    crops = ops.pad(ops.cast(gt_masks, "float32"), [[0, 0], [1, 1], [1, 1]])
    crops = ops.reshape(crops, (-1, size + 2, size + 2, 1))
    boxes = ops.take(gt_boxes, index, axis=0)
    scale_y = size / ops.maximum(boxes[:, 2] - boxes[:, 0], 1e-6)
    scale_x = size / ops.maximum(boxes[:, 3] - boxes[:, 1], 1e-6)
    scale = ops.stack([scale_y, scale_x, scale_y, scale_x], axis=-1)
    origin = ops.stack([boxes[:, 0], boxes[:, 1], boxes[:, 0], boxes[:, 1]], -1)
    local = (ops.cast(rois, "float32") - origin) * scale + 1.0
    pooled = roi_align([crops, local, index])
    return ops.cast(pooled[..., 0] >= 0.5, "float32")


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
    l1 = ops.sum(smooth_l1(deltas - samples["box_targets"], BOX_SMOOTH_L1_BETA), -1)
    regression = ops.sum(l1 * ops.cast(samples["foreground"], "float32")) / count
    return classification, regression


def select_class_masks(mask_logits, classes):
    """`(N, s, s)` probabilities of each RoI's class from `(N, s, s, C)`
    logits and `(N,)` classes in `1..C` (all zero for class 0)."""
    pick = ops.one_hot(ops.reshape(classes, (-1,)) - 1, mask_logits.shape[-1])
    logits = ops.sum(mask_logits * pick[:, None, None, :], axis=-1)
    return ops.sigmoid(logits) * ops.max(pick, axis=-1)[:, None, None]


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


# The smallest static count of foreground RoIs the mask head trains on.
SMALLEST_MASK_BUCKET = 8


def mask_buckets(limit):
    """The static row counts the mask head may train on when each image
    has at most `limit` foreground RoIs: 8, 16, 32, … below `limit`, then
    `limit`. A training step gathers the batch's foreground RoIs into the
    smallest that holds them all (more than `limit`: every image's `limit`
    candidate rows), so the mask head's cost follows the real foreground
    count (a few RoIs an image early in training: torchvision's "positives
    only") while every shape stays static."""
    buckets, rows = [], SMALLEST_MASK_BUCKET
    while rows < limit:
        buckets.append(rows)
        rows *= 2
    return [*buckets, limit]


def _cond_branch(predicate, small, large):
    """`() -> ops.cond(predicate, small, large)`: one of two branches of the
    mask loss, the other never run."""
    return lambda: ops.cond(predicate, small, large)


@keras.saving.register_keras_serializable(package="kseg")
class RoIHeads(KsegLayer):
    """The RoI heads stage: box pooling and `BoxHead`, `DetectionLayer`,
    mask pooling and `MaskHead` (PANet's fully-connected fusion a switch of
    it), and in training the RoI sampling, box and mask targets and the
    three head losses. SPEC's values are the defaults.

    Example:
    >>> heads = RoIHeads(2, filters=8, fc_units=16, max_detections=3)
    >>> levels = [np.zeros((1, 64 // s, 64 // s, 8)) for s in (4, 8, 16, 32)]
    >>> proposals = np.array([[[4.0, 4.0, 30.0, 40.0]] * 5], "float32")
    >>> out = heads([levels, proposals, np.ones((1, 5), bool),
    ...              np.zeros((1, 64, 64, 3))])
    >>> tuple(out["masks"].shape)
    (1, 3, 28, 28)

    Args:
        num_classes: int. Object classes `C` (ids `1..C`).
        filters: int. Channels of the mask head (and heavier box head).
            Defaults to `256`.
        fc_units: int. Box head fc units. Defaults to `1024`.
        adaptive_pooling: bool. Pool every RoI from every level (PANet's
            adaptive feature pooling). Defaults to `True`.
        fusion: str. `"max"` or `"sum"` across levels. Defaults to `"max"`.
        fusion_position: str. `"after"` or `"before"` the box head's first
            parameter layer. Defaults to `"after"`.
        heavier_head: bool. The 4 conv + fc box head. Defaults to `False`.
        fully_connected_fusion: bool. The mask head's fc short path.
            Defaults to `True`.
        fusion_branch: str. `"conv2"`, `"conv3"` or `"conv4"`.
            Defaults to `"conv3"`.
        mask_fusion: str. `"sum"`, `"max"` or `"product"`. Defaults to `"sum"`.
        mask_size: int. Side of the predicted masks (even; the mask grid is
            half of it). Defaults to `28`.
        sampling_ratio: int. RoIAlign samples per bin (0 = adaptive).
            Defaults to `2`.
        aligned: bool. RoIAlign's half-pixel correction of the box and
            mask pooling; `False` is torchvision's unaligned RoIAlign.
            Defaults to `True` (SPEC).
        strides: ints. Strides of the pooled levels. Defaults to
            `(4, 8, 16, 32)`.
        batch_size_per_image: int. RoIs sampled per image. Defaults to `512`.
        positive_fraction: float. Most foreground share. Defaults to `0.25`.
        foreground_iou: float. IoU with a ground-truth box from which a RoI is
            foreground. Defaults to `0.5`.
        score_threshold: float. Detection score threshold. Defaults to `0.05`.
        nms_threshold: float. Per-class NMS IoU. Defaults to `0.5`.
        max_detections: int. Detections per image. Defaults to `100`.
        min_size: float. Detections with a side under it are dropped.
            Defaults to `1e-2`.
        normalization: `None`, `"batch"` or `"sync_batch"`. Defaults to
            `None`.
        seed: int or `None`. Seed of the RoI sampling. Defaults to `None`.
        **kwargs: Base layer keyword arguments (`name`, `dtype`, ...).

    Input shape:
        `[levels, proposals (batch, P, 4), valid (batch, P), images]` with
        the list N2..N5 (or P2..P5) of `(batch, H_l, W_l, C)` maps.

    Output shape:
        Dict `boxes (batch, D, 4)`, `scores (batch, D)`, `classes (batch, D)`
        int32, `masks (batch, D, mask_size, mask_size)` probabilities of the
        detected class, `num_detections (batch,)` int32.
    """

    def __init__(
        self,
        num_classes,
        filters=256,
        fc_units=1024,
        adaptive_pooling=True,
        fusion="max",
        fusion_position="after",
        heavier_head=False,
        fully_connected_fusion=True,
        fusion_branch="conv3",
        mask_fusion="sum",
        mask_size=28,
        sampling_ratio=2,
        aligned=True,
        strides=(4, 8, 16, 32),
        batch_size_per_image=512,
        positive_fraction=0.25,
        foreground_iou=0.5,
        score_threshold=0.05,
        nms_threshold=0.5,
        max_detections=100,
        min_size=1e-2,
        normalization=None,
        seed=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.num_classes = check_positive_int(num_classes, "num_classes")
        self.filters = check_positive_int(filters, "filters")
        self.fc_units = check_positive_int(fc_units, "fc_units")
        self.adaptive_pooling = bool(adaptive_pooling)
        check_choice(fusion, ("max", "sum"), "fusion")
        check_choice(fusion_position, ("after", "before"), "fusion_position")
        self.fusion = fusion
        self.fusion_position = fusion_position
        self.heavier_head = bool(heavier_head)
        self.fully_connected_fusion = bool(fully_connected_fusion)
        self.fusion_branch = fusion_branch
        self.mask_fusion = mask_fusion
        self.mask_size = check_positive_int(mask_size, "mask_size")
        if self.mask_size % 2:
            raise ValueError(f"mask_size must be even, got {mask_size}")
        self.sampling_ratio = int(sampling_ratio)
        self.aligned = bool(aligned)
        self.strides = tuple(int(s) for s in strides)
        self.batch_size_per_image, self.positive_fraction = check_sampling(
            batch_size_per_image, positive_fraction
        )
        self.foreground_iou = float(foreground_iou)
        if not 0.0 < self.foreground_iou <= 1.0:
            raise ValueError(f"foreground_iou must be in (0, 1], got {foreground_iou}")
        self.score_threshold = float(score_threshold)
        self.nms_threshold = float(nms_threshold)
        self.max_detections = check_positive_int(max_detections, "max_detections")
        self.min_size = float(min_size)
        self.normalization = normalization
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    def build(self, input_shape):
        level_shapes, proposals_shape = input_shape[0], input_shape[1]
        policy = self.dtype_policy
        rois = (
            None
            if proposals_shape[0] is None
            else (proposals_shape[0] * proposals_shape[1])
        )
        grids = {}
        for name, size in (("box", BOX_POOL_SIZE), ("mask", self.mask_size // 2)):
            pool = PyramidRoIAlign(
                size,
                self.sampling_ratio,
                self.strides,
                self.adaptive_pooling,
                aligned=self.aligned,
                dtype=policy,
                name=f"{name}_roi_align",
            )
            pool.build([list(level_shapes), proposals_shape])
            setattr(self, f"{name}_pool", pool)
            grid = (rois, size, size, level_shapes[0][-1])
            grids[name] = [grid] * len(level_shapes) if self.adaptive_pooling else grid
        self.box_head = BoxHead(
            self.num_classes,
            fc_units=self.fc_units,
            conv_filters=self.filters,
            heavier_head=self.heavier_head,
            fusion=self.fusion,
            fusion_position=self.fusion_position,
            normalization=self.normalization,
            dtype=policy,
            name="box_head",
        )
        self.box_head.build(grids["box"])
        self.mask_head = MaskHead(
            self.num_classes,
            mask_size=self.mask_size,
            filters=self.filters,
            fusion=self.fusion,
            fully_connected_fusion=self.fully_connected_fusion,
            fusion_branch=self.fusion_branch,
            mask_fusion=self.mask_fusion,
            normalization=self.normalization,
            dtype=policy,
            name="mask_head",
        )
        self.mask_head.build(grids["mask"])
        self.detection = DetectionLayer(
            self.num_classes,
            score_threshold=self.score_threshold,
            iou_threshold=self.nms_threshold,
            max_detections=self.max_detections,
            min_size=self.min_size,
            name="detections",
        )
        self.mask_target_align = RoIAlign(
            self.mask_size, sampling_ratio=2, strides=1, name="mask_targets"
        )

    def forward(self, levels, proposals, valid, images, training=None):
        """The inference path with its intermediate values: the box head's
        `class_logits` and `box_deltas` for every proposal, the detections
        and the detected boxes' `mask_logits` `(batch·D, s, s, C)`."""
        levels = list(levels)
        rois = proposals.shape[1]
        class_logits, box_deltas = self.box_head(
            self.box_pool([levels, proposals]), training=training
        )
        class_logits = ops.reshape(class_logits, (-1, rois, self.num_classes + 1))
        box_deltas = ops.reshape(box_deltas, (-1, rois, 4 * self.num_classes))
        detections = self.detection(
            [class_logits, box_deltas, proposals, valid, images]
        )
        mask_logits = self.mask_head(
            self.mask_pool([levels, detections["boxes"]]), training=training
        )
        masks = select_class_masks(mask_logits, detections["classes"])
        size = self.mask_size
        return {
            **detections,
            "masks": ops.reshape(masks, (-1, self.max_detections, size, size)),
            "class_logits": class_logits,
            "box_deltas": box_deltas,
            "mask_logits": mask_logits,
        }

    def call(self, inputs, training=None):
        levels, proposals, valid, images = inputs
        out = self.forward(levels, proposals, valid, images, training=training)
        return {key: out[key] for key in DETECTION_KEYS}

    def losses_for(
        self,
        levels,
        proposals,
        valid,
        gt_boxes,
        gt_classes,
        gt_masks,
        gt_valid,
        training=None,
    ):
        """`{"box_class", "box_regression", "mask"}` on RoIs sampled from the
        proposals and the ground truth (`(B, M, ...)`, `gt_valid` marks the
        real rows). The mask head trains on the batch's foreground RoIs
        only (`foreground_rows`)."""
        levels = list(levels)
        samples = sample_rois(
            proposals,
            valid,
            gt_boxes,
            gt_classes,
            gt_valid,
            self.seed_generator,
            self.batch_size_per_image,
            self.positive_fraction,
            self.foreground_iou,
        )
        rois = samples["rois"]
        count = rois.shape[1]
        class_logits, box_deltas = self.box_head(
            self.box_pool([levels, rois], training=training), training=training
        )
        box_class, box_regression = box_losses(
            ops.reshape(class_logits, (-1, count, self.num_classes + 1)),
            ops.reshape(box_deltas, (-1, count, 4 * self.num_classes)),
            samples,
            self.num_classes,
        )
        fg_limit = min(count, int(self.batch_size_per_image * self.positive_fraction))
        mask = self.foreground_rows(
            samples,
            fg_limit,
            lambda take: self._mask_loss(
                levels, samples, gt_boxes, gt_masks, fg_limit, take, training
            ),
        )
        return {"box_class": box_class, "box_regression": box_regression, "mask": mask}

    def foreground_rows(self, samples, limit, fn):
        """`fn(take)` for the batch's foreground RoIs: `take` indexes the
        `B · limit` candidate rows (each image's first `limit` sampled RoIs,
        foreground first; image-major), foreground rows first, as many as
        the smallest `mask_buckets(limit)` count holding them all (one
        `ops.cond` per bucket, the other branches never run), or None for
        every candidate row. The mask head then costs what the real
        foreground count costs, with static shapes. Batch norm in the mask
        head (synchronized_bn) always takes every row: its statistics and
        their all-reduce across replicas must not sit in branches that
        replicas may choose differently."""
        foreground = ops.reshape(samples["foreground"][:, :limit], (-1,))
        needed = ops.sum(ops.cast(foreground, "int32"))
        rows = ops.cast(ops.shape(foreground)[0], "float32")
        position = ops.cast(ops.arange(ops.shape(foreground)[0]), "float32")
        key = ops.cast(foreground, "float32") * 2.0 - position / rows

        def branch(bucket):
            return lambda: fn(None if bucket is None else ops.top_k(key, bucket)[1])

        result = branch(None)
        if not self.normalization:
            for bucket in reversed(mask_buckets(limit)):
                result = _cond_branch(needed <= bucket, branch(bucket), result)
        return result()

    def mask_rows(self, samples, gt_boxes, gt_masks, limit, take):
        """The mask head's training rows `take` (`foreground_rows`):
        `{"rois" (N, 4), "image" (N,), "classes", "foreground" (N,),
        "targets" (N, s, s)}`."""

        def rows(x):
            x = ops.reshape(x[:, :limit], (-1, *x.shape[2:]))
            return x if take is None else ops.take(x, take, axis=0)

        index = ops.arange(ops.shape(samples["rois"])[0] * limit, dtype="int32")
        image = rows(ops.reshape(index, (-1, limit))) // limit
        rois = rows(samples["rois"])
        targets = flat_mask_targets(
            rois,
            image * gt_boxes.shape[1] + rows(samples["matched"]),
            ops.reshape(gt_boxes, (-1, 4)),
            ops.reshape(gt_masks, (-1, *gt_masks.shape[2:])),
            self.mask_target_align,
        )
        return {
            "rois": rois,
            "image": image,
            "classes": rows(samples["classes"]),
            "foreground": rows(samples["foreground"]),
            "targets": targets,
        }

    def _mask_loss(self, levels, samples, gt_boxes, gt_masks, limit, take, training):
        """The mask loss on rows `take` of the candidate rows (see
        `foreground_rows`), which must hold every foreground RoI."""
        rows = self.mask_rows(samples, gt_boxes, gt_masks, limit, take)
        mask_logits = self.mask_head(
            self.mask_pool([levels, rows["rois"], rows["image"]], training=training),
            training=training,
        )
        size = self.mask_size
        mask_logits = ops.reshape(mask_logits, (1, -1, size, size, self.num_classes))
        return mask_loss(
            mask_logits,
            rows["classes"][None],
            rows["foreground"][None],
            rows["targets"][None],
        )

    def compute_output_spec(self, inputs, training=None):
        d, size = self.max_detections, self.mask_size
        return detections_spec(
            inputs[1].shape[0], d, masks=((d, size, size), "float32")
        )

    def get_config(self):
        return {
            **super().get_config(),
            "num_classes": self.num_classes,
            "filters": self.filters,
            "fc_units": self.fc_units,
            "adaptive_pooling": self.adaptive_pooling,
            "fusion": self.fusion,
            "fusion_position": self.fusion_position,
            "heavier_head": self.heavier_head,
            "fully_connected_fusion": self.fully_connected_fusion,
            "fusion_branch": self.fusion_branch,
            "mask_fusion": self.mask_fusion,
            "mask_size": self.mask_size,
            "sampling_ratio": self.sampling_ratio,
            "aligned": self.aligned,
            "strides": self.strides,
            "batch_size_per_image": self.batch_size_per_image,
            "positive_fraction": self.positive_fraction,
            "foreground_iou": self.foreground_iou,
            "score_threshold": self.score_threshold,
            "nms_threshold": self.nms_threshold,
            "max_detections": self.max_detections,
            "min_size": self.min_size,
            "normalization": self.normalization,
            "seed": self.seed,
        }


DETECTION_KEYS = ("boxes", "scores", "classes", "masks", "num_detections")
