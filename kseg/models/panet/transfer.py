"""Fine-tuning PANet from earlier weights: loading by layer name (another
class count, the baseline's weights into PANet) and freezing.

`load_weights_by_name` copies every weight whose name and shape match from
a source model (a converted torchvision model, any earlier kseg run) and
says which weights it loaded, which it skipped (the class-specific layers
when the class counts differ) and which it left fresh (layers the source
lacks). PANet initialised from the Mask R-CNN baseline: backbone, FPN, RPN
and heads loaded, the adaptive feature pooling's per-level copies of the
box head's fc1 and the mask head's conv1 taken from the baseline's single
layer, the bottom-up path and the fully-connected fusion fresh.

`set_trainable` freezes for fine-tuning: torchvision's
`trainable_backbone_layers` (0..5, the last stages of stem, res2..res5) or
matterport's `"heads"` (backbone frozen) and `"all"`; the backbone's batch
norm stays frozen (torchvision's `FrozenBatchNorm2d`).
"""

import re
from dataclasses import dataclass, field
from pathlib import Path

import keras

from kseg.models.panet.panet import weights_by_name

# A PANet level copy and the baseline layer it starts from.
_LEVEL_COPIES = (
    (re.compile(r"^(.*/box_head)/adaptive_pooling/level_\d+/(\w+)$"), r"\1/fc1/\2"),
    (re.compile(r"^(.*/mask_head/conv1)/level_\d+/(\w+)$"), r"\1/\2"),
)
# Backbone stages from the top, as torchvision counts trainable layers.
BACKBONE_STAGES = ("res5", "res4", "res3", "res2", "stem")
TRAINABLE_MODES = ("all", "heads")


@dataclass
class TransferReport:
    """What `load_weights_by_name` did: weight names `loaded`, `skipped`
    (`{name: reason}`: another shape, e.g. the class-specific layers) and
    `fresh` (the source has no such weight)."""

    loaded: list = field(default_factory=list)
    skipped: dict = field(default_factory=dict)
    fresh: list = field(default_factory=list)

    def summary(self):
        lines = [f"loaded {len(self.loaded)} weights"]
        for name, reason in self.skipped.items():
            lines.append(f"skipped {name}: {reason}")
        if self.fresh:
            lines.append(f"left {len(self.fresh)} fresh: {', '.join(self.fresh)}")
        return "\n".join(lines)


def load_weights_by_name(model, source):
    """Copies `source`'s weights into `model` by name (`weights_by_name`).

    Args:
        model: the `PANet` to initialise.
        source: a `PANet` (for example `kseg.models.from_torchvision(...)`
            or `kseg.models.load_model(run / "model.keras")`), or a path:
            a `.keras` file of one (an earlier kseg run, a `kseg convert`
            output) or torchvision's Mask R-CNN state dict (`.pth`, `.npz`,
            `.safetensors`; converted at `model`'s image size).

    Returns:
        A `TransferReport`.
    """
    if isinstance(source, (str, Path)):
        source = _load_source(Path(source), model)
    target = weights_by_name(model)
    available = weights_by_name(source)
    report = TransferReport()
    for name, variable in target.items():
        origin = name if name in available else _level_origin(name, available)
        if origin is None:
            report.fresh.append(name)
            continue
        value = available[origin]
        if tuple(value.shape) != tuple(variable.shape):
            report.skipped[name] = (
                f"shape {tuple(variable.shape)}, the source's {origin} has "
                f"{tuple(value.shape)}"
            )
            continue
        variable.assign(keras.ops.convert_to_numpy(value))
        report.loaded.append(name if origin == name else f"{name} (from {origin})")
    return report


def _load_source(path, model):
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file to initialise the model from")
    if path.suffix == ".keras":
        from kseg.models.saving import load_model

        source = load_model(path)
    else:
        from kseg.models.torchvision_weights import SUFFIXES, from_torchvision

        if path.suffix.lower() not in SUFFIXES:
            raise ValueError(
                f"{path}: initialise from a .keras model or torchvision's state "
                f"dict ({', '.join(SUFFIXES)}), not {path.suffix!r}"
            )
        source = from_torchvision(path, image_size=model.image_size)
    if not hasattr(source, "roi_heads"):
        raise ValueError(f"{path}: not a PANet model ({type(source).__name__})")
    return source


def _level_origin(name, available):
    for pattern, replacement in _LEVEL_COPIES:
        if pattern.match(name):
            origin = pattern.sub(replacement, name)
            if origin in available:
                return origin
    return None


def set_trainable(model, layers="all", freeze_batch_norm=True):
    """Freezes a `PANet` for fine-tuning.

    Args:
        model: the `PANet`.
        layers: `"all"` (everything trains), `"heads"` (matterport: the
            backbone frozen, FPN, RPN and heads train) or an int 0..5
            (torchvision's `trainable_backbone_layers`: that many backbone
            stages from the top, res5, res4, res3, res2, stem, train).
        freeze_batch_norm: bool. Keep the backbone's batch normalization
            frozen (statistics and affine; torchvision's frozen batch norm).
            Defaults to `True`.

    Returns:
        The backbone stages left trainable, top first.
    """
    if layers == "heads":
        count = 0
    elif layers == "all":
        count = len(BACKBONE_STAGES)
    elif isinstance(layers, int) and not isinstance(layers, bool):
        if not 0 <= layers <= len(BACKBONE_STAGES):
            raise ValueError(
                f"trainable backbone layers must be in 0..{len(BACKBONE_STAGES)}, "
                f"got {layers}"
            )
        count = layers
    else:
        raise ValueError(
            f"layers must be one of {TRAINABLE_MODES} or an int 0..5, got {layers!r}"
        )
    trainable = BACKBONE_STAGES[:count]
    for layer in model.backbone.layers:
        stage = layer.name.split("_", 1)[0]
        train = stage in trainable
        if freeze_batch_norm and isinstance(layer, keras.layers.BatchNormalization):
            train = False
        layer.trainable = train
    for stage in (model.fpn, model.bottom_up, model.rpn, model.roi_heads):
        stage.trainable = True
    return trainable
