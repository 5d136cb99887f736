"""The one place that builds a `tf.distribute` strategy, and the helpers that
depend on which worker this process is."""

import json
import os

import keras
import tensorflow as tf

STRATEGIES = ("one_device", "mirrored", "multi_worker")


def build_strategy(name):
    """Builds the `tf.distribute` strategy a recipe's `train.strategy` names.

    - `"one_device"`: `OneDeviceStrategy` on the first GPU, or the CPU.
    - `"mirrored"`: `MirroredStrategy` over all local GPUs; without a GPU,
      over all logical CPU devices (configure several with
      `tf.config.set_logical_device_configuration` before TensorFlow starts,
      e.g. to test two replicas on one CPU).
    - `"multi_worker"`: `MultiWorkerMirroredStrategy` on the cluster that the
      `TF_CONFIG` environment variable describes. Build it before any other
      TensorFlow op runs.

    The batch size a `tf.data` pipeline yields is the global batch;
    `model.fit` splits it over `strategy.num_replicas_in_sync` replicas.

    Args:
        name: str. One of `STRATEGIES`.

    Returns:
        A `tf.distribute.Strategy`.
    """
    if name not in STRATEGIES:
        raise ValueError(
            f"Unknown strategy {name!r}; expected one of {', '.join(STRATEGIES)}"
        )
    if name == "multi_worker":
        if not os.environ.get("TF_CONFIG"):
            raise ValueError(
                "strategy 'multi_worker' reads the cluster from the TF_CONFIG "
                "environment variable, which is not set"
            )
        return tf.distribute.MultiWorkerMirroredStrategy()
    gpus = tf.config.list_logical_devices("GPU")
    if name == "one_device":
        return tf.distribute.OneDeviceStrategy(gpus[0].name if gpus else "/cpu:0")
    devices = gpus or tf.config.list_logical_devices("CPU")
    return tf.distribute.MirroredStrategy([device.name for device in devices])


def worker_index():
    """This process's index among the workers: 0 for the chief (and for a
    single-process run), `i + 1` for worker `i` of a cluster with a chief."""
    config = json.loads(os.environ.get("TF_CONFIG") or "{}")
    task = config.get("task", {})
    cluster = config.get("cluster", {})
    kind, index = task.get("type"), int(task.get("index", 0))
    if kind in (None, "chief"):
        return 0
    if kind == "worker":
        return index + (1 if "chief" in cluster else 0)
    raise ValueError(f"TF_CONFIG task type {kind!r} does not train; expected worker")


def is_chief():
    """Whether this process writes the run's results (logs, checkpoints,
    model): the single process, the `chief` task, or worker 0 of a cluster
    without one."""
    return worker_index() == 0


def set_synchronized_batch_norm(model, synchronized):
    """Sets `synchronized` on every `BatchNormalization` layer of `model`.

    Synchronized BN (PANet's "MBN") computes batch statistics over all
    replicas. It is a training-time setting: clear it before saving so the
    saved model also loads on backends without `tf.distribute`. Call it
    before the model is traced.

    Returns:
        The number of layers changed.
    """
    count = 0
    # `_flatten_layers` also reaches the sublayers that custom layers (such as
    # `ConvBNReLU`) create in `build`, which `model.layers` does not list.
    for layer in model._flatten_layers(include_self=False, recursive=True):
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.synchronized = bool(synchronized)
            count += 1
    return count
