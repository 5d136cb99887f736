"""PANet's targets and losses against slow NumPy references written from SPEC
("The PANet system": losses averaged as Detectron2 does), with hand-computed
tiny cases and random ones, and the pyramid strides RoIAlign pools with.

Each test here is one that a wrong loss fails: a wrong class channel, count,
smooth-L1 β, box-coding weights, crop offset, inverted mask target or
feature stride changes the numbers it checks.
"""

import math

import keras
import numpy as np
import pytest

from kseg.backbones import build_resnet
from kseg.layers.panet import RoIAlign
from kseg.models.panet import PANet, roi_heads, rpn, sampling
from kseg.testing import TestCase

# float32 losses against float64 sums of a few hundred terms.
RTOL = 1e-5


def _np(x):
    return np.asarray(keras.ops.convert_to_numpy(x), "float64")


def np_smooth_l1(x, beta):
    x = np.abs(x)
    if beta == 0:
        return x
    return np.where(x < beta, 0.5 * x * x / beta, x - 0.5 * beta)


def np_bce(label, logit):
    """Binary cross-entropy with logits, the stable form."""
    return np.maximum(logit, 0) - logit * label + np.log1p(np.exp(-np.abs(logit)))


def np_encode(box, ref, weights):
    """SPEC's box coding: (dy, dx, dh, dw) of `box` relative to `ref`."""
    h, w = ref[2] - ref[0], ref[3] - ref[1]
    gh, gw = box[2] - box[0], box[3] - box[1]
    cy, cx = ref[0] + h / 2, ref[1] + w / 2
    gy, gx = box[0] + gh / 2, box[1] + gw / 2
    return np.array(
        [
            weights[0] * (gy - cy) / h,
            weights[1] * (gx - cx) / w,
            weights[2] * math.log(gh / h),
            weights[3] * math.log(gw / w),
        ]
    )


def random_boxes(rng, shape, size=64.0):
    y1, x1 = rng.uniform(0, size * 0.6, shape), rng.uniform(0, size * 0.6, shape)
    h, w = rng.uniform(4, size * 0.4, shape), rng.uniform(4, size * 0.4, shape)
    return np.stack([y1, x1, y1 + h, x1 + w], -1).astype("float32")


class SmoothL1Test(TestCase):
    def test_hand_computed_values(self):
        x = np.array([0.05, -0.5, 2.0, 0.0], "float32")
        # β = 1/9: 0.5·x²·9 below 1/9, |x| − 1/18 above.
        np.testing.assert_allclose(
            _np(sampling.smooth_l1(x, 1.0 / 9.0)),
            [0.01125, 0.5 - 1 / 18, 2.0 - 1 / 18, 0.0],
            rtol=1e-6,
        )
        # β = 1: 0.5·x² below 1, |x| − 0.5 above.
        np.testing.assert_allclose(
            _np(sampling.smooth_l1(x, 1.0)), [0.00125, 0.125, 1.5, 0.0], rtol=1e-6
        )
        np.testing.assert_allclose(
            _np(sampling.smooth_l1(x, 0.0)), np.abs(x), rtol=1e-7
        )


