"""TFRecord conversion round trip."""

import numpy as np
import pytest

from kseg.data import (
    convert_to_tfrecord,
    make_synthetic,
    read_tfrecord,
    read_voc,
    shard_paths,
)


def _arrays(dataset):
    return [(image.numpy(), label.numpy()) for image, label in dataset]


def _assert_same(pairs, expected):
    assert len(pairs) == len(expected)
    for (image, label), (image_0, label_0) in zip(pairs, expected, strict=True):
        assert image.dtype == np.uint8 and label.dtype == np.uint8
        np.testing.assert_array_equal(image, image_0)
        np.testing.assert_array_equal(label, label_0)


def test_real_voc_round_trip_is_bit_identical(labelme_voc, tmp_path):
    root = labelme_voc / "data_dataset_voc"
    dataset = read_voc(root, split=None, label_dir="SegmentationClassPNG")
    calls = []
    out = tmp_path / "records" / "voc"
    paths = convert_to_tfrecord(
        dataset, out, num_shards=2, progress=lambda d, t: calls.append((d, t))
    )
    assert (
        paths
        == shard_paths(out, 2)
        == [f"{out}-00000-of-00002", f"{out}-00001-of-00002"]
    )
    assert calls == [(1, 3), (2, 3), (3, 3)]
    # JPEG bytes are stored untouched and decoded by the same decoder.
    _assert_same(_arrays(read_tfrecord(out)), _arrays(dataset.as_dataset()))
    _assert_same(
        _arrays(read_tfrecord(f"{out}-0000[01]-*")), _arrays(dataset.as_dataset())
    )

    with pytest.raises(FileExistsError, match=f"overwrite existing file: {paths[0]}"):
        convert_to_tfrecord(dataset, out, num_shards=2)
    # A different shard count still refuses when any of its files exists.
    (tmp_path / "records" / "voc-00002-of-00003").write_bytes(b"")
    with pytest.raises(FileExistsError, match="voc-00002-of-00003"):
        convert_to_tfrecord(dataset, out, num_shards=3)


def test_synthetic_round_trip_and_progress_bar(tmp_path, capsys):
    dataset = make_synthetic("val", num_images=3, image_size=32)
    out = tmp_path / "synthetic"
    convert_to_tfrecord(dataset, out, progress=True)
    assert "3/3" in capsys.readouterr().err
    expected = list(zip(dataset.images, dataset.labels, strict=True))
    _assert_same(_arrays(read_tfrecord(out)), expected)
    _assert_same(_arrays(read_tfrecord([f"{out}-00000-of-00001"])), expected)
    assert not list(tmp_path.glob("*.partial"))


def test_errors(tmp_path):
    dataset = make_synthetic("val", num_images=2, image_size=32)
    with pytest.raises(ValueError, match=r"num_shards must be an int in \[1, 2\]"):
        convert_to_tfrecord(dataset, tmp_path / "x", num_shards=3)
    with pytest.raises(
        FileNotFoundError, match=f"no TFRecord files match {tmp_path}/y"
    ):
        read_tfrecord(tmp_path / "y")
    with pytest.raises(
        FileNotFoundError, match=f"TFRecord file not found: {tmp_path}/z"
    ):
        read_tfrecord([tmp_path / "z"])


def test_failed_conversion_leaves_no_file(tmp_path):
    dataset = make_synthetic("val", num_images=2, image_size=32)

    def fail(done, total):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        convert_to_tfrecord(dataset, tmp_path / "x", progress=fail)
    assert list(tmp_path.iterdir()) == []
