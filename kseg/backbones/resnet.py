"""ResNet-family encoders: ResNet, ResNeXt, SE-ResNeXt and ExFuse's rearranged
variants, from one builder.

Every encoder is a functional `keras.Model` built from stock Keras layers (so a
`.keras` file needs no custom objects) whose output is the dict
`{"res2": ..., "res3": ..., "res4": ..., "res5": ...}` of stage-tail features.
At output stride 32 their strides are 4, 8, 16 and 32; output stride 16 trades
the last stride for dilation 2 in res5, output stride 8 trades the last two
for dilation 2 in res4 and 4 in res5.

Padding is symmetric (explicit zero padding before every strided conv and the
max pool, as in Caffe / PyTorch) rather than TensorFlow's asymmetric "same",
so weights ported from torchvision or timm give the same numbers. Feature
sizes are the same either way: `ceil(size / stride)` for any input size.
"""

import operator

import keras

STAGE_NAMES = ("res2", "res3", "res4", "res5")
OUTPUT_STRIDES = (8, 16, 32)


def build_resnet(
    block_counts=(3, 4, 6, 3),
    widths=(64, 128, 256, 512),
    expansion=4,
    cardinality=1,
    group_width=None,
    squeeze_excitation=False,
    se_ratio=16,
    deep_stem=False,
    stem_width=64,
    output_stride=32,
    synchronized_bn=False,
    bn_momentum=0.9,
    bn_epsilon=1e-5,
    input_shape=(None, None, 3),
    dtype=None,
    name="resnet",
):
    """Builds a bottleneck ResNet / ResNeXt / SE-ResNeXt encoder.

    Layer rearrangement (ExFuse, Zhang et al. ECCV 2018, Sec. 3.1) needs any
    per-stage block counts and widths; PAN (Li et al. BMVC 2018, Sec. 3.3)
    needs the deep stem of three 3×3 convs and a dilated res5; SegModel needs
    a dilated ResNet-101 at output stride 16. All of them are this builder.

    Each bottleneck block is ResNet v1.5: 1×1 conv → 3×3 conv (carrying the
    stride, the dilation and `cardinality` groups) → 1×1 conv to
    `width · expansion` channels, each followed by batch normalization, ReLU
    after the first two; an optional squeeze-excitation on the residual branch
    (Hu et al., before the addition); a 1×1 projection shortcut (with BN)
    whenever the stride or the channel count changes; ReLU after the addition.
    Every 3×3 conv of a dilated stage uses the stage's dilation (the DeepLab /
    mmsegmentation convention, first block included).

    The standard stem is a 7×7 stride-2 conv with `stem_width` channels; the
    deep stem (PSPNet, PAN) is three 3×3 convs with `stem_width`,
    `stem_width` and `2 · stem_width` channels, the first with stride 2. Both
    end with a 3×3 stride-2 max pool.

    Example:
    >>> model = build_resnet((1, 1, 1, 1), (8, 16, 32, 64), input_shape=(64, 64, 3))
    >>> {k: tuple(v.shape) for k, v in model(np.zeros((1, 64, 64, 3))).items()}
    {'res2': (1, 16, 16, 32), 'res3': (1, 8, 8, 64), 'res4': (1, 4, 4, 128), \
'res5': (1, 2, 2, 256)}

    Args:
        block_counts: 4 ints. Bottleneck blocks in res2..res5.
            Defaults to `(3, 4, 6, 3)` (ResNet-50).
        widths: 4 ints. Bottleneck widths of res2..res5; a stage outputs
            `width · expansion` channels. Defaults to `(64, 128, 256, 512)`.
        expansion: int. Output channels per bottleneck width. Defaults to `4`.
        cardinality: int. Groups of the 3×3 convs (ResNeXt). Defaults to `1`.
        group_width: int or `None`. Channels per group in res2 (the "d" of
            ResNeXt "32x4d"); the 3×3 conv of stage i then has
            `cardinality · group_width · widths[i] / widths[0]` channels. With
            `None` the 3×3 conv has `widths[i]` channels. Defaults to `None`.
        squeeze_excitation: bool. Adds a squeeze-excitation unit to every
            block. Defaults to `False`.
        se_ratio: int. Channel reduction of the squeeze-excitation unit.
            Defaults to `16`.
        deep_stem: bool. Three 3×3 convs instead of the 7×7 stem conv.
            Defaults to `False`.
        stem_width: int. Stem channels (see above). Defaults to `64`.
        output_stride: int. One of 8, 16, 32: stride of res5. Defaults to `32`.
        synchronized_bn: bool. Uses
            `BatchNormalization(synchronized=True)` (cross-replica statistics;
            TensorFlow backend only). Defaults to `False`.
        bn_momentum: float. Batch normalization momentum. Defaults to `0.9`.
        bn_epsilon: float. Batch normalization epsilon. Defaults to `1e-5`.
        input_shape: 3 ints or `None`s. Image shape `(H, W, C)`.
            Defaults to `(None, None, 3)`.
        dtype: dtype or `DTypePolicy` for every layer; `None` follows the
            global policy. Defaults to `None`.
        name: str. Model name. Defaults to `"resnet"`.

    Returns:
        A functional `keras.Model` mapping images `(N, H, W, C)` to the dict
        of features `res2..res5`, with `widths[i] · expansion` channels and
        spatial size `ceil(H / stride)`.
    """
    block_counts = _positive_ints(block_counts, "block_counts")
    widths = _positive_ints(widths, "widths")
    if len(block_counts) != len(STAGE_NAMES):
        raise ValueError(
            f"block_counts must give {len(STAGE_NAMES)} stages (res2..res5), "
            f"got {len(block_counts)}: {block_counts}"
        )
    if len(widths) != len(block_counts):
        raise ValueError(
            f"widths must have one entry per stage like block_counts "
            f"({len(block_counts)}), got {len(widths)}: {widths}"
        )
    expansion = _positive_int(expansion, "expansion")
    cardinality = _positive_int(cardinality, "cardinality")
    se_ratio = _positive_int(se_ratio, "se_ratio")
    stem_width = _positive_int(stem_width, "stem_width")
    if output_stride not in OUTPUT_STRIDES:
        raise ValueError(
            f"output_stride must be one of {OUTPUT_STRIDES}, got {output_stride!r}"
        )
    if synchronized_bn and keras.backend.backend() != "tensorflow":
        raise ValueError(
            "synchronized_bn=True needs the TensorFlow backend, the backend is "
            f"{keras.backend.backend()!r}"
        )
    if input_shape is None or len(input_shape) != 3 or input_shape[-1] is None:
        raise ValueError(
            "input_shape must be (height, width, channels) with known channels, "
            f"got {input_shape}"
        )
    inner_widths = _inner_widths(widths, cardinality, group_width)

    layers = _LayerFactory(synchronized_bn, bn_momentum, bn_epsilon, dtype)
    inputs = keras.Input(shape=tuple(input_shape), name="image")
    x = _stem(inputs, layers, deep_stem, stem_width)

    features = {}
    stride, dilation = 4, 1
    for stage, (stage_name, count) in enumerate(
        zip(STAGE_NAMES, block_counts, strict=True)
    ):
        first_stride = 1
        if stage > 0:
            if stride < output_stride:
                first_stride, stride = 2, stride * 2
            else:
                dilation *= 2
        for block in range(count):
            x = _bottleneck(
                x,
                layers,
                inner_width=inner_widths[stage],
                out_width=widths[stage] * expansion,
                stride=first_stride if block == 0 else 1,
                dilation=dilation,
                groups=cardinality,
                se_ratio=se_ratio if squeeze_excitation else None,
                prefix=f"{stage_name}_block{block + 1}",
            )
        features[stage_name] = x
    return keras.Model(inputs, features, name=name)


