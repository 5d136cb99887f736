"""SegModel: unary FCN, structured patch prediction, context CRF, guidance CRF."""

import math

import keras
import numpy as np

from kseg.backbones import segmodel_resnet101
from kseg.layers.common import ConvBNReLU, ResizeLike, check_choice
from kseg.layers.guided_filter import GuidanceCRF
from kseg.layers.segmodel import (
    ContextCRF,
    LearnableUpsampling,
    StructuredPatchPrediction,
)
from kseg.models.segmenter import Segmenter, check_positive_int

# Side `n` of the structured patch prediction (paper footnote 1: n = 2).
PATCH_SIZE = 2
# The guidance CRF runs against the image downsampled by this factor (Sec. 5,
# footnote 2: the ×4-downsampled image trained faster and more stably).
GUIDANCE_DOWNSAMPLING = 4
SCORE_UPSAMPLINGS = ("deconv", "bilinear")
# Side of the symbolic probe image that reads the encoder's output stride
# where its input size is not fixed.
_PROBE_SIZE = 256


@keras.saving.register_keras_serializable(package="kseg")
class SegModel(Segmenter):
    """SegModel: a dilated FCN unary with structured patch prediction, a
    distance-aware context CRF and a guided-filter guidance CRF.

    "Semantic segmentation via structured patch prediction, context CRF and
    guidance CRF" (Shen et al., CVPR 2017, Sec. 3–5, Fig. 4). The graph:

    1. Features: `f = ConvBNReLU1×1(res5)` with `feature_filters` channels
       (`feature_conv`). The 1×1 kernel keeps the unary a per-position
       function of the encoder feature, as the paper's "D×1×1 feature block
       → C×1×1 score" unary (Fig. 2), while the context CRF gets a narrower
       feature map than res5's 2048 channels.
    2. Local scores: by default one C-vector per position,
       `z_u = conv1×1(f)` (`unary_classifier`) at the encoder's stride (16).
       With `patch_prediction`, `z_u = StructuredPatchPrediction(f)`
       (`patch_prediction`, C·2·2 channels per position, depth-to-space) at
       stride 8: the patch predictor replaces the per-position classifier.
    3. With `context_crf`: `z = ContextCRF([f, z_u])` (`context_crf`). Table
       3's "Patch" row is "replace unary prediction in context CRF with
       structured patch prediction", and Sec. 3–4 give the context CRF the
       patch prediction as its singleton potential "at a certain interim
       resolution", so with both switches the CRF runs at stride 8 on the
       patch logits, with `f` bilinearly upsampled ×2 to their size
       (`context_features_resize`). Its box sizes and dilations keep
       `ContextCRF`'s defaults, counted in positions of that map.
    4. With `guidance_crf` (Sec. 5, Algorithm 1): the guide is the image
       average-pooled ×4 (`guide_downsample`: 4×4 windows, "same" padding
       that leaves the padding out of the means, so `ceil(H / 4) ×
       ceil(W / 4)` pixels — the area downsampling, which the half-pixel
       bilinear resize would alias at ×4), the scores are brought to ¼
       resolution and `z = GuidanceCRF([z, guide])` (`guidance_crf`). With
       `score_upsampling="deconv"` (the paper, Sec. 2 before Eq. 5: "up-sample
       the segmentation score map by transposed convolution with learnable
       parameters") a `LearnableUpsampling` (`score_upsampling`: one
       transposed-conv kernel per class, stride 4, or 2 after the patch
       prediction, initialised to bilinear) upsamples them, then
       `guidance_scores_resize` resizes them bilinearly to the guide's size —
       the identity when the two sizes agree (`4·ceil(H/16) = ceil(H/4)`,
       e.g. image sides that are multiples of 16). With
       `"bilinear"` `guidance_scores_resize` alone takes them there. An
       untrained "deconv" model therefore equals the "bilinear" one (to
       float rounding) wherever the sizes agree; elsewhere it resizes twice
       (×4 by the kernel, then to the guide), which differs from one resize
       where the interpolated scores bend. The whole branch is float32.
       `guidance_epsilon = 1` assumes the images the model receives are 0–255
       intensities (as `kseg.data` yields them; kseg encoders do not
       normalise), ε being in squared guide units.
    5. `logits = resize(z)` to the image size (bilinear, half-pixel): ×4 after
       the guidance CRF, ×8 or ×16 without it.

    The four columns of Table 3 (VOC 2012 val mIoU; encoder
    `kseg.backbones.segmodel_resnet101`, as in `build_segmodel_resnet101`):
    "Unary" (69.5) is `SegModel(b, n)`; "Context" (76.3) is
    `SegModel(b, n, context_crf=True)`; "Patch" (76.8) is
    `SegModel(b, n, context_crf=True, patch_prediction=True)`; "Guide"
    (77.7) is `SegModel(b, n, context_crf=True, patch_prediction=True,
    guidance_crf=True)`, whose score upsampling is the paper's learnable
    transposed convolution (the default `score_upsampling="deconv"`). Any
    other combination is allowed. The guidance CRF
    needs `2·guidance_radius + 1 <= ceil(min(H, W) / 4)`, i.e. images of at
    least `8·guidance_radius + 1` pixels per side.

    Example:
    >>> from kseg.backbones import build_resnet
    >>> backbone = build_resnet((1, 1, 1, 1), (8, 8, 8, 8), output_stride=16)
    >>> model = SegModel(backbone, 3, context_crf=True, patch_prediction=True,
    ...                  guidance_crf=True, feature_filters=16, guidance_radius=2)
    >>> model(np.zeros((1, 64, 64, 3)))["logits"].shape
    (1, 64, 64, 3)

    Args:
        backbone: `keras.Model`. Encoder mapping images to the dict
            `{"res2", "res3", "res4", "res5"}` of stage features (see
            `kseg.backbones`); only `"res5"` is used.
        num_classes: int. Number of classes (logit channels).
        context_crf: bool. Refines the scores with the context CRF.
            Defaults to `False`.
        patch_prediction: bool. Predicts a 2×2 patch of scores per position
            instead of one score vector. Defaults to `False`.
        guidance_crf: bool. Refines the scores at ¼ resolution with the
            guidance CRF. Defaults to `False`.
        feature_filters: int. Channels of the feature conv on res5 (the paper
            does not give them). Defaults to `512`.
        context_crf_iterations: int. Message-passing iterations of the
            context CRF. Defaults to `2`.
        guidance_crf_iterations: int. Mean-field iterations of the guidance
            CRF (3 in the paper). Defaults to `3`.
        guidance_radius: int. Guided-filter window radius at ¼ resolution
            (3 in the authors' released deploy settings). Defaults to `3`.
        guidance_epsilon: float. Guided-filter regularization in squared
            0–255 intensity units (1 in the paper). Defaults to `1.0`.
        score_upsampling: str. How the guidance CRF's scores reach ¼
            resolution: `"deconv"` (learnable per-class transposed
            convolution initialised to bilinear, the paper) or `"bilinear"`
            (fixed resize). Used only with `guidance_crf`. Defaults to
            `"deconv"`.
        dtype: dtype or `DTypePolicy` of the head layers; `None` uses the
            global policy. The guidance branch and the logits are float32
            regardless. Defaults to `None`.
        **kwargs: `keras.Model` keyword arguments (`name`, `trainable`).

    Input shape:
        Images `(batch, height, width, channels)` as the backbone takes them,
        in 0–255 when `guidance_crf` is on (1 or 3 channels).

    Output shape:
        Dict `{"logits": (batch, height, width, num_classes)}`, float32.
    """

    def __init__(
        self,
        backbone,
        num_classes,
        context_crf=False,
        patch_prediction=False,
        guidance_crf=False,
        feature_filters=512,
        context_crf_iterations=2,
        guidance_crf_iterations=3,
        guidance_radius=3,
        guidance_epsilon=1.0,
        score_upsampling="deconv",
        dtype=None,
        **kwargs,
    ):
        num_classes = check_positive_int(num_classes, "num_classes")
        context_crf = _check_bool(context_crf, "context_crf")
        patch_prediction = _check_bool(patch_prediction, "patch_prediction")
        guidance_crf = _check_bool(guidance_crf, "guidance_crf")
        feature_filters = check_positive_int(feature_filters, "feature_filters")
        check_choice(score_upsampling, SCORE_UPSAMPLINGS, "score_upsampling")
        policy = Segmenter.resolve_dtype(dtype)

        # === Layers ===
        # Both CRFs are created whatever the switches, so their options are
        # validated even where the graph leaves them out.
        context_crf_layer = ContextCRF(
            num_classes,
            iterations=context_crf_iterations,
            dtype=policy,
            name="context_crf",
        )
        guidance_crf_layer = GuidanceCRF(
            num_classes,
            iterations=guidance_crf_iterations,
            radius=guidance_radius,
            epsilon=guidance_epsilon,
            dtype=policy,
            name="guidance_crf",
        )
        feature_conv = ConvBNReLU(feature_filters, 1, dtype=policy, name="feature_conv")
        if patch_prediction:
            local_classifier = StructuredPatchPrediction(
                num_classes,
                patch_size=PATCH_SIZE,
                dtype=policy,
                name="patch_prediction",
            )
        else:
            local_classifier = keras.layers.Conv2D(
                num_classes, 1, dtype=policy, name="unary_classifier"
            )
        # The guided filter loses small values in float16: the guide, the
        # resized scores and the CRF stay float32 under mixed precision.
        guide_downsample = keras.layers.AveragePooling2D(
            GUIDANCE_DOWNSAMPLING,
            padding="same",
            dtype="float32",
            name="guide_downsample",
        )

        # === Functional Model ===
        images = Segmenter.make_inputs(backbone)
        if guidance_crf:
            _check_guide_size(images.shape[1:3], guidance_crf_layer.radius)
        features = Segmenter.backbone_features(backbone, images)
        features = feature_conv(features["res5"])
        scores = local_classifier(features)
        if context_crf:
            if patch_prediction:
                features = ResizeLike(dtype=policy, name="context_features_resize")(
                    [features, scores]
                )
            scores = context_crf_layer([features, scores])
        resize_dtype = policy
        if guidance_crf:
            guide = guide_downsample(images)
            if score_upsampling == "deconv":
                score_stride = _encoder_stride(backbone)
                if patch_prediction:
                    score_stride //= PATCH_SIZE
                scores = LearnableUpsampling(
                    _upsampling_factor(score_stride),
                    dtype="float32",
                    name="score_upsampling",
                )(scores)
            scores = ResizeLike(dtype="float32", name="guidance_scores_resize")(
                [scores, guide]
            )
            scores = guidance_crf_layer([scores, guide])
            resize_dtype = "float32"
        logits = Segmenter.full_resolution_logits(scores, images, dtype=resize_dtype)
        super().__init__(
            inputs=images,
            outputs={"logits": logits},
            backbone=backbone,
            dtype=policy,
            **kwargs,
        )

        # === Config ===
        self.num_classes = num_classes
        self.context_crf = context_crf
        self.patch_prediction = patch_prediction
        self.guidance_crf = guidance_crf
        self.feature_filters = feature_filters
        self.context_crf_iterations = context_crf_layer.iterations
        self.guidance_crf_iterations = guidance_crf_layer.iterations
        self.guidance_radius = guidance_crf_layer.radius
        self.guidance_epsilon = guidance_crf_layer.epsilon
        self.score_upsampling = score_upsampling

    def call(self, inputs, training=None, mask=None, **kwargs):
        # Input sizes unknown when the graph was built are concrete here
        # (eagerly, under jit): a guide smaller than one guided-filter window
        # would otherwise give wrong numbers silently.
        if self.guidance_crf:
            images = keras.tree.flatten(inputs)[0]
            _check_guide_size(tuple(images.shape)[1:3], self.guidance_radius)
        return super().call(inputs, training=training, mask=mask, **kwargs)

    def get_config(self):
        return {
            **super().get_config(),
            "num_classes": self.num_classes,
            "context_crf": self.context_crf,
            "patch_prediction": self.patch_prediction,
            "guidance_crf": self.guidance_crf,
            "feature_filters": self.feature_filters,
            "context_crf_iterations": self.context_crf_iterations,
            "guidance_crf_iterations": self.guidance_crf_iterations,
            "guidance_radius": self.guidance_radius,
            "guidance_epsilon": self.guidance_epsilon,
            "score_upsampling": self.score_upsampling,
        }

    @classmethod
    def from_config(cls, config):
        # Files saved before the option existed used the bilinear resize.
        return super().from_config({"score_upsampling": "bilinear", **config})


