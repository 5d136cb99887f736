"""PANet: Mask R-CNN + FPN with path aggregation, trained end to end."""

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
from kseg.layers.detection import (
    AnchorGenerator,
    BoxHead,
    DetectionLayer,
    FeaturePyramid,
    MaskHead,
    ProposalLayer,
    PyramidRoIAlign,
    RPNHead,
)
from kseg.layers.panet import BottomUpPathAugmentation, RoIAlign
from kseg.models.panet import targets as T
from kseg.models.segmenter import Segmenter

LOSS_NAMES = ("rpn_objectness", "rpn_box", "box_class", "box_regression", "mask")
_LEVEL_STRIDES = (4, 8, 16, 32)
# ImageNet statistics of RGB images in 0–255 (kseg's training inputs).
_IMAGENET_MEAN = (123.675, 116.28, 103.53)
_IMAGENET_STD = (58.395, 57.12, 57.375)


def _select_class_masks(mask_logits, classes, num_classes):
    """`(N, s, s)` probabilities of each RoI's class (0 for class 0)."""
    pick = ops.one_hot(ops.reshape(classes, (-1,)) - 1, num_classes)
    logits = ops.sum(mask_logits * pick[:, None, None, :], axis=-1)
    return ops.sigmoid(logits) * ops.max(pick, axis=-1)[:, None, None]


