"""What `kseg predict` holds for an instance model: masks pasted inside their
boxes, the overlay blended by bands, one full-size mask at a time for the
COCO results, so memory grows with the image, not detections × H × W."""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from kseg.data.instance_transform import paste_mask_crops
from kseg.inference.instance_outputs import _BAND_ROWS, blend_masks


def _detections(count, height, width, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.uniform(-20, height + 20, (count, 2))
    x = rng.uniform(-20, width + 20, (count, 2))
    boxes = np.stack([y.min(-1), x.min(-1), y.max(-1), x.max(-1)], axis=-1)
    masks = rng.uniform(0.2, 0.8, (count, 28, 28)).astype(np.float32)
    return masks, boxes


def test_blending_by_bands_is_the_whole_image_blend():
    height, width = 2 * _BAND_ROWS + 37, 50
    image = np.random.default_rng(1).integers(0, 256, (height, width, 3), np.uint8)
    masks, boxes = _detections(6, height, width)
    pasted = paste_mask_crops(masks, boxes, height, width)
    planes = np.asarray(pasted)
    assert (planes.sum(0) > 1).sum() > 100  # masks overlap
    colors = np.random.default_rng(2).integers(0, 256, (6, 3), np.uint8)
    # The blend before bands: the whole image in float32, worst first.
    expected = np.asarray(image, np.float32).copy()
    for k in range(5, -1, -1):
        expected[planes[k]] = 0.4 * expected[planes[k]] + 0.6 * colors[k]
    expected = np.round(expected).astype(np.uint8)
    np.testing.assert_array_equal(blend_masks(image, pasted, colors, 0.6), expected)
    np.testing.assert_array_equal(blend_masks(image, planes, colors, 0.6), expected)


_PREDICT = textwrap.dedent(
    """
    import resource, sys
    import numpy as np
    from kseg import testing
    from kseg.inference import predict_instances
    from kseg.inference.instance_outputs import (
        coco_results, draw_instances, encode_instance_png, encode_rgb)

    count, side = int(sys.argv[1]), int(sys.argv[2])
    rng = np.random.default_rng(0)
    # Boxes of a quarter of the 64 × 64 input each, all above the threshold.
    corners = rng.uniform(0, 32, (count, 2))
    boxes = np.concatenate([corners, corners + 32], axis=1)
    model = testing.fixed_detector(
        boxes, np.linspace(0.99, 0.6, count), np.ones(count, np.int32),
        rng.uniform(0.3, 0.7, (count, 28, 28)), count, (64, 64))

    def run(image):
        (instances,) = predict_instances(model, [image])
        draw_instances(image, instances, ["thing"])
        encode_rgb(draw_instances(image, instances, ["thing"]))
        encode_instance_png(instances.instance_map())
        coco_results(instances, 1, [1])
        return len(instances.scores)

    assert run(np.full((64, 64, 3), 90, np.uint8)) == count
    image = np.full((side, side, 3), 90, np.uint8)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert run(image) == count
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print((after - before) * 1024)
    """
)


@pytest.mark.slow
def test_kseg_predict_memory_does_not_grow_with_detections_times_pixels():
    # Before: D float32 and D bool full-size planes (paste_masks), a uint8
    # copy of them transposed for the RLE and a float32 copy of the image
    # for the overlay: ~100 bytes a pixel for 16 boxes. Now: the image,
    # its instance map and overlay, one plane (the RLE); the image is fitted
    # into the model as uint8 (no full-size float32 copy).
    count, side = 16, 1536
    result = subprocess.run(
        [sys.executable, "-c", _PREDICT, str(count), str(side)],
        capture_output=True,
        text=True,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"),
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    growth = int(result.stdout.split()[-1])
    # Bytes a pixel: 3 image + 3 overlay + 2 instance map + 1 plane, and
    # slack. Measured: 72 bytes a pixel with full-size planes, 18 with a
    # float32 copy of the image for the fit, 11.6 now.
    assert growth < 16 * side * side, growth / side**2
