"""PANet: Mask R-CNN + FPN with path aggregation, trained end to end."""

import math
import warnings

import keras
from keras import ops

from kseg.backbones import (
    build_pretrained_resnet,
    prepend_normalization,
    resnet50,
    resnext101_32x4d,
)
from kseg.layers.common import check_choice, check_positive_int
from kseg.layers.detection import FeaturePyramid
from kseg.layers.panet import BottomUpPathAugmentation
from kseg.models.panet.roi_heads import RoIHeads
from kseg.models.panet.rpn import RegionProposalNetwork
from kseg.models.segmenter import InstanceSegmenter

# torchvision's `maskrcnn_resnet50_fpn` conventions where they differ from
# SPEC's (`PANet(**TORCHVISION_CONVENTIONS)`): rounded base anchors, the
# proposal NMS per pyramid level with its 2000 training proposals, unaligned
# RoIAlign, and masks pasted as torchvision pastes them. With them kseg's
# baseline on torchvision's weights detects what torchvision detects
# (`kseg.models.from_torchvision`).
TORCHVISION_CONVENTIONS = {
    "round_anchors": True,
    "rpn_per_level_nms": True,
    "aligned_roi_align": False,
    "mask_paste": "torchvision",
    "rpn_pre_nms_top_k_train": 2000,
    "rpn_post_nms_top_k_train": 2000,
    "rpn_pre_nms_top_k_test": 1000,
    "rpn_post_nms_top_k_test": 1000,
}
LOSS_NAMES = ("rpn_objectness", "rpn_box", "box_class", "box_regression", "mask")
# Strides of P2..P5 (N2..N5), which the RoI heads pool from; P6 adds 64.
LEVEL_STRIDES = (4, 8, 16, 32)
# ImageNet statistics of RGB images in 0–255 (kseg's training inputs).
_IMAGENET_MEAN = (123.675, 116.28, 103.53)
_IMAGENET_STD = (58.395, 57.12, 57.375)


def check_loss_weights(loss_weights):
    """`{name: weight}` for every name of `LOSS_NAMES` (1.0 where `loss_weights`
    leaves a loss out); unknown names and negative or non-finite weights
    raise `ValueError`."""
    loss_weights = dict(loss_weights or {})
    unknown = sorted(set(loss_weights) - set(LOSS_NAMES))
    if unknown:
        raise ValueError(
            f"loss_weights: unknown losses {unknown}; PANet's losses are "
            f"{list(LOSS_NAMES)}"
        )
    weights = {}
    for name in LOSS_NAMES:
        value = loss_weights.get(name, 1.0)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"loss_weights[{name!r}] must be a number, got {value!r}")
        if not math.isfinite(value) or value < 0:
            raise ValueError(
                f"loss_weights[{name!r}] must be finite and >= 0, got {value}"
            )
        weights[name] = float(value)
    return weights


