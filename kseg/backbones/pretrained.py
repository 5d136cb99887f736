"""ImageNet-pretrained encoders from `keras.applications`, with kseg's
feature-dict interface."""

import keras

from kseg.backbones.resnet import OUTPUT_STRIDES, STAGE_NAMES

_APPLICATIONS = {
    50: (keras.applications.ResNet50, (3, 4, 6, 3)),
    101: (keras.applications.ResNet101, (3, 4, 23, 3)),
    152: (keras.applications.ResNet152, (3, 8, 36, 3)),
}

# Stages of keras.applications' ResNet ("conv2".."conv5") whose stride is
# traded for dilation at each output stride.
_DILATED_STAGES = {32: {}, 16: {"conv5": 2}, 8: {"conv4": 2, "conv5": 4}}


def pretrained_feature_layers(depth):
    """Names of the `keras.applications` ResNet layers that end res2..res5.

    Args:
        depth: int. 50, 101 or 152.

    Returns:
        dict like `{"res2": "conv2_block3_out", ..., "res5": "conv5_block3_out"}`.
    """
    _check_depth(depth)
    block_counts = _APPLICATIONS[depth][1]
    return {
        stage: f"conv{i + 2}_block{count}_out"
        for i, (stage, count) in enumerate(zip(STAGE_NAMES, block_counts, strict=True))
    }


def build_pretrained_resnet(
    depth=50,
    weights="imagenet",
    input_shape=(None, None, 3),
    output_stride=32,
    name=None,
):
    """Wraps a `keras.applications` ResNet as a kseg encoder.

    The papers start from ImageNet-pretrained ResNets (ExFuse's GCN baseline,
    PAN, SegModel); this adapter returns the Keras ones with the same output
    as `build_resnet`: the dict of stage-tail features `res2..res5` (strides
    4, 8, 16, 32 at output stride 32; 256, 512, 1024, 2048 channels).

    Output stride 16 or 8 is made by rebuilding the network with the strided
    1×1 convs of res5 (and res4) set to stride 1 and every 3×3 conv of those
    stages dilated by 2 (res5 at 16; res4 by 2 and res5 by 4 at 8), then
    copying all weights over: dilation changes no weight shape, so the
    pretrained weights stay valid.

    Differences from `build_resnet` come from `keras.applications`: the
    stride sits on the first 1×1 conv of a block (ResNet v1, not v1.5), the
    convs have biases, the stem is always the 7×7 conv, and inputs must be
    prepared with `keras.applications.resnet.preprocess_input` (BGR,
    ImageNet-mean subtracted, 0–255 scale).

    Example:
    >>> model = build_pretrained_resnet(50, weights=None, input_shape=(64, 64, 3))
    >>> tuple(model(np.zeros((1, 64, 64, 3)))["res5"].shape)
    (1, 2, 2, 2048)

    Args:
        depth: int. 50, 101 or 152. Defaults to `50`.
        weights: `"imagenet"` (downloaded once by Keras), `None` (random
            initialization) or the path of a `keras.applications` ResNet
            weights file. Defaults to `"imagenet"`.
        input_shape: 3 ints or `None`s. Image shape `(H, W, 3)`.
            Defaults to `(None, None, 3)`.
        output_stride: int. One of 8, 16, 32. Defaults to `32`.
        name: str or `None`. Model name; `None` gives `"pretrained_resnet<depth>"`.
            Defaults to `None`.

    Returns:
        A functional `keras.Model` mapping images to the dict `res2..res5`.
    """
    _check_depth(depth)
    if output_stride not in OUTPUT_STRIDES:
        raise ValueError(
            f"output_stride must be one of {OUTPUT_STRIDES}, got {output_stride!r}"
        )
    application = _APPLICATIONS[depth][0]
    base = application(include_top=False, weights=weights, input_shape=input_shape)
    if output_stride != 32:
        base = _dilate(base, _DILATED_STAGES[output_stride])
    outputs = {
        stage: base.get_layer(layer_name).output
        for stage, layer_name in pretrained_feature_layers(depth).items()
    }
    return keras.Model(base.input, outputs, name=name or f"pretrained_resnet{depth}")


def _dilate(base, dilations):
    def clone_layer(layer):
        config = layer.get_config()
        stage, _, rest = layer.name.partition("_")
        if stage in dilations and isinstance(layer, keras.layers.Conv2D):
            if rest in ("block1_0_conv", "block1_1_conv"):
                config["strides"] = (1, 1)
            elif rest.endswith("_2_conv"):
                rate = dilations[stage]
                config["dilation_rate"] = (rate, rate)
        return layer.__class__.from_config(config)

    dilated = keras.models.clone_model(base, clone_function=clone_layer)
    for layer in base.layers:
        if layer.weights:
            dilated.get_layer(layer.name).set_weights(layer.get_weights())
    return dilated


def _check_depth(depth):
    if depth not in _APPLICATIONS:
        raise ValueError(
            f"keras.applications has ResNet depths {tuple(_APPLICATIONS)}, "
            f"got depth={depth!r}"
        )
