"""What a training run asks of a task, and the model building both tasks share.

`kseg.training.trainer` runs any recipe the same way — run directory,
strategy, optimizer, `model.fit`, checkpoints, crash recovery, the final
evaluation — and asks the recipe's task (`recipe.task`) for everything that
depends on what is predicted: `SemanticTask` (`kseg.training.semantic`) and
`InstanceTask` (`kseg.training.instance`). A task is a plain class, looked
up in `task_for` (no registry, no import side effects).
"""

from kseg.backbones import prepend_normalization
from kseg.data import IMAGENET_MEAN
from kseg.training.recipe import BACKBONE_BUILDERS, MODELS

# Per-channel standard deviation of ImageNet RGB in 0–255, the usual partner
# of `kseg.data.IMAGENET_MEAN` (torchvision's normalization).
IMAGENET_STD = (58.395, 57.12, 57.375)


class Task:
    """The per-task part of a training run.

    A task is made from a recipe (and an optional dataset folder overriding
    `data.root`); the trainer calls, in order: `prepare` (read and check the
    data, before any run directory exists), `build_model` and `compile`
    (under the strategy's scope), `train_dataset`, `val_dataset` and
    `callbacks` (for `model.fit`), and `evaluate` (after training, and for
    `kseg evaluate`).

    Attributes:
        monitor: the validation log `best.keras` maximises.
        initialise: whether `build_model` starts from `model.init_from`; the
            trainer sets it `False` when a resumed run's own weights (its
            backup, its `model.keras`) replace them.
    """

    monitor = None
    initialise = True

    def __init__(self, recipe, data_dir=None):
        self.recipe = recipe
        self.data_dir = data_dir
        self.num_train = None

    def prepare(self):
        """Reads the splits and checks the data; returns a one-line
        description (dataset, image and class counts). Sets `num_train`."""
        raise NotImplementedError

    def build_model(self):
        """The recipe's model, uncompiled."""
        raise NotImplementedError

    def compile(self, model, total_steps):
        """Compiles `model` with the recipe's optimizer over `total_steps`
        (`kseg.training.optimizers.build_optimizer`) and the task's losses
        and metrics."""
        raise NotImplementedError

    def train_dataset(self, model):
        """The infinite training `tf.data.Dataset` for `model.fit`."""
        raise NotImplementedError

    def val_dataset(self, model):
        """The validation `tf.data.Dataset` for `model.fit`, or `None`."""
        raise NotImplementedError

    def callbacks(self, run_dir, chief):
        """Extra Keras callbacks of a run (e.g. TensorBoard images)."""
        return []

    def evaluate(self, model, split=None, progress=True):
        """Evaluates `model` on `split` (default: the validation split);
        returns a result with `table()`, `summary()` and `as_json()`."""
        raise NotImplementedError


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