def _check_bool(value, what):
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{what} must be True or False, got {value!r}")
    return bool(value)


def _encoder_stride(backbone):
    """The stride of the backbone's res5 (16 for SegModel's encoder), read
    from a symbolic call on its longer side: a power of two, as the ratio of
    sizes is `side / ceil(side / stride)`."""
    height, width, channels = backbone.input_shape[1:]
    height, width = height or _PROBE_SIZE, width or _PROBE_SIZE
    probe = keras.KerasTensor((1, height, width, channels))
    res5 = backbone.compute_output_spec(probe)["res5"].shape
    side, res5_side = max((height, res5[1]), (width, res5[2]))
    return 2 ** round(math.log2(side / res5_side))


def _upsampling_factor(score_stride):
    """The transposed convolution's stride from the scores' stride to the
    guide's ¼ resolution, or `ValueError`."""
    if score_stride % GUIDANCE_DOWNSAMPLING:
        raise ValueError(
            f'score_upsampling="deconv" upsamples the scores by an integer '
            f"factor to 1/{GUIDANCE_DOWNSAMPLING} resolution, but they have "
            f"stride {score_stride}; use an encoder of output stride 16 or "
            'score_upsampling="bilinear"'
        )
    return score_stride // GUIDANCE_DOWNSAMPLING