class RPNLossTest(TestCase):
    def test_hand_computed_tiny_case(self):
        # One image, three anchors, a batch of 4 per image: anchor 0 is a
        # sampled positive, anchor 1 a sampled negative, anchor 2 unsampled.
        logits = np.array([[0.0, 2.0, -3.0]], "float32")
        labels = np.array([[1.0, 0.0, 0.0]], "float32")
        sampled = np.array([[True, True, False]])
        positive = np.array([[True, False, False]])
        deltas = np.zeros((1, 3, 4), "float32")
        targets = np.zeros((1, 3, 4), "float32")
        deltas[0, 0] = [0.05, 0.5, 0.0, -1.0]
        deltas[0, 1] = [9.0, 9.0, 9.0, 9.0]  # a negative: no box loss
        objectness, box = rpn.rpn_losses(
            logits, deltas, labels, sampled, positive, targets, batch_size=4
        )
        # BCE(1, 0) = log 2, BCE(0, 2) = log(1 + e²); over 4 · 1 anchors.
        want = (math.log(2) + math.log1p(math.exp(2.0))) / 4
        self.assertAllClose(float(objectness), want, rtol=1e-6)
        # β = 1/9: 0.01125 + (0.5 − 1/18) + 0 + (1 − 1/18), over 4.
        want = (0.01125 + 0.5 - 1 / 18 + 1.0 - 1 / 18) / 4
        self.assertAllClose(float(box), want, rtol=1e-6)

    def test_random_cases_match_reference(self):
        rng = np.random.default_rng(0)
        for batch_size in (16, 256):
            b, k = 2, 300
            logits = rng.normal(scale=2, size=(b, k)).astype("float32")
            deltas = rng.normal(scale=0.3, size=(b, k, 4)).astype("float32")
            targets = rng.normal(scale=0.3, size=(b, k, 4)).astype("float32")
            positive = rng.uniform(size=(b, k)) < 0.1
            sampled = positive | (rng.uniform(size=(b, k)) < 0.4)
            labels = positive.astype("float32")
            objectness, box = rpn.rpn_losses(
                logits, deltas, labels, sampled, positive, targets, batch_size
            )
            norm = batch_size * b
            want_obj = np_bce(labels, logits.astype("float64"))[sampled].sum() / norm
            diff = deltas.astype("float64") - targets
            want_box = np_smooth_l1(diff, 1 / 9).sum(-1)[positive].sum() / norm
            self.assertAllClose(float(objectness), want_obj, rtol=RTOL)
            self.assertAllClose(float(box), want_box, rtol=RTOL)


def np_box_losses(class_logits, box_deltas, classes, foreground, valid, targets):
    """Softmax CE averaged over the sampled RoIs; smooth-L1 (β = 1) of the
    ground-truth class's deltas on the foreground RoIs, summed and divided by
    the number of sampled RoIs (Detectron2's `FastRCNNOutputs`)."""
    num_classes = class_logits.shape[-1] - 1
    count = max(valid.sum(), 1)
    ce, l1 = 0.0, 0.0
    for b, r in zip(*np.nonzero(valid), strict=True):
        z = class_logits[b, r].astype("float64")
        log_p = z - z.max() - math.log(np.exp(z - z.max()).sum())
        ce -= log_p[classes[b, r]]
        if foreground[b, r]:
            c = classes[b, r] - 1
            assert 0 <= c < num_classes
            d = box_deltas[b, r, 4 * c : 4 * c + 4].astype("float64")
            l1 += np_smooth_l1(d - targets[b, r], 1.0).sum()
    return ce / count, l1 / count


class BoxLossTest(TestCase):
    def _samples(self, classes, foreground, valid, targets):
        return {
            "classes": classes.astype("int32"),
            "foreground": foreground,
            "valid": valid,
            "box_targets": targets.astype("float32"),
        }

    def test_hand_computed_tiny_case(self):
        # Two sampled RoIs of three classes (+ background): RoI 0 foreground
        # of class 2, RoI 1 background; RoI 2 not sampled.
        logits = np.zeros((1, 3, 4), "float32")
        logits[0, 0] = [0.0, 0.0, math.log(2.0), 0.0]
        deltas = np.zeros((1, 3, 12), "float32")
        deltas[0, 0, 4:8] = [0.5, -2.0, 0.0, 0.0]  # class 2's deltas
        deltas[0, 0, 0:4] = [7.0, 7.0, 7.0, 7.0]  # class 1's: not read
        classes = np.array([[2, 0, 0]])
        foreground = np.array([[True, False, False]])
        valid = np.array([[True, True, False]])
        targets = np.zeros((1, 3, 4))
        box_class, box_regression = roi_heads.box_losses(
            logits, deltas, self._samples(classes, foreground, valid, targets), 3
        )
        # RoI 0: p(class 2) = 2 / 5; RoI 1: p(background) = 1 / 4.
        self.assertAllClose(
            float(box_class), (math.log(5 / 2) + math.log(4)) / 2, rtol=1e-6
        )
        # β = 1: 0.125 + 1.5 over the 2 sampled RoIs.
        self.assertAllClose(float(box_regression), (0.125 + 1.5) / 2, rtol=1e-6)

    def test_random_cases_match_reference(self):
        rng = np.random.default_rng(1)
        b, r, c = 2, 64, 5
        logits = rng.normal(scale=2, size=(b, r, c + 1)).astype("float32")
        deltas = rng.normal(scale=1.5, size=(b, r, 4 * c)).astype("float32")
        targets = rng.normal(scale=1.5, size=(b, r, 4))
        valid = rng.uniform(size=(b, r)) < 0.8
        foreground = valid & (rng.uniform(size=(b, r)) < 0.3)
        classes = np.where(foreground, rng.integers(1, c + 1, (b, r)), 0)
        got = roi_heads.box_losses(
            logits, deltas, self._samples(classes, foreground, valid, targets), c
        )
        want = np_box_losses(logits, deltas, classes, foreground, valid, targets)
        self.assertAllClose([float(v) for v in got], want, rtol=RTOL)


