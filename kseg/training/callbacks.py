"""Keras callbacks of kseg's training runs."""

import json
import math
import re
import time
from pathlib import Path
from typing import NamedTuple

import keras
import numpy as np
import tensorflow as tf

from kseg.data import colorize
from kseg.files import (
    append_text,
    atomic_path,
    make_folder,
    refuse_link,
    write_json,
    write_text,
)


class PredictedMasks(keras.callbacks.Callback):
    """Writes predicted masks of fixed validation images to TensorBoard.

    After every `every`-th epoch, each image is written as one panel of
    three side by side: the input, the ground truth and the prediction
    (argmax of the `"logits"` output), both coloured with `palette` (ignored
    pixels in the VOC boundary colour). The images are chosen once, so the
    panels show how the same predictions improve.

    Example:
    >>> callback = PredictedMasks(images, labels, palette, "runs/x/logs/masks")
    >>> model.fit(train, epochs=10, callbacks=[callback])

    Args:
        images: float32 array `(N, H, W, 3)`, RGB in 0–255, as the model
            takes them.
        labels: int array `(N, H, W)` of class indices or the ignore label.
        palette: uint8 array `(num_classes, 3)`.
        log_dir: str. TensorBoard log directory of the images.
        every: int. Epoch interval. Defaults to `1`.
        output: str. Model output holding the logits. Defaults to `"logits"`.
    """

    def __init__(self, images, labels, palette, log_dir, every=1, output="logits"):
        super().__init__()
        self.images = np.asarray(images, dtype="float32")
        self.labels = np.asarray(labels)
        if self.images.ndim != 4 or self.images.shape[-1] != 3:
            raise ValueError(
                f"images must have shape (N, H, W, 3), got {self.images.shape}"
            )
        if self.labels.shape != self.images.shape[:3]:
            raise ValueError(
                f"labels must have shape {self.images.shape[:3]}, got "
                f"{self.labels.shape}"
            )
        if every < 1:
            raise ValueError(f"every must be a positive int, got {every}")
        self.palette = np.asarray(palette, dtype="uint8")
        self.log_dir = str(log_dir)
        self.every = int(every)
        self.output = output
        self._writer = None

    def panels(self):
        """uint8 `(N, H, 3·W, 3)`: image | ground truth | prediction."""
        # A plain call, not `predict_on_batch`: under a multi-worker strategy
        # that gathers the outputs with a collective op which only the chief
        # (the one worker that logs) would join.
        outputs = self.model(self.images, training=False)
        logits = outputs[self.output] if isinstance(outputs, dict) else outputs
        predictions = np.argmax(np.asarray(logits), axis=-1)
        image = np.clip(np.round(self.images), 0, 255).astype("uint8")
        truth = colorize(self.labels, self.palette)
        predicted = colorize(predictions, self.palette)
        return np.concatenate([image, truth, predicted], axis=2)

    def on_epoch_end(self, epoch, logs=None):
        if (epoch + 1) % self.every:
            return
        if self._writer is None:
            self._writer = tf.summary.create_file_writer(self.log_dir)
        with self._writer.as_default():
            tf.summary.image(
                "predicted_masks",
                self.panels(),
                step=epoch + 1,
                max_outputs=len(self.images),
                description="image | ground truth | prediction",
            )
        self._writer.flush()

    def on_train_end(self, logs=None):
        if self._writer is not None:
            self._writer.close()
            self._writer = None


class EpochSummary(keras.callbacks.Callback):
    """Appends one JSON line per epoch to a file: the epoch, the optimizer
    step, the learning rate, the wall time and the epoch's logs.

    The file is opened in append mode, so a resumed run continues it and the
    step counter shows where training picked up; a symbolic link in its
    place is refused, never written through.

    Args:
        path: str. The JSON-lines file.
    """

    def __init__(self, path):
        super().__init__()
        self.path = str(path)
        self._start = None

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        optimizer = self.model.optimizer
        record = {
            "epoch": epoch + 1,
            "step": int(optimizer.iterations.numpy()),
            "learning_rate": float(optimizer.learning_rate),
            "seconds": round(time.perf_counter() - self._start, 3),
            **{key: float(value) for key, value in (logs or {}).items()},
        }
        append_text(self.path, json.dumps(record) + "\n")

    @staticmethod
    def _records(path):
        """`[(epoch, line)]` of an epochs file's whole lines."""
        records = []
        for line in Path(path).read_text().splitlines():
            try:
                epoch = json.loads(line)["epoch"]
            except (ValueError, KeyError, TypeError):
                continue  # a line cut off by a kill
            if isinstance(epoch, int):
                records.append((epoch, line))
        return records

    @staticmethod
    def completed_epochs(path):
        """The last epoch an epochs file records (0 when it has none or
        does not exist)."""
        refuse_link(path)
        if not Path(path).exists():
            return 0
        return max((epoch for epoch, _ in EpochSummary._records(path)), default=0)

    @staticmethod
    def truncate(path, epochs):
        """Keeps the lines of the first `epochs` epochs of an epochs file (a
        resumed run drops those of the epochs it trains again)."""
        path = Path(path)
        refuse_link(path)
        if not path.exists():
            return
        kept = [line for epoch, line in EpochSummary._records(path) if epoch <= epochs]
        write_text(path, "".join(f"{line}\n" for line in kept))


