"""Training recipes: typed dataclasses, read from and written to YAML.

A recipe holds every hyperparameter of one training run in one place, with
the papers' values (TF Model Garden's `seg_deeplabv3_pascal` pattern). Files
live in the repository's `recipes/` folder (installed with kseg as the
package `kseg.recipes`, see `recipe_dirs`) and are named like mmsegmentation's
configs,
`<model>_<backbone>_<devices>xb<batch per device>-<dataset>-<crop>.yaml`, e.g.
`pan_r101-os16_4xb4-voc-512.yaml`; a recipe's name is its file stem.

Loading is strict: an unknown key is an error that names it and suggests the
closest valid key, and every value is checked against its field's type, so a
typo never silently falls back to a default. `apply_overrides` applies
command-line `key.path=value` settings with the same checks.

Example:
>>> recipe = load_recipe("quickstart")
>>> recipe = apply_overrides(recipe, ["train.epochs=1", "model.kwargs.filters=16"])
>>> recipe.train.epochs
1
"""

import dataclasses
import difflib
import inspect
import math
import re
import types
import typing
from typing import Any

import yaml

from kseg.backbones import BACKBONES, build_resnet
from kseg.models import FCN, GCN, PAN, ExFuse, PANet, SegModel
from kseg.models.panet import LOSS_NAMES
from kseg.training.recipe_files import (  # noqa: F401 (re-exported)
    CHECKOUT_RECIPES,
    RECIPE_SUFFIX,
    RECIPES_ENV,
    RECIPES_PACKAGE,
    RecipeError,
    find_recipe,
    list_recipes,
    recipe_dirs,
)

# The one model registry: recipe `model.name` → constructor
# `(backbone, num_classes, **kwargs)`. A plain dict, filled here and nowhere
# else, so a name resolves without any import side effect.
MODELS = {
    "exfuse": ExFuse,
    "fcn": FCN,
    "gcn": GCN,
    "pan": PAN,
    "panet": PANet,
    "segmodel": SegModel,
}

# Backbone names a recipe may use: the named encoders of `kseg.backbones`, and
# "resnet" for `build_resnet` with the recipe's keyword arguments only.
BACKBONE_BUILDERS = {"resnet": build_resnet, **BACKBONES}

TASKS = ("semantic", "instance")
# The task of each model that is not semantic.
MODEL_TASKS = {"panet": "instance"}
_RECIPE_NAME = re.compile(r"[A-Za-z0-9._-]+")

DATASETS = ("synthetic", "voc", "voc_aug", "cityscapes", "ade20k", "folder", "coco")
# The datasets of each task (synthetic: shapes, or shape instances).
TASK_DATASETS = {
    "semantic": ("synthetic", "voc", "voc_aug", "cityscapes", "ade20k", "folder"),
    "instance": ("synthetic", "coco", "cityscapes"),
}
DATA_FORMATS = ("files", "tfrecord")
STRATEGIES = ("one_device", "mirrored", "multi_worker")
DTYPE_POLICIES = ("float32", "mixed_float16", "mixed_bfloat16")
OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("poly", "step")


@dataclasses.dataclass
class ModelConfig:
    """Which model to build.

    Attributes:
        name: key of `MODELS` (`"pan"`, `"fcn"`, ...).
        kwargs: keyword arguments of the model constructor beyond the backbone
            and `num_classes` (which comes from the dataset).
    """

    name: str = "pan"
    kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class BackboneConfig:
    """Which encoder to build.

    Attributes:
        name: key of `BACKBONE_BUILDERS`: a named encoder of `kseg.backbones`
            (`"pan_resnet101"`, ...) or `"resnet"` (`build_resnet` from
            `kwargs` alone).
        kwargs: `build_resnet` keyword arguments, overriding the named
            encoder's (`block_counts`, `widths`, `output_stride`, ...).
        weights: path of a `.weights.h5` file loaded into the encoder before
            training (e.g. ImageNet or semantic-supervision pretraining), or
            `None` for random initialization.
    """

    name: str = "pan_resnet101"
    kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    weights: str | None = None


