"""The instance segmentation task: COCO-format data, PANet, COCO AP.

`InstanceTask` is what `kseg.training.trainer` asks of an instance recipe
(`task: instance`, model `panet`): the instance datasets (synthetic shape
scenes, COCO-format folders, Cityscapes instances), the `tf.data` pipelines
of `kseg.data.instance_pipeline`, the model built at the recipe's fixed input
size and compiled with its five in-model losses, validation by COCO mask AP
each epoch (`val_mask_ap`, which `best.keras` maximises), and the COCO table.
"""

import json
import math
import warnings
from pathlib import Path

import keras
import numpy as np

from kseg.console import progress_bar
from kseg.data import (
    check_split_name,
    instance_eval_pipeline,
    instance_train_pipeline,
    make_synthetic_instances,
    read_cityscapes_instances,
    read_coco,
)
from kseg.models import PANet
from kseg.models.panet.transfer import load_weights_by_name, set_trainable
from kseg.models.torchvision_weights import SUFFIXES as TORCHVISION_SUFFIXES
from kseg.training.coco_evaluation import CocoEvaluator, format_coco_table
from kseg.training.optimizers import build_optimizer
from kseg.training.recipe import BACKBONE_BUILDERS, RecipeError
from kseg.training.task import Task, with_input_normalization


def _coco_categories(root, split):
    from kseg.data.instances import NON_OBJECT_CATEGORIES

    root = Path(root).expanduser()
    check_split_name(split)
    for path in (root / "annotations" / f"instances_{split}.json",
                 root / "annotations.json"):  # fmt: skip
        if path.is_file():
            categories = {
                int(c["id"]): str(c["name"])
                for c in json.loads(path.read_text())["categories"]
                if c["name"] not in NON_OBJECT_CATEGORIES
            }
            ids = tuple(sorted(categories))
            return ids, tuple(categories[c] for c in ids)
    raise FileNotFoundError(f"no COCO annotations for split {split!r} under {root}")


def recipe_categories(recipe):
    """`(category_ids, class_names)` of an instance recipe's dataset."""
    dataset = recipe.data.dataset
    if dataset == "synthetic":
        from kseg.data.synthetic_instances import SYNTHETIC_INSTANCE_CLASSES

        count = len(SYNTHETIC_INSTANCE_CLASSES)
        return tuple(range(1, count + 1)), tuple(SYNTHETIC_INSTANCE_CLASSES)
    if dataset == "cityscapes":
        from kseg.data.instances import CITYSCAPES_INSTANCE_CATEGORIES

        return (
            tuple(c for c, _ in CITYSCAPES_INSTANCE_CATEGORIES),
            tuple(n for _, n in CITYSCAPES_INSTANCE_CATEGORIES),
        )
    if recipe.data.root is None:
        raise FileNotFoundError("data.root is not set")
    return _coco_categories(recipe.data.root, recipe.data.train_split)


def read_instances(data, split, data_dir=None, seed=0):
    """Reads one split of an instance recipe's dataset (`InstanceDataset`).

    - `synthetic`: `kseg.data.make_synthetic_instances` (drawn in memory);
    - `coco`: COCO's layout, `ROOT/annotations/instances_<split>.json` and
      the images in `ROOT/<split>/` (e.g. split `val2017`); or a folder
      holding one `annotations.json` whose image paths are relative to it
      (a labelme COCO export), which is every split;
    - `cityscapes`: `kseg.data.read_cityscapes_instances(ROOT, split)`.
    """
    if data.dataset == "synthetic":
        if data_dir is not None:
            raise RecipeError("--data: the synthetic dataset is drawn, not read")
        if split not in ("train", "val"):
            raise RecipeError(f"data.{split!r}: synthetic splits are 'train' and 'val'")
        count = data.num_train_images if split == "train" else data.num_val_images
        return make_synthetic_instances(split, count, data.image_size, seed)
    root = data_dir if data_dir is not None else data.root
    if root is None:
        raise RecipeError(
            f"data.root: dataset {data.dataset!r} is read from disk; pass "
            "--data DIR or set data.root"
        )
    root = Path(root).expanduser()
    check_split_name(split)
    if data.dataset == "coco":
        annotations = root / "annotations" / f"instances_{split}.json"
        if not annotations.is_file() and (root / "annotations.json").is_file():
            return read_coco(root / "annotations.json", root)
        return read_coco(annotations, root / split)
    return read_cityscapes_instances(root, split)


