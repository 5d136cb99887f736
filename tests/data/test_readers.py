"""Dataset readers: real VOC photos from labelme-examples and small fake trees of
SBD, Cityscapes, ADE20K and a plain folder written into tmp_path."""

import json
import shutil

import cv2
import numpy as np
import pytest
import tensorflow as tf

from kseg.data import (
    IGNORE_LABEL,
    VOC_CLASSES,
    read_ade20k,
    read_cityscapes,
    read_folder,
    read_voc,
    read_voc_aug,
)

STEMS = ("2011_000003", "2011_000006", "2011_000025")


def _pairs(dataset):
    return [(i.numpy(), l.numpy()) for i, l in dataset.as_dataset()]


def _write_rgb(path, image):
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))


def _write_gray(path, label):
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), label.astype(np.uint8))


def _random_image(rng, height, width):
    return rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)


# --- PASCAL VOC on real photos --------------------------------------------------


def test_voc_real_photos_decode_palette_labels_by_index(labelme_voc):
    root = labelme_voc / "data_dataset_voc"
    dataset = read_voc(root, split=None, label_dir="SegmentationClassPNG")
    assert [dataset.sample_name(i) for i in range(len(dataset))] == list(STEMS)
    assert dataset.num_classes == 21 and dataset.class_names == VOC_CLASSES
    for stem, (image, label) in zip(STEMS, _pairs(dataset), strict=True):
        photo = cv2.imread(str(root / "JPEGImages" / f"{stem}.jpg"))
        assert image.dtype == np.uint8 and image.shape == photo.shape
        assert label.dtype == np.uint8 and label.shape == photo.shape[:2]
        assert set(np.unique(label)) <= set(range(21)) | {IGNORE_LABEL}
        # labelme's own int32 ground truth, −1 = ignore.
        truth = np.load(root / "SegmentationClass" / f"{stem}.npy")
        np.testing.assert_array_equal(label, np.where(truth < 0, 255, truth))


def _normalise(name):
    return name.replace(" ", "").replace("/", "")


def test_voc_real_labels_agree_with_annotation_polygons(labelme_voc):
    root = labelme_voc / "data_dataset_voc"
    dataset = read_voc(root, names=STEMS, label_dir="SegmentationClassPNG")
    class_ids = {_normalise(n): i for i, n in enumerate(VOC_CLASSES)}
    class_ids["__ignore__"] = IGNORE_LABEL
    checked = set()
    for index, stem in enumerate(STEMS):
        label = dataset.load_label(index)
        shapes = json.loads(
            (labelme_voc / "data_annotated" / f"{stem}.json").read_text()
        )["shapes"]
        masks = []
        for shape in shapes:
            mask = np.zeros(label.shape, np.uint8)
            cv2.fillPoly(mask, [np.round(shape["points"]).astype(np.int32)], 1)
            masks.append(mask)
        kernel = np.ones((7, 7), np.uint8)
        for k, shape in enumerate(shapes):
            # Interior pixels of the polygon that no later polygon covers: later
            # annotations paint over earlier ones.
            inside = cv2.erode(masks[k], kernel).astype(bool)
            for later in masks[k + 1 :]:
                inside &= ~cv2.dilate(later, kernel).astype(bool)
            if inside.sum() < 20:
                continue
            expected = class_ids[_normalise(shape["label"])]
            np.testing.assert_array_equal(label[inside], expected)
            checked.add(shape["label"])
    assert {"person", "bottle", "chair", "sofa", "bus", "car", "__ignore__"} <= checked


def test_voc_missing_split_file_names_the_file(labelme_voc):
    root = labelme_voc / "data_dataset_voc"
    split = root / "ImageSets" / "Segmentation" / "train.txt"
    with pytest.raises(FileNotFoundError, match=f"split file not found: {split}"):
        read_voc(root, label_dir="SegmentationClassPNG")


def test_voc_split_file_and_missing_listed_image(labelme_voc):
    root = labelme_voc / "data_dataset_voc"
    sets = root / "ImageSets" / "Segmentation"
    sets.mkdir(parents=True)
    (sets / "val.txt").write_text("2011_000025\n\n2011_000003\n")
    dataset = read_voc(root, "val", label_dir="SegmentationClassPNG")
    assert [dataset.sample_name(i) for i in range(2)] == ["2011_000025", "2011_000003"]
    assert dataset.label_paths[0] == str(root / "SegmentationClassPNG/2011_000025.png")

    (sets / "trainval.txt").write_text("2011_000003\n2011_999999\n")
    missing = root / "JPEGImages" / "2011_999999.jpg"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        read_voc(root, "trainval", label_dir="SegmentationClassPNG")


