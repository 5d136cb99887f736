"""RoIAlign's adaptive sampling ratio (`sampling_ratio=0`) against a loop
reference written from Detectron2's `ROIAlign` definition."""

import math

import keras
import numpy as np

from kseg.layers.panet import RoIAlign
from kseg.testing import TestCase


def _bilinear(feature, y, x):
    height, width = feature.shape[:2]
    if y < -1.0 or y > height or x < -1.0 or x > width:
        return np.zeros(feature.shape[-1])
    y, x = max(y, 0.0), max(x, 0.0)
    y0, x0 = int(y), int(x)
    if y0 >= height - 1:
        y0 = y1 = height - 1
        y = float(y0)
    else:
        y1 = y0 + 1
    if x0 >= width - 1:
        x0 = x1 = width - 1
        x = float(x0)
    else:
        x1 = x0 + 1
    ly, lx = y - y0, x - x0
    return (
        (1 - ly) * (1 - lx) * feature[y0, x0]
        + (1 - ly) * lx * feature[y0, x1]
        + ly * (1 - lx) * feature[y1, x0]
        + ly * lx * feature[y1, x1]
    )


def roi_align_reference(feature, box, size, stride, max_ratio=None):
    """Adaptive-ratio aligned RoIAlign of one box, one loop per sample
    (Detectron2: `ceil(roi / bins)` samples, no bound unless `max_ratio`)."""
    y1, x1, y2, x2 = (v / stride - 0.5 for v in box)
    bin_h, bin_w = (y2 - y1) / size, (x2 - x1) / size
    grid_h = math.ceil((y2 - y1) / size)
    grid_w = math.ceil((x2 - x1) / size)
    if max_ratio is not None:
        grid_h, grid_w = min(grid_h, max_ratio), min(grid_w, max_ratio)
    count = max(grid_h * grid_w, 1)
    out = np.zeros((size, size, feature.shape[-1]))
    for i in range(size):
        for j in range(size):
            for sy in range(grid_h):
                for sx in range(grid_w):
                    y = y1 + i * bin_h + (sy + 0.5) * bin_h / grid_h
                    x = x1 + j * bin_w + (sx + 0.5) * bin_w / grid_w
                    out[i, j] += _bilinear(feature, y, x)
    return out / count


