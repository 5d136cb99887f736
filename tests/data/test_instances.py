"""Instance datasets: COCO JSON (labelme's real photos and small hand-written
files with polygons, RLE and crowd regions), Cityscapes instance PNGs, the
instance statistics, and clear errors on bad input."""

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import tensorflow as tf

from kseg.data import (
    boxes_from_masks,
    data_error_message,
    encode_mask,
    format_instance_statistics,
    instance_statistics,
    instance_train_pipeline,
    instances,
    read_cityscapes_instances,
    read_coco,
)
from kseg.data.coco_format import _compressed_rle_runs, check_segmentation

LABELME_COCO = Path(
    "/usr/share/doc/labelme-examples/examples/instance_segmentation/data_dataset_coco"
)


@pytest.fixture(scope="module")
def labelme():
    if not (LABELME_COCO / "annotations.json").is_file():
        pytest.skip("Debian package labelme-examples is not installed")
    return read_coco(LABELME_COCO / "annotations.json", LABELME_COCO)


def _reference_masks(json_path, image_id):
    """Masks of an image's non-crowd annotations, decoded by pycocotools."""
    coco_module = pytest.importorskip("pycocotools.coco")
    coco = coco_module.COCO(str(json_path))
    annotations = coco.loadAnns(coco.getAnnIds(imgIds=[image_id], iscrowd=False))
    return np.stack([coco.annToMask(a) for a in annotations]), annotations


def test_labelme_coco_export(labelme):
    assert len(labelme) == 3
    assert labelme.num_classes == 20  # "_background_" (id 0) is no class
    assert labelme.category_ids == tuple(range(1, 21))
    assert labelme.class_names[14] == "person"
    sample = labelme.load(0)
    assert sample["image"].shape == (338, 500, 3)
    assert sample["image_id"] == 0
    np.testing.assert_array_equal(sample["classes"], [15, 15, 5])
    reference, annotations = _reference_masks(LABELME_COCO / "annotations.json", 0)
    np.testing.assert_array_equal(sample["masks"], reference)
    # The rasterised polygons agree with labelme's own boxes and areas.
    boxes = boxes_from_masks(sample["masks"])
    for box, annotation in zip(boxes, annotations, strict=True):
        x, y, w, h = annotation["bbox"]
        np.testing.assert_allclose(box, [y, x, y + h, x + w], atol=1.5)
    np.testing.assert_allclose(
        sample["masks"].sum(axis=(1, 2)), [a["area"] for a in annotations], rtol=0.08
    )


def test_labelme_ground_truth_scores_perfect_detections(labelme):
    from kseg.training.coco_evaluation import evaluate_coco

    gt = labelme.coco_ground_truth()
    # Its annotation ids start at 0 in the file; the evaluator's copy starts at 1.
    assert [a["id"] for a in gt["annotations"]] == list(range(1, 13))
    assert [i["id"] for i in gt["images"]] == [0, 1, 2]
    detections = []
    for index in range(len(labelme)):
        sample = labelme.load(index)
        for mask, k in zip(sample["masks"], sample["classes"], strict=True):
            y1, x1, y2, x2 = (float(v) for v in boxes_from_masks(mask[None])[0])
            detections.append(
                {
                    "image_id": sample["image_id"],
                    "category_id": labelme.category_ids[k - 1],
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "segmentation": encode_mask(mask),
                    "score": 0.9,
                }
            )
    results = evaluate_coco(gt, detections)
    assert results["segm"]["AP"] == pytest.approx(1.0)
    assert results["bbox"]["AP50"] == pytest.approx(1.0)


def test_labelme_streams_and_augments(labelme):
    streamed = list(labelme.as_dataset())
    for index, sample in enumerate(streamed):
        loaded = labelme.load(index)
        np.testing.assert_array_equal(sample["image"], loaded["image"])
        np.testing.assert_array_equal(sample["masks"], loaded["masks"])
        assert int(sample["image_id"]) == loaded["image_id"]
    batches = instance_train_pipeline(
        labelme,
        3,
        512,
        short_edge_range=(300, 400),
        max_size=512,
        max_instances=8,
        mask_size=28,
        repeat=False,
    )
    (x, y) = next(iter(batches))
    assert x["images"].shape == (3, 512, 512, 3)
    assert sorted(np.count_nonzero(y["classes"].numpy(), axis=1)) == [3, 3, 6]