def test_voc_missing_directories(tmp_path):
    with pytest.raises(
        FileNotFoundError, match=f"VOC root directory not found: {tmp_path}/x"
    ):
        read_voc(tmp_path / "x")
    (tmp_path / "JPEGImages").mkdir()
    with pytest.raises(FileNotFoundError, match="SegmentationClass"):
        read_voc(tmp_path)


def test_voc_empty_label_folder(tmp_path):
    (tmp_path / "JPEGImages").mkdir()
    (tmp_path / "SegmentationClass").mkdir()
    with pytest.raises(ValueError, match="lists no samples"):
        read_voc(tmp_path, split=None)


# --- SBD-augmented VOC ----------------------------------------------------------


def _fake_sbd(root, rng):
    labels = {}
    for stem in ("2008_000002", "2008_000003"):
        _write_rgb(root / "JPEGImages" / f"{stem}.jpg", _random_image(rng, 12, 16))
        label = rng.integers(0, 21, size=(12, 16)).astype(np.uint8)
        label[0, :3] = 255
        _write_gray(root / "SegmentationClassAug" / f"{stem}.png", label)
        labels[stem] = label
    return labels


def test_voc_aug_grayscale_labels_and_both_list_formats(tmp_path):
    labels = _fake_sbd(tmp_path, np.random.default_rng(1))
    sets = tmp_path / "ImageSets" / "Segmentation"
    sets.mkdir(parents=True)
    (sets / "train_aug.txt").write_text("2008_000003\n2008_000002\n")
    dataset = read_voc_aug(tmp_path)
    assert dataset.name == "voc_aug" and len(dataset) == 2
    for stem, (image, label) in zip(
        ("2008_000003", "2008_000002"), _pairs(dataset), strict=True
    ):
        assert image.shape == (12, 16, 3)
        np.testing.assert_array_equal(label, labels[stem])

    deeplab_list = tmp_path / "list.txt"
    deeplab_list.write_text(
        "/JPEGImages/2008_000002.jpg /SegmentationClassAug/2008_000002.png\n"
    )
    dataset = read_voc_aug(tmp_path, split_file=deeplab_list)
    np.testing.assert_array_equal(dataset.load_label(0), labels["2008_000002"])

    deeplab_list.write_text("a b c\n")
    with pytest.raises(ValueError, match="list.txt:1"):
        read_voc_aug(tmp_path, split_file=deeplab_list)


# --- Cityscapes -----------------------------------------------------------------

# Raw labelIds and the train ids the official table gives them.
CITYSCAPES_RAW = np.array(
    [
        [0, 7, 8, 11, 12, 13, 17],
        [19, 20, 21, 22, 23, 24, 25],
        [26, 27, 28, 31, 32, 33, 9],
    ]
)
CITYSCAPES_TRAIN = np.array(
    [[255, 0, 1, 2, 3, 4, 5], [6, 7, 8, 9, 10, 11, 12], [13, 14, 15, 16, 17, 18, 255]]
)


def _fake_cityscapes(root, rng):
    images = {}
    for split, city, frame in [
        ("train", "aachen", "000000_000019"),
        ("train", "bochum", "000000_000313"),
        ("val", "lindau", "000000_000019"),
    ]:
        prefix = f"{city}_{frame}"
        image = _random_image(rng, 3, 7)
        _write_rgb(
            root / "leftImg8bit" / split / city / f"{prefix}_leftImg8bit.png", image
        )
        raw = np.roll(CITYSCAPES_RAW, len(images), axis=1)
        _write_gray(
            root / "gtFine" / split / city / f"{prefix}_gtFine_labelIds.png", raw
        )
        images[prefix] = (image, np.roll(CITYSCAPES_TRAIN, len(images), axis=1))
    return images