def _check_guide_size(image_size, radius):
    """Raises `ValueError` if the ×4-downsampled image cannot hold one
    `(2·radius + 1)²` guided-filter window (unknown sides are skipped)."""
    sides = [int(side) for side in image_size if side is not None]
    if not sides:
        return
    side = min(sides)
    guide_side = -(-side // GUIDANCE_DOWNSAMPLING)
    if 2 * radius + 1 > guide_side:
        raise ValueError(
            f"SegModel's guidance CRF runs on the image downsampled ×"
            f"{GUIDANCE_DOWNSAMPLING}: an image side of {side} pixels gives "
            f"{guide_side}, fewer than the 2 * guidance_radius + 1 = "
            f"{2 * radius + 1} pixels of one guided-filter window. Use images "
            f"of at least {2 * radius * GUIDANCE_DOWNSAMPLING + 1} pixels per "
            "side or a smaller guidance_radius"
        )


def build_segmodel_resnet101(
    num_classes,
    input_shape=(None, None, 3),
    context_crf=True,
    patch_prediction=True,
    guidance_crf=True,
    **kwargs,
):
    """The paper's SegModel: `SegModel` on ResNet-101 dilated to output stride 16.

    `build_segmodel_resnet101(21)` is the "Guide" column of Table 3 (VOC
    2012 val 77.7 single scale, trained jointly with every component); turn
    the switches off for the "Unary", "Context" and "Patch" columns. The
    encoder is randomly initialized; load ImageNet weights into
    `model.backbone` before training. Images are 0–255 (the guidance CRF's
    ε = 1 is in those units).

    Args:
        num_classes: int. Number of classes (21 for VOC, 19 for Cityscapes).
        input_shape: 3 ints or `None`s. Image shape `(H, W, C)`.
            Defaults to `(None, None, 3)`.
        context_crf: bool. See `SegModel`. Defaults to `True`.
        patch_prediction: bool. See `SegModel`. Defaults to `True`.
        guidance_crf: bool. See `SegModel`. Defaults to `True`.
        **kwargs: Further `SegModel` arguments.
    """
    backbone = segmodel_resnet101(input_shape=input_shape, dtype=kwargs.get("dtype"))
    return SegModel(
        backbone,
        num_classes,
        context_crf=context_crf,
        patch_prediction=patch_prediction,
        guidance_crf=guidance_crf,
        **kwargs,
    )