def test_labelme_statistics(labelme):
    statistics = instance_statistics(labelme)
    per_class = dict(zip(labelme.class_names, statistics["per_class"], strict=True))
    assert per_class["person"] == 6 and per_class["bus"] == 2
    assert per_class["bottle"] == per_class["car"] == per_class["chair"] == 1
    assert per_class["sofa"] == 1 and statistics["per_class"].sum() == 12
    np.testing.assert_array_equal(statistics["per_image"], [3, 3, 6])
    table = format_instance_statistics(statistics, labelme.class_names)
    assert table.splitlines()[15].split() == ["person", "6", "50.0%", "0"]
    assert "instances per image: mean 4.00, median 3, min 3, max 6" in table


def _write_rgb(path, image):
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))


def _uncompressed_rle(mask):
    """COCO's uncompressed RLE: run lengths of the column-major mask, 0s first."""
    flat = mask.flatten(order="F")
    changes = np.flatnonzero(np.diff(flat)) + 1
    runs = np.diff(np.concatenate([[0], changes, [flat.size]]))
    if flat[0]:
        runs = np.concatenate([[0], runs])
    return {"size": list(mask.shape), "counts": runs.tolist()}


@pytest.fixture
def small_coco(tmp_path):
    """Two images: a polygon square, an uncompressed-RLE blob and a crowd
    region in the first; a compressed-RLE ring in the second."""
    rng = np.random.default_rng(0)
    for name in ("a.png", "b.png"):
        _write_rgb(
            tmp_path / "images" / name, rng.integers(0, 256, (40, 50, 3), np.uint8)
        )
    square = np.zeros((40, 50), np.uint8)
    square[5:15, 10:30] = 1
    blob = np.zeros((40, 50), np.uint8)
    blob[20:35, 2:8] = 1
    blob[30:35, 8:20] = 1
    crowd = np.zeros((40, 50), np.uint8)
    crowd[20:40, 30:50] = 1
    ring = np.zeros((40, 50), np.uint8)
    cv2.circle(ring, (25, 20), 12, 1, -1)
    cv2.circle(ring, (25, 20), 6, 0, -1)
    data = {
        "images": [
            {"id": 10, "file_name": "a.png", "height": 40, "width": 50},
            {"id": 11, "file_name": "b.png", "height": 40, "width": 50},
        ],
        "categories": [{"id": 9, "name": "blob"}, {"id": 5, "name": "square"}],
        "annotations": [
            {"id": 0, "image_id": 10, "category_id": 5, "iscrowd": 0,
             "segmentation": [[10, 5, 30, 5, 30, 15, 10, 15]]},
            {"id": 1, "image_id": 10, "category_id": 9, "iscrowd": 0,
             "segmentation": _uncompressed_rle(blob)},
            {"id": 2, "image_id": 10, "category_id": 9, "iscrowd": 1,
             "segmentation": _uncompressed_rle(crowd)},
            {"id": 3, "image_id": 11, "category_id": 9, "iscrowd": 0,
             "segmentation": encode_mask(ring)},
        ],
    }  # fmt: skip
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(data))
    return path, {"square": square, "blob": blob, "crowd": crowd, "ring": ring}