def test_cityscapes_maps_label_ids_to_train_ids(tmp_path):
    expected = _fake_cityscapes(tmp_path, np.random.default_rng(2))
    dataset = read_cityscapes(tmp_path, "train")
    assert dataset.num_classes == 19 and len(dataset) == 2
    names = ["aachen_000000_000019", "bochum_000000_000313"]
    for name, (image, label) in zip(names, _pairs(dataset), strict=True):
        np.testing.assert_array_equal(image, expected[name][0])
        np.testing.assert_array_equal(label, expected[name][1])
    assert len(read_cityscapes(tmp_path, "val")) == 1


def test_cityscapes_errors_name_the_path(tmp_path):
    _fake_cityscapes(tmp_path, np.random.default_rng(2))
    with pytest.raises(FileNotFoundError, match="available: train, val"):
        read_cityscapes(tmp_path, "test")
    label = tmp_path / "gtFine/val/lindau/lindau_000000_000019_gtFine_labelIds.png"
    label.unlink()
    with pytest.raises(FileNotFoundError, match=str(label)):
        read_cityscapes(tmp_path, "val")
    shutil.rmtree(tmp_path / "gtFine")
    with pytest.raises(
        FileNotFoundError, match=f"label directory not found: {tmp_path}"
    ):
        read_cityscapes(tmp_path)


# --- ADE20K ---------------------------------------------------------------------


def test_ade20k_shifts_classes_and_ignores_other(tmp_path):
    base = tmp_path / "ADEChallengeData2016"
    rng = np.random.default_rng(3)
    raw = np.array([[0, 1, 2], [37, 150, 0]], np.uint8)
    for split, stem in [
        ("training", "ADE_train_00000001"),
        ("validation", "ADE_val_00000001"),
    ]:
        _write_rgb(base / "images" / split / f"{stem}.jpg", _random_image(rng, 2, 3))
        _write_gray(base / "annotations" / split / f"{stem}.png", raw)
    for root, split in [(tmp_path, "training"), (base, "val")]:
        dataset = read_ade20k(root, split)
        assert dataset.num_classes == 150 and len(dataset) == 1
        ((image, label),) = _pairs(dataset)
        assert image.shape == (2, 3, 3)
        np.testing.assert_array_equal(label, [[255, 0, 1], [36, 149, 255]])
    with pytest.raises(ValueError, match="ADE20K split must be one of"):
        read_ade20k(tmp_path, "test")
    (base / "annotations/validation/ADE_val_00000001.png").unlink()
    with pytest.raises(FileNotFoundError, match="ADE_val_00000001.png"):
        read_ade20k(tmp_path, "validation")


# --- generic folder -------------------------------------------------------------


def test_folder_matches_by_stem(tmp_path):
    rng = np.random.default_rng(4)
    expected = {}
    for stem, ext in [("b", ".png"), ("a", ".jpg")]:
        image = _random_image(rng, 5, 6)
        _write_rgb(tmp_path / "img" / f"{stem}{ext}", image)
        label = rng.integers(0, 3, size=(5, 6)).astype(np.uint8)
        _write_gray(tmp_path / "lbl" / f"{stem}_mask.png", label)
        expected[stem] = (image, label)
    (tmp_path / "img" / "notes.txt").write_text("not an image")
    dataset = read_folder(tmp_path / "img", tmp_path / "lbl", 3, label_suffix="_mask")
    assert [dataset.sample_name(i) for i in range(2)] == ["a", "b"]
    assert dataset.class_names == ("class_0", "class_1", "class_2")
    (_, label_a), (image_b, label_b) = _pairs(dataset)
    np.testing.assert_array_equal(label_a, expected["a"][1])
    np.testing.assert_array_equal(image_b, expected["b"][0])
    np.testing.assert_array_equal(label_b, expected["b"][1])


def test_folder_errors(tmp_path):
    rng = np.random.default_rng(5)
    _write_rgb(tmp_path / "img" / "a.jpg", _random_image(rng, 4, 4))
    _write_gray(tmp_path / "lbl" / "b.png", np.zeros((4, 4)))
    with pytest.raises(
        ValueError, match=f"have no image in .*first: {tmp_path}/lbl/b.png"
    ):
        read_folder(tmp_path / "img", tmp_path / "lbl", 2)
    (tmp_path / "lbl" / "b.png").unlink()
    with pytest.raises(FileNotFoundError, match=f"{tmp_path}/lbl/a.png"):
        read_folder(tmp_path / "img", tmp_path / "lbl", 2)
    _write_rgb(tmp_path / "img" / "a.png", _random_image(rng, 4, 4))
    with pytest.raises(ValueError, match="two images share the stem 'a'"):
        read_folder(tmp_path / "img", tmp_path / "lbl", 2)
    with pytest.raises(FileNotFoundError, match="label directory not found"):
        read_folder(tmp_path / "img", tmp_path / "nope", 2)
    (tmp_path / "img" / "a.png").unlink()
    _write_gray(tmp_path / "lbl" / "a.png", np.zeros((4, 4)))
    with pytest.raises(ValueError, match="2 class names for 3 classes"):
        read_folder(tmp_path / "img", tmp_path / "lbl", 3, class_names=("x", "y"))