def np_mask_loss(mask_logits, classes, foreground, targets):
    """BCE on the ground-truth class's mask, averaged over the pixels of the
    foreground RoIs."""
    total, pixels = 0.0, 0
    for b, f in zip(*np.nonzero(foreground), strict=True):
        logits = mask_logits[b, f, :, :, classes[b, f] - 1].astype("float64")
        total += np_bce(targets[b, f], logits).sum()
        pixels += logits.size
    return total / max(pixels, 1)


class MaskLossTest(TestCase):
    def test_hand_computed_tiny_case(self):
        # One foreground RoI of class 2 (of 3), 2×2 masks: only channel 1 is
        # read; a background RoI adds nothing.
        logits = np.zeros((1, 2, 2, 2, 3), "float32")
        logits[0, 0, :, :, 1] = [[0.0, 2.0], [-2.0, 0.0]]
        logits[0, 0, :, :, 0] = 50.0
        logits[0, 1] = -50.0
        targets = np.array([[[[1, 1], [0, 0]], [[1, 1], [1, 1]]]], "float32")
        loss = roi_heads.mask_loss(
            logits, np.array([[2, 0]]), np.array([[True, False]]), targets
        )
        want = (
            math.log(2) + math.log1p(math.exp(-2)) + math.log1p(math.exp(-2))
        ) / 4 + math.log(2) / 4
        self.assertAllClose(float(loss), want, rtol=1e-6)

    def test_random_cases_match_reference(self):
        rng = np.random.default_rng(2)
        b, f, s, c = 2, 6, 7, 4
        logits = rng.normal(scale=3, size=(b, f, s, s, c)).astype("float32")
        targets = (rng.uniform(size=(b, f, s, s)) < 0.5).astype("float32")
        foreground = rng.uniform(size=(b, f)) < 0.6
        classes = np.where(foreground, rng.integers(1, c + 1, (b, f)), 0)
        got = roi_heads.mask_loss(logits, classes, foreground, targets)
        want = np_mask_loss(logits, classes, foreground, targets)
        self.assertAllClose(float(got), want, rtol=RTOL)
        # No foreground RoI: zero, not NaN.
        none = roi_heads.mask_loss(logits, classes * 0, foreground & False, targets)
        self.assertEqual(float(none), 0.0)


