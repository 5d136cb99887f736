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


def roi_align_reference(feature, box, size, stride, max_ratio):
    """Adaptive-ratio aligned RoIAlign of one box, one loop per sample."""
    y1, x1, y2, x2 = (v / stride - 0.5 for v in box)
    bin_h, bin_w = (y2 - y1) / size, (x2 - x1) / size
    grid_h = min(math.ceil((y2 - y1) / size), max_ratio)
    grid_w = min(math.ceil((x2 - x1) / size), max_ratio)
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
    def _case(self, boxes, max_ratio=4, stride=2):
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