def resnet50(**kwargs):
    """ResNet-50 (He et al. 2016): blocks {3, 4, 6, 3}, output stride 32.

    The encoder of ExFuse's ResNet-50 experiments (Tables 1–2); 23.5M
    trainable parameters, the same as torchvision's without the classifier.
    Keyword arguments override any `build_resnet` argument.
    """
    return build_resnet(**{"block_counts": (3, 4, 6, 3), "name": "resnet50", **kwargs})


def resnet101(**kwargs):
    """ResNet-101 (He et al. 2016): blocks {3, 4, 23, 3}, output stride 32.

    See `pan_resnet101` and `segmodel_resnet101` for the papers' dilated
    variants. Keyword arguments override any `build_resnet` argument.
    """
    return build_resnet(
        **{"block_counts": (3, 4, 23, 3), "name": "resnet101", **kwargs}
    )


def resnet152(**kwargs):
    """ResNet-152 (He et al. 2016): blocks {3, 8, 36, 3}, output stride 32.

    Keyword arguments override any `build_resnet` argument.
    """
    return build_resnet(
        **{"block_counts": (3, 8, 36, 3), "name": "resnet152", **kwargs}
    )


def pan_resnet101(**kwargs):
    """PAN's encoder: ResNet-101 with the deep stem and output stride 16.

    PAN (Li et al. BMVC 2018, Sec. 3.3) replaces the 7×7 stem conv with three
    3×3 convs and dilates res5 with rate 2. Keyword arguments override any
    `build_resnet` argument.
    """
    return resnet101(
        **{"deep_stem": True, "output_stride": 16, "name": "pan_resnet101", **kwargs}
    )


