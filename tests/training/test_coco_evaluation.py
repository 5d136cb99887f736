"""COCO evaluation: hand-made ground truth and detections with known AP, the
model-output path (scale, paste, RLE, category ids), and agreement of
faster-coco-eval with pycocotools."""

import math

import numpy as np
import pytest

from kseg.data import encode_mask
from kseg.training.coco_evaluation import (
    CocoEvaluator,
    detections_to_coco,
    evaluate_coco,
    format_coco_table,
)

pytest.importorskip("faster_coco_eval")

CATEGORIES = [{"id": 3, "name": "cat"}, {"id": 7, "name": "dog"}]
CATEGORY_IDS = (3, 7)

# (image id, height, width), then objects as (image id, category id,
# [y1, x1, y2, x2]) rectangles; widths are multiples of 5 so a shift by w/5
# gives IoU (4/5) / (6/5) = 2/3 exactly. Sizes: small (< 32²), medium, large.
IMAGES = [(0, 60, 90), (1, 100, 120), (2, 120, 130)]
OBJECTS = [
    (0, 3, [10, 10, 30, 30]),  # 400 px, small; stored as a polygon
    (0, 7, [30, 40, 50, 70]),  # 600 px, small
    (1, 3, [10, 20, 50, 60]),  # 1600 px, medium
    (2, 7, [5, 5, 105, 105]),  # 10000 px, large
    (2, 3, [108, 10, 118, 20]),  # 100 px, small
]
CROWD = (1, 7, [60, 0, 95, 40])


def _rectangle(height, width, box):
    mask = np.zeros((height, width), np.uint8)
    y1, x1, y2, x2 = box
    mask[y1:y2, x1:x2] = 1
    return mask


def _ground_truth(first_id=1):
    sizes = {i: (h, w) for i, h, w in IMAGES}
    annotations = []
    for number, (image_id, category_id, box) in enumerate(OBJECTS + [CROWD]):
        y1, x1, y2, x2 = box
        if number == 0:
            # The COCO rasteriser reads polygon vertices as pixel corners:
            # this square covers pixels 10..29.
            segmentation = [[x1, y1, x2, y1, x2, y2, x1, y2]]
        else:
            segmentation = encode_mask(_rectangle(*sizes[image_id], box))
        annotations.append(
            {
                "id": first_id + number,
                "image_id": image_id,
                "category_id": category_id,
                "segmentation": segmentation,
                "bbox": [x1, y1, x2 - x1, y2 - y1],
                "area": float((y2 - y1) * (x2 - x1)),
                "iscrowd": int(number == len(OBJECTS)),
            }
        )
    return {
        "images": [
            {"id": i, "height": h, "width": w, "file_name": f"{i}.png"}
            for i, h, w in IMAGES
        ],
        "annotations": annotations,
        "categories": CATEGORIES,
    }


def _outputs(shift=0.0, scale=2.0, extra=()):
    """Model outputs for the objects (plus `extra` rows), in a model input
    resized by `scale`; boxes shifted right by `shift` of their width."""
    detections = {i: [] for i, _, _ in IMAGES}
    for image_id, category_id, box in list(OBJECTS) + list(extra):
        y1, x1, y2, x2 = box
        dx = shift * (x2 - x1)
        detections[image_id].append(
            ([y1, x1 + dx, y2, x2 + dx], CATEGORY_IDS.index(category_id) + 1)
        )
    n, d = len(IMAGES), 5
    boxes = np.full((n, d, 4), 7.0)  # rows beyond num_detections are junk
    classes = np.ones((n, d), np.int32)
    scores = np.full((n, d), 0.9)
    for b, (image_id, _, _) in enumerate(IMAGES):
        for k, (box, k_class) in enumerate(detections[image_id]):
            boxes[b, k] = np.asarray(box) * scale
            classes[b, k] = k_class
            scores[b, k] = 0.9 - 0.1 * k
    outputs = {
        "boxes": boxes,
        "scores": scores,
        "classes": classes,
        "masks": np.ones((n, d, 28, 28), np.float32),
        "num_detections": np.array([len(detections[i]) for i, _, _ in IMAGES]),
    }
    meta = {
        "image_id": np.array([i for i, _, _ in IMAGES]),
        "height": np.array([h for _, h, _ in IMAGES]),
        "width": np.array([w for _, _, w in IMAGES]),
        "scale": np.full((n, 2), scale, np.float32),
    }
    return outputs, meta


