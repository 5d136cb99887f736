"""ExFuse: the GCN framework with ExFuse's five feature-fusion improvements."""

import keras

from kseg.backbones import exfuse_resnext101_rearranged
from kseg.layers.common import ConvBNReLU, check_choice
from kseg.layers.exfuse import (
    DenselyAdjacentPrediction,
    SemanticEmbeddingBranch,
    SemanticSupervisionHead,
    SubPixelUpsample,
)
from kseg.models.gcn.gcn import (
    check_decoder_width,
    check_kernel_size,
    check_stage_strides,
    gcn_decoder,
    transposed_upsampling,
)
from kseg.models.segmenter import (
    STAGE_NAMES,
    Segmenter,
    check_positive_int,
    float32_output,
)

# Intended loss weight of each auxiliary output, relative to 1 for
# "logits". The paper adds ECRE's segmentation loss to the first upsampling
# without giving a weight; kseg weighs it like the main loss, as the
# semantic supervision pretraining weighs its auxiliary classifiers. Use with
# `kseg.training.losses.segmentation_losses(model.output_loss_weights())`.
AUXILIARY_LOSS_WEIGHTS = {"ecre_logits": 1.0}

_ECRE_UPSAMPLINGS = ("subpixel", "deconv")
# The decoder level whose upsampling ECRE replaces: the first (res5 → res4).
_ECRE_STAGE = "res4"


