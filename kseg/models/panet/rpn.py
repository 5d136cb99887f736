"""The region proposal stage of PANet: its head, anchors, proposals, training
targets and losses (SPEC "The PANet system": anchors, RPN, proposals).

Ren et al., "Faster R-CNN", NIPS 2015; Lin et al., "Feature Pyramid Networks
for Object Detection", CVPR 2017.
"""

import keras
from keras import ops

from kseg.layers.boxes import RPN_BOX_WEIGHTS, encode_boxes
from kseg.layers.common import KsegLayer, check_positive_int
from kseg.layers.detection import ProposalLayer, RPNHead
from kseg.models.panet.sampling import (
    check_sampling,
    masked_iou,
    match,
    sample_mask,
    smooth_l1,
)

# Detectron2's RPN box loss: smooth-L1 with beta 1/9.
RPN_SMOOTH_L1_BETA = 1.0 / 9.0


def rpn_targets(
    anchors,
    gt_boxes,
    gt_valid,
    seed,
    batch_size=256,
    positive_fraction=0.5,
    negative_iou=0.3,
    positive_iou=0.7,
):
    """Sampled RPN labels and box targets.

    IoU `>= positive_iou` with a ground-truth box is positive, and so is
    every anchor whose IoU with some ground-truth box is that box's highest
    (ties included, Detectron2's low-quality matches; not for IoU 0);
    `< negative_iou` negative; `batch_size` anchors per image are sampled
    with at most `positive_fraction` positive.

    Returns:
        `(labels (B, K) float32, sampled (B, K) bool, positive (B, K) bool,
        box_targets (B, K, 4))`.
    """
    iou = masked_iou(
        ops.broadcast_to(anchors, (ops.shape(gt_boxes)[0],) + tuple(anchors.shape)),
        gt_boxes,
        gt_valid,
    )
    matched, labels = match(iou, negative_iou, positive_iou)
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


def rpn_losses(logits, deltas, labels, sampled, positive, box_targets, batch_size):
    """`(rpn_objectness, rpn_box)`: BCE over the sampled anchors and smooth-L1
    (β = 1/9) over the positive ones, both summed and divided by
    `batch_size · images` (Detectron2)."""
    images = ops.cast(ops.shape(logits)[0], "float32")
    normalizer = batch_size * images
    bce = ops.binary_crossentropy(labels, logits, from_logits=True)
    objectness = ops.sum(ops.where(sampled, bce, 0.0)) / normalizer
    box = ops.sum(smooth_l1(deltas - box_targets, RPN_SMOOTH_L1_BETA), axis=-1)
    box = ops.sum(ops.where(positive, box, 0.0)) / normalizer
    return objectness, box


def _outputs(proposals, logits, deltas):
    return {
        "proposals": proposals[0],
        "valid": proposals[1],
        "logits": logits,
        "deltas": deltas,
    }


