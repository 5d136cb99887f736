"""Global Convolutional Network ("Large Kernel Matters"): the U-shaped
decoder that ExFuse builds on."""

import keras
from keras import ops

from kseg.backbones import resnext101_32x4d
from kseg.layers.common import KsegLayer, check_input_and_reference
from kseg.layers.exfuse import BoundaryRefinement, GlobalConvolution
from kseg.models.segmenter import STAGE_NAMES, Segmenter, check_positive_int

# The strides the decoder's ×2 steps assume for res2..res5.
_STAGE_STRIDES = (4, 8, 16, 32)
# Size of the symbolic probe image used to read a backbone's stage strides
# where its input size is not fixed.
_PROBE_SIZE = 256
# Transposed-conv kernel of the ×2 upsampling: 4 with stride 2 lets every
# output pixel mix 2×2 input pixels (the FCN / PyTorch `k=4, s=2, p=1`
# deconvolution) instead of copying one, and "same" padding gives exactly 2×.
UPSAMPLING_KERNEL_SIZE = 4


@keras.saving.register_keras_serializable(package="kseg")
class CropLike(KsegLayer):
    """Crops a tensor's bottom and right edges to a reference's spatial size.

    A ×2 upsampling of a feature of size `ceil(n / 32)` gives
    `2·ceil(n / 32)` pixels, one more than the next level's `ceil(n / 16)`
    when that is odd. Feature pixel `i` of every level covers the image from
    `stride · i` on (the encoder pads symmetrically), so the upsampled map is
    aligned at the top-left and its surplus last row / column lies outside
    the image: cropping it keeps every other pixel where it is, where a
    resize would shift them all by a fraction of a pixel.

    Example:
    >>> CropLike()([np.zeros((1, 6, 4, 3)), np.zeros((1, 5, 3, 8))]).shape
    (1, 5, 3, 3)

    Args:
        **kwargs: Base layer keyword arguments (`name`, `dtype`, ...).

    Input shape:
        List `[x, reference]`: `x` is `(batch, h, w, channels)` and
        `reference` `(batch, height, width, any)` with `height <= h`,
        `width <= w`.

    Output shape:
        `(batch, height, width, channels)`.
    """

    def build(self, input_shape):
        check_input_and_reference(input_shape, "CropLike")
        for axis, what in ((1, "height"), (2, "width")):
            size, limit = input_shape[1][axis], input_shape[0][axis]
            if size is not None and limit is not None and size > limit:
                raise ValueError(
                    f"CropLike cannot crop x of {what} {limit} to the larger "
                    f"reference {what} {size}: shapes {input_shape}"
                )

    def call(self, inputs):
        x, reference = inputs
        shape = ops.shape(reference)
        return x[:, : shape[1], : shape[2], :]

    def compute_output_shape(self, input_shape):
        x_shape, reference_shape = input_shape
        return (x_shape[0], reference_shape[1], reference_shape[2], x_shape[3])


def check_kernel_size(kernel_size):
    """Returns the global convolution kernel size, which must be odd so that
    "same" padding centres the kernel on its pixel."""
    kernel_size = check_positive_int(kernel_size, "kernel_size")
    if kernel_size % 2 == 0:
        raise ValueError(
            f"kernel_size must be odd so the k×1 / 1×k kernels are centred, "
            f"got {kernel_size}"
        )
    return kernel_size


def check_stage_strides(backbone):
    """Raises `ValueError` unless the backbone's res2..res5 halve in size
    from one stage to the next (strides 4, 8, 16, 32).

    The decoder's ×2 upsamplings only line up with such an encoder; a
    dilated one (output stride 8 or 16) would be cropped wrongly. Read from a
    symbolic call, so it costs no computation.
    """
    height, width, channels = backbone.input_shape[1:]
    probe = keras.KerasTensor(
        (1, height or _PROBE_SIZE, width or _PROBE_SIZE, channels)
    )
    features = backbone.compute_output_spec(probe)
    for low, high in zip(STAGE_NAMES[:-1], STAGE_NAMES[1:], strict=True):
        low_size, high_size = features[low].shape[1:3], features[high].shape[1:3]
        for low_dim, high_dim in zip(low_size, high_size, strict=True):
            if low_dim is None or high_dim is None:
                continue
            if not 0 <= 2 * high_dim - low_dim <= 1:
                raise ValueError(
                    f"The GCN decoder needs an encoder with stage strides "
                    f"{_STAGE_STRIDES} (each stage half the size of the one "
                    f"below, e.g. output_stride=32), but for a "
                    f"{tuple(probe.shape[1:3])} image {high!r} is "
                    f"{tuple(high_size)} and {low!r} is {tuple(low_size)}"
                )


