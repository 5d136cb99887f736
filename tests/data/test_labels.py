"""Label checks, lookup tables and class histograms."""

import cv2
import numpy as np
import pytest
import tensorflow as tf

from kseg.data import (
    CITYSCAPES_LABEL_ID_TO_TRAIN_ID,
    IGNORE_LABEL,
    ade20k_label_map,
    check_labels,
    cityscapes_label_map,
    class_histogram,
    format_class_histogram,
    make_synthetic,
    read_folder,
    validate_dataset,
)


def test_ignore_label_is_255():
    assert IGNORE_LABEL == 255


def test_check_labels_names_file_and_bad_values():
    check_labels(np.array([[0, 2], [255, 1]], np.uint8), 3, "ok.png")
    with pytest.raises(
        ValueError, match=r"x/y\.png: label values 3, 7 are outside \[0, 3\)"
    ):
        check_labels(np.array([[0, 3], [7, 255]], np.uint8), 3, "x/y.png")
    with pytest.raises(ValueError, match="label values -1 are outside"):
        check_labels(np.array([-1, 0]), 3, "neg")
    with pytest.raises(ValueError, match="labels must be integers"):
        check_labels(np.array([0.5]), 3, "float")


def test_lookup_tables():
    cityscapes = cityscapes_label_map()
    assert cityscapes.shape == (256,) and cityscapes.dtype == np.uint8
    assert sorted(CITYSCAPES_LABEL_ID_TO_TRAIN_ID.values()) == list(range(19))
    assert cityscapes[7] == 0 and cityscapes[33] == 18 and cityscapes[26] == 13
    assert np.count_nonzero(cityscapes != 255) == 19
    ade = ade20k_label_map()
    assert ade[0] == 255 and ade[1] == 0 and ade[150] == 149 and ade[151] == 150


def _folder(tmp_path, labels):
    for index, label in enumerate(labels):
        (tmp_path / "img").mkdir(exist_ok=True)
        (tmp_path / "lbl").mkdir(exist_ok=True)
        cv2.imwrite(str(tmp_path / "img" / f"{index}.png"), np.zeros((*label.shape, 3)))
        cv2.imwrite(str(tmp_path / "lbl" / f"{index}.png"), label.astype(np.uint8))
    return read_folder(
        tmp_path / "img", tmp_path / "lbl", 3, class_names=("a", "b", "c")
    )


def test_validate_dataset_and_histogram(tmp_path):
    labels = [np.array([[0, 1, 1], [255, 2, 2]]), np.array([[2, 2, 2], [0, 0, 255]])]
    dataset = _folder(tmp_path, labels)
    calls = []
    assert validate_dataset(dataset, progress=lambda d, t: calls.append((d, t))) == 2
    assert calls == [(1, 2), (2, 2)]
    np.testing.assert_array_equal(class_histogram(dataset), [3, 2, 5, 2])
    np.testing.assert_array_equal(
        class_histogram(dataset.as_dataset(), num_classes=3), [3, 2, 5, 2]
    )
    text = format_class_histogram(class_histogram(dataset), dataset.class_names)
    lines = text.splitlines()
    assert lines[0].split() == ["id", "class", "pixels", "share"]
    assert lines[3].split() == ["2", "c", "5", "41.67%"]
    assert lines[4].split() == ["255", "(ignore)", "2", "16.67%"]
    assert lines[5].split() == ["total", "12", "100.00%"]


def test_bad_label_file_is_named(tmp_path):
    labels = [np.array([[0, 1]]), np.array([[0, 9]])]
    dataset = _folder(tmp_path, labels)
    bad = str(tmp_path / "lbl" / "1.png")
    with pytest.raises(ValueError, match=f"{bad}: label values 9 are outside"):
        validate_dataset(dataset)
    with pytest.raises(ValueError, match=f"{bad}: label values 9"):
        class_histogram(dataset)
    pairs = tf.data.Dataset.from_tensor_slices(
        (np.zeros((2, 1, 2, 3), np.uint8), np.stack(labels).astype(np.uint8))
    )
    with pytest.raises(ValueError, match="element 1: label values 9"):
        class_histogram(pairs, num_classes=3)
    with pytest.raises(ValueError, match="num_classes is required"):
        class_histogram(pairs)


def test_histogram_of_synthetic_dataset_counts_every_pixel():
    dataset = make_synthetic("val", num_images=3, image_size=32)
    histogram = class_histogram(dataset)
    assert histogram.shape == (7,) and histogram.sum() == 3 * 32 * 32
    np.testing.assert_array_equal(
        histogram[:6], np.bincount(dataset.labels.ravel(), minlength=6)
    )
    with pytest.raises(ValueError, match="histogram must have 7 entries"):
        format_class_histogram(histogram[:6], dataset.class_names)
