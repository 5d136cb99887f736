"""The one place that builds a `tf.distribute` strategy, and the helpers that
depend on which worker this process is."""

import contextlib
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
    # Private API: Keras <= 3.15 lists the sublayers built in `build` nowhere public.
    for layer in model._flatten_layers(include_self=False, recursive=True):
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.synchronized = bool(synchronized)
            count += 1
    return count


# Keras releases whose `model.fit` needs `multi_worker_fit`; raise the bound
# only after `test_multi_worker_training_on_two_local_workers` passes
# without the workaround on the newer release.
_MULTI_WORKER_FIT_BROKEN_BEFORE = (3, 16)


def is_multi_worker(strategy):
    """Whether `strategy` spans several worker processes, whose collective
    ops every worker must join in the same order."""
    # Private API: TF <= 2.21 has no public "spans several workers" query.
    return (
        isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)
        and strategy.extended._in_multi_worker_mode()
    )


def _local_batch(strategy, batch):
    """The first local replica's part of a distributed batch."""
    return tf.nest.map_structure(
        lambda value: strategy.experimental_local_results(value)[0], batch
    )


@contextlib.contextmanager
def multi_worker_fit(strategy):
    """Lets `model.fit` (and its validation) train under a multi-worker
    `MultiWorkerMirroredStrategy` on the Keras releases that cannot.

    Keras 3.15's TensorFlow trainer (`keras/src/backend/tensorflow/
    trainer.py`) fails there twice:

    - `TensorFlowTrainer._maybe_symbolic_build` calls
      `strategy.reduce("MEAN", batch, axis=None)` on the first distributed
      batch, only to learn its shapes; the collective reduce of
      `MultiWorkerMirroredStrategy` takes one tensor, not the nested
      `(images, {output: labels})` batch. Here the model is built from the
      first local replica's part of the batch, which has the same shapes.
    - `reduce_per_replica(..., reduction="auto")`, which reduces the logs
      of every train and test step, calls `strategy.reduce("MEAN", value,
      axis=0)` across workers, which fails on the scalar losses and metrics.
      Here it reduces with `axis=None` instead: the element-wise mean over
      all replicas of all workers, what `"mean"` means under
      `MirroredStrategy`. (`Model.distribute_reduction_method` would not
      help: the trainer does not read it.)

    So the logs of each step are the mean of the replicas' values, as under
    `MirroredStrategy`; the epoch logs Keras reads from the metric variables,
    which sum over the replicas of all workers (the mIoU of the summed
    confusion matrix).

    Outside multi-worker mode, and on Keras releases without the bugs, this
    changes nothing. The patch holds only while the context is open; the
    train and test functions traced inside it keep their reductions.

    Example:
    >>> with multi_worker_fit(model.distribute_strategy):
    ...     model.fit(dataset, epochs=2)

    Args:
        strategy: the `tf.distribute.Strategy` the model was built under.
    """
    version = tuple(int(part) for part in keras.version().split(".")[:2])
    if not is_multi_worker(strategy) or version >= _MULTI_WORKER_FIT_BROKEN_BEFORE:
        yield
        return
    # Private API: Keras < 3.16's trainer has no public hook for these reductions.
    from keras.src.backend.tensorflow import trainer as tf_trainer

    trainer_class = tf_trainer.TensorFlowTrainer
    reduce_per_replica = tf_trainer.reduce_per_replica
    maybe_symbolic_build = trainer_class._maybe_symbolic_build

    def reduce_across_workers(values, strategy, reduction):
        if reduction not in ("auto", "mean") or not is_multi_worker(strategy):
            return reduce_per_replica(values, strategy, reduction)
        return keras.tree.map_structure(
            lambda value: strategy.reduce("MEAN", value, axis=None), values
        )

    def build_from_local_batch(model, iterator=None, data_batch=None):
        strategy = model.distribute_strategy
        if (
            iterator is None
            or model._distribute_strategy is None
            or not is_multi_worker(strategy)
        ):
            return maybe_symbolic_build(model, iterator, data_batch)
        for _, _, batches in iterator:
            data_batch = _local_batch(strategy, next(batches))
            break
        with strategy.scope():
            model._symbolic_build(data_batch=data_batch)

    tf_trainer.reduce_per_replica = reduce_across_workers
    trainer_class._maybe_symbolic_build = build_from_local_batch
    try:
        yield
    finally:
        tf_trainer.reduce_per_replica = reduce_per_replica
        trainer_class._maybe_symbolic_build = maybe_symbolic_build