def transposed_upsampling(filters, dtype, name):
    """The baseline's learned ×2 upsampling (a transposed convolution)."""
    return keras.layers.Conv2DTranspose(
        filters,
        UPSAMPLING_KERNEL_SIZE,
        strides=2,
        padding="same",
        dtype=dtype,
        name=name,
    )


def gcn_decoder(features, widths, upsamplings, kernel_size, dtype):
    """The GCN decoder graph on stage features (Peng et al. 2017, Fig. 2).

    Per stage `s`: `g_s = BR(GCN_k(features[s]))` with `widths[s]` channels.
    Top-down from `x = g_res5`: for res4, res3, res2 in turn
    `u_s = crop(upsamplings[s](x))` (to `g_s`'s size, see `CropLike`) and
    `x = BR(u_s + g_s)`; finally `x = BR(x)`.

    Layer names: `gcn_<stage>`, `gcn_br_<stage>`, `crop_<stage>`,
    `fuse_<stage>`, `fuse_br_<stage>`, `final_br`.

    Args:
        features: dict stage → symbolic 4D tensor, res2..res5.
        widths: dict stage → int, the global convolution channels.
        upsamplings: dict res4/res3/res2 → layer taking `x` to twice its size
            with the channels of `g_s`.
        kernel_size: int. Global convolution kernel size.
        dtype: the head's `DTypePolicy`.

    Returns:
        `(x, upsampled)`: the decoder output at res2's size, and the dict
        res4/res3/res2 → `u_s`.
    """
    levels = {}
    for stage in STAGE_NAMES:
        x = GlobalConvolution(
            widths[stage], kernel_size, dtype=dtype, name=f"gcn_{stage}"
        )(features[stage])
        levels[stage] = BoundaryRefinement(dtype=dtype, name=f"gcn_br_{stage}")(x)
    x = levels[STAGE_NAMES[-1]]
    upsampled = {}
    for stage in reversed(STAGE_NAMES[:-1]):
        up = upsamplings[stage](x)
        up = CropLike(dtype=dtype, name=f"crop_{stage}")([up, levels[stage]])
        upsampled[stage] = up
        x = keras.layers.Add(dtype=dtype, name=f"fuse_{stage}")([up, levels[stage]])
        x = BoundaryRefinement(dtype=dtype, name=f"fuse_br_{stage}")(x)
    x = BoundaryRefinement(dtype=dtype, name="final_br")(x)
    return x, upsampled


def check_decoder_width(decoder_width, default):
    """Returns `decoder_width`, or `default` where it is `None`."""
    if decoder_width is None:
        return default
    return check_positive_int(decoder_width, "decoder_width")