@keras.saving.register_keras_serializable(package="kseg")
class PANet(InstanceSegmenter):
    """Path Aggregation Network for instance segmentation (Liu et al., CVPR
    2018) on Mask R-CNN + FPN, with every PANet component as a switch.

    The graph is three stages: backbone → `FeaturePyramid` (P2..P6) and the
    bottom-up path augmentation (N2..N5, `bottom_up_path`); the region
    proposal stage (`RegionProposalNetwork`: head, anchors, proposals, its
    targets and losses) on P2..P6; the RoI heads (`RoIHeads`: RoIAlign from
    N2..N5, every level with `adaptive_pooling`, else the RoI's FPN level;
    box head, detections, mask head; RoI sampling, targets and losses). All
    numbers are fixed by SPEC "The PANet system" and are the defaults; every
    one a user tunes is an argument.

    Every ablation row (`b` = `build_panet_resnet50_fpn`'s backbone, `C`
    classes; MST is a recipe setting, multi-scale training data):

    - Table 3: RBL (33.4) is `PANet(b, C, bottom_up_path=False,
      adaptive_pooling=False, fully_connected_fusion=False)`; +MST (35.3)
      the same trained with MST; +MBN (35.7) adds `synchronized_bn=True`;
      +BPA (36.4) then `bottom_up_path=True`; +AFP alone (36.3)
      `adaptive_pooling=True` with `bottom_up_path=False`; BPA+AFP (36.9)
      both; +FF (37.6) `fully_connected_fusion=True` (this is
      `PANet(b, C, synchronized_bn=True)`); +HHD (37.8) adds
      `heavier_head=True`.
    - Table 4 (AFP): "fu.fc1fc2" (35.7) is `fusion_position="before"`,
      "fc1fu.fc2" (36.3) `fusion_position="after"`; MAX (36.3)
      `fusion="max"`, SUM (36.2) `fusion="sum"`.
    - Table 5 (FF): branch from conv2 / conv3 / conv4 (37.5 / 37.6 / 37.2)
      is `fusion_branch="conv2" | "conv3" | "conv4"`; fused by product /
      sum / max (36.9 / 37.6 / 37.1) is
      `mask_fusion="product" | "sum" | "max"`.

    A Keras model like any other: `model.compile(optimizer=...)`, then
    `fit`, `evaluate` and `predict` on NumPy arrays or `tf.data`, any batch
    size, with `x` images `(B, H, W, 3)` RGB in 0–255 (or `{"images": ...}`)
    and `y = {"boxes": (B, M, 4), "classes": (B, M), "masks": (B, M, S, S)}`
    (`kseg.data.crop_instance_mask`; class 0 marks padding rows).
    `compute_loss` asks each stage for its losses and sums them weighted by
    `loss_weights`; each loss is also logged under its name (`LOSS_NAMES`),
    `evaluate` and `validation_data` included (they run the training graph
    in inference mode). Instances beyond `max_instances` are dropped with a
    warning.

    Example:
    >>> from kseg.backbones import build_resnet
    >>> backbone = build_resnet((1, 1, 1, 1), (4, 4, 4, 4),
    ...                         input_shape=(64, 64, 3))
    >>> model = PANet(backbone, 2, filters=8, fc_units=16, max_detections=5,
    ...               rpn_pre_nms_top_k_test=50, rpn_post_nms_top_k_test=20)
    >>> out = model.predict(np.zeros((1, 64, 64, 3)), verbose=0)
    >>> out["masks"].shape
    (1, 5, 28, 28)

    Args:
        backbone: `keras.Model` mapping images to `{"res2", .., "res5"}`
            (see `kseg.backbones`), with any input normalization inside.
        num_classes: int. Object classes `C` (ids `1..C`; 0 is background).
        image_size: `(H, W)` or `None`: the static input size (multiples of
            64); `None` takes the backbone's input size. Defaults to `None`.
        bottom_up_path: bool. Bottom-up path augmentation. Defaults to `True`.
        adaptive_pooling: bool. Adaptive feature pooling. Defaults to `True`.
        fusion: str. `"max"` or `"sum"` across levels. Defaults to `"max"`.
        fusion_position: str. `"after"` or `"before"` the box head's first
            parameter layer. Defaults to `"after"`.
        fully_connected_fusion: bool. The mask head's fc short path.
            Defaults to `True`.
        fusion_branch: str. `"conv2"`, `"conv3"` or `"conv4"`.
            Defaults to `"conv3"`.
        mask_fusion: str. `"sum"`, `"max"` or `"product"`. Defaults to `"sum"`.
        heavier_head: bool. 4 conv + fc box head. Defaults to `False`.
        synchronized_bn: bool. MBN: synchronized batch normalization in the
            FPN, RPN, box and mask heads (TensorFlow backend). Defaults to
            `False`.
        filters: int. Pyramid and head channels. Defaults to `256`.
        fc_units: int. Box head fc units. Defaults to `1024`.
        max_detections: int. Detections per image `D`. Defaults to `100`.
        max_instances: int. Ground-truth rows `M` per image. Defaults to `100`.
        anchor_sizes: floats, one per level P2..P6. Defaults to
            `(32, 64, 128, 256, 512)`.
        aspect_ratios: floats `h / w`; their count is the anchors per
            position. Defaults to `(0.5, 1.0, 2.0)`.
        rpn_pre_nms_top_k_train, rpn_post_nms_top_k_train,
        rpn_pre_nms_top_k_test, rpn_post_nms_top_k_test: ints. Proposal
            counts (2000, 1000, 1000, 1000).
        rpn_nms_threshold: float. Proposal NMS IoU. Defaults to `0.7`.
        rpn_positive_iou: float. Anchors at least this IoU with a ground-truth
            box are positive. Defaults to `0.7`.
        rpn_negative_iou: float. Anchors under it are negative.
            Defaults to `0.3`.
        rpn_batch_size: int. Anchors sampled per image. Defaults to `256`.
        roi_batch_size: int. RoIs sampled per image. Defaults to `512`.
        roi_positive_fraction: float. Defaults to `0.25`.
        roi_foreground_iou: float. RoIs at least this IoU with a ground-truth
            box are foreground. Defaults to `0.5`.
        mask_size: int. Side of the predicted masks (even). Defaults to `28`.
        sampling_ratio: int. RoIAlign samples per bin (0 = adaptive).
            Defaults to `2`.
        round_anchors: bool. Base anchors rounded to whole pixels
            (torchvision). Defaults to `False` (SPEC).
        rpn_per_level_nms: bool. Proposal NMS within each pyramid level
            (torchvision) instead of over all levels. Defaults to `False`.
        aligned_roi_align: bool. RoIAlign with the half-pixel correction;
            `False` is torchvision's unaligned RoIAlign. Defaults to `True`.
        mask_paste: `"kseg"` or `"torchvision"`. How `predict_instances`
            (and `kseg predict`) paste the 28 × 28 masks into the image:
            SPEC's resize into the box (`kseg.data.paste_masks`) or
            torchvision's `paste_masks_in_image`
            (`kseg.data.instance_transform.torchvision_paste_weights`).
            The model's own outputs are the same. Defaults to `"kseg"`.
        score_threshold: float. Detection score threshold. Defaults to `0.05`.
        detection_nms_threshold: float. Per-class NMS IoU of the detections.
            Defaults to `0.5`.
        loss_weights: dict or `None`. Weight of each loss by name
            (`LOSS_NAMES`); missing ones weigh 1 (SPEC: equal weights).
            Defaults to `None`.
        seed: int or `None`. Seed of the target sampling. Defaults to `None`.
        dtype: dtype or policy of the layers above the backbone.
        **kwargs: `keras.Model` keyword arguments (`name`, `trainable`).

    Input shape:
        Images `(batch, H, W, 3)`.

    Output shape:
        Dict `boxes (batch, D, 4)` `[y1, x1, y2, x2]` image pixels,
        `scores (batch, D)`, `classes (batch, D)` int32 in `1..C` (0 for
        padding), `masks (batch, D, mask_size, mask_size)` probabilities of
        the detected class inside its box, `num_detections (batch,)` int32.
    """

    def __init__(
        self,
        backbone,
        num_classes,
        image_size=None,
        bottom_up_path=True,
        adaptive_pooling=True,
        fusion="max",
        fusion_position="after",
        fully_connected_fusion=True,
        fusion_branch="conv3",
        mask_fusion="sum",
        heavier_head=False,
        synchronized_bn=False,
        filters=256,
        fc_units=1024,
        max_detections=100,
        max_instances=100,
        anchor_sizes=(32, 64, 128, 256, 512),
        aspect_ratios=(0.5, 1.0, 2.0),
        rpn_pre_nms_top_k_train=2000,
        rpn_post_nms_top_k_train=1000,
        rpn_pre_nms_top_k_test=1000,
        rpn_post_nms_top_k_test=1000,
        rpn_nms_threshold=0.7,
        rpn_positive_iou=0.7,
        rpn_negative_iou=0.3,
        rpn_batch_size=256,
        roi_batch_size=512,
        roi_positive_fraction=0.25,
        roi_foreground_iou=0.5,
        mask_size=28,
        sampling_ratio=2,
        round_anchors=False,
        rpn_per_level_nms=False,
        aligned_roi_align=True,
        mask_paste="kseg",
        score_threshold=0.05,
        detection_nms_threshold=0.5,
        loss_weights=None,
        seed=None,
        dtype=None,
        **kwargs,
    ):
        num_classes = check_positive_int(num_classes, "num_classes")
        check_choice(fusion, ("max", "sum"), "fusion")
        check_choice(fusion_position, ("after", "before"), "fusion_position")
        check_choice(mask_paste, ("kseg", "torchvision"), "mask_paste")
        weights = check_loss_weights(loss_weights)
        policy = InstanceSegmenter.resolve_dtype(dtype)
        if image_size is None:
            image_size = tuple(InstanceSegmenter.make_inputs(backbone).shape[1:3])
        image_size = tuple(image_size)
        if len(image_size) != 2 or None in image_size:
            raise ValueError(
                "PANet needs a static image size (anchors and proposal counts are "
                "fixed): pass image_size=(H, W) or build the backbone with a static "
                f"input_shape; got {image_size}"
            )
        normalization = "sync_batch" if synchronized_bn else None
        channels = InstanceSegmenter.make_inputs(backbone).shape[-1]

        # === Layers ===
        fpn = FeaturePyramid(filters, normalization=normalization, dtype=policy)
        bottom_up = BottomUpPathAugmentation(filters, dtype=policy)
        rpn = RegionProposalNetwork(
            filters,
            anchor_sizes=anchor_sizes,
            aspect_ratios=aspect_ratios,
            pre_nms_top_k_train=rpn_pre_nms_top_k_train,
            post_nms_top_k_train=rpn_post_nms_top_k_train,
            pre_nms_top_k_test=rpn_pre_nms_top_k_test,
            post_nms_top_k_test=rpn_post_nms_top_k_test,
            nms_threshold=rpn_nms_threshold,
            per_level_nms=rpn_per_level_nms,
            round_anchors=round_anchors,
            positive_iou=rpn_positive_iou,
            negative_iou=rpn_negative_iou,
            batch_size_per_image=rpn_batch_size,
            normalization=normalization,
            seed=seed,
            dtype=policy,
            name="rpn",
        )
        roi_heads = RoIHeads(
            num_classes,
            filters=filters,
            fc_units=fc_units,
            adaptive_pooling=adaptive_pooling,
            fusion=fusion,
            fusion_position=fusion_position,
            heavier_head=heavier_head,
            fully_connected_fusion=fully_connected_fusion,
            fusion_branch=fusion_branch,
            mask_fusion=mask_fusion,
            mask_size=mask_size,
            sampling_ratio=sampling_ratio,
            aligned=aligned_roi_align,
            strides=LEVEL_STRIDES,
            batch_size_per_image=roi_batch_size,
            positive_fraction=roi_positive_fraction,
            foreground_iou=roi_foreground_iou,
            score_threshold=score_threshold,
            nms_threshold=detection_nms_threshold,
            max_detections=max_detections,
            normalization=normalization,
            seed=None if seed is None else seed + 1,
            dtype=policy,
            name="roi_heads",
        )

        # === Functional Model ===
        images = keras.Input(shape=(*image_size, channels), name="images")
        features = InstanceSegmenter.backbone_features(backbone, images)
        pyramid = fpn([features[name] for name in ("res2", "res3", "res4", "res5")])
        levels = bottom_up(pyramid[:4]) if bottom_up_path else pyramid[:4]
        proposals = rpn([pyramid, images])
        outputs = roi_heads(
            [levels, proposals["proposals"], proposals["valid"], images]
        )
        super().__init__(
            inputs=images, outputs=outputs, backbone=backbone, dtype=policy, **kwargs
        )

        # === Stages ===
        self.fpn = fpn
        self.bottom_up = bottom_up
        self.rpn = rpn
        self.roi_heads = roi_heads
        self.loss_trackers = [keras.metrics.Mean(name=name) for name in LOSS_NAMES]

        # === Config ===
        self.num_classes = num_classes
        self.image_size = image_size
        self.bottom_up_path = bool(bottom_up_path)
        self.adaptive_pooling = bool(adaptive_pooling)
        self.fusion = fusion
        self.fusion_position = fusion_position
        self.fully_connected_fusion = bool(fully_connected_fusion)
        self.fusion_branch = fusion_branch
        self.mask_fusion = mask_fusion
        self.heavier_head = bool(heavier_head)
        self.synchronized_bn = bool(synchronized_bn)
        self.filters = filters
        self.fc_units = fc_units
        self.max_detections = max_detections
        self.max_instances = check_positive_int(max_instances, "max_instances")
        self.anchor_sizes = tuple(float(v) for v in anchor_sizes)
        self.aspect_ratios = tuple(float(v) for v in aspect_ratios)
        self.rpn_pre_nms_top_k_train = rpn_pre_nms_top_k_train
        self.rpn_post_nms_top_k_train = rpn_post_nms_top_k_train
        self.rpn_pre_nms_top_k_test = rpn_pre_nms_top_k_test
        self.rpn_post_nms_top_k_test = rpn_post_nms_top_k_test
        self.rpn_nms_threshold = float(rpn_nms_threshold)
        self.rpn_positive_iou = float(rpn_positive_iou)
        self.rpn_negative_iou = float(rpn_negative_iou)
        self.rpn_batch_size = check_positive_int(rpn_batch_size, "rpn_batch_size")
        self.roi_batch_size = check_positive_int(roi_batch_size, "roi_batch_size")
        self.roi_positive_fraction = float(roi_positive_fraction)
        self.roi_foreground_iou = float(roi_foreground_iou)
        self.mask_size = mask_size
        self.sampling_ratio = sampling_ratio
        self.round_anchors = bool(round_anchors)
        self.rpn_per_level_nms = bool(rpn_per_level_nms)
        self.aligned_roi_align = bool(aligned_roi_align)
        self.mask_paste = mask_paste
        self.score_threshold = float(score_threshold)
        self.detection_nms_threshold = float(detection_nms_threshold)
        self.loss_weights = weights
        self.seed = seed

    # === Training ===

    def stage_outputs(self, images, training=False):
        """The training graph up to the RoI heads: `{"levels": [N2..N5],
        "rpn": the region proposal stage's outputs}`."""
        features = self.backbone(images, training=training)
        stages = [features[name] for name in ("res2", "res3", "res4", "res5")]
        pyramid = self.fpn(stages, training=training)
        levels = pyramid[:4]
        if self.bottom_up_path:
            levels = self.bottom_up(levels, training=training)
        return {"levels": levels, "rpn": self.rpn([pyramid, images], training=training)}

    def detect(self, images):
        """Inference with every stage's intermediate values: `stage_outputs`
        and `RoIHeads.forward` (detections, class logits, box deltas, mask
        logits), for inspection and stage-by-stage comparisons."""
        images = ops.convert_to_tensor(images, "float32")
        stages = self.stage_outputs(images, training=False)
        rpn = stages["rpn"]
        heads = self.roi_heads.forward(
            stages["levels"], rpn["proposals"], rpn["valid"], images, training=False
        )
        return {**stages, **heads}

    def call(self, inputs, training=None, mask=None):
        if not training:
            return super().call(inputs, training=training, mask=mask)
        images = inputs["images"] if isinstance(inputs, dict) else inputs
        return self.stage_outputs(images, training=True)

    def _ground_truth(self, y):
        boxes = ops.cast(y["boxes"], "float32")
        classes = ops.cast(y["classes"], "int32")
        masks = y["masks"]
        if boxes.shape[1] is not None and boxes.shape[1] > self.max_instances:
            warnings.warn(
                f"PANet: {boxes.shape[1]} ground-truth rows per image, more than "
                f"max_instances={self.max_instances}; the extra ones are dropped",
                stacklevel=3,
            )
            boxes = boxes[:, : self.max_instances]
            classes = classes[:, : self.max_instances]
            masks = masks[:, : self.max_instances]
        return boxes, classes, masks, classes > 0

    def compute_loss(
        self, x=None, y=None, y_pred=None, sample_weight=None, training=True
    ):
        """The five PANet losses (float32), each stage's own, summed with
        `loss_weights`; each is also tracked under its name in `LOSS_NAMES`.

        In training `y_pred` is the training call's output. Keras evaluates
        (`evaluate`, `validation_data`) with the inference outputs, which
        hold no training values: then the training graph runs again on `x`
        in inference mode (batch statistics and weights untouched)."""
        if not training:
            images = x["images"] if isinstance(x, dict) else x
            y_pred = self.stage_outputs(images, training=False)
        gt_boxes, gt_classes, gt_masks, gt_valid = self._ground_truth(y)
        rpn = y_pred["rpn"]
        losses = {
            **self.rpn.losses_for(rpn, gt_boxes, gt_valid),
            **self.roi_heads.losses_for(
                y_pred["levels"],
                rpn["proposals"],
                rpn["valid"],
                gt_boxes,
                gt_classes,
                gt_masks,
                gt_valid,
                training=bool(training),
            ),
        }
        # Weighted by the batch size, as Keras tracks `loss`: epoch means
        # that add up even when the last batch is smaller.
        batch = ops.shape(gt_boxes)[0]
        for tracker, name in zip(self.loss_trackers, LOSS_NAMES, strict=True):
            tracker.update_state(losses[name], sample_weight=batch)
        total = sum(self.loss_weights[name] * losses[name] for name in LOSS_NAMES)
        return total + ops.cast(sum(self.losses), "float32") if self.losses else total

    def compute_metrics(self, x, y, y_pred, sample_weight=None):
        return self.get_metrics_result()

    def get_config(self):
        return {
            **super().get_config(),
            "num_classes": self.num_classes,
            "image_size": self.image_size,
            "bottom_up_path": self.bottom_up_path,
            "adaptive_pooling": self.adaptive_pooling,
            "fusion": self.fusion,
            "fusion_position": self.fusion_position,
            "fully_connected_fusion": self.fully_connected_fusion,
            "fusion_branch": self.fusion_branch,
            "mask_fusion": self.mask_fusion,
            "heavier_head": self.heavier_head,
            "synchronized_bn": self.synchronized_bn,
            "filters": self.filters,
            "fc_units": self.fc_units,
            "max_detections": self.max_detections,
            "max_instances": self.max_instances,
            "anchor_sizes": self.anchor_sizes,
            "aspect_ratios": self.aspect_ratios,
            "rpn_pre_nms_top_k_train": self.rpn_pre_nms_top_k_train,
            "rpn_post_nms_top_k_train": self.rpn_post_nms_top_k_train,
            "rpn_pre_nms_top_k_test": self.rpn_pre_nms_top_k_test,
            "rpn_post_nms_top_k_test": self.rpn_post_nms_top_k_test,
            "rpn_nms_threshold": self.rpn_nms_threshold,
            "rpn_positive_iou": self.rpn_positive_iou,
            "rpn_negative_iou": self.rpn_negative_iou,
            "rpn_batch_size": self.rpn_batch_size,
            "roi_batch_size": self.roi_batch_size,
            "roi_positive_fraction": self.roi_positive_fraction,
            "roi_foreground_iou": self.roi_foreground_iou,
            "mask_size": self.mask_size,
            "sampling_ratio": self.sampling_ratio,
            "round_anchors": self.round_anchors,
            "rpn_per_level_nms": self.rpn_per_level_nms,
            "aligned_roi_align": self.aligned_roi_align,
            "mask_paste": self.mask_paste,
            "score_threshold": self.score_threshold,
            "detection_nms_threshold": self.detection_nms_threshold,
            "loss_weights": self.loss_weights,
            "seed": self.seed,
        }