def test_outputs_map_back_to_the_original_images():
    outputs, meta = _outputs()
    detections = detections_to_coco(outputs, meta, CATEGORY_IDS)
    assert len(detections) == len(OBJECTS)
    first = detections[0]
    assert first["image_id"] == 0 and first["category_id"] == 3
    np.testing.assert_allclose(first["bbox"], [10, 10, 20, 20])
    from faster_coco_eval.core import mask

    decoded = mask.decode(
        {
            "size": first["segmentation"]["size"],
            "counts": first["segmentation"]["counts"].encode(),
        }  # fmt: skip
    )
    np.testing.assert_array_equal(decoded, _rectangle(60, 90, [10, 10, 30, 30]))


@pytest.mark.parametrize("backend", ["faster_coco_eval", "pycocotools"])
def test_perfect_detections_give_ap_one(backend):
    if backend == "pycocotools":
        pytest.importorskip("pycocotools")
    # A confident detection on the crowd region is ignored, not a false positive.
    outputs, meta = _outputs(extra=[CROWD])
    detections = detections_to_coco(outputs, meta, CATEGORY_IDS)
    results = evaluate_coco(_ground_truth(), detections, backend=backend)
    for iou_type in ("bbox", "segm"):
        summary = results[iou_type]
        for metric in ("AP", "AP50", "AP75", "APs", "APm", "APl"):
            assert summary[metric] == pytest.approx(1.0), (iou_type, metric)
        assert summary["per_class"] == {3: pytest.approx(1.0), 7: pytest.approx(1.0)}


@pytest.mark.parametrize("backend", ["faster_coco_eval", "pycocotools"])
def test_shifted_detections_give_the_hand_computed_ap(backend):
    if backend == "pycocotools":
        pytest.importorskip("pycocotools")
    # IoU 2/3 everywhere: a match at IoU thresholds 0.50-0.65 (4 of 10).
    outputs, meta = _outputs(shift=0.2)
    detections = detections_to_coco(outputs, meta, CATEGORY_IDS)
    results = evaluate_coco(_ground_truth(), detections, backend=backend)
    for iou_type in ("bbox", "segm"):
        summary = results[iou_type]
        assert summary["AP"] == pytest.approx(0.4)
        assert summary["AP50"] == pytest.approx(1.0)
        assert summary["AP75"] == pytest.approx(0.0)
        for area in ("APs", "APm", "APl"):
            assert summary[area] == pytest.approx(0.4)
        assert summary["per_class"] == {3: pytest.approx(0.4), 7: pytest.approx(0.4)}


def test_annotation_ids_from_zero_are_renumbered():
    # The COCO API reads a match with annotation id 0 as "no match": left as
    # is, the first object would count as missed and AP would drop.
    outputs, meta = _outputs()
    detections = detections_to_coco(outputs, meta, CATEGORY_IDS)
    results = evaluate_coco(_ground_truth(first_id=0), detections)
    assert results["segm"]["AP"] == pytest.approx(1.0)


def test_faster_coco_eval_agrees_with_pycocotools():
    pytest.importorskip("pycocotools")
    rng = np.random.default_rng(0)
    outputs, meta = _outputs(shift=0.1, extra=[(0, 7, [0, 0, 20, 25]), CROWD])
    outputs["scores"] = rng.uniform(0.05, 1.0, size=outputs["scores"].shape)
    outputs["masks"] = rng.uniform(0.3, 1.0, size=outputs["masks"].shape)
    outputs["boxes"] = outputs["boxes"] + rng.normal(0, 3, outputs["boxes"].shape)
    detections = detections_to_coco(outputs, meta, CATEGORY_IDS)
    fast = evaluate_coco(_ground_truth(), detections, backend="faster_coco_eval")
    reference = evaluate_coco(_ground_truth(), detections, backend="pycocotools")
    for iou_type in ("bbox", "segm"):
        assert 0.05 < fast[iou_type]["AP"] < 0.95  # neither trivial case
        for metric, value in reference[iou_type].items():
            if metric == "per_class":
                for c in CATEGORY_IDS:
                    assert fast[iou_type][metric][c] == pytest.approx(
                        value[c], abs=1e-9
                    )
            else:
                assert fast[iou_type][metric] == pytest.approx(value, abs=1e-9)