@keras.saving.register_keras_serializable(package="kseg")
class GCN(Segmenter):
    """Global Convolutional Network: large-kernel convolutions on every
    encoder stage, fused top-down with boundary refinement.

    "Large Kernel Matters — Improve Semantic Segmentation by Global
    Convolutional Network" (Peng et al., CVPR 2017, Fig. 2), the baseline
    of ExFuse (Zhang et al., ECCV 2018, Sec. 3, Table 3 #1, 76.0 mIoU on
    VOC 2012 val with ResNeXt-101). Per stage res2..res5 (strides 4, 8, 16,
    32): `g = BR(GCN_k(res_i))` with `decoder_width` channels. Top-down from
    `x = g_5`: `x = BR(up(x) + g_i)` for i = 4, 3, 2, where `up` is a
    stride-2 transposed convolution (4×4 kernel, "same" padding,
    `decoder_width` channels) whose result is cropped at the bottom / right
    to `g_i`'s size (`CropLike`: a ×2 map can be one pixel larger than the
    next stage for sizes that are not multiples of 32). Then a final `BR`,
    the classifier, and a bilinear (half-pixel) resize to the image (×4).

    With `decoder_width=None` the decoder carries `num_classes` channels —
    GCN's score maps — and the classifier is the identity; otherwise it is
    a 1×1 convolution to `num_classes`. `kseg.models.ExFuse` with every
    switch off builds this same graph (same layer names and weights).

    Example:
    >>> from kseg.backbones import build_resnet
    >>> backbone = build_resnet((1, 1, 1, 1), (8, 8, 8, 8))
    >>> model = GCN(backbone, num_classes=3, kernel_size=7)
    >>> model(np.zeros((1, 64, 64, 3)))["logits"].shape
    (1, 64, 64, 3)

    Args:
        backbone: `keras.Model`. Encoder mapping images to the dict
            `{"res2", "res3", "res4", "res5"}` of stage features with strides
            4, 8, 16, 32 (e.g. `kseg.backbones.resnext101_32x4d()`).
        num_classes: int. Number of classes (logit channels).
        kernel_size: int. Odd kernel size `k` of the global convolutions.
            Defaults to `15`.
        decoder_width: int or `None`. Channels of the global convolutions and
            of the whole decoder; `None` means `num_classes`.
            Defaults to `None`.
        dtype: dtype or `DTypePolicy` of the decoder layers; `None` uses the
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
        kernel_size=15,
        decoder_width=None,
        dtype=None,
        **kwargs,
    ):
        num_classes = check_positive_int(num_classes, "num_classes")
        kernel_size = check_kernel_size(kernel_size)
        width = check_decoder_width(decoder_width, num_classes)
        policy = Segmenter.resolve_dtype(dtype)

        # === Layers ===
        upsamplings = {
            stage: transposed_upsampling(width, policy, f"up_{stage}")
            for stage in STAGE_NAMES[:-1]
        }
        classifier = None
        if width != num_classes:
            classifier = keras.layers.Conv2D(
                num_classes, 1, dtype=policy, name="classifier"
            )

        # === Functional Model ===
        images = Segmenter.make_inputs(backbone)
        features = Segmenter.backbone_features(backbone, images)
        check_stage_strides(backbone)
        widths = dict.fromkeys(STAGE_NAMES, width)
        x, _ = gcn_decoder(features, widths, upsamplings, kernel_size, policy)
        if classifier is not None:
            x = classifier(x)
        logits = Segmenter.full_resolution_logits(x, images, dtype=policy)
        super().__init__(
            inputs=images,
            outputs={"logits": logits},
            backbone=backbone,
            dtype=policy,
            **kwargs,
        )

        # === Config ===
        self.num_classes = num_classes
        self.kernel_size = kernel_size
        self.decoder_width = None if decoder_width is None else width

    def get_config(self):
        return {
            **super().get_config(),
            "num_classes": self.num_classes,
            "kernel_size": self.kernel_size,
            "decoder_width": self.decoder_width,
        }


def build_gcn_resnext101(num_classes, input_shape=(None, None, 3), **kwargs):
    """ExFuse's GCN baseline: `GCN` on ResNeXt-101 32×4d (Table 3 #1).

    76.0 mIoU on VOC 2012 val in the ExFuse paper. The encoder is randomly
    initialized; load ImageNet weights into `model.backbone` before training.

    Args:
        num_classes: int. Number of classes (21 for VOC).
        input_shape: 3 ints or `None`s. Image shape `(H, W, C)`.
            Defaults to `(None, None, 3)`.
        **kwargs: Further `GCN` arguments.
    """
    backbone = resnext101_32x4d(input_shape=input_shape, dtype=kwargs.get("dtype"))
    return GCN(backbone, num_classes, **kwargs)