@keras.saving.register_keras_serializable(package="kseg")
class ExFuse(Segmenter):
    """ExFuse: GCN with semantic supervision, layer rearrangement, semantic
    embedding branches, explicit channel resolution embedding and densely
    adjacent prediction.

    "ExFuse: Enhancing Feature Fusion for Semantic Segmentation" (Zhang et
    al., ECCV 2018, Sec. 3, Fig. 2). With every switch off this is exactly
    `kseg.models.GCN` (same graph, layer names and weights): per stage
    `g_i = BR(GCN_k(x_i))`, top-down `x = BR(crop(up(x)) + g_i)` with
    stride-2 transposed convs, a final BR, the classifier and a bilinear ×4
    resize. The switches:

    - `semantic_supervision` (SS, Sec. 3.1, Fig. 3): each stage feature
      `x_i` is the *second* 3×3 conv–BN–ReLU of that stage's semantic
      supervision head applied to the stage tail (layers `ss_<stage>_conv1`,
      `ss_<stage>_conv2`); the heads' pooling and classifiers only exist in
      pretraining (`kseg.backbones.build_semantic_supervision_pretrainer`).
      `load_semantic_supervision_weights(pretrainer)` copies the pretrained
      encoder and the heads' two convs into the model, matched by name
      (`ss_<stage>` head → `ss_<stage>_conv1/2`). Equivalently,
      `kseg.backbones.semantic_supervision_features(pretrainer)` is an
      encoder that already ends in those convs, for
      `semantic_supervision=False`.
    - LR (layer rearrangement, Sec. 3.1) is the encoder:
      `kseg.backbones.exfuse_resnext101_rearranged()` ({8, 8, 9, 8} blocks)
      instead of `resnext101_32x4d()` ({3, 4, 23, 3}).
    - `seb` (SEB, Sec. 3.1, Fig. 4): for res2, res3 and res4 the global
      convolution takes `SemanticEmbeddingBranch([x_i, x_{i+1}, ..., x_5])`
      (`seb_<stage>`, `x_i`'s channel count) instead of `x_i`.
    - `ecre` (ECRE, Sec. 3.2, Fig. 5): the first decoder upsampling
      (res5 → res4, `up_res4`) is a parameter-free `SubPixelUpsample(2)`, so
      the res5 global convolution and BR carry `4 · decoder_width` channels,
      and the upsampled map (at stride 16, res4's size) gets the auxiliary
      output `"ecre_logits"`: the map itself when `decoder_width` equals
      `num_classes` (no weights between the loss and the sub-pixel
      channels), its DAP with `dap`, otherwise a 1×1 classifier
      (`ecre_classifier`). Train it with weight
      `AUXILIARY_LOSS_WEIGHTS["ecre_logits"]`; the loss resizes it to the
      labels.
    - `dap` (DAP, Sec. 3.2, Fig. 6): the decoder carries
      `num_classes · dap_window_size²` channels (189 for VOC, k = 3) and the
      classifier is `DenselyAdjacentPrediction(k)`, which has no weights.

    Every ablation row of the paper is one constructor call (VOC 2012 val
    mIoU; `b = resnext101_32x4d()`, `lr = exfuse_resnext101_rearranged()`,
    `n = 21`, SS rows after SS pretraining):

    - Table 3: #1 baseline (76.0) `ExFuse(b, n)`; #2 +SS (77.5)
      `ExFuse(b, n, semantic_supervision=True)`; #3 +LR (78.3)
      `ExFuse(lr, n, semantic_supervision=True)`; #4 +ECRE (78.8) adds
      `ecre=True` to #3; #5 +SEB (79.0) adds `seb=True` to #3; #6 +DAP
      (79.6) adds `seb=True, dap=True` to #3; #7 all (80.0)
      `ExFuse(lr, n, semantic_supervision=True, ecre=True, seb=True,
      dap=True)` (`build_exfuse_resnext101(n)`).
    - Table 4 (on #3): "Deconv + Supervised" `ecre=True,
      ecre_upsampling="deconv"` (transposed conv, auxiliary loss on its
      output); "Sub-pixel Upsample Only" `ecre=True,
      ecre_supervision=False`; "ECRE" `ecre=True`.
    - Table 5 (on #5): "Baseline (more channels)" `seb=True,
      decoder_width=189`; "DAP" `seb=True, dap=True`.

    Example:
    >>> from kseg.backbones import build_resnet
    >>> backbone = build_resnet((1, 1, 1, 1), (8, 8, 8, 8))
    >>> model = ExFuse(backbone, 3, ecre=True, seb=True, dap=True, kernel_size=7)
    >>> {k: v.shape for k, v in model(np.zeros((1, 64, 64, 3))).items()}
    {'logits': (1, 64, 64, 3), 'ecre_logits': (1, 4, 4, 3)}

    Args:
        backbone: `keras.Model`. Encoder mapping images to the dict
            `{"res2", "res3", "res4", "res5"}` of stage features with strides
            4, 8, 16, 32 (see `kseg.backbones`).
        num_classes: int. Number of classes (logit channels).
        semantic_supervision: bool. Takes every stage feature from a semantic
            supervision head's second conv (SS). Defaults to `False`.
        ecre: bool. Sub-pixel first upsampling with the auxiliary
            `"ecre_logits"` output (ECRE). Defaults to `False`.
        seb: bool. Semantic embedding branches on res2..res4 (SEB).
            Defaults to `False`.
        dap: bool. Densely adjacent prediction as the classifier (DAP).
            Defaults to `False`.
        dap_window_size: int. Odd DAP window `k`. Defaults to `3`.
        kernel_size: int. Odd global convolution kernel size.
            Defaults to `15`.
        decoder_width: int or `None`. Channels of the global convolutions and
            the decoder; `None` means `num_classes · dap_window_size²` with
            `dap`, else `num_classes`. With `dap` it must be a multiple of
            `dap_window_size²`; a width other than the class scores gets a
            1×1 classifier (before DAP, to `num_classes · k²`).
            Defaults to `None`.
        ecre_upsampling: str. With `ecre`: `"subpixel"` (ECRE) or
            `"deconv"` (the transposed conv, Table 4 "Deconv + Supervised").
            Defaults to `"subpixel"`.
        ecre_supervision: bool. With `ecre`: whether `"ecre_logits"` is an
            output (`False` is Table 4 "Sub-pixel Upsample Only").
            Defaults to `True`.
        semantic_supervision_filters: int or `None`. With
            `semantic_supervision`: channels of the SS convs, as
            `head_filters` in pretraining; `None` keeps each stage's channels.
            Defaults to `None`.
        dtype: dtype or `DTypePolicy` of the decoder layers; `None` uses the
            global policy. The outputs are float32 regardless.
            Defaults to `None`.
        **kwargs: `keras.Model` keyword arguments (`name`, `trainable`).

    Input shape:
        Images `(batch, height, width, channels)` as the backbone takes them.

    Output shape:
        Dict `{"logits": (batch, height, width, num_classes)}`, float32, plus
        `"ecre_logits": (batch, ceil(height / 16), ceil(width / 16),
        num_classes)` with `ecre` (and `ecre_supervision`).
    """

    def __init__(
        self,
        backbone,
        num_classes,
        semantic_supervision=False,
        ecre=False,
        seb=False,
        dap=False,
        dap_window_size=3,
        kernel_size=15,
        decoder_width=None,
        ecre_upsampling="subpixel",
        ecre_supervision=True,
        semantic_supervision_filters=None,
        dtype=None,
        **kwargs,
    ):
        num_classes = check_positive_int(num_classes, "num_classes")
        semantic_supervision, ecre = bool(semantic_supervision), bool(ecre)
        seb, dap, ecre_supervision = bool(seb), bool(dap), bool(ecre_supervision)
        kernel_size = check_kernel_size(kernel_size)
        dap_window_size = check_positive_int(dap_window_size, "dap_window_size")
        if dap_window_size % 2 == 0:
            raise ValueError(
                f"dap_window_size must be odd so the window has a centre, "
                f"got {dap_window_size}"
            )
        groups = dap_window_size**2 if dap else 1
        width = check_decoder_width(decoder_width, num_classes * groups)
        if width % groups:
            raise ValueError(
                f"With dap=True, decoder_width must be a multiple of "
                f"dap_window_size**2={groups} (k² maps per class), got {width}"
            )
        check_choice(ecre_upsampling, _ECRE_UPSAMPLINGS, "ecre_upsampling")
        if not ecre and (ecre_upsampling != "subpixel" or not ecre_supervision):
            raise ValueError(
                "ecre_upsampling and ecre_supervision choose the ECRE variant; "
                "they need ecre=True"
            )
        if semantic_supervision_filters is not None:
            if not semantic_supervision:
                raise ValueError(
                    "semantic_supervision_filters needs semantic_supervision=True"
                )
            semantic_supervision_filters = check_positive_int(
                semantic_supervision_filters, "semantic_supervision_filters"
            )
        policy = Segmenter.resolve_dtype(dtype)
        subpixel = ecre and ecre_upsampling == "subpixel"

        # === Layers ===
        upsamplings = {
            stage: transposed_upsampling(width, policy, f"up_{stage}")
            for stage in STAGE_NAMES[:-1]
        }
        if subpixel:
            upsamplings[_ECRE_STAGE] = SubPixelUpsample(
                2, dtype=policy, name=f"up_{_ECRE_STAGE}"
            )
        scores = _score_layers(width, num_classes, dap, dap_window_size, policy, "")
        ecre_scores = None
        if ecre and ecre_supervision:
            ecre_scores = _score_layers(
                width, num_classes, dap, dap_window_size, policy, "ecre_"
            )

        # === Functional Model ===
        images = Segmenter.make_inputs(backbone)
        features = Segmenter.backbone_features(backbone, images)
        check_stage_strides(backbone)
        if semantic_supervision:
            features = {
                stage: _semantic_supervision_convs(
                    x, semantic_supervision_filters, policy, stage
                )
                for stage, x in features.items()
                if stage in STAGE_NAMES
            }
        gcn_inputs = dict(features)
        if seb:
            for index, stage in enumerate(STAGE_NAMES[:-1]):
                levels = [features[s] for s in STAGE_NAMES[index:]]
                gcn_inputs[stage] = SemanticEmbeddingBranch(
                    levels[0].shape[-1], dtype=policy, name=f"seb_{stage}"
                )(levels)
        widths = dict.fromkeys(STAGE_NAMES, width)
        if subpixel:
            # Sub-pixel upsampling turns 4·C channels into C.
            widths[STAGE_NAMES[-1]] = 4 * width
        x, upsampled = gcn_decoder(gcn_inputs, widths, upsamplings, kernel_size, policy)
        outputs = {
            "logits": Segmenter.full_resolution_logits(
                _apply(scores, x), images, dtype=policy
            )
        }
        if ecre_scores is not None:
            outputs["ecre_logits"] = float32_output(
                _apply(ecre_scores, upsampled[_ECRE_STAGE]), "ecre_logits"
            )
        super().__init__(
            inputs=images,
            outputs=outputs,
            backbone=backbone,
            dtype=policy,
            **kwargs,
        )

        # === Config ===
        self.num_classes = num_classes
        self.semantic_supervision = semantic_supervision
        self.ecre = ecre
        self.seb = seb
        self.dap = dap
        self.dap_window_size = dap_window_size
        self.kernel_size = kernel_size
        self.decoder_width = None if decoder_width is None else width
        self.ecre_upsampling = ecre_upsampling
        self.ecre_supervision = ecre_supervision
        self.semantic_supervision_filters = semantic_supervision_filters

    def output_loss_weights(self):
        """Loss weight of every output: 1 for `"logits"`, the
        `AUXILIARY_LOSS_WEIGHTS` entry for each auxiliary output.

        Example:
        >>> from kseg.training.losses import segmentation_losses
        >>> losses, weights = segmentation_losses(model.output_loss_weights())
        >>> model.compile(optimizer="sgd", loss=losses, loss_weights=weights)
        """
        return {
            name: 1.0 if name == "logits" else AUXILIARY_LOSS_WEIGHTS[name]
            for name in self.output
        }

    def load_semantic_supervision_weights(self, pretrainer):
        """Copies a semantic supervision pretrainer's weights into the model.

        The pretrainer's encoder goes into `self.backbone`, and the two
        conv–BN–ReLU units of its head `ss_<stage>` into
        `ss_<stage>_conv1` / `ss_<stage>_conv2`; its classifiers are left
        behind (ExFuse Sec. 3.1: "we remove these branches").

        Args:
            pretrainer: model from
                `kseg.backbones.build_semantic_supervision_pretrainer` (or
                its `.keras` reload), built on an encoder like this model's
                backbone and with `head_filters` equal to
                `semantic_supervision_filters`. Either encoder may carry
                `kseg.backbones.prepend_normalization` (the trainer's input
                normalization): it has no weights.
        """
        if not self.semantic_supervision:
            raise ValueError(
                "load_semantic_supervision_weights needs a model built with "
                "semantic_supervision=True"
            )
        encoders = [
            layer for layer in pretrainer.layers if isinstance(layer, keras.Model)
        ]
        heads = {
            layer.name: layer
            for layer in pretrainer.layers
            if isinstance(layer, SemanticSupervisionHead)
        }
        missing = [s for s in STAGE_NAMES if f"ss_{s}" not in heads]
        if len(encoders) != 1 or missing:
            raise ValueError(
                "pretrainer must come from build_semantic_supervision_pretrainer: "
                f"one nested encoder and heads ss_res2..ss_res5, got "
                f"{len(encoders)} nested models and heads {sorted(heads)}"
            )
        pairs = [(encoders[0], self.backbone, "the pretrained encoder")]
        for stage in STAGE_NAMES:
            head = heads[f"ss_{stage}"]
            for conv in ("conv1", "conv2"):
                target = self.get_layer(f"ss_{stage}_{conv}")
                pairs.append((getattr(head, conv), target, f"head ss_{stage}.{conv}"))
        # Every shape is checked before any weight is written, so a mismatch
        # leaves the model as it was.
        values = [
            _matching_weights(source, target, what) for source, target, what in pairs
        ]
        for (_, target, _), weights in zip(pairs, values, strict=True):
            target.set_weights(weights)

    def get_config(self):
        return {
            **super().get_config(),
            "num_classes": self.num_classes,
            "semantic_supervision": self.semantic_supervision,
            "ecre": self.ecre,
            "seb": self.seb,
            "dap": self.dap,
            "dap_window_size": self.dap_window_size,
            "kernel_size": self.kernel_size,
            "decoder_width": self.decoder_width,
            "ecre_upsampling": self.ecre_upsampling,
            "ecre_supervision": self.ecre_supervision,
            "semantic_supervision_filters": self.semantic_supervision_filters,
        }


