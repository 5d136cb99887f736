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
import types
import typing
from typing import Any

import yaml

from kseg.backbones import build_resnet
from kseg.models.panet import LOSS_NAMES
from kseg.models.panet.transfer import BACKBONE_STAGES, TRAINABLE_MODES
from kseg.training.recipe_files import (  # noqa: F401 (re-exported)
    CHECKOUT_RECIPES,
    RECIPE_SUFFIX,
    RECIPES_ENV,
    RECIPES_PACKAGE,
    RecipeError,
    find_recipe,
    list_recipes,
    parse_yaml,
    recipe_dirs,
)
from kseg.training.recipe_schema import (  # noqa: F401 (re-exported)
    _RECIPE_NAME,
    BACKBONE_BUILDERS,
    DATA_FORMATS,
    DATASETS,
    DTYPE_POLICIES,
    MODEL_TASKS,
    MODELS,
    OPTIMIZERS,
    SCHEDULES,
    STRATEGIES,
    TASK_DATASETS,
    TASKS,
    BackboneConfig,
    DataConfig,
    EvalConfig,
    LossConfig,
    ModelConfig,
    OptimizerConfig,
    Recipe,
    ScheduleConfig,
    TrainConfig,
)


def _join(path, key):
    return f"{path}.{key}" if path else str(key)


def _type_name(type_):
    if isinstance(type_, type) and not typing.get_args(type_):
        return type_.__name__
    return str(type_).replace("typing.", "")


def _suggest(key, valid, path=""):
    match = difflib.get_close_matches(str(key), list(valid), n=1, cutoff=0.6)
    return f"; did you mean {_join(path, match[0])!r}?" if match else ""


def _check_finite(value, path):
    """No NaN or infinity anywhere in `value` (nested lists and mappings
    too): no setting means them, and a NaN rate trains a NaN model."""
    if isinstance(value, float) and not math.isfinite(value):
        raise RecipeError(f"{path}: must be a finite number, got {value!r}")
    if isinstance(value, dict):
        for key, item in value.items():
            _check_finite(item, _join(path, key))
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_finite(item, f"{path}[{i}]")


def _convert(value, type_, path):
    """Checks `value` against `type_` and returns it in that type's form.

    Lists become tuples for tuple fields; ints are accepted as floats; nothing
    else is coerced (a string is never read as a number).
    """
    origin, args = typing.get_origin(type_), typing.get_args(type_)
    if type_ is Any:
        _check_finite(value, path)
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
        _check_finite(value, path)
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


def _check_model_start(model, task):
    """`model.init_from` and `model.trainable_layers` (whether the file
    exists is checked when a run starts, see `InstanceTask.prepare`)."""
    for key in ("init_from", "trainable_layers"):
        if getattr(model, key) is not None and task != "instance":
            raise RecipeError(
                f"model.{key}: an instance segmentation setting (PANet, task: "
                f"instance); remove it (a semantic recipe loads encoder weights "
                "with backbone.weights)"
            )
    if model.init_from is not None and not model.init_from.strip():
        raise RecipeError(
            "model.init_from: empty; give a .keras model, a kseg run directory "
            "or torchvision's state dict (.pth, .npz, .safetensors), or null"
        )
    layers = model.trainable_layers
    if layers is None or layers in TRAINABLE_MODES:
        return
    if isinstance(layers, bool) or not isinstance(layers, int):
        raise RecipeError(
            f"model.trainable_layers: expected an int 0..{len(BACKBONE_STAGES)}, "
            f"{' or '.join(map(repr, TRAINABLE_MODES))} or null, got {layers!r}"
        )
    if not 0 <= layers <= len(BACKBONE_STAGES):
        raise RecipeError(
            f"model.trainable_layers: torchvision's trainable backbone layers "
            f"run from 0 (backbone frozen) to {len(BACKBONE_STAGES)} (all of "
            f"{', '.join(BACKBONE_STAGES)}), got {layers}"
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
    _check_model_start(recipe.model, recipe.task)
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
    if data.mask_size < 2:
        raise RecipeError(
            "data.mask_size: the instance mask targets are cropped at this "
            f"side, so it must be at least 2, got {data.mask_size}"
        )
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
