"""Keras callbacks of kseg's training runs."""

import json
import time

import keras
import numpy as np
import tensorflow as tf

from kseg.data import colorize


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
    step counter shows where training picked up.

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
        with open(self.path, "a") as file:
            file.write(json.dumps(record) + "\n")
