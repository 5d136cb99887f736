"""The recipe's schema: the registries of models, backbones, datasets and
settings, and the typed dataclasses of every section (`kseg.training.recipe`
reads, checks and writes them)."""

import dataclasses
import re
from typing import Any

from kseg.backbones import BACKBONES, build_resnet
from kseg.models import FCN, GCN, PAN, ExFuse, PANet, SegModel

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
        init_from: instance task: the weights the model starts from, copied
            by layer name and shape (`kseg.models.panet.transfer`): a
            `.keras` model (a `kseg convert torchvision` output, an earlier
            run's `model.keras` or checkpoint), an earlier kseg run
            directory (its `model.keras`), or torchvision's Mask R-CNN state
            dict (`.pth`, `.pt`, `.npz`, `.safetensors`). The class-specific
            layers of another class count stay fresh. `None`: random (or
            `backbone.weights`). A resumed run restores its backup instead.
        trainable_layers: instance task: what trains. An int 0..5 is
            torchvision's `trainable_backbone_layers` (that many backbone
            stages from the top train: res5, res4, res3, res2, stem),
            `"heads"` freezes the whole backbone (matterport), `"all"` trains
            it all; with any of them the backbone's batch norm is frozen.
            `None` (default): everything trains, batch norm included.
    """

    name: str = "pan"
    kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    init_from: str | None = None
    trainable_layers: Any = None


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
