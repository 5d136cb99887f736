"""torchvision's Mask R-CNN conventions as layer arguments, each against a
NumPy reference written from torchvision's definitions (`AnchorGenerator`'s
rounded base anchors, `RegionProposalNetwork.filter_proposals`' NMS by
level, `MultiScaleRoIAlign`'s unaligned RoIAlign), and SPEC's defaults
unchanged."""

import math

import keras
import numpy as np

from kseg.layers.detection import AnchorGenerator, ProposalLayer
from kseg.layers.panet import RoIAlign
from kseg.layers.roi_align import PyramidLevelSelect, PyramidRoIAlign
from kseg.testing import TestCase


def _np(x):
    return np.asarray(keras.ops.convert_to_numpy(x), dtype="float64")


def np_torchvision_anchors(image_size, sizes, strides, ratios):
    """torchvision's `AnchorGenerator` in `[y1, x1, y2, x2]`: base anchors
    `round([-ws, -hs, ws, hs] / 2)` (float32, `hs = size·√r`, `ws = size/√r`)
    shifted by `(i·stride, j·stride)`; level, row, column, ratio order."""
    out = []
    for size, stride in zip(sizes, strides, strict=True):
        r = np.asarray(ratios, "float32")
        hs = np.sqrt(r) * np.float32(size)
        ws = (1 / np.sqrt(r)) * np.float32(size)
        base = np.round(np.stack([-hs, -ws, hs, ws], 1) / 2)
        for i in range(math.ceil(image_size[0] / stride)):
            for j in range(math.ceil(image_size[1] / stride)):
                shift = np.array([i, j, i, j], "float32") * stride
                out.extend(base + shift)
    return np.asarray(out)


def np_iou(a, b):
    ih = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iw = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ih * iw
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


CLIP = math.log(1000 / 16)


def np_decode(delta, ref, clip=CLIP):
    h, w = ref[2] - ref[0], ref[3] - ref[1]
    cy, cx = ref[0] + 0.5 * h, ref[1] + 0.5 * w
    ph, pw = h * math.exp(min(delta[2], clip)), w * math.exp(min(delta[3], clip))
    py, px = cy + delta[0] * h, cx + delta[1] * w
    return [py - ph / 2, px - pw / 2, py + ph / 2, px + pw / 2]


def np_torchvision_proposals(logits, deltas, anchors, counts, pre, post, size):
    """torchvision's `filter_proposals` for one image: top `pre` per level,
    decode, clip, drop sides < 1e-3, `batched_nms(boxes, scores, level, 0.7)`
    (greedy per level, by decreasing score), the first `post` kept."""
    boxes, scores, levels = [], [], []
    start = 0
    for level, count in enumerate(counts):
        part = logits[start : start + count]
        for i in sorted(range(count), key=lambda i: -part[i])[:pre]:
            box = np_decode(deltas[start + i], anchors[start + i])
            box = [min(max(v, 0.0), lim) for v, lim in zip(box, size * 2, strict=True)]
            if box[2] - box[0] >= 1e-3 and box[3] - box[1] >= 1e-3:
                boxes.append(box)
                scores.append(1 / (1 + math.exp(-part[i])))
                levels.append(level)
        start += count
    kept = []
    for i in sorted(range(len(scores)), key=lambda i: -scores[i]):
        if all(
            levels[i] != levels[k] or np_iou(boxes[i], boxes[k]) <= 0.7 for k in kept
        ):
            kept.append(i)
    return np.asarray([boxes[k] for k in kept[:post]])


class RoundedAnchorsTest(TestCase):
    def test_matches_torchvision_reference(self):
        layer = AnchorGenerator(round_base=True)
        got = _np(layer(np.zeros((1, 128, 64, 3))))
        want = np_torchvision_anchors(
            (128, 64), (32, 64, 128, 256, 512), (4, 8, 16, 32, 64), (0.5, 1.0, 2.0)
        )
        np.testing.assert_array_equal(got, want)
        # SPEC's anchors (the default) differ by up to 0.49 px.
        spec = _np(AnchorGenerator()(np.zeros((1, 128, 64, 3))))
        self.assertGreater(np.abs(spec - want).max(), 0.3)
        self.assertLess(np.abs(spec - want).max(), 0.5)

    def test_config_round_trip(self):
        layer = AnchorGenerator(round_base=True)
        self.assertTrue(AnchorGenerator.from_config(layer.get_config()).round_base)
        self.assertFalse(AnchorGenerator().round_base)