@dataclasses.dataclass
class DataConfig:
    """The dataset and the training augmentation.

    Attributes:
        dataset: one of `DATASETS`. `"synthetic"` draws `kseg.data`'s shapes
            dataset in memory; the others read a dataset from `root`.
        format: `"files"` (the dataset's own layout) or `"tfrecord"` (shards
            written by `kseg data convert`, read from `root/<split>`).
        root: dataset directory; `kseg train --data DIR` sets it.
        train_split: split trained on.
        val_split: split validated and evaluated on.
        num_classes: number of classes of a `"folder"` dataset (the others
            know theirs); `None` otherwise.
        image_size: side of the synthetic images.
        num_train_images: synthetic training images.
        num_val_images: synthetic validation images.
        crop_size: `(height, width)` of the training crops.
        scale_range: random rescaling range before the crop.
        aspect_range: random aspect-ratio range before the crop.
        flip: random horizontal flips.
        color_jitter: `(brightness, contrast, saturation)` strengths, or
            `None` for none.
        shuffle_buffer: training shuffle buffer, in images.
        cache: keep the decoded training images in memory after the first
            epoch.
        short_edge_range: instance task: the shorter image edge is drawn
            from this range for each training image (multi-scale training,
            MST), or `None` to fit the image into `crop_size`.
        max_size: instance task: cap of the longer edge after resizing, or
            `None` for `crop_size`.
        max_instances: instance task: ground-truth instances kept per image
            (more are dropped with a warning).
        mask_size: instance task: side of the box-relative mask crops the
            mask targets are taken from.
        skip_corrupt: leave out samples whose image does not decode or whose
            label does not fit (size, values), with a warning naming each,
            instead of stopping with an error naming the first.
    """

    dataset: str = "synthetic"
    format: str = "files"
    root: str | None = None
    train_split: str = "train"
    val_split: str = "val"
    num_classes: int | None = None
    image_size: int = 64
    num_train_images: int = 1000
    num_val_images: int = 200
    crop_size: tuple[int, int] = (512, 512)
    scale_range: tuple[float, float] = (0.5, 2.0)
    aspect_range: tuple[float, float] = (1.0, 1.0)
    flip: bool = True
    color_jitter: tuple[float, float, float] | None = None
    shuffle_buffer: int = 1000
    cache: bool = False
    short_edge_range: tuple[int, int] | None = None
    max_size: int | None = None
    max_instances: int = 100
    mask_size: int = 112
    skip_corrupt: bool = False


@dataclasses.dataclass
class LossConfig:
    """Pixel-wise cross-entropy settings (`SegmentationCrossEntropy`).

    The ignore label is `kseg.data.IGNORE_LABEL` (255), the same for the data
    pipeline, the loss and the metric.

    Attributes:
        aux_weights: semantic task: loss weight of each auxiliary model
            output, by output name (the main `"logits"` output has weight 1).
        class_weights: semantic task: one weight per class, or `None` for
            equal weights.
        top_k_percent_pixels: semantic task: fraction of the hardest pixels
            kept (OHEM); `1.0` keeps all.
        weights: instance task: weight of each of the model's losses by name
            (`rpn_objectness`, `rpn_box`, `box_class`, `box_regression`,
            `mask`); missing ones weigh 1 (SPEC: equal weights).
    """

    aux_weights: dict[str, float] = dataclasses.field(default_factory=dict)
    class_weights: list[float] | None = None
    top_k_percent_pixels: float = 1.0
    weights: dict[str, float] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class OptimizerConfig:
    """The optimizer.

    Attributes:
        name: `"sgd"` (momentum SGD whose weight decay is an L2 term added to
            the gradient, as in Caffe and PyTorch — the papers' setting) or
            `"adamw"` (Adam with decoupled weight decay).
        learning_rate: base learning rate, before the schedule.
        momentum: SGD momentum.
        nesterov: Nesterov momentum for SGD.
        weight_decay: weight decay coefficient.
        global_clipnorm: clip the global gradient norm, or `None`.
    """

    name: str = "sgd"
    learning_rate: float = 0.01
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 1e-4
    global_clipnorm: float | None = None


