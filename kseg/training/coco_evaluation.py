"""COCO box and mask AP of instance predictions, through a maintained evaluator.

kseg never computes AP itself: `evaluate_coco` hands the ground truth and the
detections to `faster-coco-eval` (the default: the COCO API's algorithm, in
C++) or `pycocotools` (the reference), and reads their summary. Per-class AP
is the evaluator's precision array averaged over IoU thresholds and recall
points for one category (area "all", 100 detections), as Detectron2 reports it.

The path from a model to the numbers:

    evaluator = CocoEvaluator(ground_truth, category_ids, class_names)
    for x, meta in batches:                      # instance_eval_pipeline
        evaluator.update(model.predict_on_batch(x), meta)
    results = evaluator.result()
    print(format_coco_table(results))

`detections_to_coco` takes the model's outputs (boxes in the padded input
image, 28 × 28 mask probabilities, contiguous classes) back to the original
image (boxes divided by the resize scale, masks pasted with `paste_masks`,
RLE-encoded) and to the dataset's category ids.
"""

import contextlib
import copy
import io
import math

import numpy as np
from keras import ops

from kseg.data.instance_transform import boxes_to_image, paste_mask_crops
from kseg.data.instances import mask_api, segmentation_to_rle

SUMMARY_METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")
IOU_TYPES = {"bbox": "box", "segm": "mask"}
BACKENDS = ("faster_coco_eval", "pycocotools")


def _numpy(value):
    return value.numpy() if hasattr(value, "numpy") else np.asarray(value)


def detections_to_coco(
    outputs, meta, category_ids, mask_threshold=0.5, mask_paste="kseg"
):
    """Turns a batch of model outputs into COCO result dicts.

    Args:
        outputs: dict with `boxes` `(N, D, 4)` `[y1, x1, y2, x2]` in pixels of
            the padded model input, `scores` `(N, D)`, `classes` `(N, D)` in
            1..C, `num_detections` `(N,)` and optionally `masks` `(N, D, S, S)`
            probabilities. NumPy arrays or tensors.
        meta: dict with `image_id` `(N,)`, `height`, `width` `(N,)` (original
            size) and `scale` `(N, 2)` or `(N,)` (resize factor, `(y, x)`),
            as `instance_eval_pipeline` yields.
        category_ids: the dataset's category id of class k at k − 1.
        mask_threshold: float. Threshold of the pasted probabilities.
            Defaults to 0.5.
        mask_paste: `"kseg"` (SPEC's `paste_masks`) or `"torchvision"`
            (torchvision's pasting, for a converted model: the model's
            `mask_paste`). Defaults to `"kseg"`.

    Returns:
        list of dicts `{"image_id", "category_id", "bbox" [x, y, w, h],
        "score"}` plus `"segmentation"` (compressed RLE, `counts` a str) when
        `masks` is given; boxes clipped to the original image.
    """
    boxes = _numpy(outputs["boxes"]).astype(np.float64)
    scores = _numpy(outputs["scores"])
    classes = _numpy(outputs["classes"]).astype(np.int64)
    counts = _numpy(outputs["num_detections"]).astype(np.int64).reshape(-1)
    masks = _numpy(outputs["masks"]) if "masks" in outputs else None
    image_ids = _numpy(meta["image_id"]).reshape(-1)
    heights = _numpy(meta["height"]).reshape(-1)
    widths = _numpy(meta["width"]).reshape(-1)
    scales = _numpy(meta["scale"]).astype(np.float64).reshape(len(image_ids), -1)
    scales = np.broadcast_to(scales, (len(image_ids), 2))
    category_ids = np.asarray(category_ids)
    api = mask_api() if masks is not None else None
    results = []
    for b, image_id in enumerate(image_ids):
        height, width = int(heights[b]), int(widths[b])
        n = int(counts[b])
        valid = (classes[b, :n] >= 1) & (classes[b, :n] <= len(category_ids))
        keep = np.flatnonzero(valid)
        if keep.size == 0:
            continue
        box = ops.convert_to_numpy(
            boxes_to_image(boxes[b, keep], scales[b], height, width)
        )
        if masks is not None:
            # One image plane at a time, not detections × height × width.
            pasted = paste_mask_crops(
                masks[b, keep], box, height, width, mask_threshold, mask_paste
            )
            rles = [
                api.encode(np.asfortranarray(pasted.plane(i)[..., None], np.uint8))[0]
                for i in range(len(keep))
            ]
        for i, k in enumerate(keep):
            y1, x1, y2, x2 = (float(v) for v in box[i])
            result = {
                "image_id": int(image_id),
                "category_id": int(category_ids[classes[b, k] - 1]),
                "bbox": [x1, y1, x2 - x1, y2 - y1],
                "score": float(scores[b, k]),
            }
            if masks is not None:
                result["segmentation"] = {
                    "size": [height, width],
                    "counts": rles[i]["counts"].decode("ascii"),
                }
            results.append(result)
    return results