def segmodel_resnet101(**kwargs):
    """SegModel's unary encoder: ResNet-101 dilated to output stride 16.

    Keyword arguments override any `build_resnet` argument.
    """
    return resnet101(**{"output_stride": 16, "name": "segmodel_resnet101", **kwargs})


def resnext101_32x4d(**kwargs):
    """ResNeXt-101 32×4d (Xie et al. 2017): blocks {3, 4, 23, 3}, output stride 32.

    Cardinality 32 with 4 channels per group in res2 (3×3 convs of 128, 256,
    512, 1024 channels). The default encoder of ExFuse's GCN baseline.
    Keyword arguments override any `build_resnet` argument.
    """
    return build_resnet(
        **{
            "block_counts": (3, 4, 23, 3),
            "cardinality": 32,
            "group_width": 4,
            "name": "resnext101_32x4d",
            **kwargs,
        }
    )


def exfuse_resnext101_rearranged(**kwargs):
    """ExFuse's layer-rearranged ResNeXt-101: blocks {8, 8, 9, 8}, output stride 32.

    ExFuse (Sec. 3.1, Table 3 "+LR") moves blocks out of res4 into the other
    stages, bringing res2 and res3 closer to the supervision, and "adjusts
    the number of channels to ensure the same overall computational
    complexity". The widths are kept at ResNeXt-101 32×4d's
    (64, 128, 256, 512), cardinality 32, group width 4, because with these
    widths every non-first bottleneck block costs the same: each stage halves
    H and W and doubles every channel count (group width included), so
    `H·W·(C_in·C_mid + 9·C_mid²/32 + C_mid·C_out)` is stage-independent, and
    both layouts have 33 blocks, four of them stage-first. Counted with
    `count_multiply_adds` at 224×224 (convs only):

    - ResNeXt-101 32×4d {3, 4, 23, 3}: 7.968 G multiply-adds,
    - rearranged {8, 8, 9, 8}, same widths: 7.968 G multiply-adds (Δ 0.0%).

    Any width change would break the equality, so none is made. What does
    change is size: the rearranged net has 1.19× the parameters (50.3M vs
    42.1M trainable, without classifier; a res5 block holds 16× the weights
    of a res2 block) and its early, high-resolution stages hold more
    activations. Keyword arguments override any `build_resnet` argument.
    """
    return resnext101_32x4d(
        **{
            "block_counts": (8, 8, 9, 8),
            "name": "exfuse_resnext101_rearranged",
            **kwargs,
        }
    )


