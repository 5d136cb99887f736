"""Input normalization as the first layer of an encoder."""

import keras


def prepend_normalization(backbone, mean, std, name="input_normalization"):
    """The encoder `backbone` with per-channel normalization as its first layer.

    A `keras.layers.Normalization` computing `(x − mean) / std` goes between
    the image input and the encoder's first layer, *inside* the encoder: the
    result is a flat functional model with the backbone's name, input name
    and output dict, made of the backbone's own layer objects (weights are
    shared, not copied) plus the normalization. So it is still the encoder
    built by `kseg.backbones` wherever a model expects one as its
    `model.backbone`: layers are found by their names, a weights file saved
    from or for the bare encoder loads into it (the normalization has no
    weights), and `ExFuse.load_semantic_supervision_weights` copies a
    pretrained encoder into it. The normalization is part of the graph, so a
    saved model takes raw images (for kseg, RGB in 0–255, see
    `kseg.data.preprocess_images`).

    Example:
    >>> encoder = build_resnet((1, 1, 1, 1), (8, 16, 32, 64))
    >>> rgb = prepend_normalization(encoder, (123.675, 116.28, 103.53),
    ...                             (58.395, 57.12, 57.375))
    >>> rgb.name, rgb.layers[1].name, sorted(rgb.output)
    ('resnet', 'input_normalization', ['res2', 'res3', 'res4', 'res5'])

    Args:
        backbone: functional `keras.Model` with one image input
            `(batch, height, width, channels)`, e.g. `build_resnet(...)`.
        mean: sequence of floats, one per channel: subtracted.
        std: sequence of positive floats, one per channel: divided by.
        name: str. Name of the `Normalization` layer. Defaults to
            `"input_normalization"`.

    Returns:
        A functional `keras.Model` named like `backbone`, taking the same
        images and returning the same structure.
    """
    # Only a functional model (not a Sequential or subclassed one) has a
    # graph that can be re-run from a new input.
    if not isinstance(backbone, keras.Model) or not hasattr(
        backbone, "_run_through_graph"
    ):
        raise ValueError(
            f"backbone must be a functional keras.Model, got {type(backbone).__name__}"
        )
    if len(backbone.inputs) != 1:
        raise ValueError(
            f"backbone must take one image input, it takes {len(backbone.inputs)}"
        )
    image = backbone.inputs[0]
    channels = image.shape[-1]
    if len(image.shape) != 4 or channels is None:
        raise ValueError(
            "backbone's input must be (batch, height, width, channels) with known "
            f"channels, got {image.shape}"
        )
    mean = tuple(float(m) for m in mean)
    std = tuple(float(s) for s in std)
    if len(mean) != channels or len(std) != channels:
        raise ValueError(
            f"mean and std need one value per input channel ({channels}), got "
            f"{len(mean)} and {len(std)}"
        )
    if not all(s > 0 for s in std):
        raise ValueError(f"std must be positive, got {std}")

    inputs = keras.Input(batch_shape=image.shape, dtype=image.dtype, name=image.name)
    normalization = keras.layers.Normalization(
        mean=mean, variance=tuple(s * s for s in std), name=name
    )
    normalized = normalization(inputs)

    def call_function(layer, *args, **kwargs):
        # The layers that read the image read it normalized.
        args, kwargs = keras.tree.map_structure(
            lambda x: normalized if x is inputs else x, (args, kwargs)
        )
        return layer(*args, **kwargs)

    return keras.models.clone_model(
        backbone,
        input_tensors=inputs,
        clone_function=lambda layer: layer,
        call_function=call_function,
    )