class RoIBoxTargetTest(TestCase):
    def test_box_targets_use_roi_weights(self):
        rng = np.random.default_rng(3)
        gt = random_boxes(rng, (2, 3))
        proposals = np.concatenate(
            [gt + rng.normal(scale=1.5, size=gt.shape), random_boxes(rng, (2, 12))],
            axis=1,
        ).astype("float32")
        samples = roi_heads.sample_rois(
            proposals,
            np.ones((2, 15), bool),
            gt,
            np.array([[1, 2, 3], [3, 1, 0]]),
            np.array([[True, True, True], [True, True, False]]),
            keras.random.SeedGenerator(0),
            batch_size=16,
            positive_fraction=0.5,
        )
        rois, matched = _np(samples["rois"]), _np(samples["matched"]).astype(int)
        foreground = _np(samples["foreground"]).astype(bool)
        self.assertGreater(foreground.sum(), 4)
        got = _np(samples["box_targets"])
        for b, r in zip(*np.nonzero(foreground), strict=True):
            want = np_encode(gt[b, matched[b, r]], rois[b, r], (10, 10, 5, 5))
            np.testing.assert_allclose(got[b, r], want, rtol=1e-4, atol=1e-4)


def np_zero_extended_bilinear(crop, u, v):
    """Bilinear value of `crop` at crop coordinates `(u, v)` (pixel `(i, j)`
    at `(i, j)`), zero outside: the mask beyond its box is empty."""
    size = crop.shape[0]
    padded = np.pad(crop.astype("float64"), 1)
    u, v = u + 1, v + 1
    u0, v0 = np.floor(u).astype(int), np.floor(v).astype(int)
    fu, fv = u - u0, v - v0
    out = np.zeros(np.broadcast(u, v).shape)
    for du, wu in ((0, 1 - fu), (1, fu)):
        for dv, wv in ((0, 1 - fv), (1, fv)):
            i, j = u0 + du, v0 + dv
            inside = (i >= 0) & (i < size + 2) & (j >= 0) & (j < size + 2)
            value = padded[np.clip(i, 0, size + 1), np.clip(j, 0, size + 1)]
            out += np.where(inside, value, 0.0) * wu * wv
    return out


def np_mask_target(crop, gt_box, roi, out=28, ratio=2):
    """SPEC: the ground-truth mask RoIAligned into the RoI (aligned, sampling
    ratio 2), thresholded at 0.5. The mask is given as its crop: crop pixel
    `(i, j)` is the mask at image point `y1 + (i + 0.5)·h / S` (same for x),
    zero outside the ground-truth box. Also returns the averages, to leave
    out pixels within rounding of the threshold."""
    size = crop.shape[0]
    gy1, gx1, gy2, gx2 = (float(v) for v in gt_box)
    y1, x1, y2, x2 = (float(v) for v in roi)
    steps = (np.arange(out * ratio) + 0.5) / ratio
    ys = y1 + steps * (y2 - y1) / out
    xs = x1 + steps * (x2 - x1) / out
    u = (ys - gy1) * size / (gy2 - gy1) - 0.5
    v = (xs - gx1) * size / (gx2 - gx1) - 0.5
    samples = np_zero_extended_bilinear(crop, u[:, None], v[None, :])
    mean = samples.reshape(out, ratio, out, ratio).mean(axis=(1, 3))
    return (mean >= 0.5).astype("float32"), mean


class MaskTargetTest(TestCase):
    def test_matches_reference_on_rois_that_are_not_the_box(self):
        rng = np.random.default_rng(4)
        # Blocky crops (4×4 blocks of 0/1): every shift changes many pixels.
        blocks = rng.uniform(size=(2, 3, 4, 4)) < 0.5
        crops = np.repeat(np.repeat(blocks, 4, axis=2), 4, axis=3).astype("uint8")
        gt = random_boxes(rng, (2, 3))
        matched = rng.integers(0, 3, (2, 5)).astype("int32")
        rois = np.take_along_axis(gt, matched[..., None], axis=1)
        rois = rois + rng.normal(scale=3, size=rois.shape).astype("float32")
        rois[..., 2:] = np.maximum(rois[..., 2:], rois[..., :2] + 2)
        got = _np(
            roi_heads.mask_targets(rois, matched, gt, crops, RoIAlign(28, 2, strides=1))
        )
        compared = 0
        for b in range(2):
            for f in range(5):
                m = matched[b, f]
                want, mean = np_mask_target(crops[b, m], gt[b, m], rois[b, f])
                clear = np.abs(mean - 0.5) > 1e-4
                np.testing.assert_array_equal(got[b, f][clear], want[clear])
                compared += clear.sum()
        self.assertGreater(compared, 0.95 * 2 * 5 * 28 * 28)