def init_source(value):
    """The file `model.init_from` names: a `.keras` model, torchvision's state
    dict, or a kseg run directory's `model.keras`. Raises `FileNotFoundError`
    or `ValueError` naming the recipe field, the path and what it takes."""
    takes = (
        "give a converted model (kseg convert torchvision FILE --out M.keras), "
        "a kseg run directory or its model.keras, or torchvision's state dict "
        f"({', '.join(TORCHVISION_SUFFIXES)})"
    )
    path = Path(value).expanduser()
    if path.is_dir():
        model = path / "model.keras"
        if not model.is_file():
            raise FileNotFoundError(
                f"model.init_from: {path} is a folder without model.keras (a run "
                "that has not finished?); give a finished kseg run directory or "
                f"a checkpoint such as {path / 'checkpoints' / 'last.keras'}"
            )
        return model
    if not path.is_file():
        raise FileNotFoundError(f"model.init_from: {path} does not exist; {takes}")
    if path.suffix.lower() not in (".keras", *TORCHVISION_SUFFIXES):
        raise ValueError(
            f"model.init_from: {path} is not a file kseg initialises from; {takes}"
        )
    return path


def init_message(source, report, limit=8):
    """One summary line of `load_weights_by_name`'s `report`, then the layers
    skipped and left fresh by name (their first `limit` when more)."""

    def layers(names):
        names = list(dict.fromkeys(n.split(" ")[0].rsplit("/", 1)[0] for n in names))
        more = len(names) - limit
        return ", ".join(names[:limit]) + (f", ... ({more} more)" if more > 0 else "")

    lines = [
        f"model.init_from {source}: loaded {len(report.loaded)} weights, skipped "
        f"{len(report.skipped)} (another shape), left {len(report.fresh)} fresh"
    ]
    if 0 < len(report.skipped) <= limit:
        lines.extend(f"  skipped {name}: {why}" for name, why in report.skipped.items())
    elif report.skipped:
        lines.append(f"  skipped: {layers(report.skipped)}")
    if report.fresh:
        lines.append(f"  fresh: {layers(report.fresh)}")
    return "\n".join(lines)


class InstanceEvaluation:
    """COCO box and mask AP of a model on a split.

    Attributes:
        results: `CocoEvaluator.result()`: `{"bbox" | "segm": {"AP", "AP50",
            "AP75", "APs", "APm", "APl", "per_class": {name: AP}}}`, values
            in [0, 1] (NaN or −1 where the split has no such objects).
    """

    def __init__(self, results):
        self.results = results

    @property
    def mask_ap(self):
        return _number(self.results["segm"]["AP"])

    def table(self):
        return format_coco_table(self.results)

    def summary(self):
        segm, bbox = self.results["segm"], self.results["bbox"]
        return (
            f"mask AP {100 * _number(segm['AP']):.1f} (AP50 "
            f"{100 * _number(segm['AP50']):.1f}), box AP "
            f"{100 * _number(bbox['AP']):.1f}"
        )

    def as_json(self):
        def plain(value):
            if isinstance(value, dict):
                return {str(k): plain(v) for k, v in value.items()}
            value = float(value)
            return None if math.isnan(value) or value < 0 else value

        return {"coco": plain(self.results), "mask_ap": self.mask_ap}


def _number(value):
    value = float(value)
    return 0.0 if math.isnan(value) or value < 0 else value


def evaluate_instances(model, dataset, recipe, progress=True):
    """COCO-evaluates `model` on an `InstanceDataset` with the recipe's eval
    settings; returns `InstanceEvaluation`."""
    size = tuple(recipe.data.crop_size)
    batches, ground_truth = instance_eval_pipeline(
        dataset,
        recipe.eval.batch_size,
        size,
        short_edge=recipe.eval.short_edge,
        max_size=recipe.data.max_size,
    )
    evaluator = CocoEvaluator(
        ground_truth,
        dataset.category_ids,
        dataset.class_names,
        mask_paste=getattr(model, "mask_paste", "kseg"),
    )
    bar = None
    if progress:
        bar = progress_bar(
            math.ceil(len(dataset) / recipe.eval.batch_size), unit_name="batch"
        )
    for step, (x, meta) in enumerate(batches, start=1):
        outputs = model.predict_on_batch(x["images"])
        evaluator.update(
            {key: np.asarray(value) for key, value in outputs.items()},
            {key: value.numpy() for key, value in meta.items()},
        )
        if bar is not None:
            bar.update(step)
    return InstanceEvaluation(evaluator.result())


class CocoValidation(keras.callbacks.Callback):
    """COCO-evaluates the model on the validation split every `every` epochs
    and adds `val_mask_ap`, `val_mask_ap50` and `val_box_ap` to the epoch's
    logs (so checkpoints, the epochs file and TensorBoard see them); list it
    before the callbacks that read them.

    Args:
        evaluate: callable `model -> InstanceEvaluation`.
        every: int. Epoch interval. Defaults to `1`.
    """

    def __init__(self, evaluate, every=1):
        super().__init__()
        self.evaluate = evaluate
        self.every = int(every)

    def on_epoch_end(self, epoch, logs=None):
        if logs is None or (epoch + 1) % self.every:
            return
        results = self.evaluate(self.model).results
        logs["val_mask_ap"] = _number(results["segm"]["AP"])
        logs["val_mask_ap50"] = _number(results["segm"]["AP50"])
        logs["val_box_ap"] = _number(results["bbox"]["AP"])