def weights_by_name(model):
    """`{name: variable}` of a PANet's weights under names that do not depend
    on what else the process built: the backbone's as `layer/weight`
    (`stem_conv/kernel`), the stages' under their default names
    (`feature_pyramid/...`, `bottom_up_path/...`, `rpn/...`,
    `roi_heads/...`)."""
    weights = {}
    for layer in model.backbone.layers:
        for variable in layer.weights:
            weights[f"{layer.name}/{variable.name}"] = variable
    stages = [("feature_pyramid", model.fpn), ("rpn", model.rpn)]
    if getattr(model, "bottom_up_path", False):
        stages.append(("bottom_up_path", model.bottom_up))
    stages.append(("roi_heads", model.roi_heads))
    for name, stage in stages:
        for variable in stage.weights:
            weights[name + variable.path[len(stage.name) :]] = variable
    return weights


def _imagenet_rgb(backbone):
    return prepend_normalization(
        backbone, _IMAGENET_MEAN, _IMAGENET_STD, name="imagenet_normalization"
    )


def build_panet_resnet50_fpn(
    num_classes, image_size=(1024, 1024), pretrained=False, **kwargs
):
    """The paper's PANet on ResNet-50 + FPN (COCO mask AP 36.6 test-dev).

    With `pretrained=True` the encoder is `keras.applications.ResNet50` with
    ImageNet weights (`kseg.backbones.build_pretrained_resnet`, downloaded by
    Keras once); its BGR mean-subtracted input is folded into the model (the
    first conv's input channels are reversed, the RGB mean subtracted
    inside), so the model takes RGB in 0–255. Otherwise kseg's ResNet-50,
    randomly initialized, with ImageNet normalization inside.

    Args:
        num_classes: int. Object classes (80 for COCO, 8 for Cityscapes).
        image_size: `(H, W)`, multiples of 64. Defaults to `(1024, 1024)`.
        pretrained: bool. Load `keras.applications` ImageNet weights.
            Defaults to `False`.
        **kwargs: Further `PANet` arguments (the ablation switches).
    """
    shape = (*image_size, 3)
    if pretrained:
        backbone = build_pretrained_resnet(50, weights="imagenet", input_shape=shape)
        conv = backbone.get_layer("conv1_conv")
        kernel, bias = conv.get_weights()
        conv.set_weights([kernel[:, :, ::-1, :], bias])
        backbone = prepend_normalization(
            backbone, (123.68, 116.779, 103.939), (1.0, 1.0, 1.0), name="caffe_mean"
        )
    else:
        backbone = _imagenet_rgb(resnet50(input_shape=shape))
    return PANet(backbone, num_classes, **kwargs)


def build_panet_resnext101_fpn(num_classes, image_size=(1024, 1024), **kwargs):
    """The paper's PANet on ResNeXt-101 (32×4d) + FPN (COCO mask AP 40.0
    test-dev). `keras.applications` has no ResNeXt: the encoder is kseg's,
    randomly initialized (load ImageNet weights into `model.backbone`).

    Args:
        num_classes: int. Object classes.
        image_size: `(H, W)`, multiples of 64. Defaults to `(1024, 1024)`.
        **kwargs: Further `PANet` arguments.
    """
    backbone = _imagenet_rgb(resnext101_32x4d(input_shape=(*image_size, 3)))
    return PANet(backbone, num_classes, **kwargs)