def se_resnext131(**kwargs):
    """ExFuse's "ResNeXt 131": SE-ResNeXt 32×4d, blocks {8, 8, 19, 8}.

    The deeper backbone of ExFuse's final VOC system (Sec. 5): squeeze-
    excitation in every block (reduction 16) and the rearranged-style block
    counts; 3·(8+8+19+8) + 2 = 131 layers. Output stride 32. Keyword arguments
    override any `build_resnet` argument.
    """
    return resnext101_32x4d(
        **{
            "block_counts": (8, 8, 19, 8),
            "squeeze_excitation": True,
            "name": "se_resnext131",
            **kwargs,
        }
    )


BACKBONES = {
    "resnet50": resnet50,
    "resnet101": resnet101,
    "resnet152": resnet152,
    "pan_resnet101": pan_resnet101,
    "segmodel_resnet101": segmodel_resnet101,
    "resnext101_32x4d": resnext101_32x4d,
    "exfuse_resnext101_rearranged": exfuse_resnext101_rearranged,
    "se_resnext131": se_resnext131,
}


def build_backbone(name, **kwargs):
    """Builds a named encoder from `BACKBONES`; `kwargs` override its config."""
    if name not in BACKBONES:
        raise ValueError(
            f"Unknown backbone {name!r}; expected one of {', '.join(BACKBONES)}"
        )
    return BACKBONES[name](**kwargs)


def count_multiply_adds(model):
    """Multiply-adds of every `Conv2D` and `Dense` layer of a built model.

    The usual "FLOPs" of classification papers (ResNet-50: 4.1 G at
    224×224). Needs static spatial shapes; nested models are counted too.

    Args:
        model: a functional `keras.Model` built on a fixed input size.

    Returns:
        int, the total multiply-adds for one image.
    """
    total = 0
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            total += count_multiply_adds(layer)
        elif isinstance(layer, (keras.layers.Conv2D, keras.layers.Dense)):
            in_shape, out_shape = layer.input.shape, layer.output.shape
            if any(d is None for d in out_shape[1:]):
                raise ValueError(
                    f"count_multiply_adds needs static shapes, layer {layer.name} "
                    f"has output shape {out_shape}"
                )
            positions = 1
            for d in out_shape[1:-1]:
                positions *= d
            per_output = in_shape[-1]
            if isinstance(layer, keras.layers.Conv2D):
                per_output = per_output // layer.groups
                per_output *= layer.kernel_size[0] * layer.kernel_size[1]
            total += positions * out_shape[-1] * per_output
    return int(total)


class _LayerFactory:
    """Makes the conv and BN layers with the builder's shared settings."""

    def __init__(self, synchronized_bn, bn_momentum, bn_epsilon, dtype):
        self.synchronized_bn = bool(synchronized_bn)
        self.bn_momentum = bn_momentum
        self.bn_epsilon = bn_epsilon
        self.dtype = dtype

    def conv(self, x, filters, kernel_size, name, strides=1, dilation=1, groups=1):
        padding = "same"
        if strides > 1 and kernel_size > 1:
            # Symmetric padding (Caffe / PyTorch); "same" would pad only the
            # bottom/right for even sizes and shift every strided window.
            pad = dilation * (kernel_size - 1) // 2
            x = keras.layers.ZeroPadding2D(pad, dtype=self.dtype, name=f"{name}_pad")(x)
            padding = "valid"
        return keras.layers.Conv2D(
            filters,
            kernel_size,
            strides=strides,
            padding=padding,
            dilation_rate=dilation,
            groups=groups,
            use_bias=False,
            kernel_initializer="he_normal",
            dtype=self.dtype,
            name=name,
        )(x)

    def bn(self, x, name):
        return keras.layers.BatchNormalization(
            momentum=self.bn_momentum,
            epsilon=self.bn_epsilon,
            synchronized=self.synchronized_bn,
            dtype=self.dtype,
            name=name,
        )(x)

    def relu(self, x, name):
        return keras.layers.ReLU(dtype=self.dtype, name=name)(x)

    def conv_bn_relu(self, x, filters, kernel_size, name, **conv_kwargs):
        x = self.conv(x, filters, kernel_size, f"{name}_conv", **conv_kwargs)
        x = self.bn(x, f"{name}_bn")
        return self.relu(x, f"{name}_relu")