def test_polygons_rle_and_crowd_regions(small_coco):
    path, masks = small_coco
    data = read_coco(path, path.parent / "images")
    assert data.class_names == ("square", "blob") and data.category_ids == (5, 9)
    assert data.name == "instances"
    first = data.load(0)
    np.testing.assert_array_equal(first["classes"], [1, 2])  # crowd dropped
    np.testing.assert_array_equal(first["masks"], [masks["square"], masks["blob"]])
    second = data.load(1)
    np.testing.assert_array_equal(second["masks"], [masks["ring"]])
    gt = data.coco_ground_truth()
    assert [a["iscrowd"] for a in gt["annotations"]] == [0, 0, 1, 0]
    assert [a["id"] for a in gt["annotations"]] == [1, 2, 3, 4]
    assert [a["category_id"] for a in gt["annotations"]] == [5, 9, 9, 9]
    # Missing areas and boxes are filled from the masks.
    assert [a["area"] for a in gt["annotations"]] == [
        float(masks[k].sum()) for k in ("square", "blob", "crowd", "ring")
    ]
    assert gt["annotations"][1]["bbox"] == [2.0, 20.0, 18.0, 15.0]
    assert gt["categories"] == [{"id": 5, "name": "square"}, {"id": 9, "name": "blob"}]
    statistics = instance_statistics(data)
    np.testing.assert_array_equal(statistics["per_class"], [1, 2])
    np.testing.assert_array_equal(statistics["crowd_per_class"], [0, 1])


