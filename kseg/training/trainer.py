"""Training and evaluation of a recipe: data → model → compile → fit → evaluate.

`train(recipe)` runs one recipe end to end through `model.fit` and leaves
everything in a new run directory `runs/<recipe name>/<timestamp>/`:

    recipe.yaml          the full recipe, every field written out
    epochs.jsonl         one line per epoch: step, learning rate, losses, mIoU
    logs/                TensorBoard: loss, mIoU, learning rate; masks/ images
    backup/              `BackupAndRestore` state while training runs
    checkpoints/         last.keras (every epoch), best.keras (best val mIoU)
    model.keras          the trained model
    evaluation.txt       the per-class IoU table of the final evaluation
    result.json          mIoU, pixel accuracy, per-class IoU, steps, times

A run directory is never reused: a new run claims a fresh directory, and a
crashed run continues only when asked, with `train(resume=run_dir)`.
"""

import dataclasses
import datetime
import json
import time
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from kseg.backbones import prepend_normalization
from kseg.data import (
    ADE20K_CLASSES,
    ADE20K_PALETTE,
    CITYSCAPES_CLASSES,
    CITYSCAPES_PALETTE,
    IMAGENET_MEAN,
    SYNTHETIC_CLASSES,
    SYNTHETIC_PALETTE,
    VOC_CLASSES,
    VOC_PALETTE,
    augment_dataset,
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
from kseg.models import load_model
from kseg.training.callbacks import EpochSummary, PredictedMasks
from kseg.training.losses import segmentation_losses
from kseg.training.metrics import (
    SegmentationConfusionMatrix,
    SegmentationMeanIoU,
    format_iou_table,
)
from kseg.training.optimizers import L2DecaySGD
from kseg.training.recipe import (
    BACKBONE_BUILDERS,
    MODELS,
    RecipeError,
    load_recipe,
    save_recipe,
)
from kseg.training.schedules import PolyWarmup
from kseg.training.strategy import (
    build_strategy,
    is_chief,
    multi_worker_fit,
    set_synchronized_batch_norm,
    worker_index,
)

# Per-channel standard deviation of ImageNet RGB in 0–255, the usual partner
# of `kseg.data.IMAGENET_MEAN` (torchvision's normalization).
IMAGENET_STD = (58.395, 57.12, 57.375)

RECIPE_FILE = "recipe.yaml"
MODEL_FILE = "model.keras"


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


@dataclasses.dataclass
class TrainResult:
    """What `train` leaves behind."""

    run_dir: Path
    model_path: Path
    evaluation: Evaluation
    steps: int
    history: dict


# === Data ===


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
    if data.format == "tfrecord":
        prefix = root / split
        records = read_tfrecord(str(prefix))
        files = sorted(tf.io.gfile.glob(f"{prefix}-?????-of-?????")) or sorted(
            tf.io.gfile.glob(str(prefix))
        )
        length = sum(1 for _ in tf.data.TFRecordDataset(files))
        return records, length
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
    return dataset.as_dataset(), len(dataset)


def read_kseg_dataset(data, split, data_dir=None, seed=0):
    """The kseg dataset object (`SegmentationDataset` or the synthetic arrays)
    of one split, as `kseg data convert` / `inspect` consume it."""
    if data.dataset == "synthetic":
        size = data.num_train_images if split == "train" else data.num_val_images
        return make_synthetic(split, size, data.image_size, seed)
    root = _require_root(data, data_dir)
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


# === Model ===


def with_input_normalization(backbone):
    """`backbone` taking RGB images in 0–255 (`kseg.data.preprocess_images`).

    A `Normalization` layer `imagenet_normalization` with the ImageNet mean
    and standard deviation becomes the encoder's first layer
    (`kseg.backbones.prepend_normalization`): inside the model, so a saved
    model needs no separate preprocessing, and inside the encoder, so
    `model.backbone` stays the encoder `kseg.backbones` built (same name,
    layers and weights; ExFuse's `load_semantic_supervision_weights` and
    encoder weight files load into it).
    """
    return prepend_normalization(
        backbone, IMAGENET_MEAN, IMAGENET_STD, name="imagenet_normalization"
    )


def build_model(recipe, num_classes):
    """Builds the recipe's backbone and model (`MODELS[recipe.model.name]`)."""
    backbone = BACKBONE_BUILDERS[recipe.backbone.name](**recipe.backbone.kwargs)
    if recipe.backbone.weights is not None:
        backbone.load_weights(recipe.backbone.weights)
    model_class = MODELS[recipe.model.name]
    return model_class(
        with_input_normalization(backbone), num_classes, **recipe.model.kwargs
    )


def output_names(model):
    """Names of a kseg model's outputs (its output dict's keys)."""
    outputs = model.output
    if not isinstance(outputs, dict) or "logits" not in outputs:
        raise ValueError(
            "a kseg model returns a dict with a 'logits' entry, got "
            f"{type(outputs).__name__}"
        )
    return list(outputs)


def build_optimizer(recipe, total_steps):
    """The recipe's optimizer with its `PolyWarmup` schedule over
    `total_steps`.

    The warm-up is capped at `total_steps − 1` steps, so that a short trial
    of a recipe (`--set train.epochs=1`) keeps its schedule valid.
    """
    schedule = PolyWarmup(
        recipe.optimizer.learning_rate,
        decay_steps=total_steps,
        power=recipe.schedule.power,
        end_learning_rate=recipe.schedule.end_learning_rate,
        warmup_steps=min(recipe.schedule.warmup_steps, total_steps - 1),
        warmup_start_factor=recipe.schedule.warmup_start_factor,
    )
    optimizer = recipe.optimizer
    weight_decay = optimizer.weight_decay or None
    if optimizer.name == "sgd":
        return L2DecaySGD(
            schedule,
            momentum=optimizer.momentum,
            nesterov=optimizer.nesterov,
            weight_decay=weight_decay,
            global_clipnorm=optimizer.global_clipnorm,
        )
    return keras.optimizers.AdamW(
        schedule,
        weight_decay=optimizer.weight_decay,
        global_clipnorm=optimizer.global_clipnorm,
    )


def compile_model(model, recipe, num_classes, total_steps):
    """Compiles `model` with the recipe's loss, optimizer and mIoU metric.

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


# === Evaluation ===


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
        bar = keras.utils.Progbar(
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


# === Runs ===


def new_run_dir(runs_dir, name):
    """Claims a fresh `runs_dir/name/<YYYYmmdd-HHMMSS>[-k]/` directory.

    `mkdir` without `exist_ok` is the claim, so two runs started in the same
    second get different directories and no run ever reuses another's.
    """
    parent = Path(runs_dir) / name
    parent.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    for index in range(1, 1000):
        candidate = parent / (stamp if index == 1 else f"{stamp}-{index}")
        try:
            candidate.mkdir()
        except FileExistsError:
            continue
        return candidate
    raise RuntimeError(f"could not claim a run directory under {parent}")


def _claim_run_dir(recipe, runs_dir, run_dir):
    """The directory this process writes: a new run, claimed by writing the
    recipe file exclusively (never overwriting an earlier run's)."""
    if run_dir is None:
        path = new_run_dir(runs_dir, recipe.name)
    else:
        path = Path(run_dir)
        path.mkdir(parents=True, exist_ok=True)
    index = worker_index()
    if index:
        # Non-chief workers of a cluster keep their own files apart.
        path = path / f"worker-{index}"
        path.mkdir(parents=True, exist_ok=True)
    try:
        save_recipe(recipe, path / RECIPE_FILE)
    except FileExistsError:
        raise FileExistsError(
            f"{path} already holds a run ({RECIPE_FILE} exists); runs are never "
            f"overwritten: continue it with --resume {path}, or start a new one"
        ) from None
    return path


def _resumed_run_dir(resume):
    path = Path(resume)
    index = worker_index()
    if index:
        path = path / f"worker-{index}"
    if not (path / RECIPE_FILE).is_file():
        raise FileNotFoundError(
            f"cannot resume {path}: it holds no {RECIPE_FILE}, so it is not a "
            "kseg run directory"
        )
    if (path / MODEL_FILE).exists():
        raise FileExistsError(
            f"cannot resume {path}: the run already finished ({MODEL_FILE} exists)"
        )
    return path


def _sample_batch(pairs, evaluation, count):
    """The first `count` validation images and labels, as NumPy arrays."""
    images, labels = [], []
    for image, label in eval_pipeline(pairs, evaluation).unbatch().take(count):
        images.append(image.numpy())
        labels.append(label.numpy())
    return np.stack(images), np.stack(labels)


def _print(*args):
    print(*args, flush=True)


def train(
    recipe,
    data_dir=None,
    runs_dir="runs",
    run_dir=None,
    resume=None,
    callbacks=(),
    verbose="auto",
):
    """Trains a recipe with `model.fit`, evaluates it and saves the model.

    Args:
        recipe: `Recipe`, or a recipe name or path. Ignored with `resume`,
            which uses the run's saved recipe.
        data_dir: optional dataset directory overriding `data.root`.
        runs_dir: str. Parent of the new run directory. Defaults to `"runs"`.
        run_dir: optional explicit directory of a new run (every worker of a
            multi-worker run must get the same one); it must not already
            hold a run.
        resume: optional run directory of an interrupted run to continue
            from its last backup (the end of its last completed epoch).
        callbacks: extra Keras callbacks.
        verbose: `model.fit` verbosity. Defaults to `"auto"`.

    Returns:
        `TrainResult`.
    """
    clock = (time.perf_counter(), time.process_time())
    if resume is not None:
        path = _resumed_run_dir(resume)
        recipe = load_recipe(path / RECIPE_FILE)
    elif not hasattr(recipe, "train"):
        recipe = load_recipe(recipe)
    # A multi-worker strategy must exist before any other TensorFlow op.
    strategy = build_strategy(recipe.train.strategy)
    if resume is None:
        path = _claim_run_dir(recipe, runs_dir, run_dir)
    policy = keras.config.dtype_policy()
    keras.config.set_dtype_policy(recipe.train.dtype_policy)
    try:
        return _fit_and_evaluate(
            recipe, strategy, path, data_dir, callbacks, verbose, clock
        )
    finally:
        keras.config.set_dtype_policy(policy)


def _fit_and_evaluate(
    recipe, strategy, path, data_dir, extra_callbacks, verbose, clock
):
    """`train` once the run directory, strategy and dtype policy are set;
    `clock` is the `(wall, CPU)` time the run started at."""
    started, cpu_started = clock
    chief = is_chief()
    train_config, data = recipe.train, recipe.data
    keras.utils.set_random_seed(train_config.seed)
    replicas = strategy.num_replicas_in_sync
    if train_config.batch_size % replicas:
        raise RecipeError(
            f"train.batch_size: the global batch {train_config.batch_size} does "
            f"not split evenly over {replicas} replicas"
        )
    info = dataset_info(data)
    train_pairs, num_train = read_split(
        data, data.train_split, data_dir, train_config.seed
    )
    val_pairs, num_val = read_split(data, data.val_split, data_dir, train_config.seed)
    steps = train_config.steps_per_epoch or num_train // train_config.batch_size
    if steps < 1:
        raise RecipeError(
            f"train.batch_size: {num_train} training images make no batch of "
            f"{train_config.batch_size}; lower it or set train.steps_per_epoch"
        )
    total_steps = steps * train_config.epochs
    _print(
        f"run {path}\n"
        f"{recipe.name}: {recipe.model.name} on {recipe.backbone.name}, "
        f"{info.name} ({num_train} train / {num_val} val images, "
        f"{info.num_classes} classes); {train_config.epochs} epochs × {steps} "
        f"steps, global batch {train_config.batch_size} = {replicas} "
        f"replica(s) × {train_config.batch_size // replicas}"
    )

    with strategy.scope():
        model = build_model(recipe, info.num_classes)
        if train_config.synchronized_bn:
            set_synchronized_batch_norm(model, True)
        compile_model(model, recipe, info.num_classes, total_steps)
    outputs = output_names(model)
    train_batches = train_pipeline(
        train_pairs, data, train_config.batch_size, outputs, train_config.seed
    )
    val_batches = eval_pipeline(val_pairs, recipe.eval, outputs)

    logs = path / "logs"
    checkpoints = path / "checkpoints"
    callbacks = [
        keras.callbacks.BackupAndRestore(str(path / "backup")),
        keras.callbacks.ModelCheckpoint(str(checkpoints / "last.keras")),
        keras.callbacks.ModelCheckpoint(
            str(checkpoints / "best.keras"),
            monitor="val_mean_iou",
            mode="max",
            save_best_only=True,
        ),
        keras.callbacks.TensorBoard(str(logs), write_graph=False, profile_batch=0),
        EpochSummary(path / "epochs.jsonl"),
    ]
    if train_config.log_images and chief:
        images, labels = _sample_batch(val_pairs, recipe.eval, train_config.log_images)
        callbacks.append(
            PredictedMasks(
                images,
                labels,
                info.palette,
                logs / "masks",
                every=train_config.validation_freq,
            )
        )
    callbacks.extend(extra_callbacks)

    with multi_worker_fit(strategy):
        history = model.fit(
            train_batches,
            epochs=train_config.epochs,
            steps_per_epoch=steps,
            validation_data=val_batches,
            validation_freq=train_config.validation_freq,
            callbacks=callbacks,
            # The pipeline shuffles; Keras cannot shuffle a tf.data.Dataset.
            shuffle=False,
            verbose=verbose,
        )
    steps_done = int(model.optimizer.iterations.numpy())
    train_seconds = time.perf_counter() - started

    # The saved model must load on any backend; synchronized BN is TF-only.
    set_synchronized_batch_norm(model, False)
    model_path = path / MODEL_FILE
    model.save(model_path)

    _print("evaluating on", data.val_split)
    evaluation = evaluate_model(
        model, val_pairs, info, recipe.eval, progress=verbose != 0
    )
    table = evaluation.table()
    (path / "evaluation.txt").write_text(table + "\n")
    seconds = time.perf_counter() - started
    result = {
        "recipe": recipe.name,
        "mean_iou": evaluation.mean_iou,
        "pixel_accuracy": evaluation.pixel_accuracy,
        "per_class_iou": {
            name: None if np.isnan(iou) else float(iou)
            for name, iou in zip(
                info.class_names, evaluation.per_class_iou, strict=True
            )
        },
        "steps": steps_done,
        "train_seconds": round(train_seconds, 2),
        "wall_seconds": round(seconds, 2),
        "cpu_seconds": round(time.process_time() - cpu_started, 2),
        "chief": chief,
    }
    (path / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    _print(
        f"\n{table}\n\nmean IoU {100.0 * evaluation.mean_iou:.2f}% after "
        f"{steps_done} steps in {seconds:.0f} s (wall); model saved to {model_path}"
    )
    return TrainResult(
        run_dir=path,
        model_path=model_path,
        evaluation=evaluation,
        steps=steps_done,
        history=history.history,
    )


def evaluate(model, recipe, data_dir=None, split=None, progress=True):
    """Evaluates a model (object or `.keras` path) on a recipe's validation
    split (or `split`), with the recipe's `eval` settings.

    Returns:
        `Evaluation`.
    """
    if not hasattr(recipe, "train"):
        recipe = load_recipe(recipe)
    if not isinstance(model, keras.Model):
        model = load_model(model)
    info = dataset_info(recipe.data)
    pairs, _ = read_split(
        recipe.data, split or recipe.data.val_split, data_dir, recipe.train.seed
    )
    return evaluate_model(model, pairs, info, recipe.eval, progress=progress)