def _stem(x, layers, deep_stem, stem_width):
    if deep_stem:
        x = layers.conv_bn_relu(x, stem_width, 3, "stem1", strides=2)
        x = layers.conv_bn_relu(x, stem_width, 3, "stem2")
        x = layers.conv_bn_relu(x, 2 * stem_width, 3, "stem3")
    else:
        x = layers.conv_bn_relu(x, stem_width, 7, "stem", strides=2)
    # Zero padding equals the -inf padding of a max pool here: inputs are ReLU
    # outputs, and every window holds at least one real pixel.
    x = keras.layers.ZeroPadding2D(1, dtype=layers.dtype, name="stem_pool_pad")(x)
    return keras.layers.MaxPooling2D(
        3, strides=2, dtype=layers.dtype, name="stem_pool"
    )(x)


def _bottleneck(
    x, layers, inner_width, out_width, stride, dilation, groups, se_ratio, prefix
):
    shortcut = x
    if stride != 1 or x.shape[-1] != out_width:
        shortcut = layers.conv(
            x, out_width, 1, f"{prefix}_shortcut_conv", strides=stride
        )
        shortcut = layers.bn(shortcut, f"{prefix}_shortcut_bn")
    y = layers.conv_bn_relu(x, inner_width, 1, f"{prefix}_1")
    y = layers.conv_bn_relu(
        y,
        inner_width,
        3,
        f"{prefix}_2",
        strides=stride,
        dilation=dilation,
        groups=groups,
    )
    y = layers.conv(y, out_width, 1, f"{prefix}_3_conv")
    y = layers.bn(y, f"{prefix}_3_bn")
    if se_ratio is not None:
        y = _squeeze_excitation(y, layers, se_ratio, f"{prefix}_se")
    y = keras.layers.Add(dtype=layers.dtype, name=f"{prefix}_add")([shortcut, y])
    return layers.relu(y, f"{prefix}_out")


def _squeeze_excitation(x, layers, ratio, prefix):
    channels = x.shape[-1]
    s = keras.layers.GlobalAveragePooling2D(
        keepdims=True, dtype=layers.dtype, name=f"{prefix}_pool"
    )(x)
    s = keras.layers.Conv2D(
        max(1, channels // ratio),
        1,
        activation="relu",
        dtype=layers.dtype,
        name=f"{prefix}_reduce",
    )(s)
    s = keras.layers.Conv2D(
        channels, 1, activation="sigmoid", dtype=layers.dtype, name=f"{prefix}_expand"
    )(s)
    return keras.layers.Multiply(dtype=layers.dtype, name=f"{prefix}_scale")([x, s])


def _inner_widths(widths, cardinality, group_width):
    if group_width is None:
        inner = list(widths)
    else:
        group_width = _positive_int(group_width, "group_width")
        inner = []
        for w in widths:
            channels = cardinality * group_width * w
            if channels % widths[0]:
                raise ValueError(
                    f"cardinality · group_width · widths[i] / widths[0] must be an "
                    f"integer, got {cardinality}·{group_width}·{w}/{widths[0]}"
                )
            inner.append(channels // widths[0])
    for w in inner:
        if w % cardinality:
            raise ValueError(
                f"cardinality {cardinality} must divide the 3×3 conv width of "
                f"every stage, got widths {inner}"
            )
    return inner


def _positive_int(value, what):
    try:
        number = operator.index(value)
    except TypeError:
        number = None
    if isinstance(value, bool) or number is None or number < 1:
        raise ValueError(f"{what} must be a positive integer, got {value!r}")
    return number


def _positive_ints(values, what):
    try:
        values = tuple(values)
    except TypeError:
        raise ValueError(f"{what} must be a sequence of ints, got {values!r}") from None
    return tuple(_positive_int(v, f"every entry of {what}") for v in values)