def _checked_validation_set(dataset, data):
    """`dataset` with every sample loaded and checked: a bad one is an error
    naming its file, or, with `data.skip_corrupt`, left out (with a warning)
    of the evaluation and its ground truth."""
    problems = dataset.validate()
    if not problems:
        return dataset
    messages = [message for _, message in problems]
    if not data.skip_corrupt or len(problems) == len(dataset):
        shown = "\n  ".join(messages[:10])
        left = " (data.skip_corrupt would leave none)" if data.skip_corrupt else ""
        raise ValueError(
            f"{len(problems)} of the {len(dataset)} samples of the validation "
            f"split {data.val_split!r} are bad{left}:\n  {shown}"
        )
    for message in messages:
        warnings.warn(
            f"skipping a bad validation sample (data.skip_corrupt): {message}",
            stacklevel=2,
        )
    bad = {index for index, _ in problems}
    return dataset.subset(i for i in range(len(dataset)) if i not in bad)


def _images_only(x, y):
    # The model's one input is the image tensor; a dict {"images": ...}
    # feeds it too, but Keras warns on every trace that the structures differ.
    return x["images"], y


class InstanceTask(Task):
    """Instance segmentation: boxes, classes and masks, scored by COCO AP."""

    monitor = "val_mask_ap"

    def prepare(self):
        init_from = self.recipe.model.init_from
        # Checked before the data is read and before any run directory.
        self.init_source = None
        if init_from is not None and self.initialise:
            self.init_source = init_source(init_from)
        data, seed = self.recipe.data, self.recipe.train.seed
        self.train_set = read_instances(data, data.train_split, self.data_dir, seed)
        self.val_set = read_instances(data, data.val_split, self.data_dir, seed)
        if data.dataset != "synthetic":
            # Checked now rather than after the first training epoch.
            self.val_set = _checked_validation_set(self.val_set, data)
        self.num_train = len(self.train_set)
        return (
            f"{self.train_set.name} ({len(self.train_set)} train / "
            f"{len(self.val_set)} val images, {self.train_set.num_classes} classes)"
        )

    def build_model(self):
        recipe = self.recipe
        size = tuple(recipe.data.crop_size)
        kwargs = dict(recipe.backbone.kwargs)
        kwargs.setdefault("input_shape", (*size, 3))
        backbone = BACKBONE_BUILDERS[recipe.backbone.name](**kwargs)
        if recipe.backbone.weights is not None:
            backbone.load_weights(recipe.backbone.weights)
        model = PANet(
            with_input_normalization(backbone),
            self.train_set.num_classes,
            image_size=size,
            max_instances=recipe.data.max_instances,
            loss_weights=recipe.loss.weights,
            seed=recipe.train.seed,
            **recipe.model.kwargs,
        )
        if getattr(self, "init_source", None) is not None:
            report = load_weights_by_name(model, self.init_source)
            if not report.loaded:
                raise ValueError(
                    f"model.init_from: no weight of {self.init_source} matches "
                    "the recipe's model by name and shape; build the same "
                    "architecture (backbone, model.kwargs filters and fc_units)"
                )
            print(init_message(self.init_source, report), flush=True)
        if recipe.model.trainable_layers is not None:
            stages = set_trainable(model, recipe.model.trainable_layers)
            print(
                f"model.trainable_layers {recipe.model.trainable_layers!r}: "
                f"backbone stages training: {', '.join(stages) or 'none'} "
                "(batch norm frozen)",
                flush=True,
            )
        return model

    def compile(self, model, total_steps):
        train = self.recipe.train
        model.compile(
            optimizer=build_optimizer(self.recipe, total_steps),
            jit_compile=train.jit_compile,
            steps_per_execution=train.steps_per_execution,
        )

    def train_dataset(self, model):
        data, train = self.recipe.data, self.recipe.train
        return instance_train_pipeline(
            self.train_set,
            train.batch_size,
            tuple(data.crop_size),
            short_edge_range=data.short_edge_range,
            max_size=data.max_size,
            flip=data.flip,
            max_instances=data.max_instances,
            mask_size=data.mask_size,
            seed=train.seed,
            skip_corrupt=data.skip_corrupt,
        ).map(_images_only)

    def val_dataset(self, model):
        # Validation is COCO AP (`CocoValidation`), not the training losses.
        return None

    def callbacks(self, run_dir, chief):
        return [
            CocoValidation(
                lambda model: evaluate_instances(
                    model, self.val_set, self.recipe, progress=False
                ),
                every=self.recipe.train.validation_freq,
            )
        ]

    def evaluate(self, model, split=None, progress=True):
        data = self.recipe.data
        if split is None or split == data.val_split:
            dataset = getattr(self, "val_set", None)
        else:
            dataset = None
        if dataset is None:
            dataset = read_instances(
                data, split or data.val_split, self.data_dir, self.recipe.train.seed
            )
        return evaluate_instances(model, dataset, self.recipe, progress)