def np_roi_align(level, box, out, stride):
    """Aligned RoIAlign of one box from one `(H, W, C)` level, sampling
    ratio 2."""
    height, width = level.shape[:2]
    y1, x1, y2, x2 = (float(v) / stride - 0.5 for v in box)
    steps = (np.arange(2 * out) + 0.5) / 2
    ys = y1 + steps * (y2 - y1) / out
    xs = x1 + steps * (x2 - x1) / out

    def axis(coords, size):
        valid = (coords >= -1) & (coords <= size)
        coords = np.clip(coords, 0, size - 1)
        low = np.floor(coords).astype(int)
        high = np.minimum(low + 1, size - 1)
        frac = coords - low
        return low, high, (1 - frac) * valid, frac * valid

    yl, yh, wyl, wyh = axis(ys, height)
    xl, xh, wxl, wxh = axis(xs, width)
    level = level.astype("float64")
    samples = sum(
        wy[:, None, None] * wx[None, :, None] * level[ry][:, rx]
        for ry, wy in ((yl, wyl), (yh, wyh))
        for rx, wx in ((xl, wxl), (xh, wxh))
    )
    return samples.reshape(out, 2, out, 2, -1).mean(axis=(1, 3))


@pytest.mark.parametrize("adaptive", [True, False])
def test_pooled_grids_match_reference_at_the_level_strides(adaptive):
    # The box RoIAlign pools each level at its own stride (image size over
    # the level's size): every level with adaptive pooling, each box's FPN
    # level without.
    size = 64
    backbone = build_resnet((1, 1, 1, 1), (4, 4, 4, 4), input_shape=(size, size, 3))
    model = PANet(
        backbone,
        2,
        filters=4,
        fc_units=8,
        max_detections=4,
        rpn_pre_nms_top_k_test=40,
        rpn_post_nms_top_k_test=6,
        adaptive_pooling=adaptive,
        bottom_up_path=False,
    )
    pool = model.roi_heads.box_pool
    fpn_out = model.fpn.output[:4]
    boxes = random_boxes(np.random.default_rng(5), (1, 6), size=size)
    levels_model = keras.Model(model.input, fpn_out)
    images = np.random.default_rng(6).uniform(0, 255, (1, size, size, 3))
    levels = [np.asarray(x) for x in levels_model.predict(images, verbose=0)]
    grids = pool([levels, boxes])
    grids = [_np(g) for g in (grids if adaptive else [grids])]
    for r, box in enumerate(boxes[0]):
        if adaptive:
            wanted = [
                (grids[i][r], levels[i][0], size // levels[i].shape[1])
                for i in range(4)
            ]
        else:
            scale = math.sqrt((box[2] - box[0]) * (box[3] - box[1]))
            k = int(np.clip(math.floor(4 + math.log2(scale / 224 + 1e-8)), 2, 5))
            level = levels[k - 2]
            wanted = [(grids[0][r], level[0], size // level.shape[1])]
        for grid, level, stride in wanted:
            want = np_roi_align(level, box, 7, stride)
            np.testing.assert_allclose(grid, want, rtol=1e-4, atol=1e-4)


def test_mask_buckets():
    assert roi_heads.mask_buckets(128) == [8, 16, 32, 64, 128]
    assert roi_heads.mask_buckets(100) == [8, 16, 32, 64, 100]
    assert roi_heads.mask_buckets(8) == [8]
    assert roi_heads.mask_buckets(5) == [5]


@pytest.mark.parametrize(
    "foreground, rows, normalization",
    [
        ((3, 2), 8, None),
        ((5, 3), 8, None),
        ((8, 3), 16, None),
        ((3, 12), 16, None),
        ((16, 9), 32, None),
        ((30, 2), 32, None),
        # More than one image's candidate rows: all of them, both images.
        ((32, 2), 64, None),
        # Batch norm in the mask head: always every candidate row.
        ((3, 2), 64, "batch"),
    ],
)
def test_the_mask_head_trains_on_the_smallest_bucket_of_foreground_rois(
    foreground, rows, normalization
):
    """The mask loss on the batch's foreground RoIs, gathered across its
    images into the smallest static row count that holds them, equals the
    loss on all the candidate rows (32 an image here: 64 RoIs an image, half
    foreground at most), and the mask head ran on that count only."""
    rng = np.random.default_rng(7)
    heads = roi_heads.RoIHeads(
        3,
        filters=8,
        fc_units=16,
        batch_size_per_image=64,
        positive_fraction=0.5,
        normalization=normalization,
    )
    levels = [
        rng.normal(size=(2, 64 // s, 64 // s, 8)).astype("float32")
        for s in (4, 8, 16, 32)
    ]
    gt_boxes = np.array([[[4, 4, 30, 28], [20, 30, 60, 62]]] * 2, "float32")
    gt_classes = np.array([[1, 3], [2, 1]], "int32")
    gt_masks = (rng.uniform(size=(2, 2, 28, 28)) < 0.5).astype("uint8")
    gt_valid = np.ones((2, 2), bool)
    # Per image: its foreground count minus the two ground-truth boxes as
    # jittered copies of them (IoU > 0.7), the rest far from both; 30
    # proposals + 2 boxes < 64, so every RoI is sampled, in a fixed order.
    proposals = np.zeros((2, 30, 4), "float32")
    for b, count in enumerate(foreground):
        for p in range(30):
            if p < count - 2:
                box = gt_boxes[b, p % 2] + rng.uniform(-1, 1, 4)
            else:
                box = np.array([40, 0, 44, 4]) + rng.uniform(0, 2, 4)
            proposals[b, p] = box
    valid = np.ones((2, 30), bool)
    heads([levels, proposals, valid, np.zeros((2, 64, 64, 3), "float32")])
    seen = []
    run_mask_head = heads.mask_head.call

    def mask_head(inputs, *args, **kwargs):
        first = inputs[0] if isinstance(inputs, (list, tuple)) else inputs
        seen.append(first.shape[0])
        return run_mask_head(inputs, *args, **kwargs)

    heads.mask_head.call = mask_head
    losses = heads.losses_for(
        levels, proposals, valid, gt_boxes, gt_classes, gt_masks, gt_valid,
        training=True,
    )  # fmt: skip
    assert seen == [rows]
    samples = roi_heads.sample_rois(
        proposals, valid, gt_boxes, gt_classes, gt_valid, heads.seed_generator,
        64, 0.5, 0.5,
    )  # fmt: skip
    np.testing.assert_array_equal(
        _np(ops_sum(samples["foreground"])), np.asarray(foreground)
    )
    every_row = heads._mask_loss(levels, samples, gt_boxes, gt_masks, 32, None, True)
    # Every row, per image as a (B, 32) batch: the batched pooling and targets.
    heads.mask_head.call = run_mask_head
    rois = samples["rois"][:, :32]
    logits = heads.mask_head(heads.mask_pool([levels, rois]), training=True)
    per_image = roi_heads.mask_loss(
        keras.ops.reshape(logits, (2, 32, 28, 28, 3)),
        samples["classes"][:, :32],
        samples["foreground"][:, :32],
        roi_heads.mask_targets(
            rois, samples["matched"][:, :32], gt_boxes, gt_masks,
            heads.mask_target_align,
        ),
    )  # fmt: skip
    np.testing.assert_allclose(_np(every_row), _np(per_image), rtol=RTOL)
    assert float(_np(losses["mask"])) > 0.1
    np.testing.assert_allclose(_np(losses["mask"]), _np(every_row), rtol=RTOL)


def ops_sum(mask):
    return keras.ops.sum(keras.ops.cast(mask, "int32"), axis=1)
