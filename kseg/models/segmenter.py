"""The base class every kseg segmentation model derives from."""

import keras
import numpy as np

from kseg.layers.common import ResizeLike, check_keyword_arguments

# Re-exported: the models and kseg.inference validate their options with it.
from kseg.layers.common import check_positive_int as check_positive_int
from kseg.tasks import INSTANCE, SEMANTIC

STAGE_NAMES = ("res2", "res3", "res4", "res5")
# The keyword arguments a functional `keras.Model` reads besides its inputs
# and outputs; it drops any other silently (Keras 3.15).
MODEL_KEYWORD_ARGUMENTS = frozenset(("name", "trainable"))


@keras.saving.register_keras_serializable(package="kseg")
class Segmenter(keras.Model):
    """A functional `keras.Model` with a backbone and a dict of named outputs.

    Subclasses build their graph in `__init__` (keras-hub pattern: `# ===
    Layers ===`, `# === Functional Model ===`, `# === Config ===`) and call
    `super().__init__(inputs=..., outputs=..., backbone=..., dtype=...,
    **kwargs)`. The config is the constructor arguments; the backbone is
    serialized with it, so a `.keras` file rebuilds the whole graph.

    `dtype` is the dtype policy of the layers a subclass adds on top of the
    backbone (resolve it with `Segmenter.resolve_dtype` before creating them).
    It is stored in the config, so a model built under `mixed_float16` loads
    back with a `mixed_float16` head whatever the global policy is then.

    Every model returns a dict whose `"logits"` entry is at the input
    resolution and float32 even under mixed precision; auxiliary outputs
    (named after the paper component that adds them) may be at lower
    resolution — the loss resizes logits to the label size.

    A keyword argument that is neither the subclass's own nor `name` or
    `trainable` raises `TypeError` naming it.

    `task` says what the model predicts: `"semantic"` (a class per pixel,
    `"logits"`) here, `"instance"` for `InstanceSegmenter`s. Training,
    evaluation, prediction and export dispatch on it.
    """

    task = SEMANTIC

    def __init__(self, inputs, outputs, backbone=None, dtype=None, **kwargs):
        check_keyword_arguments(type(self), kwargs, MODEL_KEYWORD_ARGUMENTS)
        super().__init__(inputs=inputs, outputs=outputs, **kwargs)
        self.backbone = backbone
        self.dtype_policy = self.resolve_dtype(dtype)

    @staticmethod
    def resolve_dtype(dtype):
        """The `DTypePolicy` for `dtype`; `None` means the global policy."""
        if dtype is None:
            return keras.config.dtype_policy()
        return keras.dtype_policies.get(dtype)

    @staticmethod
    def backbone_features(backbone, inputs):
        """Calls `backbone` on `inputs` and checks it returns the feature dict
        `{"res2", "res3", "res4", "res5"}` of 4D tensors with known channels."""
        features = backbone(inputs)
        if not isinstance(features, dict):
            raise ValueError(
                "A kseg backbone must return a dict of stage features "
                f"{{'res2': ..., 'res5': ...}}, got {type(features).__name__}"
            )
        missing = set(STAGE_NAMES) - set(features)
        if missing:
            raise ValueError(
                f"The backbone output is missing {sorted(missing)}; it returns "
                f"{sorted(features)}"
            )
        for stage in STAGE_NAMES:
            shape = features[stage].shape
            if len(shape) != 4 or shape[-1] is None:
                raise ValueError(
                    f"The backbone's {stage!r} feature must be 4D "
                    f"(batch, height, width, channels) with known channels, "
                    f"got shape {shape}"
                )
        return features

    @staticmethod
    def make_inputs(backbone):
        """A fresh `keras.Input` shaped like the backbone's image input."""
        if not isinstance(backbone, keras.Model):
            raise ValueError(
                "The backbone must be a functional keras.Model mapping images "
                f"to the dict of stage features, got {type(backbone).__name__}"
            )
        shape = backbone.input_shape
        if isinstance(shape, list):
            raise ValueError("A kseg backbone must take a single image input")
        if len(shape) != 4 or shape[-1] is None:
            raise ValueError(
                "The backbone's input must be (batch, height, width, channels) "
                f"with known channels, got {shape}"
            )
        return keras.Input(shape=shape[1:], name="images")

    @staticmethod
    def full_resolution_logits(logits, images, name="logits", dtype=None):
        """Upsamples `logits` to the image size and casts them to float32.

        `dtype` is the policy of the resize (the head's policy); the result
        is float32 regardless.
        """
        resized = ResizeLike(name=f"{name}_resize", dtype=dtype)([logits, images])
        return float32_output(resized, name)

    def get_config(self):
        return {
            "name": self.name,
            "trainable": self.trainable,
            "backbone": keras.layers.serialize(self.backbone),
            "dtype": keras.dtype_policies.serialize(self.dtype_policy),
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        if isinstance(config.get("backbone"), dict):
            config["backbone"] = keras.layers.deserialize(config["backbone"])
        return cls(**config)


@keras.saving.register_keras_serializable(package="kseg")
class InstanceSegmenter(Segmenter):
    """A `Segmenter` that detects instances: its outputs are `boxes`
    `(batch, D, 4)` `[y1, x1, y2, x2]` in input pixels, `scores`, `classes`
    (int32, `1..C`, 0 for padding rows), `masks` `(batch, D, s, s)`
    probabilities of the detected class inside its box, `num_detections`.
    Every model of this class takes a fixed input size (`image_size`) and
    has `num_classes` and `mask_size` attributes."""

    task = INSTANCE


def float32_output(x, name):
    """Returns `x` as a float32 named model output (identity otherwise)."""
    return keras.layers.Activation("linear", dtype="float32", name=name)(x)


def check_rate(value, what):
    """Returns `value` as a float in [0, 1), or raises `ValueError`."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.number)):
        raise ValueError(f"{what} must be a float in [0, 1), got {value!r}")
    if not 0.0 <= float(value) < 1.0:
        raise ValueError(f"{what} must be a float in [0, 1), got {value!r}")
    return float(value)
