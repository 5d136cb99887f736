"""The NMS swaps of the PANet file exports: TFLite's `SelectedNMS` and
ONNX's `CombinedNMS` keep what kseg's padded NMS keeps (SPEC's greedy NMS)."""

import numpy as np
import pytest
import tensorflow as tf

from kseg.export.instance_graph import CombinedNMS, SelectedNMS
from kseg.layers.nms import BatchedNMS


def _boxes_and_scores(seed, batch=2, count=60):
    rng = np.random.default_rng(seed)
    # Whole-pixel boxes on a coarse grid: many pairs overlap at an IoU of
    # exactly 0.5 (kept), and scores in steps of 1/8 tie often (the lower
    # index wins).
    corners = rng.integers(0, 10, (batch, count, 2)) * 10
    sizes = rng.choice([10, 20, 40], (batch, count, 2))
    boxes = np.concatenate([corners, corners + sizes], axis=-1).astype(np.float32)
    scores = rng.integers(1, 9, (batch, count)) / 8
    classes = rng.integers(1, 4, (batch, count))
    return boxes, scores.astype(np.float32), classes.astype(np.int32)


def _loop_nms(boxes, scores, classes, iou_threshold, score_threshold):
    """Greedy per-class NMS by a loop: SPEC's rules (stable order, IoU above
    the threshold suppresses)."""

    def iou(a, b):
        ih = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
        iw = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
        union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1])
        return ih * iw / (union - ih * iw)

    kept = []
    for i in sorted(range(len(scores)), key=lambda i: -scores[i]):
        if scores[i] > score_threshold and all(
            classes[i] != classes[k] or iou(boxes[i], boxes[k]) <= iou_threshold
            for k in kept
        ):
            kept.append(i)
    return kept


@pytest.mark.parametrize("nms", [SelectedNMS, CombinedNMS])
def test_swapped_nms_keeps_what_kseg_keeps(nms):
    layer = BatchedNMS(iou_threshold=0.5, max_detections=30, score_threshold=0.2)
    swapped = tf.function(lambda *inputs: layer(list(inputs)))
    counts = []
    for seed in range(3):
        inputs = _boxes_and_scores(seed, count=20 + 40 * seed)
        expected = layer(list(inputs))
        counts.extend(np.asarray(expected["num_detections"]))
        for image, count in enumerate(np.asarray(expected["num_detections"])):
            boxes, scores, classes = (x[image] for x in inputs)
            kept = _loop_nms(boxes, scores, classes, 0.5, 0.2)[:30]
            np.testing.assert_array_equal(expected["boxes"][image, :count], boxes[kept])
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


@pytest.mark.parametrize("nms", [SelectedNMS, CombinedNMS])
def test_a_new_panet_traces_without_loops(nms):
    # Its NMS layers are created when first called: the swap must still find
    # them, leaving no `while` loop for tf2onnx or TFLite to meet.
    import keras

    from kseg.backbones import build_resnet
    from kseg.export.instance_graph import instance_function, swapped_nms
    from kseg.models import PANet

    backbone = build_resnet((1, 1, 1, 1), (4, 4, 4, 4), input_shape=(64, 64, 3))
    model = PANet(
        backbone, 2, filters=8, fc_units=16, max_detections=4,
        rpn_pre_nms_top_k_test=40, rpn_post_nms_top_k_test=12,
    )  # fmt: skip
    keras.utils.set_random_seed(0)
    with swapped_nms(model, nms):
        graph = instance_function(model, batch_size=1).get_concrete_function().graph
    kinds = {op.type for op in graph.get_operations()}
    assert not {"While", "StatelessWhile"} & kinds, sorted(kinds)