@dataclasses.dataclass
class ScheduleConfig:
    """The learning-rate schedule, with linear warm-up.

    Attributes:
        name: `"poly"` (`PolyWarmup`: DeepLab, PAN, SegModel) or `"step"`
            (`StepWarmup`: ×`gamma` at `step_fractions` of the training,
            Detectron / Mask R-CNN / PANet).
        power: poly exponent.
        end_learning_rate: learning rate at the last step.
        warmup_steps: steps of linear warm-up (capped at the total number of
            steps minus one).
        warmup_start_factor: learning rate at step 0, as a fraction of the
            schedule's value at the end of the warm-up.
        step_fractions: `"step"`: the fractions of the total steps at which
            the rate drops (Detectron's 1x schedule: 60k and 80k of 90k).
        gamma: `"step"`: the factor of each drop.
    """

    name: str = "poly"
    power: float = 0.9
    end_learning_rate: float = 0.0
    warmup_steps: int = 0
    warmup_start_factor: float = 0.1
    step_fractions: tuple[float, ...] = (2 / 3, 8 / 9)
    gamma: float = 0.1


@dataclasses.dataclass
class TrainConfig:
    """How training runs.

    Attributes:
        batch_size: global batch size (all replicas together); each replica
            takes `batch_size / replicas`.
        epochs: training epochs.
        steps_per_epoch: steps per epoch, or `None` for one pass over the
            training set (`len(train) // batch_size`).
        steps_per_execution: training steps run per call into the compiled
            function.
        strategy: `"one_device"`, `"mirrored"` (all local GPUs, or all logical
            CPUs when there is no GPU) or `"multi_worker"` (cluster from
            `TF_CONFIG`).
        synchronized_bn: batch-norm statistics over all replicas.
        dtype_policy: `"float32"`, `"mixed_float16"` (Keras adds the loss
            scale optimizer) or `"mixed_bfloat16"`.
        jit_compile: XLA-compile the train step.
        seed: seed of weights, shuffling and augmentation.
        validation_freq: validate every this many epochs.
        log_images: validation images whose predicted masks go to
            TensorBoard each epoch (0 for none).
    """

    batch_size: int = 16
    epochs: int = 50
    steps_per_epoch: int | None = None
    steps_per_execution: int = 1
    strategy: str = "one_device"
    synchronized_bn: bool = False
    dtype_policy: str = "float32"
    jit_compile: bool = False
    seed: int = 0
    validation_freq: int = 1
    log_images: int = 4


@dataclasses.dataclass
class EvalConfig:
    """Evaluation (validation during training, and the final evaluation).

    Attributes:
        batch_size: evaluation batch size.
        size: `(height, width)` the images are padded to (bottom/right, label
            255) so they batch, or `None` to keep their size (then they must
            all have one size, or `batch_size` must be 1).
        scales: image scales whose softmax outputs are averaged in the final
            evaluation; `[1.0]` is single scale.
        flip: also average the horizontally flipped predictions in the final
            evaluation.
        window: `(height, width)` of sliding-window inference in the final
            evaluation (usually the training crop), or `None` for whole
            images.
        short_edge: instance task: the shorter edge of evaluated images
            (capped by `data.max_size` and the model's input size), or
            `None` to fit each image into the model's input.

    With several scales, a flip or a window the final evaluation runs image by
    image through `kseg.inference.predict`; validation during training is
    always single scale.
    """

    batch_size: int = 1
    size: tuple[int, int] | None = None
    scales: tuple[float, ...] = (1.0,)
    flip: bool = False
    window: tuple[int, int] | None = None
    short_edge: int | None = None