def _rewrite(path, change):
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def test_bad_coco_input_is_named(small_coco, tmp_path):
    path, _ = small_coco
    images = path.parent / "images"
    with pytest.raises(FileNotFoundError, match="annotation file not found"):
        read_coco(tmp_path / "nope.json", images)
    broken = tmp_path / "broken.json"
    broken.write_text('{"images": [')
    with pytest.raises(ValueError, match="broken.json: not valid JSON"):
        read_coco(broken, images)

    _rewrite(path, lambda d: d["annotations"][0].update(category_id=4))
    with pytest.raises(ValueError, match=r"annotation 0: unknown category id 4"):
        read_coco(path, images)
    _rewrite(path, lambda d: d["annotations"][0].update(category_id=5))

    _rewrite(path, lambda d: d["annotations"][0].update(segmentation=[[1, 2, 3, 4]]))
    with pytest.raises(ValueError, match=r"instances.json: annotation 0: a polygon"):
        read_coco(path, images)
    _rewrite(
        path, lambda d: d["annotations"][0].update(segmentation=[[1, 1, 9, 1, 9, 9]])
    )

    (images / "b.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"missing, first: .*b\.png"):
        read_coco(path, images)
    (images / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    data = read_coco(path, images)
    with pytest.raises(ValueError, match=r"b\.png: not a decodable image"):
        data.load(1)
    (images / "b.png").write_text("not an image at all")
    with pytest.raises(tf.errors.InvalidArgumentError) as error:
        list(data.as_dataset())
    assert data_error_message(error.value).startswith(
        f"{images / 'b.png'}: not a decodable image"
    )


@pytest.fixture
def no_rasterising(monkeypatch):
    """The COCO mask API replaced by one that fails: a polygon that would
    take all memory must be refused before anything is rasterised, and a
    regression fails here instead of exhausting the machine."""

    class Refuse:
        def __getattr__(self, name):
            raise AssertionError(f"mask API {name} called on a refused annotation")

    monkeypatch.setattr(instances, "mask_api", Refuse)


@pytest.mark.parametrize(
    "value", [float("nan"), float("inf"), -float("inf"), 1e9, -1e9, 10**400, 151]
)
def test_polygon_coordinates_far_outside_the_image_are_refused(
    small_coco, no_rasterising, value
):
    path, _ = small_coco
    polygon = [10, 5, 30, 5, 30, 15, value, 15]
    _rewrite(path, lambda d: d["annotations"][0].update(segmentation=[polygon]))
    # No bbox or area: read_coco would rasterise the polygon to fill them in.
    with pytest.raises(ValueError, match=r"instances.json: annotation 0: (a )?polygon"):
        read_coco(path, path.parent / "images")
    with pytest.raises(ValueError, match=r"x in \[-50, 100\]|not a finite number"):
        check_segmentation([polygon], 40, 50, "here")


def test_polygons_slightly_outside_the_image_are_kept(small_coco):
    path, _ = small_coco
    polygon = [-50, -40, 100, -40, 100, 80, -50, 80]
    _rewrite(path, lambda d: d["annotations"][0].update(segmentation=[polygon]))
    data = read_coco(path, path.parent / "images")
    assert data.load(0)["masks"][0].all()  # covers the whole image


def test_compressed_rle_runs_decode_as_the_coco_api(small_coco):
    rng = np.random.default_rng(0)
    for _ in range(50):
        height, width = (int(v) for v in rng.integers(1, 120, 2))
        mask = (rng.random((height, width)) < rng.random()).astype(np.uint8)
        rle = encode_mask(mask)
        runs = _compressed_rle_runs(rle["counts"])
        np.testing.assert_array_equal(runs, _uncompressed_rle(mask)["counts"])
        check_segmentation(rle, height, width)


@pytest.mark.parametrize(
    "counts, reason",
    [
        ("_", "ends inside a number"),
        ("oooooooooooooooo1", "more than 7 characters"),
        ("\u00e9", "outside '0'..'o'"),
        ("\x00", "outside '0'..'o'"),
        ("61", "sum to 7"),
        ("O?", "negative run"),
        (17, "must be a list of run lengths or a compressed string"),
    ],
)
def test_malformed_compressed_rle_is_named(small_coco, counts, reason):
    path, _ = small_coco
    rle = {"size": [40, 50], "counts": counts}
    _rewrite(
        path,
        lambda d: d["annotations"][3].update(
            segmentation=rle, area=10.0, bbox=[0, 0, 1, 1]
        ),
    )
    with pytest.raises(ValueError, match=rf"annotation 3: .*{reason}"):
        read_coco(path, path.parent / "images")


@pytest.mark.parametrize(
    "change, message",
    [
        (
            lambda d: d["categories"].append({"id": "9", "name": "again"}),
            r"a category's id must be an integer, got '9' \(str\)",
        ),
        (
            lambda d: d["annotations"][0].update(category_id=True),
            r"annotation 0: category_id must be an integer, got True",
        ),
        (
            lambda d: d["annotations"][0].update(image_id=10.0),
            r"annotation 0: image_id must be an integer, got 10.0",
        ),
        (
            lambda d: d["images"][0].update(id="10"),
            r"an image's id must be an integer",
        ),
        (
            lambda d: d["images"][0].update(height=0),
            r"image 10: height must be positive",
        ),
        (
            lambda d: d["annotations"][0].update(bbox=[0, 0, float("nan"), 1]),
            r"annotation 0: bbox must be",
        ),
        (
            lambda d: d["annotations"][0].update(area="12"),
            r"annotation 0: area must be a finite number",
        ),
        (
            lambda d: d["annotations"][0].update(iscrowd="0"),
            r"annotation 0: iscrowd must be 0 or 1",
        ),
    ],
)
def test_ids_boxes_and_areas_must_have_their_types(small_coco, change, message):
    path, _ = small_coco
    _rewrite(path, change)
    with pytest.raises(ValueError, match=message):
        read_coco(path, path.parent / "images")


@pytest.mark.parametrize(
    "file_name", ["../outside.png", "images/../../outside.png", "/etc/hostname",
                  "..\\outside.png", "C:\\images\\a.png"],
)  # fmt: skip
def test_image_file_names_stay_inside_the_image_folder(small_coco, file_name):
    path, _ = small_coco
    (path.parent / "outside.png").write_bytes(
        (path.parent / "images/a.png").read_bytes()
    )
    _rewrite(path, lambda d: d["images"][0].update(file_name=file_name))
    with pytest.raises(ValueError, match=r"image 10: file_name .* points outside"):
        read_coco(path, path.parent / "images")


def test_a_file_without_annotations_is_refused(small_coco):
    path, _ = small_coco
    _rewrite(path, lambda d: d.update(annotations=[]))
    with pytest.raises(ValueError, match=r"instances.json: the file lists no annot"):
        read_coco(path, path.parent / "images")


def _samples(dataset):
    return [int(sample["image_id"]) for sample in dataset]


def test_bad_images_are_named_or_skipped_in_the_stream(small_coco):
    path, _ = small_coco
    images = path.parent / "images"
    jpeg = cv2.imencode(".jpg", np.full((40, 50, 3), 99, np.uint8))[1].tobytes()
    (images / "a.png").write_bytes(jpeg[: len(jpeg) // 2])  # truncated
    data = read_coco(path, images)
    for targets in (True, False):
        with pytest.raises(tf.errors.InvalidArgumentError) as error:
            list(data.as_dataset(targets=targets))
        assert data_error_message(error.value).startswith(
            f"{images / 'a.png'}: not a decodable image"
        )
        with pytest.warns(UserWarning, match=r"skipping a bad sample.*a\.png"):
            assert _samples(data.as_dataset(targets=targets, skip_corrupt=True)) == [11]
    problems = data.validate()
    assert [index for index, _ in problems] == [0]
    good = data.subset([1])
    assert len(good) == 1 and good.image_paths == (str(images / "b.png"),)
    assert good.coco_ground_truth()["images"][0]["id"] == 11
    assert not good.validate()

    (images / "b.png").write_text("not an image")
    with (
        pytest.warns(UserWarning),
        pytest.raises(tf.errors.InvalidArgumentError) as error,
    ):
        list(data.as_dataset(skip_corrupt=True))
    assert "every one of the 2 samples of instances is bad" in data_error_message(
        error.value
    )


def test_an_image_of_another_size_than_its_annotations_is_named(small_coco):
    path, _ = small_coco
    _write_rgb(path.parent / "images" / "b.png", np.zeros((20, 50, 3), np.uint8))
    data = read_coco(path, path.parent / "images")
    with pytest.raises(tf.errors.InvalidArgumentError) as error:
        list(data.as_dataset())
    assert data_error_message(error.value).endswith(
        "b.png: image is 20x50 but the annotations say 40x50"
    )


def _write_instance_ids(path, ids):
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), ids.astype(np.uint16))


def test_cityscapes_instances(tmp_path):
    rng = np.random.default_rng(1)
    ids = np.zeros((32, 64), np.uint16)
    ids[:, :] = 7  # road: a class without instances
    ids[2:10, 2:20] = 26001  # car
    ids[12:20, 2:20] = 26002  # another car
    ids[2:30, 30:34] = 24000  # person (instance number 0 is an instance too)
    ids[22:30, 40:60] = 26  # a car group: crowd
    ids[0:4, 50:60] = 33001  # bicycle
    ids[28:32, 0:4] = 7001  # a road "instance": not an instance class
    for city, stem in (
        ("aachen", "aachen_000000_000019"),
        ("bonn", "bonn_000001_000002"),
    ):
        base = tmp_path / "leftImg8bit" / "val" / city / f"{stem}_leftImg8bit.png"
        _write_rgb(base, rng.integers(0, 256, (32, 64, 3), np.uint8))
        _write_instance_ids(
            tmp_path / "gtFine" / "val" / city / f"{stem}_gtFine_instanceIds.png", ids
        )
    data = read_cityscapes_instances(tmp_path, "val")
    assert len(data) == 2 and data.num_classes == 8
    assert data.class_names[2] == "car" and data.category_ids[2] == 26
    sample = data.load(0)
    np.testing.assert_array_equal(sample["classes"], [1, 3, 3, 8])
    for mask, value in zip(sample["masks"], (24000, 26001, 26002, 33001), strict=True):
        np.testing.assert_array_equal(mask, ids == value)
    gt = data.coco_ground_truth([0])
    crowd = [a for a in gt["annotations"] if a["iscrowd"]]
    assert len(gt["annotations"]) == 5 and len(crowd) == 1
    assert crowd[0]["category_id"] == 26 and crowd[0]["area"] == 160.0
    assert crowd[0]["bbox"] == [40.0, 22.0, 20.0, 8.0]
    (streamed,) = list(data.as_dataset().take(1))
    np.testing.assert_array_equal(streamed["masks"], sample["masks"])

    with pytest.raises(FileNotFoundError, match="split directory not found"):
        read_cityscapes_instances(tmp_path, "train")
    (
        tmp_path
        / "gtFine"
        / "val"
        / "bonn"
        / "bonn_000001_000002_gtFine_instanceIds.png"
    ).unlink()
    with pytest.raises(FileNotFoundError, match="instance PNG not found"):
        read_cityscapes_instances(tmp_path, "val")
