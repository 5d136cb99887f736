"""The semantic segmentation task: datasets, pipelines, losses, mIoU.

`SemanticTask` is what `kseg.training.trainer` asks of a semantic recipe
(models `fcn`, `gcn`, `exfuse`, `pan`, `segmodel`): the data read and
checked, the model built and compiled with the pixel cross-entropy and the
mean-IoU metric, the `tf.data` pipelines, the TensorBoard masks, and the
per-class IoU evaluation.
"""

import dataclasses
from pathlib import Path

import numpy as np
import tensorflow as tf

from kseg.console import progress_bar
from kseg.data import (
    ADE20K_CLASSES,
    ADE20K_PALETTE,
    CITYSCAPES_CLASSES,
    CITYSCAPES_PALETTE,
    SYNTHETIC_CLASSES,
    SYNTHETIC_PALETTE,
    VOC_CLASSES,
    VOC_PALETTE,
    augment_dataset,
    check_split_name,
    count_records,
    eval_transform,
    make_synthetic,
    read_ade20k,
    read_cityscapes,
    read_folder,
    read_tfrecord,
    read_voc,
    read_voc_aug,
    voc_colormap,
)
from kseg.inference import predict
from kseg.training.callbacks import PredictedMasks
from kseg.training.losses import segmentation_losses
from kseg.training.metrics import (
    SegmentationConfusionMatrix,
    SegmentationMeanIoU,
    format_iou_table,
)
from kseg.training.optimizers import build_optimizer
from kseg.training.recipe import RecipeError
from kseg.training.task import Task, build_model


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """Class metadata of a dataset."""

    name: str
    num_classes: int
    class_names: tuple
    palette: np.ndarray


@dataclasses.dataclass
class Evaluation:
    """Result of evaluating a model on a split."""

    confusion_matrix: np.ndarray
    class_names: tuple

    @property
    def per_class_iou(self):
        matrix = self.confusion_matrix
        intersection = np.diag(matrix)
        union = matrix.sum(0) + matrix.sum(1) - intersection
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(union > 0, intersection / union, np.nan)

    @property
    def mean_iou(self):
        iou = self.per_class_iou
        return float(np.nanmean(iou)) if np.isfinite(iou).any() else 0.0

    @property
    def pixel_accuracy(self):
        total = self.confusion_matrix.sum()
        return float(np.trace(self.confusion_matrix) / total) if total else 0.0

    def table(self):
        """The per-class IoU table (`format_iou_table`) plus pixel accuracy."""
        return (
            f"{format_iou_table(self.per_class_iou, self.class_names)}\n"
            f"pixel accuracy: {100.0 * self.pixel_accuracy:.2f}%"
        )

    def summary(self):
        """The one-line result: `mean IoU 89.47%`."""
        return f"mean IoU {100.0 * self.mean_iou:.2f}%"

    def as_json(self):
        """The numbers of `result.json`."""
        return {
            "mean_iou": self.mean_iou,
            "pixel_accuracy": self.pixel_accuracy,
            "per_class_iou": {
                name: None if np.isnan(iou) else float(iou)
                for name, iou in zip(self.class_names, self.per_class_iou, strict=True)
            },
        }


def dataset_info(data):
    """The `DatasetInfo` of a recipe's `data` section."""
    if data.dataset == "synthetic":
        return DatasetInfo(
            "synthetic", len(SYNTHETIC_CLASSES), SYNTHETIC_CLASSES, SYNTHETIC_PALETTE
        )
    if data.dataset in ("voc", "voc_aug"):
        return DatasetInfo(data.dataset, len(VOC_CLASSES), VOC_CLASSES, VOC_PALETTE)
    if data.dataset == "cityscapes":
        return DatasetInfo(
            "cityscapes",
            len(CITYSCAPES_CLASSES),
            CITYSCAPES_CLASSES,
            CITYSCAPES_PALETTE,
        )
    if data.dataset == "ade20k":
        return DatasetInfo(
            "ade20k", len(ADE20K_CLASSES), ADE20K_CLASSES, ADE20K_PALETTE
        )
    num_classes = data.num_classes
    return DatasetInfo(
        "folder",
        num_classes,
        tuple(f"class_{i}" for i in range(num_classes)),
        voc_colormap(num_classes),
    )