def _semantic_supervision_convs(x, filters, dtype, stage):
    """The two 3×3 conv–BN–ReLU units of a semantic supervision head."""
    filters = filters or x.shape[-1]
    for conv in ("conv1", "conv2"):
        x = ConvBNReLU(filters, 3, dtype=dtype, name=f"ss_{stage}_{conv}")(x)
    return x


def _score_layers(width, num_classes, dap, window_size, dtype, prefix):
    """The layers from a `width`-channel decoder map to class logits: a 1×1
    classifier unless the map already holds the scores (`num_classes`
    channels, or `num_classes · k²` for DAP), then DAP."""
    target = num_classes * window_size**2 if dap else num_classes
    layers = []
    if width != target:
        layers.append(
            keras.layers.Conv2D(target, 1, dtype=dtype, name=f"{prefix}classifier")
        )
    if dap:
        layers.append(
            DenselyAdjacentPrediction(window_size, dtype=dtype, name=f"{prefix}dap")
        )
    return layers


def _apply(layers, x):
    for layer in layers:
        x = layer(x)
    return x


def _matching_weights(source, target, what):
    """`source`'s weights, checked to fit `target` one to one."""
    weights = source.get_weights()
    want = [tuple(w.shape) for w in target.weights]
    got = [tuple(w.shape) for w in weights]
    if want != got:
        raise ValueError(
            f"Cannot load {what} into {target.name!r}: weight shapes {got} do "
            f"not match {want}"
        )
    return weights


def build_exfuse_resnext101(num_classes, input_shape=(None, None, 3), **kwargs):
    """ExFuse with every component on the rearranged ResNeXt-101 encoder.

    Table 3 #7 (80.0 mIoU on VOC 2012 val): `ExFuse(
    exfuse_resnext101_rearranged(), num_classes, semantic_supervision=True,
    ecre=True, seb=True, dap=True)`. The encoder is randomly initialized:
    pretrain it with semantic supervision and load the result with
    `load_semantic_supervision_weights` before fine-tuning.

    Args:
        num_classes: int. Number of classes (21 for VOC).
        input_shape: 3 ints or `None`s. Image shape `(H, W, C)`.
            Defaults to `(None, None, 3)`.
        **kwargs: Further `ExFuse` arguments (they override the switches).
    """
    backbone = exfuse_resnext101_rearranged(
        input_shape=input_shape, dtype=kwargs.get("dtype")
    )
    switches = dict(semantic_supervision=True, ecre=True, seb=True, dap=True)
    return ExFuse(backbone, num_classes, **{**switches, **kwargs})
