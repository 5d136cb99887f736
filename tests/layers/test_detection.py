"""The PANet system's detection layers against slow NumPy references written
from SPEC ("The PANet system"), not from kseg."""

import itertools
import math

import keras
import numpy as np
import pytest

from kseg.layers.boxes import decode_boxes, encode_boxes, pairwise_iou
from kseg.layers.detection import (
    AnchorGenerator,
    DetectionLayer,
    FeaturePyramid,
    ProposalLayer,
    RPNHead,
)
from kseg.layers.heads import BoxHead, FullyConnectedFusionMaskHead, MaskHead
from kseg.layers.nms import BatchedNMS
from kseg.layers.panet import RoIAlign
from kseg.layers.roi_align import PyramidLevelSelect, PyramidRoIAlign
from kseg.testing import TestCase, input_gradients


def _np(x):
    return np.asarray(keras.ops.convert_to_numpy(x), dtype="float64")


def _randomize(layer, seed, scale=0.5):
    rng = np.random.default_rng(seed)
    for weight in layer.weights:
        if "moving_variance" in weight.path:
            continue
        weight.assign(rng.normal(scale=scale, size=weight.shape).astype("float32"))


def conv2d_same(x, kernel, bias):
    """Stride-1 "same" convolution, one kernel offset at a time."""
    n, h, w, _ = x.shape
    kh, kw, _, filters = kernel.shape
    xp = np.pad(x, ((0, 0), (kh // 2, kh // 2), (kw // 2, kw // 2), (0, 0)))
    out = np.zeros((n, h, w, filters)) + bias
    for a in range(kh):
        for b in range(kw):
            out += np.einsum("nhwc,co->nhwo", xp[:, a : a + h, b : b + w], kernel[a, b])
    return out


def np_iou(a, b):
    """IoU of two `[y1, x1, y2, x2]` boxes (0 for empty unions)."""
    ih = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iw = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ih * iw
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def np_nms(boxes, scores, classes, iou_threshold, max_out, score_threshold):
    """Greedy per-class NMS with a loop (SPEC, torchvision): by decreasing
    score, the lower index first on ties (a stable sort); a box is dropped
    when its IoU with a kept box of its class is greater than the threshold.
    Returns kept indices, best first."""
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    kept = []
    for i in order:
        if scores[i] <= score_threshold:
            continue
        if all(
            classes[i] != classes[k] or np_iou(boxes[i], boxes[k]) <= iou_threshold
            for k in kept
        ):
            kept.append(i)
        if len(kept) == max_out:
            break
    return kept


CLIP = math.log(1000 / 16)


def np_decode(delta, ref, weights, clip=CLIP):
    h, w = ref[2] - ref[0], ref[3] - ref[1]
    cy, cx = ref[0] + 0.5 * h, ref[1] + 0.5 * w
    dy, dx = delta[0] / weights[0], delta[1] / weights[1]
    dh = min(delta[2] / weights[2], clip)
    dw = min(delta[3] / weights[3], clip)
    ph, pw = h * math.exp(dh), w * math.exp(dw)
    py, px = cy + dy * h, cx + dx * w
    return [py - ph / 2, px - pw / 2, py + ph / 2, px + pw / 2]


def random_boxes(rng, n, size=64.0, min_side=2.0):
    y1 = rng.uniform(0, size - min_side, n)
    x1 = rng.uniform(0, size - min_side, n)
    h = rng.uniform(min_side, size / 2, n)
    w = rng.uniform(min_side, size / 2, n)
    return np.stack([y1, x1, np.minimum(y1 + h, size), np.minimum(x1 + w, size)], 1)


class BoxCodingTest(TestCase):
    def test_encode_matches_formula(self):
        rng = np.random.default_rng(0)
        boxes, refs = random_boxes(rng, 20), random_boxes(rng, 20)
        weights = (10.0, 10.0, 5.0, 5.0)
        got = _np(encode_boxes(boxes, refs, weights))
        for box, ref, delta in zip(boxes, refs, got, strict=True):
            h, w = ref[2] - ref[0], ref[3] - ref[1]
            bh, bw = box[2] - box[0], box[3] - box[1]
            want = [
                10 * ((box[0] + bh / 2) - (ref[0] + h / 2)) / h,
                10 * ((box[1] + bw / 2) - (ref[1] + w / 2)) / w,
                5 * math.log(bh / h),
                5 * math.log(bw / w),
            ]
            np.testing.assert_allclose(delta, want, rtol=1e-4, atol=1e-4)

    def test_decode_matches_formula_with_clip(self):
        rng = np.random.default_rng(1)
        refs = random_boxes(rng, 20)
        deltas = rng.normal(scale=2.0, size=(20, 4))
        deltas[0, 2:] = 100.0  # far past the clip
        for weights in ((1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0)):
            got = _np(decode_boxes(deltas, refs, weights))
            want = [np_decode(d, r, weights) for d, r in zip(deltas, refs, strict=True)]
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-3)

    def test_round_trip(self):
        rng = np.random.default_rng(2)
        boxes, refs = random_boxes(rng, 10), random_boxes(rng, 10)
        weights = (10.0, 10.0, 5.0, 5.0)
        back = decode_boxes(encode_boxes(boxes, refs, weights), refs, weights)
        np.testing.assert_allclose(_np(back), boxes, atol=1e-3)

    def test_pairwise_iou_matches_reference(self):
        rng = np.random.default_rng(3)
        a, b = random_boxes(rng, 7), random_boxes(rng, 5)
        b[4] = 0.0  # an empty (padding) box
        got = _np(pairwise_iou(a[None], b[None]))[0]
        want = [[np_iou(x, y) for y in b] for x in a]
        np.testing.assert_allclose(got, want, atol=1e-5)


class AnchorGeneratorTest(TestCase):
    def test_matches_reference(self):
        layer = AnchorGenerator()
        got = _np(layer(np.zeros((1, 128, 64, 3))))
        want = []
        for size, stride in zip(
            (32, 64, 128, 256, 512), (4, 8, 16, 32, 64), strict=True
        ):
            for i in range(math.ceil(128 / stride)):
                for j in range(math.ceil(64 / stride)):
                    for ratio in (0.5, 1.0, 2.0):
                        h, w = size * math.sqrt(ratio), size / math.sqrt(ratio)
                        cy, cx = i * stride, j * stride
                        want.append([cy - h / 2, cx - w / 2, cy + h / 2, cx + w / 2])
        np.testing.assert_allclose(got, want, atol=1e-4)
        self.assertEqual(layer.compute_output_shape((1, 128, 64, 3)), got.shape)

    def test_keras_hub_rounds_the_sizes(self):
        keras_hub = pytest.importorskip("keras_hub")
        hub = keras_hub.layers.AnchorGenerator("yxyx", 2, 2, 1, [0.5], 8.0)
        hub_anchor = _np(hub(np.zeros((1, 8, 8, 3)))["P2"])[0]
        ours = _np(AnchorGenerator((32,), (4,), (0.5,))(np.zeros((1, 8, 8, 3))))[0]
        # keras-hub: 46 × 22 (rounded half sides); SPEC: 32·√0.5 × 32/√0.5.
        np.testing.assert_allclose(hub_anchor[2:] - hub_anchor[:2], [22, 46])
        np.testing.assert_allclose(ours[2:] - ours[:2], [22.627, 45.255], atol=1e-3)

    def test_rejects_unknown_keyword(self):
        with self.assertRaisesRegex(TypeError, "sizs"):
            AnchorGenerator(sizs=(1,))

    def test_serialization_round_trip(self):
        layer = AnchorGenerator(sizes=(8,), strides=(8,))
        got = layer.from_config(layer.get_config())
        np.testing.assert_array_equal(
            _np(got(np.zeros((1, 16, 16, 3)))), _np(layer(np.zeros((1, 16, 16, 3))))
        )


class BatchedNMSTest(TestCase):
    def _check(self, boxes, scores, classes, iou, max_out, threshold):
        layer = BatchedNMS(iou, max_out, score_threshold=threshold)
        inputs = [boxes, scores] + ([classes] if classes is not None else [])
        out = {k: _np(v) for k, v in layer(inputs).items()}
        for b in range(boxes.shape[0]):
            cls = classes[b] if classes is not None else np.zeros(len(scores[b]))
            kept = np_nms(boxes[b], scores[b], cls, iou, max_out, threshold)
            n = len(kept)
            self.assertEqual(out["num_detections"][b], n)
            # The kept rows are the inputs' own values, carried by index.
            np.testing.assert_array_equal(out["boxes"][b, :n], boxes[b, kept])
            np.testing.assert_array_equal(out["scores"][b, :n], scores[b, kept])
            np.testing.assert_array_equal(out["classes"][b, :n], cls[kept])
            np.testing.assert_array_equal(out["valid"][b], np.arange(max_out) < n)
            self.assertTrue(np.all(out["boxes"][b, n:] == 0))

    def test_matches_loop_nms(self):
        rng = np.random.default_rng(0)
        boxes = np.stack([random_boxes(rng, 60) for _ in range(2)]).astype("float32")
        scores = rng.uniform(size=(2, 60)).astype("float32")
        self._check(boxes, scores, None, 0.5, 20, 0.0)
        self._check(boxes, scores, None, 0.3, 100, 0.4)

    def test_class_aware_matches_loop_nms(self):
        rng = np.random.default_rng(1)
        boxes = np.stack([random_boxes(rng, 80) for _ in range(2)]).astype("float32")
        scores = rng.uniform(size=(2, 80)).astype("float32")
        classes = rng.integers(1, 4, size=(2, 80)).astype("int32")
        self._check(boxes, scores, classes, 0.5, 30, 0.05)

    def test_class_and_box_survive_a_fractional_offset(self):
        # The class offset max(boxes) + 1 = 601.05 is no integer: decoding the
        # class from the shifted y1 = 31 · 601.05 gave class 30 and a box moved
        # by the offset.
        boxes = np.array([[[0, 10, 50, 60], [300, 300, 600.05, 600.05]]], "float32")
        classes = np.array([[31, 1]], "int32")
        scores = np.array([[0.9, 0.9]], "float32")
        out = BatchedNMS(0.5, 10, score_threshold=0.05)([boxes, scores, classes])
        self.assertEqual(int(_np(out["num_detections"])[0]), 2)
        np.testing.assert_array_equal(_np(out["classes"])[0, :2], [31, 1])
        np.testing.assert_array_equal(_np(out["boxes"])[0, :2], boxes[0])

    def test_many_classes_on_the_borders_match_loop_nms(self):
        # 80 classes, boxes touching every border of an image whose extent is
        # no integer, many overlapping: the loop NMS keeps the same rows, with
        # the same classes and coordinates.
        rng = np.random.default_rng(7)
        height, width = 1000.37, 777.77
        for seed in range(3):
            boxes = np.stack(
                [random_boxes(rng, 300, size=height) for _ in range(2)]
            ).astype("float32")
            boxes[..., 3] = np.minimum(boxes[..., 3] * width / height, width)
            boxes[..., 1] *= width / height
            side = rng.integers(0, 5, (2, 300))
            boxes[..., 0] = np.where(side == 0, 0.0, boxes[..., 0])
            boxes[..., 1] = np.where(side == 1, 0.0, boxes[..., 1])
            boxes[..., 2] = np.where(side == 2, np.float32(height), boxes[..., 2])
            boxes[..., 3] = np.where(side == 3, np.float32(width), boxes[..., 3])
            scores = rng.uniform(size=(2, 300)).astype("float32")
            classes = rng.integers(1, 81, (2, 300)).astype("int32")
            self._check(boxes, scores, classes, 0.5, 100, 0.05 * seed)

    def test_ties_keep_the_lower_index(self):
        # Equal scores, overlapping boxes of one class: the first one stays.
        boxes = np.array([[[0, 0, 10, 10], [1, 0, 11, 10], [0, 1, 10, 11]]], "float32")
        scores = np.full((1, 3), 0.7, "float32")
        out = BatchedNMS(0.5, 3)([boxes, scores])
        self.assertEqual(int(_np(out["num_detections"])[0]), 1)
        np.testing.assert_array_equal(_np(out["boxes"])[0, 0], boxes[0, 0])
        # Reversed: again the lower index, now the other box.
        out = BatchedNMS(0.5, 3)([boxes[:, ::-1].copy(), scores])
        np.testing.assert_array_equal(_np(out["boxes"])[0, 0], boxes[0, 2])
        rng = np.random.default_rng(3)
        boxes = np.stack([random_boxes(rng, 80) for _ in range(2)]).astype("float32")
        scores = rng.integers(1, 5, (2, 80)).astype("float32") / 4
        classes = rng.integers(1, 3, (2, 80)).astype("int32")
        self._check(boxes, scores, classes, 0.3, 40, 0.0)

    def test_iou_equal_to_the_threshold_is_kept(self):
        # IoU exactly 0.5 (50 / 100) and 0.25 (25 / 100): kept at that
        # threshold, suppressed just below it.
        boxes = np.array([[[0, 0, 10, 10], [0, 0, 10, 5], [0, 0, 5, 5]]], "float32")
        scores = np.array([[0.9, 0.8, 0.7]], "float32")
        out = BatchedNMS(0.5, 3)([boxes, scores])
        self.assertEqual(int(_np(out["num_detections"])[0]), 3)
        out = BatchedNMS(0.25, 3)([boxes, scores])
        # [0, 0, 10, 5] (IoU 0.5) is suppressed; [0, 0, 5, 5] has IoU 0.25
        # with the first box and 0.5 with the suppressed one: kept.
        self.assertEqual(int(_np(out["num_detections"])[0]), 2)
        np.testing.assert_array_equal(_np(out["boxes"])[0, 1], boxes[0, 2])
        out = BatchedNMS(0.2499, 3)([boxes, scores])
        self.assertEqual(int(_np(out["num_detections"])[0]), 1)

    def test_compiled_matches_loop_nms_across_tiles(self):
        # Clusters of heavily overlapping boxes (IoUs around the 0.7 of the
        # proposal NMS), 1300 boxes in three tiles of 512: run as Keras runs
        # it (a traced function, and XLA), every kept box is the loop NMS's.
        # keras-hub's padded NMS, traced, kept other boxes than the greedy NMS.
        rng = np.random.default_rng(5)
        centres = rng.uniform(10, 120, (40, 2))
        pick = rng.integers(0, 40, 1300)
        centre = centres[pick] + rng.normal(scale=2.0, size=(1300, 2))
        size = rng.uniform(8, 30, (1300, 2))
        boxes = np.concatenate([centre - size / 2, centre + size / 2], 1)
        boxes = np.clip(boxes, 0, 128)[None].astype("float32")
        scores = rng.uniform(size=(1, 1300)).astype("float32")
        for max_out in (64, 300):
            layer = BatchedNMS(0.7, max_out)
            inputs = [keras.Input((1300, 4)), keras.Input((1300,))]
            model = keras.Model(inputs, layer(inputs))
            kept = np_nms(boxes[0], scores[0], np.zeros(1300), 0.7, max_out, 0.0)
            for jit in (False, True):
                model.compile(jit_compile=jit)
                out = model.predict([boxes, scores], verbose=0)
                self.assertEqual(out["num_detections"][0], len(kept))
                np.testing.assert_array_equal(
                    out["boxes"][0, : len(kept)], boxes[0, kept]
                )

    def test_no_boxes_above_threshold(self):
        boxes = np.ones((1, 5, 4), "float32") * [0, 0, 4, 4]
        out = BatchedNMS(0.5, 3, score_threshold=0.5)([boxes, np.zeros((1, 5))])
        self.assertEqual(int(_np(out["num_detections"])[0]), 0)

    def test_xla_matches_eager(self):
        rng = np.random.default_rng(2)
        boxes = random_boxes(rng, 30)[None].astype("float32")
        scores = rng.uniform(size=(1, 30)).astype("float32")
        layer = BatchedNMS(0.5, 10)
        eager = _np(layer([boxes, scores])["boxes"])
        inputs = [keras.Input((30, 4)), keras.Input((30,))]
        model = keras.Model(inputs, layer(inputs)["boxes"])
        model.compile(jit_compile=True)
        np.testing.assert_allclose(model.predict([boxes, scores], verbose=0), eager)


class FeaturePyramidTest(TestCase):
    def _inputs(self):
        rng = np.random.default_rng(0)
        return [
            rng.normal(size=(2, 16 // 2**i, 16 // 2**i, 3 + i)).astype("float32")
            for i in range(4)
        ]

    def test_matches_reference(self):
        inputs = self._inputs()
        layer = FeaturePyramid(filters=4)
        layer(inputs)
        _randomize(layer, 1)
        got = [_np(p) for p in layer(inputs)]
        laterals = [
            conv2d_same(x.astype("float64"), _np(c.kernel), _np(c.bias))
            for x, c in zip(inputs, layer.lateral_convs, strict=True)
        ]
        merged = [laterals[3]]
        for lateral in reversed(laterals[:3]):
            coarse = merged[0]
            up = np.zeros_like(lateral)
            for i in range(lateral.shape[1]):
                for j in range(lateral.shape[2]):
                    up[:, i, j] = coarse[:, i // 2, j // 2]
            merged.insert(0, lateral + up)
        want = [
            conv2d_same(m, _np(c.kernel), _np(c.bias))
            for m, c in zip(merged, layer.output_convs, strict=True)
        ]
        want.append(want[3][:, ::2, ::2])
        for g, w in zip(got, want, strict=True):
            np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-3)

    def test_serialization_round_trip(self):
        self.run_serialization_round_trip(FeaturePyramid(filters=4), self._inputs())

    def test_mixed_precision_matches_float32(self):
        inputs = self._inputs()
        full = FeaturePyramid(filters=4)
        full(inputs)
        half = FeaturePyramid(filters=4, dtype="mixed_float16")
        half(inputs)
        half.set_weights(full.get_weights())
        for a, b in zip(full(inputs), half(inputs), strict=True):
            self.assertEqual(keras.backend.standardize_dtype(b.dtype), "float16")
            # float16 has 11 significant bits: 1e-2 relative on O(1) values.
            np.testing.assert_allclose(_np(b), _np(a), rtol=2e-2, atol=2e-2)

    def test_batch_normalization_option(self):
        layer = FeaturePyramid(filters=4, normalization="batch")
        layer(self._inputs())
        self.assertEqual(len(layer.lateral_norms), 4)
        self.assertIsNone(layer.lateral_convs[0].bias)


class RPNHeadTest(TestCase):
    def test_matches_reference(self):
        rng = np.random.default_rng(0)
        levels = [rng.normal(size=(2, s, s, 4)).astype("float32") for s in (4, 2)]
        head = RPNHead(num_anchors=3, filters=5)
        head(levels)
        _randomize(head, 1)
        logits, deltas = (_np(t) for t in head(levels))
        want_logits, want_deltas = [], []
        for x in levels:
            h = np.maximum(
                conv2d_same(x, _np(head.conv.kernel), _np(head.conv.bias)), 0
            )
            o = conv2d_same(h, _np(head.objectness.kernel), _np(head.objectness.bias))
            d = conv2d_same(h, _np(head.deltas.kernel), _np(head.deltas.bias))
            want_logits.append(o.reshape(2, -1))
            want_deltas.append(d.reshape(2, -1, 4))
        np.testing.assert_allclose(logits, np.concatenate(want_logits, 1), atol=1e-3)
        np.testing.assert_allclose(deltas, np.concatenate(want_deltas, 1), atol=1e-3)

    def test_serialization_and_mixed_precision(self):
        levels = [np.random.default_rng(0).normal(size=(1, 4, 4, 4)).astype("float32")]
        head = RPNHead(filters=4)
        self.run_serialization_round_trip(head, levels)
        half = RPNHead(filters=4, dtype="mixed_float16")
        half(levels)
        half.set_weights(head.get_weights())
        for a, b in zip(head(levels), half(levels), strict=True):
            self.assertEqual(keras.backend.standardize_dtype(b.dtype), "float32")
            np.testing.assert_allclose(_np(b), _np(a), rtol=1e-2, atol=1e-2)


def np_proposals(logits, deltas, anchors, counts, pre, post, size, iou=0.7):
    boxes, scores = [], []
    start = 0
    for count in counts:
        level = logits[start : start + count]
        top = sorted(range(count), key=lambda i: -level[i])[:pre]
        for i in top:
            box = np_decode(deltas[start + i], anchors[start + i], (1, 1, 1, 1))
            box = [min(max(v, 0.0), lim) for v, lim in zip(box, size * 2, strict=True)]
            if box[2] - box[0] > 1e-3 and box[3] - box[1] > 1e-3:
                boxes.append(box)
                scores.append(1 / (1 + math.exp(-level[i])))
        start += count
    kept = np_nms(boxes, scores, [0] * len(boxes), iou, post, 0.0)
    return np.asarray([boxes[k] for k in kept])


class ProposalLayerTest(TestCase):
    def test_matches_reference(self):
        rng = np.random.default_rng(0)
        images = np.zeros((2, 64, 64, 3), "float32")
        anchors = AnchorGenerator()
        k = anchors(images).shape[0]
        logits = rng.normal(size=(2, k)).astype("float32")
        deltas = rng.normal(scale=0.5, size=(2, k, 4)).astype("float32")
        layer = ProposalLayer(
            pre_nms_top_k_test=30,
            post_nms_top_k_test=25,
            pre_nms_top_k_train=60,
            post_nms_top_k_train=40,
        )
        counts = [h * w * 3 for h, w in anchors.level_shapes((64, 64))]
        for training, pre, post in ((False, 30, 25), (True, 60, 40)):
            boxes, valid = layer([logits, deltas, images], training=training)
            boxes, valid = _np(boxes), _np(valid).astype(bool)
            self.assertEqual(boxes.shape, (2, post, 4))
            for b in range(2):
                want = np_proposals(
                    logits[b],
                    deltas[b],
                    anchors.anchors((64, 64)),
                    counts,
                    pre,
                    post,
                    (64.0, 64.0),
                )
                self.assertEqual(valid[b].sum(), len(want))
                np.testing.assert_allclose(boxes[b, : len(want)], want, atol=1e-3)

    def test_serialization_round_trip(self):
        layer = ProposalLayer(pre_nms_top_k_test=5, post_nms_top_k_test=4)
        revived = ProposalLayer.from_config(layer.get_config())
        self.assertEqual(revived.get_config(), layer.get_config())


class DetectionLayerTest(TestCase):
    def test_matches_reference(self):
        rng = np.random.default_rng(0)
        c, r = 3, 40
        logits = rng.normal(scale=2.0, size=(2, r, c + 1)).astype("float32")
        deltas = rng.normal(scale=0.5, size=(2, r, 4 * c)).astype("float32")
        proposals = np.stack([random_boxes(rng, r) for _ in range(2)]).astype("float32")
        valid = rng.uniform(size=(2, r)) < 0.8
        layer = DetectionLayer(c, max_detections=15)
        out = layer([logits, deltas, proposals, valid, np.zeros((2, 64, 64, 3))])
        out = {k: _np(v) for k, v in out.items()}
        for b in range(2):
            boxes, scores, classes = [], [], []
            for i in range(r):
                p = np.exp(logits[b, i] - logits[b, i].max())
                p = p / p.sum()
                for j in range(c):
                    box = np_decode(
                        deltas[b, i, 4 * j : 4 * j + 4], proposals[b, i], (10, 10, 5, 5)
                    )
                    box = [min(max(v, 0.0), 64.0) for v in box]
                    # torchvision's remove_small_boxes(1e-2) after clipping.
                    small = min(box[2] - box[0], box[3] - box[1]) < 1e-2
                    boxes.append(box)
                    scores.append(p[j + 1] if valid[b, i] and not small else 0.0)
                    classes.append(j + 1)
            kept = np_nms(boxes, scores, classes, 0.5, 15, 0.05)
            n = len(kept)
            self.assertEqual(out["num_detections"][b], n)
            np.testing.assert_allclose(
                out["boxes"][b, :n], [boxes[k] for k in kept], atol=1e-3
            )
            np.testing.assert_allclose(
                out["scores"][b, :n], [scores[k] for k in kept], atol=1e-5
            )
            np.testing.assert_array_equal(
                out["classes"][b, :n], [classes[k] for k in kept]
            )
            np.testing.assert_array_equal(out["classes"][b, n:], 0)

    def test_classes_survive_many_classes_and_a_fractional_offset(self):
        # The reproduction: 80 classes on a 1024² image; proposal 0
        # is class 31, proposal 1 class 1, with equal scores.
        c = 80
        proposals = np.array([[[0, 10, 50, 60], [300, 300, 600.05, 600.05]]], "float32")
        logits = np.zeros((1, 2, c + 1), "float32")
        logits[0, 0, 31] = logits[0, 1, 1] = 10.0
        out = DetectionLayer(c, max_detections=10)(
            [
                logits,
                np.zeros((1, 2, 4 * c)),
                proposals,
                np.ones((1, 2), bool),
                np.zeros((1, 1024, 1024, 3)),
            ]
        )
        self.assertEqual(int(_np(out["num_detections"])[0]), 2)
        np.testing.assert_array_equal(_np(out["classes"])[0, :2], [31, 1])
        np.testing.assert_allclose(_np(out["boxes"])[0, :2], proposals[0], atol=1e-3)

    def test_boxes_clipped_to_nothing_are_dropped(self):
        # Both proposals score high; the second lies past the right border and
        # clips to zero width (and a sliver of 1e-3 px stays under 1e-2).
        proposals = np.array(
            [[[4, 4, 20, 20], [4, 70, 20, 90], [30, 63.999, 40, 70]]], "float32"
        )
        logits = np.array([[[0.0, 6.0], [0.0, 6.0], [0.0, 6.0]]], "float32")
        out = DetectionLayer(1, max_detections=5)(
            [
                logits,
                np.zeros((1, 3, 4)),
                proposals,
                np.ones((1, 3), bool),
                np.zeros((1, 64, 64, 3)),
            ]
        )
        self.assertEqual(int(_np(out["num_detections"])[0]), 1)
        np.testing.assert_allclose(_np(out["boxes"])[0, 0], proposals[0, 0], atol=1e-4)


class PyramidLevelTest(TestCase):
    def test_level_select_matches_formula(self):
        rng = np.random.default_rng(0)
        boxes = random_boxes(rng, 30, size=900.0, min_side=1.0)
        boxes[0] = [0, 0, 224, 224]  # level 4 exactly
        boxes[1] = [0, 0, 0, 0]  # empty: level 2
        grids = [np.full((30, 1, 1, 1), float(level)) for level in range(2, 6)]
        got = _np(PyramidLevelSelect()([grids, boxes]))[:, 0, 0, 0]
        for box, level in zip(boxes, got, strict=True):
            side = math.sqrt(max((box[2] - box[0]) * (box[3] - box[1]), 0))
            want = min(max(math.floor(4 + math.log2(side / 224 + 1e-8)), 2), 5)
            self.assertEqual(level, want)

    def test_pyramid_roi_align_equals_roi_align(self):
        # The batched separable form gives RoIAlign's numbers (RoIAlign is
        # checked against its loop reference in test_panet*.py): boxes inside,
        # across and outside the maps, empty boxes, both sampling ratios.
        rng = np.random.default_rng(3)
        # 128×128 at stride 4: large enough that adaptive pooling gathers
        # from that level (`GATHER_COST`) and uses products for the others.
        feats = [
            rng.normal(size=(3, 128 // 2**i, 128 // 2**i, 5)).astype("float32")
            for i in range(4)
        ]
        y1, x1 = rng.uniform(-80, 520, (2, 3, 7))
        h, w = rng.uniform(0, 320, (2, 3, 7))
        boxes = np.stack([y1, x1, y1 + h, x1 + w], -1).astype("float32")
        boxes[0, 0] = [10, 10, 10, 10]
        flat, index = boxes.reshape(-1, 4), np.repeat(np.arange(3), 7)
        strides = (4, 8, 16, 32)
        # The form `_gathers` picks (gathers from the 128×128 level, products
        # from the others; without adaptive pooling a gather from each box's
        # own level), and each form forced on every level.
        cases = [(2, 7, True), (2, 14, False), (0, 7, True), (0, 7, False)]
        for (sr, size, adaptive), form in itertools.product(cases, (None, True, False)):
            layer = PyramidRoIAlign(size, sr, strides, adaptive=adaptive)
            if form is not None and sr > 0:
                layer._gathers = lambda height=None, width=None, form=form: form
            got = layer([feats, boxes])
            want = RoIAlign(size, sampling_ratio=sr, strides=strides)(
                [feats, flat, index]
            )
            if not adaptive:
                got, want = [got], [PyramidLevelSelect()([want, flat])]
            for g, w_ in zip(got, want, strict=True):
                np.testing.assert_allclose(_np(g), _np(w_), atol=1e-5)

    def test_both_forms_give_the_same_gradients(self):
        # Training pools in the same forms as inference: the gathers' gradient
        # (scatter-adds into the sampled pixels) must be the products'.
        rng = np.random.default_rng(5)
        feats = [
            rng.normal(size=(2, 128 // 2**i, 128 // 2**i, 3)).astype("float32")
            for i in range(4)
        ]
        y1, x1 = rng.uniform(-40, 500, (2, 2, 6))
        h, w = rng.uniform(1, 300, (2, 2, 6))
        boxes = np.stack([y1, x1, y1 + h, x1 + w], -1).astype("float32")
        for adaptive in (True, False):
            weights = [
                rng.normal(size=(12, 7, 7, 3)).astype("float32")
                for _ in range(4 if adaptive else 1)
            ]
            gradients = []
            for gathers in (True, False):
                layer = PyramidRoIAlign(7, 2, (4, 8, 16, 32), adaptive=adaptive)
                layer._gathers = lambda height=None, width=None, g=gathers: g

                def weighted_sum(*levels, layer=layer, weights=weights):
                    out = layer([list(levels), boxes])
                    out = out if isinstance(out, list) else [out]
                    return sum(
                        keras.ops.sum(o * w) for o, w in zip(out, weights, strict=True)
                    )

                gradients.append(input_gradients(weighted_sum, *feats))
            assert np.abs(gradients[0][0]).max() > 0.1
            for a, b in zip(*gradients, strict=True):
                np.testing.assert_allclose(a, b, atol=1e-5)

    def test_pyramid_roi_align_flattens_image_major(self):
        feats = [np.arange(2.0)[:, None, None, None] * np.ones((2, 8, 8, 1))]
        boxes = np.ones((2, 3, 4), "float32") * [0, 0, 8, 8]
        out = PyramidRoIAlign(2, strides=(4,), adaptive=True)([feats, boxes])
        np.testing.assert_allclose(_np(out[0])[:, 0, 0, 0], [0, 0, 0, 1, 1, 1])


def _dense(x, layer, relu=True):
    y = x.reshape(len(x), -1) @ _np(layer.kernel) + _np(layer.bias)
    return np.maximum(y, 0) if relu else y


class BoxHeadTest(TestCase):
    def _grids(self):
        rng = np.random.default_rng(0)
        return [rng.normal(size=(5, 7, 7, 3)).astype("float32") for _ in range(4)]

    def test_fusion_matches_reference(self):
        grids = self._grids()
        for fusion in ("max", "sum"):
            for position in ("after", "before"):
                head = BoxHead(2, fc_units=6, fusion=fusion, fusion_position=position)
                head(grids)
                _randomize(head, 1, scale=0.2)
                logits, deltas = (_np(t) for t in head(grids))
                op = np.maximum if fusion == "max" else np.add
                if position == "after":
                    per_level = [
                        _dense(g, layer)
                        for g, layer in zip(
                            grids, head.adaptive_pooling.level_layers, strict=True
                        )
                    ]
                    x = per_level[0]
                    for y in per_level[1:]:
                        x = op(x, y)
                    x = _dense(x, head.fcs[0])
                else:
                    x = grids[0].astype("float64")
                    for g in grids[1:]:
                        x = op(x, g)
                    x = _dense(_dense(x, head.fcs[0]), head.fcs[1])
                np.testing.assert_allclose(
                    logits, _dense(x, head.class_logits, False), rtol=1e-4, atol=1e-3
                )
                np.testing.assert_allclose(
                    deltas, _dense(x, head.box_deltas, False), rtol=1e-4, atol=1e-3
                )

    def test_heavier_head_matches_reference(self):
        grid = self._grids()[0]
        head = BoxHead(2, fc_units=6, conv_filters=4, heavier_head=True)
        head(grid)
        _randomize(head, 2, scale=0.2)
        x = grid.astype("float64")
        for conv in head.convs:
            x = np.maximum(conv2d_same(x, _np(conv.kernel), _np(conv.bias)), 0)
        x = _dense(x, head.fcs[0])
        logits, _ = head(grid)
        np.testing.assert_allclose(
            _np(logits), _dense(x, head.class_logits, False), rtol=1e-4, atol=1e-3
        )
        self.assertEqual(len(head.convs), 4)

    def test_serialization_and_mixed_precision(self):
        grids = self._grids()
        head = BoxHead(2, fc_units=6, heavier_head=True, conv_filters=4)
        self.run_serialization_round_trip(head, grids)
        half = BoxHead(
            2, fc_units=6, heavier_head=True, conv_filters=4, dtype="mixed_float16"
        )
        half(grids)
        half.set_weights(head.get_weights())
        for a, b in zip(head(grids), half(grids), strict=True):
            np.testing.assert_allclose(_np(b), _np(a), rtol=2e-2, atol=2e-2)


class MaskHeadTest(TestCase):
    def _grid(self):
        return np.random.default_rng(0).normal(size=(3, 4, 4, 4)).astype("float32")

    def test_default_fusion_equals_fully_connected_fusion_mask_head(self):
        grid = self._grid()
        ours = MaskHead(2, mask_size=8, filters=4, fully_connected_fusion=True)
        ours(grid)
        _randomize(ours, 1, scale=0.3)
        theirs = FullyConnectedFusionMaskHead(2, mask_size=8, filters=4)
        theirs(grid)
        by_path = {w.path.split("/", 1)[1]: w for w in ours.weights}
        for w in theirs.weights:
            w.assign(by_path[w.path.split("/", 1)[1]])
        np.testing.assert_allclose(_np(ours(grid)), _np(theirs(grid)), atol=1e-5)

    def test_mask_fusion_formulas(self):
        grid = self._grid()
        plain = MaskHead(2, mask_size=8, filters=4)
        plain(grid)
        _randomize(plain, 2, scale=0.3)
        masks = _np(plain(grid))
        for fusion, op in (
            ("sum", np.add),
            ("max", np.maximum),
            ("product", np.multiply),
        ):
            for branch in ("conv2", "conv3", "conv4"):
                head = MaskHead(
                    2,
                    mask_size=8,
                    filters=4,
                    fully_connected_fusion=True,
                    fusion_branch=branch,
                    mask_fusion=fusion,
                )
                head(grid)
                shared = {w.path.split("/", 1)[1]: w for w in plain.weights}
                bias = np.linspace(-1, 1, 64).astype("float32")
                for w in head.weights:
                    key = w.path.split("/", 1)[1]
                    if key in shared:
                        w.assign(shared[key])
                    elif key == "fc/kernel":
                        w.assign(np.zeros(w.shape, "float32"))
                    elif key == "fc/bias":
                        w.assign(bias)
                foreground = bias.reshape(1, 8, 8, 1)
                np.testing.assert_allclose(
                    _np(head(grid)), op(masks, foreground), atol=1e-5
                )

    def test_adaptive_pooling_takes_levels(self):
        grids = [self._grid() for _ in range(4)]
        head = MaskHead(2, mask_size=8, filters=4, fully_connected_fusion=True)
        self.assertEqual(tuple(head(grids).shape), (3, 8, 8, 2))
        self.assertEqual(len(head.convs), 3)

    def test_serialization_and_mixed_precision(self):
        grid = self._grid()
        head = MaskHead(2, mask_size=8, filters=4, fully_connected_fusion=True)
        self.run_serialization_round_trip(head, grid)
        half = MaskHead(
            2,
            mask_size=8,
            filters=4,
            fully_connected_fusion=True,
            dtype="mixed_float16",
        )
        half(grid)
        half.set_weights(head.get_weights())
        np.testing.assert_allclose(_np(half(grid)), _np(head(grid)), atol=2e-2)

    def test_rejects_bad_options(self):
        with self.assertRaisesRegex(ValueError, "fusion_branch"):
            MaskHead(2, fusion_branch="conv5")
        with self.assertRaisesRegex(TypeError, "mask_fusions"):
            MaskHead(2, mask_fusions="sum")