def _require_root(data, data_dir):
    root = data_dir if data_dir is not None else data.root
    if root is None:
        raise RecipeError(
            f"data.root: dataset {data.dataset!r} is read from disk; pass "
            "--data DIR or set data.root"
        )
    return Path(root).expanduser()


def read_split(data, split, data_dir=None, seed=0):
    """Reads one split of a recipe's dataset.

    Args:
        data: the recipe's `DataConfig`.
        split: str. Split name (`"train"`, `"val"`, ...).
        data_dir: optional dataset directory overriding `data.root`.
        seed: int. Seed of the synthetic dataset.

    Returns:
        `(pairs, length)`: a `tf.data.Dataset` of `(image uint8 (H, W, 3),
        label uint8 (H, W))` and its number of elements.
    """
    if data.dataset == "synthetic":
        if data_dir is not None:
            raise RecipeError("--data: the synthetic dataset is drawn, not read")
        if split not in ("train", "val"):
            raise RecipeError(f"data.{split!r}: synthetic splits are 'train' and 'val'")
        size = data.num_train_images if split == "train" else data.num_val_images
        dataset = make_synthetic(split, size, data.image_size, seed)
        return dataset.as_dataset(), len(dataset)
    root = _require_root(data, data_dir)
    check_split_name(split)
    if data.format == "tfrecord":
        prefix = root / split
        records = read_tfrecord(str(prefix))
        files = sorted(tf.io.gfile.glob(f"{prefix}-?????-of-?????")) or sorted(
            tf.io.gfile.glob(str(prefix))
        )
        # Reads every record: a damaged shard is named now, not mid-training.
        return records, count_records(files)
    if data.dataset == "voc":
        dataset = read_voc(root, split)
    elif data.dataset == "voc_aug":
        dataset = read_voc_aug(root, split)
    elif data.dataset == "cityscapes":
        dataset = read_cityscapes(root, split)
    elif data.dataset == "ade20k":
        dataset = read_ade20k(root, split)
    else:
        dataset = read_folder(
            root / split / "images", root / split / "labels", data.num_classes
        )
    return dataset.as_dataset(skip_corrupt=data.skip_corrupt), len(dataset)


def read_kseg_dataset(data, split, data_dir=None, seed=0):
    """The kseg dataset object (`SegmentationDataset` or the synthetic arrays)
    of one split, as `kseg data convert` / `inspect` consume it."""
    if data.dataset == "synthetic":
        size = data.num_train_images if split == "train" else data.num_val_images
        return make_synthetic(split, size, data.image_size, seed)
    root = _require_root(data, data_dir)
    check_split_name(split)
    readers = {
        "voc": read_voc,
        "voc_aug": read_voc_aug,
        "cityscapes": read_cityscapes,
        "ade20k": read_ade20k,
    }
    if data.dataset in readers:
        return readers[data.dataset](root, split)
    return read_folder(
        root / split / "images", root / split / "labels", data.num_classes
    )


def _targets(outputs):
    """Maps `(image, label)` to `(image, {output: label})` for every output."""

    def to_targets(image, label):
        return image, {name: label for name in outputs}

    return to_targets