@dataclasses.dataclass
class Recipe:
    """One training run: model, backbone, data, loss, optimizer, schedule,
    training and evaluation settings.

    Attributes:
        name: the recipe name (its file stem; names the run directory): one
            folder name of letters, digits, `.`, `_` and `-`.
        description: what the recipe reproduces and the paper's figure.
        task: `"semantic"` (a class per pixel) or `"instance"` (boxes, classes
            and masks of objects); the trainer, `kseg evaluate`, `predict`
            and `export` dispatch on it.
    """

    name: str = "recipe"
    description: str = ""
    task: str = "semantic"
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    backbone: BackboneConfig = dataclasses.field(default_factory=BackboneConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    loss: LossConfig = dataclasses.field(default_factory=LossConfig)
    optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = dataclasses.field(default_factory=ScheduleConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)


# === Typed conversion ===


def _join(path, key):
    return f"{path}.{key}" if path else str(key)


def _type_name(type_):
    if isinstance(type_, type) and not typing.get_args(type_):
        return type_.__name__
    return str(type_).replace("typing.", "")


def _suggest(key, valid, path=""):
    match = difflib.get_close_matches(str(key), list(valid), n=1, cutoff=0.6)
    return f"; did you mean {_join(path, match[0])!r}?" if match else ""


def _convert(value, type_, path):
    """Checks `value` against `type_` and returns it in that type's form.

    Lists become tuples for tuple fields; ints are accepted as floats; nothing
    else is coerced (a string is never read as a number).
    """
    origin, args = typing.get_origin(type_), typing.get_args(type_)
    if type_ is Any:
        return value
    if origin in (types.UnionType, typing.Union):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _convert(value, inner, path)
    if dataclasses.is_dataclass(type_):
        if not isinstance(value, dict):
            raise RecipeError(
                f"{path}: expected a mapping of {type_.__name__} fields, got "
                f"{type(value).__name__} {value!r}"
            )
        return _from_dict(type_, value, path)
    if type_ is bool:
        if not isinstance(value, bool):
            raise RecipeError(f"{path}: expected true or false, got {value!r}")
        return value
    if type_ is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise RecipeError(f"{path}: expected an int, got {value!r}")
        return value
    if type_ is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RecipeError(f"{path}: expected a number, got {value!r}")
        return float(value)
    if type_ is str:
        if not isinstance(value, str):
            raise RecipeError(f"{path}: expected a string, got {value!r}")
        return value
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise RecipeError(
                f"{path}: expected a list ({_type_name(type_)}), got {value!r}"
            )
        if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
            if len(value) != len(args):
                raise RecipeError(
                    f"{path}: expected {len(args)} values, got {len(value)}: "
                    f"{list(value)!r}"
                )
            item_types = args
        else:
            item_types = [args[0]] * len(value)
        items = [
            _convert(v, t, f"{path}[{i}]")
            for i, (v, t) in enumerate(zip(value, item_types, strict=True))
        ]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise RecipeError(f"{path}: expected a mapping, got {value!r}")
        key_type, value_type = args
        return {
            _convert(k, key_type, f"{path} key"): _convert(
                v, value_type, _join(path, k)
            )
            for k, v in value.items()
        }
    raise TypeError(f"{path}: unsupported recipe field type {type_!r}")


def _from_dict(cls, values, path=""):
    hints = typing.get_type_hints(cls)
    fields = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        if key not in hints:
            where = f"{path}.{key}" if path else str(key)
            section = f" in {path!r}" if path else ""
            raise RecipeError(
                f"unknown recipe key {where!r}{section} (valid keys: "
                f"{', '.join(fields)}){_suggest(key, fields, path)}"
            )
        kwargs[key] = _convert(value, hints[key], _join(path, key))
    return cls(**kwargs)


def _to_plain(value):
    if dataclasses.is_dataclass(value):
        return {
            f.name: _to_plain(getattr(value, f.name)) for f in dataclasses.fields(value)
        }
    if isinstance(value, (list, tuple)):
        return [_to_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _to_plain(v) for k, v in value.items()}
    return value


def recipe_to_dict(recipe):
    """The recipe as plain YAML-ready data (dicts, lists, scalars)."""
    return _to_plain(recipe)


def recipe_from_dict(values, name=None):
    """Builds and validates a `Recipe` from plain data.

    Args:
        values: dict of recipe sections, as read from YAML.
        name: recipe name used when `values` has no `name`.

    Raises:
        RecipeError: naming the first unknown key or badly typed value.
    """
    if not isinstance(values, dict):
        raise RecipeError(
            f"a recipe must be a mapping of sections, got {type(values).__name__}"
        )
    if name is not None and "name" not in values:
        values = {"name": name, **values}
    recipe = _from_dict(Recipe, values)
    validate_recipe(recipe)
    return recipe


# === Validation beyond types ===


def _check_choice(value, choices, path):
    if value not in choices:
        raise RecipeError(
            f"{path}: {value!r} is not one of {', '.join(map(str, choices))}"
            f"{_suggest(value, choices)}"
        )


def _check_positive(value, path, allow_zero=False):
    if not math.isfinite(value):
        raise RecipeError(f"{path}: must be a finite number, got {value!r}")
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise RecipeError(f"{path}: must be {bound}, got {value!r}")


def _check_kwargs(kwargs, function, path, reserved=()):
    """Every key of `kwargs` must be a keyword argument of `function`."""
    parameters = inspect.signature(function).parameters
    valid = [
        name
        for name, p in parameters.items()
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and name not in reserved
    ]
    for key in kwargs:
        if key not in valid:
            raise RecipeError(
                f"unknown recipe key {_join(path, key)!r}: not an argument of "
                f"{function.__qualname__} (valid: {', '.join(valid)})"
                f"{_suggest(key, valid, path)}"
            )


def _check_range(pair, path, low_bound):
    if not low_bound < pair[0] <= pair[1]:
        raise RecipeError(
            f"{path}: expected [low, high] with {low_bound} < low <= high, got "
            f"{list(pair)}"
        )


def _check_loss_task(loss, task):
    """The `loss:` keys of the other task are refused, never ignored."""
    default = LossConfig()
    if task == "instance":
        for key in ("aux_weights", "class_weights", "top_k_percent_pixels"):
            if getattr(loss, key) != getattr(default, key):
                raise RecipeError(
                    f"loss.{key}: a semantic segmentation setting; an instance "
                    "recipe weighs its losses with loss.weights "
                    f"({', '.join(LOSS_NAMES)})"
                )
        for name, weight in loss.weights.items():
            if name not in LOSS_NAMES:
                raise RecipeError(
                    f"loss.weights.{name}: not a loss of the instance model "
                    f"(valid: {', '.join(LOSS_NAMES)})"
                    f"{_suggest(name, LOSS_NAMES, 'loss.weights')}"
                )
            _check_positive(weight, f"loss.weights.{name}", allow_zero=True)
    elif loss.weights:
        raise RecipeError(
            "loss.weights: an instance segmentation setting; a semantic recipe "
            "weighs auxiliary outputs with loss.aux_weights"
        )


def validate_recipe(recipe):
    """Checks the values of a typed recipe; raises `RecipeError` naming the key."""
    if not _RECIPE_NAME.fullmatch(recipe.name) or recipe.name in (".", ".."):
        raise RecipeError(
            f"name: {recipe.name!r} names the run folder, so it must be one "
            "folder name of letters, digits, '.', '_' and '-' (no '/', no '..')"
        )
    _check_choice(recipe.task, TASKS, "task")
    _check_choice(recipe.model.name, MODELS, "model.name")
    model_task = MODEL_TASKS.get(recipe.model.name, "semantic")
    if model_task != recipe.task:
        raise RecipeError(
            f"task: model {recipe.model.name!r} is a {model_task} model, the "
            f"recipe's task is {recipe.task!r}; set task: {model_task}"
        )
    _check_kwargs(
        recipe.model.kwargs,
        MODELS[recipe.model.name],
        "model.kwargs",
        # The instance task sets the input size and the instance count from
        # data.crop_size and data.max_instances.
        reserved=(
            "self",
            "backbone",
            "num_classes",
            "dtype",
            "image_size",
            "max_instances",
            "loss_weights",
        ),
    )
    _check_choice(recipe.backbone.name, BACKBONE_BUILDERS, "backbone.name")
    _check_kwargs(
        recipe.backbone.kwargs,
        build_resnet,
        "backbone.kwargs",
        reserved=("dtype", "synchronized_bn"),
    )

    data = recipe.data
    _check_choice(data.dataset, TASK_DATASETS[recipe.task], "data.dataset")
    _check_choice(data.format, DATA_FORMATS, "data.format")
    if data.dataset == "synthetic" and data.format != "files":
        raise RecipeError("data.format: synthetic data is drawn in memory, use 'files'")
    if data.dataset == "folder" and data.num_classes is None:
        raise RecipeError("data.num_classes: required for data.dataset 'folder'")
    if data.num_classes is not None:
        _check_positive(data.num_classes, "data.num_classes")
        if data.dataset != "folder":
            raise RecipeError(
                f"data.num_classes: only for data.dataset 'folder'; "
                f"{data.dataset!r} knows its classes"
            )
    if data.image_size < 32:
        raise RecipeError(f"data.image_size: must be >= 32, got {data.image_size}")
    _check_positive(data.num_train_images, "data.num_train_images")
    _check_positive(data.num_val_images, "data.num_val_images")
    for i, side in enumerate(data.crop_size):
        _check_positive(side, f"data.crop_size[{i}]")
    _check_range(data.scale_range, "data.scale_range", 0.0)
    _check_range(data.aspect_range, "data.aspect_range", 0.0)
    if data.color_jitter is not None:
        for i, strength in enumerate(data.color_jitter):
            _check_positive(strength, f"data.color_jitter[{i}]", allow_zero=True)
    _check_positive(data.shuffle_buffer, "data.shuffle_buffer")
    if data.short_edge_range is not None:
        _check_range(data.short_edge_range, "data.short_edge_range", 0)
    if data.max_size is not None:
        _check_positive(data.max_size, "data.max_size")
    _check_positive(data.max_instances, "data.max_instances")
    _check_positive(data.mask_size, "data.mask_size")
    if recipe.task == "instance":
        for i, side in enumerate(data.crop_size):
            if side % 64:
                raise RecipeError(
                    f"data.crop_size[{i}]: the instance model's input must be a "
                    f"multiple of 64, got {side}"
                )

    loss = recipe.loss
    _check_loss_task(loss, recipe.task)
    if "logits" in loss.aux_weights:
        raise RecipeError(
            "loss.aux_weights.logits: the main output always has weight 1; "
            "list auxiliary outputs only"
        )
    for output, weight in loss.aux_weights.items():
        _check_positive(weight, f"loss.aux_weights.{output}", allow_zero=True)
    if loss.class_weights is not None:
        for i, weight in enumerate(loss.class_weights):
            _check_positive(weight, f"loss.class_weights[{i}]", allow_zero=True)
    if not 0.0 < loss.top_k_percent_pixels <= 1.0:
        raise RecipeError(
            "loss.top_k_percent_pixels: must be in (0, 1], got "
            f"{loss.top_k_percent_pixels}"
        )

    optimizer = recipe.optimizer
    _check_choice(optimizer.name, OPTIMIZERS, "optimizer.name")
    _check_positive(optimizer.learning_rate, "optimizer.learning_rate")
    if not 0.0 <= optimizer.momentum <= 1.0:
        raise RecipeError(
            f"optimizer.momentum: must be in [0, 1], got {optimizer.momentum}"
        )
    _check_positive(optimizer.weight_decay, "optimizer.weight_decay", allow_zero=True)
    if optimizer.global_clipnorm is not None:
        _check_positive(optimizer.global_clipnorm, "optimizer.global_clipnorm")

    schedule = recipe.schedule
    _check_choice(schedule.name, SCHEDULES, "schedule.name")
    fractions = list(schedule.step_fractions)
    if fractions != sorted(fractions) or not all(0 < f < 1 for f in fractions):
        raise RecipeError(
            f"schedule.step_fractions: ascending fractions in (0, 1), got {fractions}"
        )
    if not 0.0 < schedule.gamma <= 1.0:
        raise RecipeError(f"schedule.gamma: must be in (0, 1], got {schedule.gamma}")
    _check_positive(schedule.power, "schedule.power", allow_zero=True)
    _check_positive(
        schedule.end_learning_rate, "schedule.end_learning_rate", allow_zero=True
    )
    _check_positive(schedule.warmup_steps, "schedule.warmup_steps", allow_zero=True)
    if not 0.0 <= schedule.warmup_start_factor <= 1.0:
        raise RecipeError(
            "schedule.warmup_start_factor: must be in [0, 1], got "
            f"{schedule.warmup_start_factor}"
        )

    train = recipe.train
    _check_positive(train.batch_size, "train.batch_size")
    _check_positive(train.epochs, "train.epochs")
    if train.steps_per_epoch is not None:
        _check_positive(train.steps_per_epoch, "train.steps_per_epoch")
    _check_positive(train.steps_per_execution, "train.steps_per_execution")
    _check_choice(train.strategy, STRATEGIES, "train.strategy")
    _check_choice(train.dtype_policy, DTYPE_POLICIES, "train.dtype_policy")
    _check_positive(train.seed, "train.seed", allow_zero=True)
    _check_positive(train.validation_freq, "train.validation_freq")
    _check_positive(train.log_images, "train.log_images", allow_zero=True)

    evaluation = recipe.eval
    _check_positive(evaluation.batch_size, "eval.batch_size")
    if evaluation.size is not None:
        for i, side in enumerate(evaluation.size):
            _check_positive(side, f"eval.size[{i}]")
    if not evaluation.scales:
        raise RecipeError("eval.scales: needs at least one scale")
    for i, scale in enumerate(evaluation.scales):
        _check_positive(scale, f"eval.scales[{i}]")
    if evaluation.window is not None:
        for i, side in enumerate(evaluation.window):
            _check_positive(side, f"eval.window[{i}]")
    if evaluation.short_edge is not None:
        _check_positive(evaluation.short_edge, "eval.short_edge")


# === YAML ===


class _Loader(yaml.SafeLoader):
    """YAML 1.2 numbers (PyYAML, YAML 1.1, reads `1e-4` as a string), and a
    key given twice in one mapping is an error (PyYAML keeps the last)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"duplicate key {key!r}",
                    key_node.start_mark,
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def parse_yaml(text):
    """Parses YAML text with YAML 1.2 number syntax."""
    return yaml.load(text, Loader=_Loader)


class _Dumper(yaml.SafeDumper):
    """Writes lists of scalars inline (`crop_size: [512, 512]`)."""


def _represent_list(dumper, values):
    flow = all(not isinstance(v, (dict, list)) for v in values)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", values, flow_style=flow)


_Dumper.add_representer(list, _represent_list)


def dump_recipe(recipe):
    """The recipe as YAML text, every field written out."""
    return yaml.dump(recipe_to_dict(recipe), Dumper=_Dumper, sort_keys=False, width=88)


def save_recipe(recipe, path):
    """Writes the recipe to `path` as YAML (atomically); never overwrites an
    existing file."""
    from kseg.files import write_text

    write_text(path, dump_recipe(recipe), overwrite=False)


def load_recipe(name_or_path):
    """Loads and validates a recipe by name (see `recipe_dirs`) or file path."""
    path = find_recipe(name_or_path)
    try:
        values = parse_yaml(path.read_text())
    except yaml.YAMLError as error:
        raise RecipeError(f"{path}: invalid YAML: {error}") from None
    if values is None:
        raise RecipeError(
            f"{path}: the recipe file is empty; write its sections (see "
            "`kseg recipes quickstart` for a complete one)"
        )
    try:
        return recipe_from_dict(values, name=path.stem)
    except RecipeError as error:
        raise RecipeError(f"{path}: {error}") from None


# === Overrides ===


def _set_path(values, cls, keys, value, path=""):
    """Sets `values[keys[0]]...[keys[-1]] = value`, checking each key against
    the dataclass `cls` (dict-typed fields accept any key)."""
    key, rest = keys[0], keys[1:]
    where = _join(path, key)
    if cls is not None:
        hints = typing.get_type_hints(cls)
        if key not in hints:
            fields = [f.name for f in dataclasses.fields(cls)]
            raise RecipeError(
                f"unknown recipe key {where!r} (valid keys"
                f"{' in ' + repr(path) if path else ''}: {', '.join(fields)})"
                f"{_suggest(key, fields, path)}"
            )
        field_type = hints[key]
    else:
        field_type = Any
    if not rest:
        values[key] = value
        return
    if dataclasses.is_dataclass(field_type):
        _set_path(values[key], field_type, rest, value, where)
        return
    origin = typing.get_origin(field_type)
    if origin is dict or field_type is Any:
        child = values.get(key)
        if child is None:
            child = values[key] = {}
        if not isinstance(child, dict):
            raise RecipeError(f"{where}: is {child!r}, not a mapping with keys")
        _set_path(child, None, rest, value, where)
        return
    raise RecipeError(
        f"{where}: is a {_type_name(field_type)} value, it has no key {rest[0]!r}"
    )


def parse_override(text):
    """Splits `"key.path=value"` into `(["key", "path"], value)`; the value is
    read as YAML (`32`, `0.5`, `true`, `null`, `[512, 512]`, `text`)."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise RecipeError(f"override {text!r} must look like key.path=value")
    keys = key.split(".")
    if not all(keys):
        raise RecipeError(f"override {text!r}: empty part in key {key!r}")
    try:
        value = parse_yaml(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return keys, value


def apply_overrides(recipe, overrides):
    """A copy of `recipe` with `key.path=value` overrides applied and checked.

    Example: `apply_overrides(recipe, ["train.epochs=2",
    "model.kwargs.filters=32", "data.crop_size=[256, 256]"])`.

    Raises:
        RecipeError: naming an unknown key or a value of the wrong type.
    """
    values = recipe_to_dict(recipe)
    for text in overrides:
        keys, value = parse_override(text)
        _set_path(values, Recipe, keys, value)
    try:
        return recipe_from_dict(values)
    except RecipeError as error:
        raise RecipeError(f"--set: {error}") from None
