"""The NMS swaps of the PANet file exports: TFLite's `SelectedNMS` and
ONNX's `CombinedNMS` keep what keras-hub's padded NMS keeps."""

import numpy as np
import pytest
import tensorflow as tf

from kseg.export.instance_graph import CombinedNMS, SelectedNMS
from kseg.layers.detection import BatchedNMS


def _boxes_and_scores(seed, batch=2, count=60):
    rng = np.random.default_rng(seed)
    corners = rng.uniform(0, 100, (batch, count, 2))
    sizes = rng.uniform(5, 40, (batch, count, 2))
    boxes = np.concatenate([corners, corners + sizes], axis=-1).astype(np.float32)
    # Distinct scores: ties may be broken either way.
    scores = rng.permutation(batch * count).reshape(batch, count) / (batch * count)
    classes = rng.integers(1, 4, (batch, count))
    return boxes, scores.astype(np.float32), classes.astype(np.int32)


@pytest.mark.parametrize("nms", [SelectedNMS, CombinedNMS])
def test_swapped_nms_keeps_what_keras_hub_keeps(nms):
    layer = BatchedNMS(iou_threshold=0.5, max_detections=30, score_threshold=0.2)
    swapped = tf.function(lambda *inputs: layer(list(inputs)))
    counts = []
    for seed in range(3):
        inputs = _boxes_and_scores(seed, count=20 + 40 * seed)
        expected = layer(list(inputs))
        counts.extend(np.asarray(expected["num_detections"]))
        # What `swapped_nms` does to each BatchedNMS of a model.
        original = vars(layer)["nms"]
        object.__setattr__(layer, "nms", nms(layer))
        try:
            actual = swapped(*inputs)
        finally:
            object.__setattr__(layer, "nms", original)
        for key in ("num_detections", "classes", "valid"):
            np.testing.assert_array_equal(actual[key], expected[key])
        for key in ("boxes", "scores"):
            np.testing.assert_allclose(actual[key], expected[key], atol=1e-4)
    # Both full and zero-padded outputs were compared.
    assert min(counts) < 30 and max(counts) == 30, counts