@keras.saving.register_keras_serializable(package="kseg")
class PANet(Segmenter):
    """Path Aggregation Network for instance segmentation (Liu et al., CVPR
    2018) on Mask R-CNN + FPN, with every PANet component as a switch.

    The graph: backbone → `FeaturePyramid` (P2..P6) → bottom-up path
    augmentation (N2..N5, `bottom_up_path`) → `RPNHead` on P2..P6 →
    `ProposalLayer` → RoIAlign from N2..N5 (every level with
    `adaptive_pooling`, else the RoI's FPN level) → `BoxHead` →
    `DetectionLayer` → RoIAlign of the detections → `MaskHead`. All numbers
    are fixed by SPEC "The PANet system"; sizes (proposal counts, widths)
    can be lowered so a tiny model trains on a CPU.

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

    Training is `model.compile(optimizer=...)` then `model.fit(dataset)` on
    `(x, y)` with `x = {"images": (B, H, W, 3)}` RGB in 0–255 and
    `y = {"boxes": (B, M, 4), "classes": (B, M), "masks": (B, M, S, S)}`
    (`kseg.models.panet.crop_instance_mask`); `compute_loss` builds every
    target in `keras.ops` and logs the five losses (`LOSS_NAMES`) beside
    `loss`. Instances beyond `max_instances` are dropped with a warning.

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
        rpn_pre_nms_top_k_train, rpn_post_nms_top_k_train,
        rpn_pre_nms_top_k_test, rpn_post_nms_top_k_test: ints. Proposal
            counts (2000, 1000, 1000, 1000).
        rpn_batch_size: int. Anchors sampled per image. Defaults to `256`.
        roi_batch_size: int. RoIs sampled per image. Defaults to `512`.
        roi_positive_fraction: float. Defaults to `0.25`.
        sampling_ratio: int. RoIAlign samples per bin. Defaults to `2`.
        score_threshold: float. Detection score threshold. Defaults to `0.05`.
        seed: int or `None`. Seed of the target sampling. Defaults to `None`.
        dtype: dtype or policy of the layers above the backbone.
        **kwargs: `keras.Model` keyword arguments (`name`, `trainable`).

    Input shape:
        Images `(batch, H, W, 3)`.

    Output shape:
        Dict `boxes (batch, D, 4)` `[y1, x1, y2, x2]` image pixels,
        `scores (batch, D)`, `classes (batch, D)` int32 in `1..C` (0 for
        padding), `masks (batch, D, 28, 28)` probabilities of the detected
        class inside its box, `num_detections (batch,)` int32.
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
        rpn_pre_nms_top_k_train=2000,
        rpn_post_nms_top_k_train=1000,
        rpn_pre_nms_top_k_test=1000,
        rpn_post_nms_top_k_test=1000,
        rpn_batch_size=256,
        roi_batch_size=512,
        roi_positive_fraction=0.25,
        sampling_ratio=2,
        score_threshold=0.05,
        seed=None,
        dtype=None,
        **kwargs,
    ):
        num_classes = check_positive_int(num_classes, "num_classes")
        check_choice(fusion, ("max", "sum"), "fusion")
        check_choice(fusion_position, ("after", "before"), "fusion_position")
        policy = Segmenter.resolve_dtype(dtype)
        if image_size is None:
            image_size = tuple(Segmenter.make_inputs(backbone).shape[1:3])
        image_size = tuple(image_size)
        if len(image_size) != 2 or None in image_size:
            raise ValueError(
                "PANet needs a static image size (anchors and proposal counts are "
                "fixed): pass image_size=(H, W) or build the backbone with a static "
                f"input_shape; got {image_size}"
            )
        normalization = "sync_batch" if synchronized_bn else None
        channels = Segmenter.make_inputs(backbone).shape[-1]

        # === Layers ===
        fpn = FeaturePyramid(filters, normalization=normalization, dtype=policy)
        bottom_up = BottomUpPathAugmentation(filters, dtype=policy)
        rpn_head = RPNHead(3, filters, normalization=normalization, dtype=policy)
        proposals_layer = ProposalLayer(
            rpn_pre_nms_top_k_train,
            rpn_post_nms_top_k_train,
            rpn_pre_nms_top_k_test,
            rpn_post_nms_top_k_test,
            dtype=policy,
            name="proposals",
        )
        box_pool = PyramidRoIAlign(
            7,
            sampling_ratio,
            _LEVEL_STRIDES,
            adaptive_pooling,
            dtype=policy,
            name="box_roi_align",
        )
        mask_pool = PyramidRoIAlign(
            14,
            sampling_ratio,
            _LEVEL_STRIDES,
            adaptive_pooling,
            dtype=policy,
            name="mask_roi_align",
        )
        box_head = BoxHead(
            num_classes,
            fc_units=fc_units,
            conv_filters=filters,
            heavier_head=heavier_head,
            fusion=fusion,
            fusion_position=fusion_position,
            normalization=normalization,
            dtype=policy,
            name="box_head",
        )
        mask_head = MaskHead(
            num_classes,
            filters=filters,
            fusion=fusion,
            fully_connected_fusion=fully_connected_fusion,
            fusion_branch=fusion_branch,
            mask_fusion=mask_fusion,
            normalization=normalization,
            dtype=policy,
            name="mask_head",
        )
        detection = DetectionLayer(
            num_classes,
            score_threshold=score_threshold,
            max_detections=max_detections,
            name="detections",
        )

        # === Functional Model ===
        images = keras.Input(shape=(*image_size, channels), name="images")
        features = Segmenter.backbone_features(backbone, images)
        stages = [features[name] for name in ("res2", "res3", "res4", "res5")]
        pyramid = fpn(stages)
        levels = bottom_up(pyramid[:4]) if bottom_up_path else pyramid[:4]
        rpn_logits, rpn_deltas = rpn_head(pyramid)
        proposals, valid = proposals_layer([rpn_logits, rpn_deltas, images])
        class_logits, box_deltas = box_head(box_pool([levels, proposals]))
        rois = proposals.shape[1]
        detections = detection(
            [
                ops.reshape(class_logits, (-1, rois, num_classes + 1)),
                ops.reshape(box_deltas, (-1, rois, 4 * num_classes)),
                proposals,
                valid,
                images,
            ]
        )
        mask_logits = mask_head(mask_pool([levels, detections["boxes"]]))
        masks = _select_class_masks(mask_logits, detections["classes"], num_classes)
        masks = ops.reshape(masks, (-1, max_detections, 28, 28))
        outputs = {
            "boxes": detections["boxes"],
            "scores": detections["scores"],
            "classes": detections["classes"],
            "masks": masks,
            "num_detections": detections["num_detections"],
        }
        super().__init__(
            inputs=images, outputs=outputs, backbone=backbone, dtype=policy, **kwargs
        )

        # === Training parts ===
        self.fpn = fpn
        self.bottom_up = bottom_up
        self.rpn_head = rpn_head
        self.proposal_layer = proposals_layer
        self.box_pool = box_pool
        self.mask_pool = mask_pool
        self.box_head = box_head
        self.mask_head = mask_head
        self.anchor_generator = AnchorGenerator(name="anchor_generator")
        self.mask_target_align = RoIAlign(28, sampling_ratio=2, strides=1)
        self.seed_generator = keras.random.SeedGenerator(seed)
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
        self.rpn_pre_nms_top_k_train = rpn_pre_nms_top_k_train
        self.rpn_post_nms_top_k_train = rpn_post_nms_top_k_train
        self.rpn_pre_nms_top_k_test = rpn_pre_nms_top_k_test
        self.rpn_post_nms_top_k_test = rpn_post_nms_top_k_test
        self.rpn_batch_size = check_positive_int(rpn_batch_size, "rpn_batch_size")
        self.roi_batch_size = check_positive_int(roi_batch_size, "roi_batch_size")
        self.roi_positive_fraction = float(roi_positive_fraction)
        self.sampling_ratio = sampling_ratio
        self.score_threshold = float(score_threshold)
        self.seed = seed

    # === Training ===

    def call(self, inputs, training=None, mask=None):
        if not training:
            return super().call(inputs, training=training, mask=mask)
        images = inputs["images"] if isinstance(inputs, dict) else inputs
        features = self.backbone(images, training=True)
        stages = [features[name] for name in ("res2", "res3", "res4", "res5")]
        pyramid = self.fpn(stages, training=True)
        levels = pyramid[:4]
        if self.bottom_up_path:
            levels = self.bottom_up(levels, training=True)
        rpn_logits, rpn_deltas = self.rpn_head(pyramid, training=True)
        proposals, valid = self.proposal_layer(
            [rpn_logits, rpn_deltas, images], training=True
        )
        return {
            "levels": levels,
            "rpn_logits": rpn_logits,
            "rpn_deltas": rpn_deltas,
            "proposals": proposals,
            "proposal_valid": valid,
        }

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
        """The five PANet losses (float32), summed; each is also tracked
        under its name in `LOSS_NAMES`."""
        gt_boxes, gt_classes, gt_masks, gt_valid = self._ground_truth(y)
        anchors = ops.convert_to_tensor(
            self.anchor_generator.anchors(self.image_size), "float32"
        )
        labels, sampled, positive, anchor_targets = T.rpn_targets(
            anchors, gt_boxes, gt_valid, self.seed_generator, self.rpn_batch_size
        )
        rpn_objectness, rpn_box = T.rpn_losses(
            y_pred["rpn_logits"],
            y_pred["rpn_deltas"],
            labels,
            sampled,
            positive,
            anchor_targets,
            self.rpn_batch_size,
        )
        samples = T.sample_rois(
            y_pred["proposals"],
            y_pred["proposal_valid"],
            gt_boxes,
            gt_classes,
            gt_valid,
            self.seed_generator,
            self.roi_batch_size,
            self.roi_positive_fraction,
        )
        levels = y_pred["levels"]
        rois = samples["rois"]
        count = rois.shape[1]
        # training=True: RoIAlign's matrix form, whose gradient is cheap.
        class_logits, box_deltas = self.box_head(
            self.box_pool([levels, rois], training=True), training=True
        )
        box_class, box_regression = T.box_losses(
            ops.reshape(class_logits, (-1, count, self.num_classes + 1)),
            ops.reshape(box_deltas, (-1, count, 4 * self.num_classes)),
            samples,
            self.num_classes,
        )
        # Foreground RoIs come first: the mask head sees only those rows.
        fg_count = min(count, int(self.roi_batch_size * self.roi_positive_fraction))
        fg_rois = rois[:, :fg_count]
        fg_matched = samples["matched"][:, :fg_count]
        mask_logits = self.mask_head(
            self.mask_pool([levels, fg_rois], training=True), training=True
        )
        mask_logits = ops.reshape(mask_logits, (-1, fg_count, 28, 28, self.num_classes))
        mask_targets = T.mask_targets(
            fg_rois, fg_matched, gt_boxes, gt_masks, self.mask_target_align
        )
        mask = T.mask_loss(
            mask_logits,
            samples["classes"][:, :fg_count],
            samples["foreground"][:, :fg_count],
            mask_targets,
        )
        losses = (rpn_objectness, rpn_box, box_class, box_regression, mask)
        for tracker, value in zip(self.loss_trackers, losses, strict=True):
            tracker.update_state(value)
        total = rpn_objectness + rpn_box + box_class + box_regression + mask
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
            "rpn_pre_nms_top_k_train": self.rpn_pre_nms_top_k_train,
            "rpn_post_nms_top_k_train": self.rpn_post_nms_top_k_train,
            "rpn_pre_nms_top_k_test": self.rpn_pre_nms_top_k_test,
            "rpn_post_nms_top_k_test": self.rpn_post_nms_top_k_test,
            "rpn_batch_size": self.rpn_batch_size,
            "roi_batch_size": self.roi_batch_size,
            "roi_positive_fraction": self.roi_positive_fraction,
            "sampling_ratio": self.sampling_ratio,
            "score_threshold": self.score_threshold,
            "seed": self.seed,
        }


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