class AdaptiveRoIAlignTest(TestCase):
    def _case(self, boxes, max_ratio=None, stride=2):
        rng = np.random.default_rng(0)
        features = rng.normal(size=(2, 12, 10, 3)).astype("float32")
        indices = np.arange(len(boxes)) % 2
        layer = RoIAlign(
            3, sampling_ratio=0, strides=stride, max_sampling_ratio=max_ratio
        )
        got = keras.ops.convert_to_numpy(layer([features, boxes, indices]))
        for box, index, pooled in zip(boxes, indices, got, strict=True):
            want = roi_align_reference(
                features[index].astype("float64"), box, 3, stride, max_ratio
            )
            np.testing.assert_allclose(pooled, want, rtol=1e-4, atol=1e-4)

    def test_matches_reference(self):
        rng = np.random.default_rng(1)
        y1, x1 = rng.uniform(-4, 18, 12), rng.uniform(-4, 14, 12)
        h, w = rng.uniform(0.5, 22, 12), rng.uniform(0.5, 22, 12)
        boxes = np.stack([y1, x1, y1 + h, x1 + w], 1).astype("float32")
        self._case(boxes)

    def test_exact_for_every_box_inside_the_image(self):
        # A 12×10 map at stride 2 (a 24×20 image): boxes up to the whole
        # image need up to ceil(12 / 3) = 4 samples per bin; a 40×30 map at
        # stride 1 up to 14 (the old cap was 4: 20-60 px boxes were off).
        rng = np.random.default_rng(3)
        y1, x1 = rng.uniform(0, 12, 16), rng.uniform(0, 10, 16)
        y2, x2 = rng.uniform(y1, 24), rng.uniform(x1, 20)
        boxes = np.stack([y1, x1, y2, x2], 1).astype("float32")
        boxes[0] = [0, 0, 24, 20]
        self._case(boxes)
        features = rng.normal(size=(1, 40, 30, 2)).astype("float32")
        boxes = np.array(
            [[0, 0, 40, 30], [3.3, 1.7, 39.1, 29.9], [10, 2, 31, 7]], "float32"
        )
        got = keras.ops.convert_to_numpy(
            RoIAlign(3, sampling_ratio=0, strides=1)([features, boxes, np.zeros(3)])
        )
        for box, pooled in zip(boxes, got, strict=True):
            want = roi_align_reference(features[0].astype("float64"), box, 3, 1)
            np.testing.assert_allclose(pooled, want, rtol=1e-4, atol=1e-4)

    def test_pyramid_roi_align_is_exact_in_both_forms(self):
        from kseg.layers.roi_align import PyramidRoIAlign

        rng = np.random.default_rng(4)
        # A 64×64 image: up to 8 samples per bin on the stride-4 level.
        levels = [
            rng.normal(size=(2, 64 // s, 64 // s, 2)).astype("float32") for s in (4, 8)
        ]
        y1, x1 = rng.uniform(0, 30, (2, 5)), rng.uniform(0, 30, (2, 5))
        y2, x2 = rng.uniform(y1 + 20, 64), rng.uniform(x1 + 20, 64)
        boxes = np.stack([y1, x1, y2, x2], -1).astype("float32")
        boxes[0, 0] = [0, 0, 64, 64]
        layer = PyramidRoIAlign(2, sampling_ratio=0, strides=(4, 8))
        for training in (False, True):
            grids = layer([levels, boxes], training=training)
            for level, stride, grid in zip(levels, (4, 8), grids, strict=True):
                grid = keras.ops.convert_to_numpy(grid)
                for r, box in enumerate(boxes.reshape(-1, 4)):
                    want = roi_align_reference(
                        level[r // 5].astype("float64"), box, 2, stride
                    )
                    np.testing.assert_allclose(grid[r], want, rtol=1e-4, atol=1e-4)

    def test_dynamic_map_size_needs_a_bound(self):
        layer = RoIAlign(3, sampling_ratio=0, strides=1)
        with self.assertRaisesRegex(ValueError, "max_sampling_ratio"):
            layer.samples_per_bin(keras.ops.convert_to_tensor(5), 3)
        self.assertEqual(layer.samples_per_bin(40, 3), 14)

    def test_empty_box_pools_zero(self):
        boxes = np.array([[4.0, 4.0, 4.0, 9.0]], "float32")
        self._case(boxes)

    def test_ratio_is_capped_at_the_bound(self):
        boxes = np.array([[0.0, 0.0, 24.0, 20.0]], "float32")  # ceil 4 at stride 2
        self._case(boxes, max_ratio=2)

    def test_config_round_trip_and_mixed_precision(self):
        layer = RoIAlign(3, sampling_ratio=0, strides=2, max_sampling_ratio=3)
        self.assertEqual(
            RoIAlign.from_config(layer.get_config()).get_config(), layer.get_config()
        )
        features = np.random.default_rng(2).normal(size=(1, 12, 10, 3))
        boxes = np.array([[1.0, 2.0, 17.0, 15.0]], "float32")
        half = RoIAlign(3, sampling_ratio=0, strides=2, dtype="mixed_float16")
        full = RoIAlign(3, sampling_ratio=0, strides=2)
        a = keras.ops.convert_to_numpy(full([features, boxes, np.array([0])]))
        b = keras.ops.convert_to_numpy(half([features, boxes, np.array([0])]))
        self.assertEqual(b.dtype, np.float16)
        np.testing.assert_allclose(b.astype("float64"), a, atol=1e-2)

    def test_rejects_negative_ratio(self):
        with self.assertRaisesRegex(ValueError, "sampling_ratio"):
            RoIAlign(3, sampling_ratio=-1)