class Checkpoint(keras.callbacks.Callback):
    """Saves the model as a `.keras` file at the end of each epoch, written
    under a temporary name and renamed into place (a kill never leaves a
    damaged checkpoint).

    Args:
        path: the `.keras` file.
        monitor: optional validation log to maximise/minimise: the model is
            saved only when it improves on `best` (epochs without that log,
            e.g. without validation, are skipped). `None` saves every epoch.
        mode: `"max"` or `"min"`. Defaults to `"max"`.

    Attributes:
        best: the best monitored value so far (`None` before the first); a
            resumed run sets it from its backup.
    """

    def __init__(self, path, monitor=None, mode="max"):
        super().__init__()
        if mode not in ("max", "min"):
            raise ValueError(f"mode must be 'max' or 'min', got {mode!r}")
        self.path = Path(path)
        self.monitor = monitor
        self.mode = mode
        self.best = None

    def _improves(self, value):
        if self.best is None:
            return True
        return value > self.best if self.mode == "max" else value < self.best

    def on_epoch_end(self, epoch, logs=None):
        if self.monitor is not None:
            value = (logs or {}).get(self.monitor)
            if value is None or not self._improves(float(value)):
                return
            self.best = float(value)
        make_folder(self.path.parent)
        with atomic_path(self.path) as tmp:
            self.model.save(tmp)


class NonFiniteLossError(ValueError):
    """The training loss became NaN or infinite in epoch `epoch` (from 1)."""

    def __init__(self, message, epoch):
        super().__init__(message)
        self.epoch = epoch


class StopOnNonFiniteLoss(keras.callbacks.Callback):
    """Stops training with `NonFiniteLossError` at the first batch whose loss
    is NaN or infinite.

    Keras' `TerminateOnNaN` stops only after the epoch ends, so the epoch's
    checkpoints and backup would save the diverged weights; raising in the
    batch leaves the last complete epoch's files the newest.
    """

    def __init__(self):
        super().__init__()
        self._epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is None or math.isfinite(float(loss)):
            return
        step = int(self.model.optimizer.iterations.numpy())
        raise NonFiniteLossError(
            f"the training loss became {float(loss)} in epoch {self._epoch + 1} "
            f"(step {step}); training stopped",
            epoch=self._epoch + 1,
        )


class BackupState(NamedTuple):
    """A backup `RunBackup.restore` loaded: the epochs completed, the
    optimizer step, the best monitored value, the weights file, and the
    messages about damaged newer backups it passed over."""

    epoch: int
    step: int
    best: float | None
    path: Path
    messages: list


class RunBackup(keras.callbacks.Callback):
    """Backs up the training state at the end of every epoch, so a killed
    run continues from its last completed epoch.

    Each epoch `k` writes `epoch-k.weights.h5` (model weights with the
    optimizer state, `model.save_weights`) and then `epoch-k.json` (epoch,
    step, the best value of `best_checkpoint`), each under a temporary name
    renamed into place; the JSON file, written last, marks the backup
    complete. The two newest complete backups are kept (older ones are
    deleted once a new one is complete), so a damaged newest backup falls
    back to the one before.

    Args:
        directory: the backup folder.
        best_checkpoint: optional `Checkpoint` whose `best` is saved too.
    """

    def __init__(self, directory, best_checkpoint=None):
        super().__init__()
        self.directory = Path(directory)
        self.best_checkpoint = best_checkpoint

    def _complete(self):
        """`[(epoch, json path)]` of the complete backups, newest first."""
        found = []
        for path in self.directory.glob("epoch-*.json"):
            match = re.fullmatch(r"epoch-(\d+)\.json", path.name)
            if match:
                found.append((int(match.group(1)), path))
        return sorted(found, reverse=True)

    def exists(self):
        """Whether any complete backup is present (loadable or not)."""
        return bool(self._complete())

    def on_train_begin(self, logs=None):
        # The folder exists from the start: a run whose epochs file records
        # an epoch and that has no backup folder lost it (see the trainer's
        # resume).
        make_folder(self.directory)

    def on_epoch_end(self, epoch, logs=None):
        make_folder(self.directory)
        name = f"epoch-{epoch + 1:04d}"
        weights = self.directory / f"{name}.weights.h5"
        with atomic_path(weights) as tmp:
            self.model.save_weights(tmp)
        best = None if self.best_checkpoint is None else self.best_checkpoint.best
        write_json(
            self.directory / f"{name}.json",
            {
                "epoch": epoch + 1,
                "step": int(self.model.optimizer.iterations.numpy()),
                "best": best,
                "weights": weights.name,
            },
        )
        # Two complete backups are kept: the newest and, should it turn out
        # damaged (a disk that lost the last write), the one before.
        for older, path in self._complete()[2:]:
            path.unlink(missing_ok=True)
            (self.directory / f"epoch-{older:04d}.weights.h5").unlink(missing_ok=True)

    def restore(self, model):
        """Loads the newest backup that loads into `model` (built and
        compiled; its optimizer is built here) and returns its
        `BackupState`, or `None` when no backup loads."""
        messages = []
        optimizer = model.optimizer
        if optimizer is not None and not optimizer.built:
            optimizer.build(model.trainable_variables)
        for _, path in self._complete():
            try:
                state = json.loads(path.read_text())
                weights = self.directory / state["weights"]
                model.load_weights(weights)
            except (OSError, ValueError, KeyError, TypeError) as error:
                reason = str(error).splitlines()[0] if str(error) else type(error)
                messages.append(
                    f"backup {path.name} is damaged ({reason}); trying the one "
                    "before it"
                )
                continue
            return BackupState(
                int(state["epoch"]),
                int(state["step"]),
                state.get("best"),
                weights,
                messages,
            )
        for message in messages:
            print(message, flush=True)
        return None