def test_no_detections_and_unknown_images():
    results = evaluate_coco(_ground_truth(), [])
    assert results["bbox"]["AP"] == 0.0 and results["segm"]["per_class"][3] == 0.0
    with pytest.raises(ValueError, match="image id"):
        evaluate_coco(
            _ground_truth(),
            [{"image_id": 99, "category_id": 3, "bbox": [0, 0, 1, 1], "score": 1}],
            iou_types=("bbox",),
        )


def test_evaluator_collects_batches_and_formats_the_table():
    evaluator = CocoEvaluator(_ground_truth(), CATEGORY_IDS)
    outputs, meta = _outputs()
    for part in (slice(0, 2), slice(2, 3)):
        evaluator.update(
            {k: v[part] for k, v in outputs.items()},
            {k: v[part] for k, v in meta.items()},
        )
    results = evaluator.result()
    assert results["segm"]["per_class"] == {
        "cat": pytest.approx(1.0),
        "dog": pytest.approx(1.0),
    }
    table = format_coco_table(results)
    lines = table.splitlines()
    assert lines[0].split() == ["AP", "AP50", "AP75", "APs", "APm", "APl"]
    assert lines[1].split() == ["box"] + ["1.000"] * 6
    assert lines[2].split() == ["mask"] + ["1.000"] * 6
    assert lines[-2].split() == ["cat", "1.000", "1.000"]
    evaluator.reset()
    assert evaluator.detections == []


def test_table_marks_missing_values():
    nan = math.nan
    results = {
        "segm": {
            "AP": 0.5, "AP50": 0.75, "AP75": 0.25, "APs": -1.0, "APm": 0.5,
            "APl": 0.5, "per_class": {"cat": 0.5, "dog": nan},
        }
    }  # fmt: skip
    lines = format_coco_table(results).splitlines()
    assert lines[1].split() == [
        "mask",
        "0.500",
        "0.750",
        "0.250",
        "-",
        "0.500",
        "0.500",
    ]
    assert lines[-1].split() == ["dog", "-"]


def test_eval_pipeline_to_evaluator_round_trip():
    # Oracle outputs built from the ground truth in the eval pipeline's
    # resized frame: boxes exact (box AP 1), masks through a 28x28 crop and
    # back (mask AP near 1, every object found at IoU 0.5).
    import tensorflow as tf

    from kseg.data import (
        boxes_from_masks,
        crop_masks_to_boxes,
        instance_eval_pipeline,
        make_synthetic_instances,
    )

    val = make_synthetic_instances("val", num_images=6, image_size=96, seed=1)
    batches, gt = instance_eval_pipeline(val, 4, 192, short_edge=150)
    evaluator = CocoEvaluator(gt, val.category_ids)
    by_id = {val.images[i]["id"]: i for i in range(len(val))}
    for _, meta in batches:
        count = len(meta["image_id"])
        outputs = {
            "boxes": np.zeros((count, 8, 4), np.float32),
            "scores": np.zeros((count, 8), np.float32),
            "classes": np.zeros((count, 8), np.int32),
            "masks": np.zeros((count, 8, 28, 28), np.float32),
            "num_detections": np.zeros(count, np.int32),
        }
        for b, image_id in enumerate(meta["image_id"].numpy()):
            sample = val.load(by_id[image_id])
            boxes = boxes_from_masks(sample["masks"])
            n = len(boxes)
            crops = crop_masks_to_boxes(tf.constant(sample["masks"]), boxes, 28)
            outputs["boxes"][b, :n] = boxes * np.tile(meta["scale"][b], 2)
            outputs["scores"][b, :n] = 0.9
            outputs["classes"][b, :n] = sample["classes"]
            outputs["masks"][b, :n] = crops.numpy()
            outputs["num_detections"][b] = n
        evaluator.update(outputs, meta)
    results = evaluator.result()
    assert results["bbox"]["AP"] == pytest.approx(1.0)
    assert results["segm"]["AP50"] == pytest.approx(1.0)
    assert results["segm"]["AP"] > 0.85
    assert set(results["segm"]["per_class"]) == set(val.class_names)