def _ground_truth_for_evaluator(ground_truth):
    """A copy the COCO API accepts: annotation ids from 1 (id 0 reads as
    "unmatched"), `iscrowd` and `area` present, RLE counts as bytes-free str."""
    ground_truth = copy.deepcopy(ground_truth)
    images = {image["id"]: image for image in ground_truth["images"]}
    for number, annotation in enumerate(ground_truth["annotations"], start=1):
        annotation["id"] = number
        annotation.setdefault("iscrowd", 0)
        if "area" not in annotation or "bbox" not in annotation:
            image = images[annotation["image_id"]]
            rle = segmentation_to_rle(
                annotation["segmentation"], image["height"], image["width"]
            )
            if isinstance(rle["counts"], str):
                rle = {"size": rle["size"], "counts": rle["counts"].encode("ascii")}
            annotation.setdefault("area", float(mask_api().area(rle)))
            annotation.setdefault("bbox", [float(v) for v in mask_api().toBbox(rle)])
    ground_truth.setdefault("info", {})
    return ground_truth


def _evaluator_classes(backend):
    if backend == "faster_coco_eval":
        try:
            from faster_coco_eval import COCO, COCOeval_faster
        except ImportError as error:
            raise ImportError(
                "COCO evaluation needs faster-coco-eval: pip install "
                "'faster-coco-eval>=1.6,<2'"
            ) from error
        return COCO, COCOeval_faster
    if backend == "pycocotools":
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval

        return COCO, COCOeval
    raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def _coco(coco_class, dataset):
    coco = coco_class()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def _per_class(precision, category_ids, all_category_ids):
    """AP per category from the evaluator's precision array `[T, R, K, A, M]`
    (area "all", the last maxDets); NaN for a category without ground truth."""
    per_class = {}
    for category_id in category_ids:
        k = all_category_ids.index(category_id)
        values = precision[:, :, k, 0, -1]
        values = values[values > -1]
        per_class[category_id] = float(np.mean(values)) if values.size else math.nan
    return per_class


def evaluate_coco(
    ground_truth,
    detections,
    iou_types=("bbox", "segm"),
    backend="faster_coco_eval",
):
    """COCO AP of detections against a ground truth, by a maintained evaluator.

    Args:
        ground_truth: COCO dict (`images`, `annotations`, `categories`), e.g.
            `InstanceDataset.coco_ground_truth()`; annotation ids are
            renumbered from 1 on a copy.
        detections: list of result dicts (`detections_to_coco`): `image_id`,
            `category_id`, `score`, `bbox` and, for `"segm"`, `segmentation`.
        iou_types: which of `"bbox"` and `"segm"` to evaluate.
        backend: `"faster_coco_eval"` (default) or `"pycocotools"`.

    Returns:
        dict per IoU type: `{"AP", "AP50", "AP75", "APs", "APm", "APl"}` in
        [0, 1] (−1 where the COCO API has no ground truth for it, e.g. no
        small objects) and `"per_class"`: `{category_id: AP}` (NaN without
        ground truth).
    """
    coco_class, eval_class = _evaluator_classes(backend)
    for iou_type in iou_types:
        if iou_type not in IOU_TYPES:
            raise ValueError(
                f"iou_types must be among {tuple(IOU_TYPES)}, got {iou_type!r}"
            )
    gt = _coco(coco_class, _ground_truth_for_evaluator(ground_truth))
    category_ids = [c["id"] for c in ground_truth["categories"]]
    image_ids = set(gt.getImgIds())
    unknown = {d["image_id"] for d in detections} - image_ids
    if unknown:
        raise ValueError(
            f"detections name {len(unknown)} image id(s) not in the ground truth, "
            f"e.g. {sorted(unknown)[:5]}"
        )
    results = {}
    for iou_type in iou_types:
        if iou_type == "segm":
            # As Detectron2: without "bbox", loadRes takes the mask area, which
            # decides a detection's area range.
            entries = [{k: v for k, v in d.items() if k != "bbox"} for d in detections]
            if any("segmentation" not in d for d in entries):
                raise ValueError("segm evaluation needs a segmentation per detection")
        else:
            entries = [
                {k: v for k, v in d.items() if k != "segmentation"} for d in detections
            ]
        if not entries:
            results[iou_type] = _no_detections(gt, category_ids)
            continue
        with contextlib.redirect_stdout(io.StringIO()):
            dt = gt.loadRes(copy.deepcopy(entries))
            evaluator = eval_class(gt, dt, iou_type)
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
        stats = [float(s) for s in evaluator.stats[:6]]
        summary = dict(zip(SUMMARY_METRICS, stats, strict=True))
        summary["per_class"] = _per_class(
            np.asarray(evaluator.eval["precision"]),
            category_ids,
            list(evaluator.params.catIds),
        )
        results[iou_type] = summary
    return results


