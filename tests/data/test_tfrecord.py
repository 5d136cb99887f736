"""TFRecord conversion round trip."""

from pathlib import Path

import numpy as np
import pytest

from kseg.data import (
    convert_to_tfrecord,
    count_records,
    encode_index_png,
    make_synthetic,
    read_folder,
    read_tfrecord,
    read_voc,
    shard_paths,
)
from kseg.data.png import encode_rgb_png


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


def _folder_with_bad_images(root, bad):
    """A folder dataset of 4 PNG pairs; the images numbered in `bad` are cut
    in half."""
    rng = np.random.default_rng(0)
    for i in range(4):
        image = encode_rgb_png(rng.integers(0, 256, (8, 8, 3), np.uint8))
        if i in bad:
            image = image[: len(image) // 2]
        (root / "images").mkdir(parents=True, exist_ok=True)
        (root / "labels").mkdir(parents=True, exist_ok=True)
        (root / "images" / f"{i}.png").write_bytes(image)
        (root / "labels" / f"{i}.png").write_bytes(
            encode_index_png(np.zeros((8, 8), np.uint8))
        )
    return read_folder(root / "images", root / "labels", 2)


def test_conversion_names_or_skips_bad_samples(tmp_path):
    dataset = _folder_with_bad_images(tmp_path / "data", bad={1})
    with pytest.raises(ValueError, match=r"images/1.png: not a decodable image"):
        convert_to_tfrecord(dataset, tmp_path / "x")
    with pytest.warns(UserWarning, match=r"skipping a bad sample .*images/1.png"):
        paths = convert_to_tfrecord(dataset, tmp_path / "y", 2, skip_corrupt=True)
    assert count_records(paths) == 3
    expected = [dataset.load(i) for i in (0, 2, 3)]
    _assert_same(_arrays(read_tfrecord(tmp_path / "y")), expected)

    broken = _folder_with_bad_images(tmp_path / "broken", bad={0, 1, 2, 3})
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="every one of"):
        convert_to_tfrecord(broken, tmp_path / "z", skip_corrupt=True)


def test_kseg_data_convert_honours_skip_corrupt(tmp_path, capsys):
    from kseg.cli import main

    _folder_with_bad_images(tmp_path / "data" / "train", bad={2})
    command = ["data", "convert", "--dataset", "folder", "--data",
               str(tmp_path / "data"), "--set", "data.num_classes=2"]  # fmt: skip
    assert main([*command, "--out", str(tmp_path / "a")]) == 1
    assert "images/2.png: not a decodable image" in capsys.readouterr().err
    with pytest.warns(UserWarning, match=r"images/2.png"):
        status = main(
            [*command, "--set", "data.skip_corrupt=true", "--out", str(tmp_path / "b")]
        )
    assert status == 0
    assert "wrote 3 examples" in capsys.readouterr().out


def test_a_damaged_shard_is_named(tmp_path):
    dataset = make_synthetic("val", num_images=4, image_size=32)
    paths = convert_to_tfrecord(dataset, tmp_path / "val", num_shards=2)
    assert count_records(paths) == 4
    data = Path(paths[1]).read_bytes()
    Path(paths[1]).write_bytes(data[: len(data) - 10])
    with pytest.raises(ValueError, match=rf"{paths[1]}: damaged TFRecord file"):
        count_records(paths)
    # Training and evaluation count the records first.
    from kseg.training.recipe import apply_overrides, load_recipe
    from kseg.training.semantic import read_split

    recipe = apply_overrides(
        load_recipe("quickstart"),
        ["data.dataset=folder", "data.num_classes=6", "data.format=tfrecord"],
    )
    with pytest.raises(ValueError, match=rf"{paths[1]}: damaged TFRecord file"):
        read_split(recipe.data, "val", tmp_path)
