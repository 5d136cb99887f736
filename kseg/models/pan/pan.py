"""Pyramid Attention Network (PAN) for semantic segmentation."""

import keras

from kseg.backbones import pan_resnet101
from kseg.layers.common import ConvBNReLU, check_choice
from kseg.layers.pan import FeaturePyramidAttention, GlobalAttentionUpsample
from kseg.models.segmenter import Segmenter, check_positive_int, check_rate

_DECODERS = ("gau", "naive")
# GAU blocks in the order PAN applies them, from the coarsest skip feature.
_GAU_STAGES = ("res4", "res3", "res2")


@keras.saving.register_keras_serializable(package="kseg")
class PAN(Segmenter):
    """Pyramid Attention Network: feature pyramid attention on res5, global
    attention upsample with res4, res3 and res2, classifier, ×4 upsample.

    Section 3.3 and Figure 2 of "Pyramid Attention Network for Semantic
    Segmentation" (Li et al., BMVC 2018). With the `"gau"` decoder,
    `x = FPA(res5)`, `x = GAU([res4, x])`, `x = GAU([res3, x])`,
    `x = GAU([res2, x])`, `logits = up(conv1×1(x))` where `up` is a bilinear
    (half-pixel) resize to the image size (×4 from res2). Every FPA and GAU
    block has `filters` channels (`kseg.layers.pan`). With the `"naive"`
    decoder the classifier is applied to the FPA output and upsampled
    directly (×16 at output stride 16). With `fpa=False`, res5 enters the GAU
    chain through a 1×1 conv–BN–ReLU to `filters` channels.

    Every ablation row of the paper is a constructor call (VOC 2012 val
    mIoU; backbone `kseg.backbones.pan_resnet101`, as in
    `build_pan_resnet101`):

    - Table 1 / 2 (FPA, naive decoder): "ResNet101" is `kseg.models.FCN`;
      "+SE" is `PAN(b, n, decoder="naive", fpa_attention="se",
      fpa_global_pooling=False)`; "+C333+MAX" is
      `PAN(b, n, decoder="naive", fpa_kernel_sizes=(3, 3, 3),
      fpa_pooling="max", fpa_global_pooling=False)`; "AVE" rows use
      `fpa_pooling="avg"`, "C357" rows `fpa_kernel_sizes=(7, 5, 3)` (the
      7×7 conv on the largest level), "+GP" rows `fpa_global_pooling=True`;
      the best row "C357+AVE+GP" (78.37) is `PAN(b, n, decoder="naive")`.
    - Table 3 (GAU without FPA): "+GAU" without GP, 3×3 (73.56) is
      `PAN(b, n, fpa=False, gau_global_context=False)`; GP + 1×1 (77.48)
      is `PAN(b, n, fpa=False, gau_low_kernel_size=1)`; GP + 3×3 (77.84) is
      `PAN(b, n, fpa=False)`.
    - Table 5: "PAN" (79.38) is `PAN(b, n)`; its "MS" and "Flip" rows are
      evaluation settings (multi-scale, flipped inputs) of the same model.

    Example:
    >>> from kseg.backbones import build_resnet
    >>> backbone = build_resnet((1, 1, 1, 1), (8, 8, 8, 8), output_stride=16)
    >>> model = PAN(backbone, num_classes=3, filters=16)
    >>> model(np.zeros((1, 64, 64, 3)))["logits"].shape
    (1, 64, 64, 3)

    Args:
        backbone: `keras.Model`. Encoder mapping images to the dict
            `{"res2", "res3", "res4", "res5"}` of stage features (see
            `kseg.backbones`).
        num_classes: int. Number of classes (logit channels).
        filters: int. Channels of the FPA and every GAU block (the paper
            does not give them). Defaults to `256`.
        fpa: bool. Whether FPA is applied to res5 (Table 3 rows have none).
            Defaults to `True`.
        fpa_kernel_sizes: 3 odd ints. FPA pyramid kernels from the largest
            level to the smallest: `(7, 5, 3)` is "C357", `(3, 3, 3)`
            "C333". Defaults to `(7, 5, 3)`.
        fpa_pooling: str. `"avg"` ("AVE") or `"max"` ("MAX") FPA
            downsampling. Defaults to `"avg"`.
        fpa_global_pooling: bool. FPA's global pooling branch ("GP" of
            Table 1). Defaults to `True`.
        fpa_attention: str. `"pyramid"` (FPA) or `"se"` (Table 1's SENet
            attention). Defaults to `"pyramid"`.
        decoder: str. `"gau"` (the GAU chain) or `"naive"` (classifier on
            res5's FPA output, bilinear upsampling). Defaults to `"gau"`.
        gau_low_kernel_size: int. Kernel of the GAU conv on the low-level
            feature, 3 or 1 (Table 3). Defaults to `3`.
        gau_global_context: bool. GAU's global context weighting ("GP" of
            Table 3). Defaults to `True`.
        dropout: float. Dropout rate before the classifier; the paper uses
            none. Defaults to `0.0`.
        dtype: dtype or `DTypePolicy` of the head layers; `None` uses the
            global policy. The logits are float32 regardless.
            Defaults to `None`.
        **kwargs: `keras.Model` keyword arguments (`name`, `trainable`).

    Input shape:
        Images `(batch, height, width, channels)` as the backbone takes them.

    Output shape:
        Dict `{"logits": (batch, height, width, num_classes)}`, float32.
    """

    def __init__(
        self,
        backbone,
        num_classes,
        filters=256,
        fpa=True,
        fpa_kernel_sizes=(7, 5, 3),
        fpa_pooling="avg",
        fpa_global_pooling=True,
        fpa_attention="pyramid",
        decoder="gau",
        gau_low_kernel_size=3,
        gau_global_context=True,
        dropout=0.0,
        dtype=None,
        **kwargs,
    ):
        num_classes = check_positive_int(num_classes, "num_classes")
        filters = check_positive_int(filters, "filters")
        fpa = bool(fpa)
        check_choice(decoder, _DECODERS, "decoder")
        if not fpa and decoder == "naive":
            raise ValueError(
                "PAN(fpa=False, decoder='naive') has neither FPA nor GAU: that "
                "is the paper's ResNet101 baseline, kseg.models.FCN"
            )
        dropout = check_rate(dropout, "dropout")
        policy = Segmenter.resolve_dtype(dtype)

        # === Layers ===
        # The FPA and GAU blocks are created whatever the switches, so their
        # options are validated even where the graph leaves them out.
        fpa_layer = FeaturePyramidAttention(
            filters,
            kernel_sizes=fpa_kernel_sizes,
            pooling=fpa_pooling,
            global_pooling=fpa_global_pooling,
            attention=fpa_attention,
            dtype=policy,
            name="fpa",
        )
        gau_layers = [
            GlobalAttentionUpsample(
                filters,
                low_kernel_size=gau_low_kernel_size,
                global_context=gau_global_context,
                dtype=policy,
                name=f"gau_{stage}",
            )
            for stage in _GAU_STAGES
        ]
        res5_projection = None
        if not fpa:
            res5_projection = ConvBNReLU(
                filters, 1, dtype=policy, name="res5_projection"
            )
        dropout_layer = None
        if dropout > 0.0:
            dropout_layer = keras.layers.Dropout(dropout, dtype=policy, name="dropout")
        classifier = keras.layers.Conv2D(
            num_classes, 1, dtype=policy, name="classifier"
        )

        # === Functional Model ===
        images = Segmenter.make_inputs(backbone)
        features = Segmenter.backbone_features(backbone, images)
        if fpa:
            x = fpa_layer(features["res5"])
        else:
            x = res5_projection(features["res5"])
        if decoder == "gau":
            for stage, gau in zip(_GAU_STAGES, gau_layers, strict=True):
                x = gau([features[stage], x])
        if dropout_layer is not None:
            x = dropout_layer(x)
        logits = Segmenter.full_resolution_logits(classifier(x), images, dtype=policy)
        super().__init__(
            inputs=images,
            outputs={"logits": logits},
            backbone=backbone,
            dtype=policy,
            **kwargs,
        )

        # === Config ===
        self.num_classes = num_classes
        self.filters = filters
        self.fpa = fpa
        self.fpa_kernel_sizes = fpa_layer.kernel_sizes
        self.fpa_pooling = fpa_layer.pooling
        self.fpa_global_pooling = fpa_layer.global_pooling
        self.fpa_attention = fpa_layer.attention
        self.decoder = decoder
        self.gau_low_kernel_size = gau_layers[0].low_kernel_size
        self.gau_global_context = gau_layers[0].global_context
        self.dropout = dropout

    def get_config(self):
        return {
            **super().get_config(),
            "num_classes": self.num_classes,
            "filters": self.filters,
            "fpa": self.fpa,
            "fpa_kernel_sizes": self.fpa_kernel_sizes,
            "fpa_pooling": self.fpa_pooling,
            "fpa_global_pooling": self.fpa_global_pooling,
            "fpa_attention": self.fpa_attention,
            "decoder": self.decoder,
            "gau_low_kernel_size": self.gau_low_kernel_size,
            "gau_global_context": self.gau_global_context,
            "dropout": self.dropout,
        }


def build_pan_resnet101(num_classes, input_shape=(None, None, 3), **kwargs):
    """The paper's PAN: `PAN` on ResNet-101 with the deep stem, output stride 16.

    `build_pan_resnet101(21)` is the "PAN" row of Table 5 (VOC 2012 val
    79.38 single scale); any `PAN` switch can be passed to get the other
    rows on the paper's backbone. The encoder is randomly initialized; load
    ImageNet weights into `model.backbone` before training.

    Args:
        num_classes: int. Number of classes (21 for VOC, 19 for Cityscapes).
        input_shape: 3 ints or `None`s. Image shape `(H, W, C)`.
            Defaults to `(None, None, 3)`.
        **kwargs: Further `PAN` arguments.
    """
    backbone = pan_resnet101(input_shape=input_shape, dtype=kwargs.get("dtype"))
    return PAN(backbone, num_classes, **kwargs)