class PerLevelNMSTest(TestCase):
    def test_matches_torchvision_reference(self):
        rng = np.random.default_rng(0)
        images = np.zeros((2, 64, 64, 3), "float32")
        layer = ProposalLayer(
            pre_nms_top_k_test=30,
            post_nms_top_k_test=60,
            per_level_nms=True,
            round_anchors=True,
        )
        anchors = layer.anchor_generator
        k = anchors(images).shape[0]
        # Large boxes so that boxes of different levels overlap a lot: one
        # NMS over all levels would suppress some of them.
        logits = rng.normal(size=(2, k)).astype("float32")
        deltas = rng.normal(scale=0.5, size=(2, k, 4)).astype("float32")
        counts = [h * w * 3 for h, w in anchors.level_shapes((64, 64))]
        boxes, valid = layer([logits, deltas, images], training=False)
        boxes, valid = _np(boxes), _np(valid).astype(bool)
        for b in range(2):
            want = np_torchvision_proposals(
                logits[b],
                deltas[b],
                np_torchvision_anchors(
                    (64, 64),
                    (32, 64, 128, 256, 512),
                    (4, 8, 16, 32, 64),
                    (0.5, 1.0, 2.0),
                ),
                counts,
                30,
                60,
                (64.0, 64.0),
            )
            self.assertEqual(valid[b].sum(), len(want))
            np.testing.assert_allclose(boxes[b, : len(want)], want, atol=1e-3)
        # One NMS over all levels (SPEC) keeps fewer proposals here.
        spec = ProposalLayer(
            pre_nms_top_k_test=30, post_nms_top_k_test=60, round_anchors=True
        )
        _, spec_valid = spec([logits, deltas, images], training=False)
        self.assertLess(_np(spec_valid).sum(), valid.sum())

    def test_config_round_trip(self):
        layer = ProposalLayer(per_level_nms=True, round_anchors=True)
        revived = ProposalLayer.from_config(layer.get_config())
        self.assertTrue(revived.per_level_nms)
        self.assertTrue(revived.anchor_generator.round_base)


class UnalignedPyramidRoIAlignTest(TestCase):
    def test_equals_unaligned_roi_align_in_every_form(self):
        # RoIAlign(aligned=False) is checked against its loop reference in
        # tests/layers/test_panet.py; PyramidRoIAlign must pass it through
        # to the form it picks, the gathers and the matrix products alike.
        rng = np.random.default_rng(1)
        feats = [
            rng.normal(size=(2, 64 // 2**i, 64 // 2**i, 3)).astype("float32")
            for i in range(4)
        ]
        y1, x1 = rng.uniform(-10, 200, (2, 2, 6))
        h, w = rng.uniform(0.5, 160, (2, 2, 6))
        boxes = np.stack([y1, x1, y1 + h, x1 + w], -1).astype("float32")
        flat, index = boxes.reshape(-1, 4), np.repeat(np.arange(2), 6)
        strides = (4, 8, 16, 32)
        want = RoIAlign(7, sampling_ratio=2, strides=strides, aligned=False)(
            [feats, flat, index]
        )
        aligned = RoIAlign(7, sampling_ratio=2, strides=strides)([feats, flat, index])
        for adaptive in (True, False):
            for form in (None, True, False):
                layer = PyramidRoIAlign(7, 2, strides, adaptive=adaptive, aligned=False)
                if form is not None:
                    layer._gathers = lambda height=None, width=None, form=form: form
                got = layer([feats, boxes])
                expected = want
                if not adaptive:
                    got = [got]
                    expected = [PyramidLevelSelect()([want, flat])]
                for g, e in zip(got, expected, strict=True):
                    np.testing.assert_allclose(_np(g), _np(e), atol=1e-5)
        self.assertGreater(np.abs(_np(want[0]) - _np(aligned[0])).max(), 0.1)

    def test_config_round_trip(self):
        layer = PyramidRoIAlign(7, aligned=False)
        self.assertFalse(PyramidRoIAlign.from_config(layer.get_config()).aligned)