def test_size_mismatch_is_reported_with_both_paths(tmp_path):
    rng = np.random.default_rng(6)
    _write_rgb(tmp_path / "img" / "a.png", _random_image(rng, 4, 5))
    _write_gray(tmp_path / "lbl" / "a.png", np.zeros((4, 4)))
    dataset = read_folder(tmp_path / "img", tmp_path / "lbl", 2)
    with pytest.raises(
        ValueError, match=r"img/a.png is 4x5 but label .*lbl/a.png is 4x4"
    ):
        dataset.load(0)
    # The pipeline stops with the same message, naming both files.
    with pytest.raises(
        tf.errors.OpError, match=r"DataError: image .*img/a.png is 4x5 but label"
    ):
        _pairs(dataset)


def test_rgb_label_png_is_rejected_with_its_path(tmp_path):
    rng = np.random.default_rng(7)
    _write_rgb(tmp_path / "img" / "a.png", _random_image(rng, 4, 4))
    _write_rgb(tmp_path / "lbl" / "a.png", _random_image(rng, 4, 4))
    dataset = read_folder(tmp_path / "img", tmp_path / "lbl", 2)
    with pytest.raises(ValueError, match=f"{tmp_path}/lbl/a.png: a label PNG .* RGB"):
        dataset.load_label(0)


@pytest.mark.parametrize(
    "line",
    [
        "../../etc/passwd",
        "sub/2008_000002",
        "/JPEGImages/../../x.jpg /SegmentationClassAug/x.png",
        "/JPEGImages/x.jpg /../outside/x.png",
    ],
)
def test_split_file_lines_cannot_leave_the_dataset_folder(tmp_path, line):
    _fake_sbd(tmp_path, np.random.default_rng(1))
    listing = tmp_path / "list.txt"
    listing.write_text(f"{line}\n")
    with pytest.raises(ValueError, match=r"list.txt:1: .* outside the dataset"):
        read_voc_aug(tmp_path, split_file=listing)


@pytest.mark.parametrize("split", ["../../x", "a/b", "..", "", "a\\b"])
def test_split_names_cannot_leave_the_dataset_folder(tmp_path, split):
    _fake_cityscapes(tmp_path, np.random.default_rng(2))
    (tmp_path / "JPEGImages").mkdir()
    (tmp_path / "SegmentationClass").mkdir()
    with pytest.raises(ValueError, match=r"is not a split name"):
        read_cityscapes(tmp_path, split)
    with pytest.raises(ValueError, match=r"is not a split name"):
        read_voc(tmp_path, split)


def test_skip_corrupt_skips_bad_samples_but_not_all_of_them(tmp_path):
    rng = np.random.default_rng(8)
    for name in ("a", "b"):
        _write_rgb(tmp_path / "img" / f"{name}.png", _random_image(rng, 4, 4))
        _write_gray(tmp_path / "lbl" / f"{name}.png", np.zeros((4, 4)))
    (tmp_path / "img" / "a.png").write_text("not an image")
    dataset = read_folder(tmp_path / "img", tmp_path / "lbl", 2)
    with pytest.warns(UserWarning, match=r"skipping a bad sample .*img/a.png"):
        assert len(list(dataset.as_dataset(skip_corrupt=True))) == 1
    # With every sample bad the stream must not just end empty (training
    # then stopped with a bare StopIteration).
    (tmp_path / "img" / "b.png").write_text("not an image")
    with (
        pytest.warns(UserWarning),
        pytest.raises(
            tf.errors.OpError, match=r"DataError: every one of the 2 samples of folder"
        ),
    ):
        list(dataset.as_dataset(skip_corrupt=True))
