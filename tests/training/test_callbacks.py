"""Callbacks: predicted-mask images in TensorBoard, the per-epoch JSON log."""

import json

import keras
import numpy as np
import pytest
import tensorflow as tf

from kseg.data import VOC_PALETTE
from kseg.training.callbacks import EpochSummary, PredictedMasks


def _model(num_classes=3):
    inputs = keras.Input((8, 8, 3))
    logits = keras.layers.Conv2D(num_classes, 1, name="logits_conv")(inputs)
    return keras.Model(inputs, {"logits": logits})


def test_predicted_masks_panels_and_summary(tmp_path):
    model = _model()
    model.compile(optimizer="sgd")
    images = np.random.default_rng(0).uniform(0, 255, (2, 8, 8, 3)).astype("float32")
    labels = np.zeros((2, 8, 8), "int32")
    labels[:, 0] = 255
    callback = PredictedMasks(images, labels, VOC_PALETTE[:3], tmp_path / "masks")
    callback.set_model(model)
    panels = callback.panels()
    assert panels.shape == (2, 8, 24, 3) and panels.dtype == np.uint8
    np.testing.assert_array_equal(panels[:, :, :8], np.round(images).astype("uint8"))
    # Ground truth: class 0 black, the ignored row in the boundary colour.
    np.testing.assert_array_equal(panels[:, 1:, 8:16], 0)
    np.testing.assert_array_equal(
        panels[:, 0, 8:16], np.broadcast_to([224, 224, 192], (2, 8, 3))
    )
    predicted = np.argmax(model.predict_on_batch(images)["logits"], axis=-1)
    np.testing.assert_array_equal(panels[:, :, 16:], VOC_PALETTE[predicted])

    callback.on_epoch_end(0)
    callback.on_train_end()
    (event_file,) = (tmp_path / "masks").iterdir()
    tags = [
        value.tag
        for record in tf.compat.v1.train.summary_iterator(str(event_file))
        for value in record.summary.value
    ]
    assert tags == ["predicted_masks"]


def test_predicted_masks_checks_shapes():
    with pytest.raises(ValueError, match="labels must have shape"):
        PredictedMasks(np.zeros((2, 8, 8, 3)), np.zeros((2, 4, 4)), VOC_PALETTE, "x")
    with pytest.raises(ValueError, match=r"images must have shape \(N, H, W, 3\)"):
        PredictedMasks(np.zeros((2, 8, 8)), np.zeros((2, 8)), VOC_PALETTE, "x")


def test_epoch_summary_appends_one_line_per_epoch(tmp_path):
    model = _model()
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss={"logits": "mse"})
    x = np.zeros((4, 8, 8, 3), "float32")
    y = {"logits": np.zeros((4, 8, 8, 3), "float32")}
    path = tmp_path / "epochs.jsonl"
    for _ in range(2):
        model.fit(
            x, y, batch_size=2, epochs=1, verbose=0, callbacks=[EpochSummary(path)]
        )
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4]
    assert all(r["learning_rate"] == pytest.approx(0.1) for r in records)
    assert all("loss" in r and r["seconds"] >= 0 for r in records)
