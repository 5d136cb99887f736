"""ExFuse semantic supervision (SS): classification pretraining of an encoder
with an auxiliary classifier on every stage, and the fine-tuning features
taken from those classifiers' second convolutions."""

import numbers

import keras

from kseg.layers.exfuse import SemanticSupervisionHead

_HEAD_PREFIX = "ss_"


def build_semantic_supervision_pretrainer(
    backbone,
    num_classes,
    aux_weights=(1.0, 1.0, 1.0, 1.0),
    head_filters=None,
    name=None,
):
    """Attaches semantic supervision heads to every stage of an encoder.

    ExFuse (Zhang et al. ECCV 2018, Sec. 3.1, Fig. 2–3): while the encoder is
    pretrained for classification, a `SemanticSupervisionHead` (two 3×3
    conv–BN–ReLU, global average pooling, dense classifier) sits on the tail
    of each stage, and the loss is `main + Σ wᵢ·auxᵢ`. The main classifier
    is global average pooling of the last stage followed by a dense layer.
    The paper gives no values for the `wᵢ`; all are 1 by default.

    Example:
    >>> backbone = build_resnet((1, 1, 1, 1), (8, 16, 32, 64))
    >>> model, loss_weights = build_semantic_supervision_pretrainer(backbone, 10)
    >>> loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    >>> model.compile(
    ...     optimizer="sgd",
    ...     loss={output: loss for output in loss_weights},
    ...     loss_weights=loss_weights,
    ... )

    Args:
        backbone: functional `keras.Model` whose output is a dict of stage
            features ordered from low to high level, e.g. `build_resnet(...)`.
        num_classes: int. Classification classes (1000 for ImageNet).
        aux_weights: sequence of floats ≥ 0, one per backbone output: the
            weights `wᵢ` of the auxiliary losses. Defaults to `(1, 1, 1, 1)`.
        head_filters: int or `None`. Channels of the heads' convolutions;
            `None` keeps each stage's channel count. Defaults to `None`.
        name: str or `None`. Model name; `None` gives
            `"<backbone name>_ss_pretrainer"`. Defaults to `None`.

    Returns:
        `(model, loss_weights)`: a functional `keras.Model` whose output is
        the dict of logits `{"main": ..., "ss_<stage>": ...}` (each
        `(N, num_classes)`), and the dict of loss weights for `compile`
        (`1.0` for `"main"`, `wᵢ` for `"ss_<stage>"`).
    """
    stages = _stage_names(backbone)
    if (
        isinstance(num_classes, bool)
        or not isinstance(num_classes, numbers.Integral)
        or num_classes < 1
    ):
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    aux_weights = tuple(aux_weights)
    if len(aux_weights) != len(stages):
        raise ValueError(
            f"aux_weights needs one weight per backbone stage {stages}, "
            f"got {len(aux_weights)}: {aux_weights}"
        )
    for weight in aux_weights:
        if not isinstance(weight, numbers.Real) or weight < 0:
            raise ValueError(f"aux_weights must be numbers ≥ 0, got {aux_weights}")

    inputs = keras.Input(shape=backbone.inputs[0].shape[1:], name="image")
    features = backbone(inputs)
    pooled = keras.layers.GlobalAveragePooling2D(name="main_pool")(features[stages[-1]])
    outputs = {"main": keras.layers.Dense(num_classes, name="main_classifier")(pooled)}
    for stage in stages:
        head = SemanticSupervisionHead(
            num_classes, filters=head_filters, name=_HEAD_PREFIX + stage
        )
        outputs[_HEAD_PREFIX + stage], _ = head(features[stage])
    model = keras.Model(inputs, outputs, name=name or f"{backbone.name}_ss_pretrainer")
    loss_weights = {"main": 1.0}
    for stage, weight in zip(stages, aux_weights, strict=True):
        loss_weights[_HEAD_PREFIX + stage] = float(weight)
    return model, loss_weights


def semantic_supervision_features(pretrainer, name=None):
    """The fine-tuning encoder of a semantic supervision pretrainer.

    ExFuse (Sec. 3.1, Table 3 #2): after pretraining, the classifiers are
    dropped and each stage's feature is taken from its head's *second
    convolution* instead of the stage tail (+1.5 mIoU over the baseline,
    against +1.1 with the stage tails). The returned model shares its
    weights with `pretrainer` (backbone and the heads' two conv–BN–ReLU
    units; no classifier).

    Example:
    >>> model, _ = build_semantic_supervision_pretrainer(backbone, 10)
    >>> encoder = semantic_supervision_features(model)
    >>> sorted(encoder.output)
    ['res2', 'res3', 'res4', 'res5']

    Args:
        pretrainer: model from `build_semantic_supervision_pretrainer` (or
            its `.keras` reload).
        name: str or `None`. Model name; `None` gives
            `"<backbone name>_ss_features"`. Defaults to `None`.

    Returns:
        A functional `keras.Model` mapping images to the dict of the
        backbone's stage keys, each the second conv–BN–ReLU output of that
        stage's head, `(N, H_i, W_i, filters_i)`.
    """
    backbones = [layer for layer in pretrainer.layers if isinstance(layer, keras.Model)]
    heads = {
        layer.name[len(_HEAD_PREFIX) :]: layer
        for layer in pretrainer.layers
        if isinstance(layer, SemanticSupervisionHead)
    }
    if len(backbones) != 1 or not heads:
        raise ValueError(
            "pretrainer must be a model from build_semantic_supervision_pretrainer "
            f"(one nested backbone and SemanticSupervisionHead layers), got "
            f"{len(backbones)} nested models and {len(heads)} heads in "
            f"{pretrainer.name!r}"
        )
    backbone = backbones[0]
    stages = _stage_names(backbone)
    if set(heads) != set(stages):
        raise ValueError(
            f"pretrainer heads {sorted(heads)} do not match the backbone stages "
            f"{stages}"
        )

    inputs = keras.Input(shape=backbone.inputs[0].shape[1:], name="image")
    features = backbone(inputs)
    outputs = {}
    for stage in stages:
        head = heads[stage]
        # A nested Sequential keeps the heads' equally named "conv1"/"conv2"
        # apart and leaves their classifiers out of the encoder.
        convs = keras.Sequential([head.conv1, head.conv2], name=f"{head.name}_convs")
        outputs[stage] = convs(features[stage])
    return keras.Model(inputs, outputs, name=name or f"{backbone.name}_ss_features")


def _stage_names(backbone):
    output = backbone.output if isinstance(backbone, keras.Model) else None
    if not isinstance(output, dict) or not output:
        raise ValueError(
            "backbone must be a functional keras.Model whose output is a dict of "
            f"stage features like build_resnet's, got {type(backbone).__name__} "
            f"with output {type(output).__name__}"
        )
    return tuple(output)