def train_pipeline(pairs, data, batch_size, outputs=("logits",), seed=0):
    """The training `tf.data` pipeline: shuffle, repeat, augment, batch.

    Args:
        pairs: `tf.data.Dataset` of `(image, label)`.
        data: the recipe's `DataConfig` (crop, scale, aspect, flip, colour
            jitter, shuffle buffer, cache).
        batch_size: int. The global batch size.
        outputs: model output names; each gets the label as its target.
        seed: int. Seed of shuffling and augmentation.

    Returns:
        An infinite `tf.data.Dataset` of `(float32 (B, h, w, 3) images in
        0–255, {output: int32 (B, h, w) labels})`.
    """
    if data.cache:
        pairs = pairs.cache()
    pairs = pairs.shuffle(data.shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
    augmented = augment_dataset(
        pairs.repeat(),
        tuple(data.crop_size),
        seed=seed,
        scale_range=data.scale_range,
        aspect_range=data.aspect_range,
        flip=data.flip,
        color_jitter=data.color_jitter,
    )
    batches = augmented.batch(batch_size, drop_remainder=True)
    return batches.map(_targets(outputs)).prefetch(tf.data.AUTOTUNE)


def eval_pipeline(pairs, evaluation, outputs=None):
    """The evaluation pipeline: pad to `eval.size` (if set) and batch.

    Args:
        pairs: `tf.data.Dataset` of `(image, label)`.
        evaluation: the recipe's `EvalConfig`.
        outputs: model output names for `model.fit`'s validation targets, or
            `None` for plain `(image, label)` batches.
    """
    size = None if evaluation.size is None else tuple(evaluation.size)
    batches = pairs.map(
        lambda image, label: eval_transform(image, label, size=size, mode="pad"),
        num_parallel_calls=tf.data.AUTOTUNE,
    ).batch(evaluation.batch_size)
    if outputs is not None:
        batches = batches.map(_targets(outputs))
    return batches.prefetch(tf.data.AUTOTUNE)


def output_names(model):
    """Names of a kseg model's outputs (its output dict's keys)."""
    outputs = model.output
    if not isinstance(outputs, dict) or "logits" not in outputs:
        raise ValueError(
            "a kseg model returns a dict with a 'logits' entry, got "
            f"{type(outputs).__name__}"
        )
    return list(outputs)


def compile_model(model, recipe, num_classes, total_steps):
    """Compiles `model` with the recipe's loss, optimizer (`build_optimizer`
    over `total_steps`) and mIoU metric.

    Every output gets a `SegmentationCrossEntropy` (the main `"logits"` with
    weight 1, auxiliary outputs with `loss.aux_weights`); the metric is the
    mean IoU of `"logits"`. Under `mixed_float16` Keras wraps the optimizer
    in a `LossScaleOptimizer`.
    """
    outputs = output_names(model)
    auxiliary = [name for name in outputs if name != "logits"]
    missing = [name for name in auxiliary if name not in recipe.loss.aux_weights]
    if missing:
        raise RecipeError(
            f"loss.aux_weights: the model has auxiliary output(s) {missing}; "
            f"give each a loss weight, e.g. --set loss.aux_weights.{missing[0]}=0.4"
        )
    unknown = [name for name in recipe.loss.aux_weights if name not in outputs]
    if unknown:
        raise RecipeError(
            f"loss.aux_weights.{unknown[0]}: the model has no output "
            f"{unknown[0]!r} (outputs: {', '.join(outputs)})"
        )
    losses, loss_weights = segmentation_losses(
        {"logits": 1.0, **recipe.loss.aux_weights},
        num_classes=num_classes,
        class_weights=recipe.loss.class_weights,
        top_k_percent_pixels=recipe.loss.top_k_percent_pixels,
    )
    model.compile(
        optimizer=build_optimizer(recipe, total_steps),
        loss=losses,
        loss_weights=loss_weights,
        metrics={"logits": [SegmentationMeanIoU(num_classes, name="mean_iou")]},
        jit_compile=recipe.train.jit_compile,
        steps_per_execution=recipe.train.steps_per_execution,
    )
    return model


def evaluate_model(model, pairs, info, evaluation, progress=True):
    """Evaluates `model` on a split and returns its confusion matrix.

    Single-scale evaluation without a window runs batched
    (`eval_pipeline`). Multi-scale, flipped or sliding-window evaluation runs
    image by image through `kseg.inference.predict`, the one implementation
    of test-time augmentation (softmax probabilities of every pass resized
    to the image and averaged).

    Args:
        model: a kseg model.
        pairs: `tf.data.Dataset` of `(image, label)`.
        info: `DatasetInfo` of the dataset.
        evaluation: the recipe's `EvalConfig`.
        progress: bool. Shows a progress bar. Defaults to `True`.

    Returns:
        `Evaluation`.
    """
    metric = SegmentationConfusionMatrix(info.num_classes)
    augmented = (
        tuple(evaluation.scales) != (1.0,)
        or evaluation.flip
        or evaluation.window is not None
    )
    if augmented:
        batches = pairs.map(lambda image, label: eval_transform(image, label))
    else:
        batches = eval_pipeline(pairs, evaluation)
        logits = tf.function(
            lambda images: model(images, training=False)["logits"],
            reduce_retracing=True,
        )
    cardinality = int(batches.cardinality())
    bar = None
    if progress:
        bar = progress_bar(
            cardinality if cardinality > 0 else None,
            unit_name="image" if augmented else "batch",
        )
    for step, (images, labels) in enumerate(batches, start=1):
        if augmented:
            probabilities = predict(
                model,
                images.numpy(),
                scales=evaluation.scales,
                flip=evaluation.flip,
                window=evaluation.window,
            ).probabilities
            metric.update_state(labels[None], probabilities[None])
        else:
            metric.update_state(labels, logits(images))
        if bar is not None:
            bar.update(step)
    return Evaluation(
        confusion_matrix=np.asarray(metric.confusion_matrix, dtype="float64"),
        class_names=tuple(info.class_names),
    )


def _sample_batch(pairs, evaluation, count):
    """The first `count` validation images and labels, as NumPy arrays."""
    images, labels = [], []
    for image, label in eval_pipeline(pairs, evaluation).unbatch().take(count):
        images.append(image.numpy())
        labels.append(label.numpy())
    return np.stack(images), np.stack(labels)


class SemanticTask(Task):
    """Semantic segmentation: one class per pixel, scored by mean IoU."""

    monitor = "val_mean_iou"

    def __init__(self, recipe, data_dir=None):
        super().__init__(recipe, data_dir)
        self.info = dataset_info(recipe.data)

    def prepare(self):
        data, seed = self.recipe.data, self.recipe.train.seed
        self.train_pairs, self.num_train = read_split(
            data, data.train_split, self.data_dir, seed
        )
        self.val_pairs, self.num_val = read_split(
            data, data.val_split, self.data_dir, seed
        )
        if data.dataset != "synthetic" and data.format == "files":
            # Checked now rather than after the first training epoch.
            dataset = read_kseg_dataset(data, data.val_split, self.data_dir, seed)
            problems = dataset.validate()
            if problems and not data.skip_corrupt:
                shown = "\n  ".join(message for _, message in problems[:10])
                raise ValueError(
                    f"{len(problems)} bad sample(s) in the validation split "
                    f"{data.val_split!r}:\n  {shown}"
                )
        return (
            f"{self.info.name} ({self.num_train} train / {self.num_val} val "
            f"images, {self.info.num_classes} classes)"
        )

    def build_model(self):
        return build_model(self.recipe, self.info.num_classes)

    def compile(self, model, total_steps):
        compile_model(model, self.recipe, self.info.num_classes, total_steps)

    def train_dataset(self, model):
        train = self.recipe.train
        return train_pipeline(
            self.train_pairs,
            self.recipe.data,
            train.batch_size,
            output_names(model),
            train.seed,
        )

    def val_dataset(self, model):
        return eval_pipeline(self.val_pairs, self.recipe.eval, output_names(model))

    def callbacks(self, run_dir, chief):
        train = self.recipe.train
        if not (train.log_images and chief):
            return []
        images, labels = _sample_batch(
            self.val_pairs, self.recipe.eval, train.log_images
        )
        return [
            PredictedMasks(
                images,
                labels,
                self.info.palette,
                Path(run_dir) / "logs" / "masks",
                every=train.validation_freq,
            )
        ]

    def evaluate(self, model, split=None, progress=True):
        data = self.recipe.data
        pairs, _ = read_split(
            data, split or data.val_split, self.data_dir, self.recipe.train.seed
        )
        return evaluate_model(model, pairs, self.info, self.recipe.eval, progress)
