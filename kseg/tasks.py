"""What a model predicts, for the code that dispatches on it (training,
evaluation, prediction, export). Imports nothing, so the `kseg` command can
ask before it loads TensorFlow.

- `"semantic"`: a class per pixel (`logits`); `kseg.models.Segmenter`.
- `"instance"`: boxes, classes and masks of instances;
  `kseg.models.InstanceSegmenter` and the runners of its exports.
"""

SEMANTIC = "semantic"
INSTANCE = "instance"
TASKS = (SEMANTIC, INSTANCE)


def is_instance_model(model):
    """Whether `model` detects instances: an `InstanceSegmenter`, or an
    exported one run by kseg (each says so with its `task`)."""
    return getattr(model, "task", None) == INSTANCE