def _no_detections(gt, category_ids):
    """What the COCO API reports without any detection: 0 where there is
    ground truth, −1 / NaN where there is none."""
    with_gt = {a["category_id"] for a in gt.dataset["annotations"] if not a["iscrowd"]}
    summary = dict.fromkeys(SUMMARY_METRICS, 0.0 if with_gt else -1.0)
    summary["per_class"] = {c: 0.0 if c in with_gt else math.nan for c in category_ids}
    return summary


class CocoEvaluator:
    """Collects a model's outputs batch by batch, then runs `evaluate_coco`.

    Args:
        ground_truth: COCO dict of the evaluated images
            (`instance_eval_pipeline`'s second value).
        category_ids: the dataset's category id of class k at k − 1.
        class_names: optional names of the classes (for the table); defaults
            to the ground truth's category names.
        iou_types: which of `"bbox"` and `"segm"` to evaluate. Defaults to
            both.
        backend: `"faster_coco_eval"` or `"pycocotools"`.
        mask_paste: how masks are pasted (`detections_to_coco`): the
            evaluated model's `mask_paste`. Defaults to `"kseg"`.
    """

    def __init__(
        self,
        ground_truth,
        category_ids,
        class_names=None,
        iou_types=("bbox", "segm"),
        backend="faster_coco_eval",
        mask_paste="kseg",
    ):
        self.ground_truth = ground_truth
        self.category_ids = tuple(int(c) for c in category_ids)
        names = {c["id"]: c["name"] for c in ground_truth["categories"]}
        if class_names is None:
            class_names = [names.get(c, str(c)) for c in self.category_ids]
        self.class_names = tuple(class_names)
        self.iou_types = tuple(iou_types)
        self.backend = backend
        self.mask_paste = mask_paste
        self.detections = []

    def reset(self):
        self.detections = []

    def update(self, outputs, meta):
        """Adds one batch: model outputs (see `detections_to_coco`) and `meta`."""
        self.detections.extend(
            detections_to_coco(
                outputs, meta, self.category_ids, mask_paste=self.mask_paste
            )
        )

    def result(self):
        """`evaluate_coco`'s dict, with per-class AP keyed by class name."""
        results = evaluate_coco(
            self.ground_truth, self.detections, self.iou_types, self.backend
        )
        for summary in results.values():
            summary["per_class"] = {
                name: summary["per_class"][c]
                for c, name in zip(self.category_ids, self.class_names, strict=True)
            }
        return results


def _value(value):
    if value is None or math.isnan(value) or value < 0:
        return "    -"
    return f"{value:.3f}"


def format_coco_table(results):
    """The COCO numbers as a text table: one row per IoU type (box, mask) with
    AP, AP50, AP75, APs, APm, APl, then AP per class.

    Args:
        results: dict returned by `evaluate_coco` or `CocoEvaluator.result`.

    Returns:
        str.
    """
    iou_types = [t for t in IOU_TYPES if t in results]
    lines = ["      " + "  ".join(f"{m:>5}" for m in SUMMARY_METRICS)]
    for iou_type in iou_types:
        values = "  ".join(
            f"{_value(results[iou_type][m]):>5}" for m in SUMMARY_METRICS
        )
        lines.append(f"{IOU_TYPES[iou_type]:<4}  {values}")
    classes = list(results[iou_types[0]]["per_class"]) if iou_types else []
    if classes:
        width = max(len("class"), *(len(str(c)) for c in classes))
        lines.append("")
        lines.append(
            f"{'class':<{width}}  "
            + "  ".join(f"{IOU_TYPES[t] + ' AP':>7}" for t in iou_types)
        )
        for name in classes:
            values = "  ".join(
                f"{_value(results[t]['per_class'][name]):>7}" for t in iou_types
            )
            lines.append(f"{str(name):<{width}}  {values}")
    return "\n".join(lines)