@keras.saving.register_keras_serializable(package="kseg")
class RegionProposalNetwork(KsegLayer):
    """The region proposal stage: `RPNHead` on every pyramid level, the
    proposals (`ProposalLayer`, whose `AnchorGenerator` is the stage's one
    set of anchors, also for the targets), and the RPN training targets and
    losses. SPEC's values are the defaults.

    Example:
    >>> rpn = RegionProposalNetwork(filters=8, post_nms_top_k_test=10)
    >>> pyramid = [np.zeros((1, 64 // s, 64 // s, 8)) for s in (4, 8, 16, 32, 64)]
    >>> out = rpn([pyramid, np.zeros((1, 64, 64, 3))])
    >>> tuple(out["proposals"].shape), tuple(out["valid"].shape)
    ((1, 10, 4), (1, 10))

    Args:
        filters: int. Channels of the head's shared conv. Defaults to `256`.
        anchor_sizes: floats, one per level (P2..P6). Defaults to
            `(32, 64, 128, 256, 512)`.
        anchor_strides: ints, one per level. Defaults to `(4, 8, 16, 32, 64)`.
        aspect_ratios: floats `h / w`; their count is the anchors per
            position. Defaults to `(0.5, 1.0, 2.0)`.
        pre_nms_top_k_train, post_nms_top_k_train, pre_nms_top_k_test,
        post_nms_top_k_test: ints. Proposal counts (2000, 1000, 1000, 1000).
        nms_threshold: float. Proposal NMS IoU. Defaults to `0.7`.
        per_level_nms: bool. Proposal NMS within each level (torchvision)
            instead of over all levels (SPEC). Defaults to `False`.
        round_anchors: bool. Base anchors rounded to whole pixels
            (torchvision). Defaults to `False`.
        min_size: float. Proposals with a side under it are dropped.
            Defaults to `1e-3`.
        positive_iou: float. Anchors at least this IoU are positive.
            Defaults to `0.7`.
        negative_iou: float. Anchors under this IoU are negative.
            Defaults to `0.3`.
        batch_size_per_image: int. Anchors sampled per image. Defaults to
            `256`.
        positive_fraction: float. Most positive share of the sample.
            Defaults to `0.5`.
        normalization: `None`, `"batch"` or `"sync_batch"`. Defaults to
            `None`.
        seed: int or `None`. Seed of the anchor sampling. Defaults to `None`.
        **kwargs: Base layer keyword arguments (`name`, `dtype`, ...).

    Input shape:
        `[pyramid, images]`: the list P2..P6 of `(batch, H_l, W_l, C)` maps
        and the `(batch, H, W, 3)` images (static `H`, `W`).

    Output shape:
        Dict `proposals (batch, P, 4)` float32, `valid (batch, P)` bool (`P`
        the post-NMS count of the mode), `logits (batch, K)` and
        `deltas (batch, K, 4)` float32 for the `K` anchors.
    """

    def __init__(
        self,
        filters=256,
        anchor_sizes=(32, 64, 128, 256, 512),
        anchor_strides=(4, 8, 16, 32, 64),
        aspect_ratios=(0.5, 1.0, 2.0),
        pre_nms_top_k_train=2000,
        post_nms_top_k_train=1000,
        pre_nms_top_k_test=1000,
        post_nms_top_k_test=1000,
        nms_threshold=0.7,
        per_level_nms=False,
        round_anchors=False,
        min_size=1e-3,
        positive_iou=0.7,
        negative_iou=0.3,
        batch_size_per_image=256,
        positive_fraction=0.5,
        normalization=None,
        seed=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.filters = check_positive_int(filters, "filters")
        self.positive_iou = float(positive_iou)
        self.negative_iou = float(negative_iou)
        if not 0.0 <= self.negative_iou <= self.positive_iou <= 1.0:
            raise ValueError(
                "RPN IoU thresholds need 0 <= negative_iou <= positive_iou <= 1, "
                f"got negative_iou={negative_iou}, positive_iou={positive_iou}"
            )
        self.batch_size_per_image, self.positive_fraction = check_sampling(
            batch_size_per_image, positive_fraction
        )
        self.normalization = normalization
        self.seed = seed
        # Built here, not in `build`: it holds the proposal settings and the
        # anchors that `get_config` reports and the targets use.
        self.proposal_layer = ProposalLayer(
            pre_nms_top_k_train,
            post_nms_top_k_train,
            pre_nms_top_k_test,
            post_nms_top_k_test,
            iou_threshold=nms_threshold,
            min_size=min_size,
            anchor_sizes=anchor_sizes,
            anchor_strides=anchor_strides,
            aspect_ratios=aspect_ratios,
            per_level_nms=per_level_nms,
            round_anchors=round_anchors,
            dtype=self.dtype_policy,
            name="proposals",
        )
        self.seed_generator = keras.random.SeedGenerator(seed)

    @property
    def anchor_generator(self):
        return self.proposal_layer.anchor_generator

    def build(self, input_shape):
        pyramid_shapes, images_shape = input_shape
        self.image_size = tuple(images_shape[1:3])
        self.head = RPNHead(
            self.anchor_generator.num_anchors,
            self.filters,
            normalization=self.normalization,
            dtype=self.dtype_policy,
            name="rpn_head",
        )
        self.head.build(list(pyramid_shapes))

    def call(self, inputs, training=None):
        pyramid, images = inputs
        logits, deltas = self.head(list(pyramid), training=training)
        proposals = self.proposal_layer([logits, deltas, images], training=training)
        return _outputs(proposals, logits, deltas)

    def losses_for(self, outputs, gt_boxes, gt_valid):
        """`{"rpn_objectness", "rpn_box"}` of this stage's `outputs` against
        the `(B, M, 4)` ground-truth boxes (`gt_valid` marks real rows)."""
        anchors = ops.convert_to_tensor(
            self.anchor_generator.anchors(self.image_size), "float32"
        )
        labels, sampled, positive, targets = rpn_targets(
            anchors,
            gt_boxes,
            gt_valid,
            self.seed_generator,
            self.batch_size_per_image,
            self.positive_fraction,
            self.negative_iou,
            self.positive_iou,
        )
        objectness, box = rpn_losses(
            outputs["logits"],
            outputs["deltas"],
            labels,
            sampled,
            positive,
            targets,
            self.batch_size_per_image,
        )
        return {"rpn_objectness": objectness, "rpn_box": box}

    def compute_output_spec(self, inputs, training=None):
        pyramid, images = inputs
        batch = images.shape[0]
        count = sum(
            x.shape[1] * x.shape[2] * self.anchor_generator.num_anchors for x in pyramid
        )
        logits = keras.KerasTensor((batch, count), "float32")
        deltas = keras.KerasTensor((batch, count, 4), "float32")
        proposals = self.proposal_layer.compute_output_spec(
            [logits, deltas, images], training=training
        )
        return _outputs(proposals, logits, deltas)

    def get_config(self):
        proposals = self.proposal_layer
        anchors = self.anchor_generator
        return {
            **super().get_config(),
            "filters": self.filters,
            "anchor_sizes": anchors.sizes,
            "anchor_strides": anchors.strides,
            "aspect_ratios": anchors.aspect_ratios,
            "pre_nms_top_k_train": proposals.pre_nms_top_k_train,
            "post_nms_top_k_train": proposals.post_nms_top_k_train,
            "pre_nms_top_k_test": proposals.pre_nms_top_k_test,
            "post_nms_top_k_test": proposals.post_nms_top_k_test,
            "nms_threshold": proposals.iou_threshold,
            "per_level_nms": proposals.per_level_nms,
            "round_anchors": anchors.round_base,
            "min_size": proposals.min_size,
            "positive_iou": self.positive_iou,
            "negative_iou": self.negative_iou,
            "batch_size_per_image": self.batch_size_per_image,
            "positive_fraction": self.positive_fraction,
            "normalization": self.normalization,
            "seed": self.seed,
        }
