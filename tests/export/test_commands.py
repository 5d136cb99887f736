"""`kseg export`: the argparse subcommand and its handler."""

import argparse

import keras
import numpy as np
import pytest
import tensorflow as tf

from kseg.export import CLASS_MAP, IMAGES, SERVING_SIGNATURE, TFLiteSegmenter
from kseg.export.commands import _calibration_source, register
from kseg.models import FCN

NUM_CLASSES = 6


def _parse(argv):
    parser = argparse.ArgumentParser(prog="kseg")
    register(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["export", *argv])


@pytest.fixture(scope="module")
def fcn_file(build_tiny_backbone, tmp_path_factory):
    keras.utils.set_random_seed(6)
    model = FCN(build_tiny_backbone(), NUM_CLASSES)
    path = tmp_path_factory.mktemp("models") / "fcn.keras"
    model.save(path)
    return path, model


@pytest.fixture(scope="module")
def small_recipe(tmp_path_factory):
    """The quickstart recipe with 8 training images (fast calibration)."""
    from kseg.training.recipe import apply_overrides, dump_recipe, load_recipe

    recipe = apply_overrides(load_recipe("quickstart"), ["data.num_train_images=8"])
    path = tmp_path_factory.mktemp("recipes") / "small.yaml"
    path.write_text(dump_recipe(recipe))
    return path


def test_export_writes_saved_model_and_tflite(fcn_file, small_recipe, tmp_path, capsys):
    path, model = fcn_file
    out = tmp_path / "saved_models"
    args = _parse(
        [
            str(path),
            "--name",
            "shapes",
            "--out",
            str(out),
            "--tflite",
            "int8",
            "--input-size",
            "32",
            "48",
            "--recipe",
            str(small_recipe),
            "--calibration-images",
            "4",
        ]
    )
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    version = out / "shapes" / "1"
    assert str(version) in printed
    assert (version / "saved_model.pb").is_file()

    images = np.random.default_rng(0).integers(0, 256, (1, 32, 48, 3), np.uint8)
    expected = model(images.astype(np.float32))["logits"].numpy().argmax(-1)
    serve = tf.saved_model.load(str(version)).signatures[SERVING_SIGNATURE]
    served = serve(**{IMAGES: tf.constant(images)})[CLASS_MAP].numpy()
    assert np.mean(served == expected) >= 0.995
    tflite = out / "shapes" / "tflite" / "shapes_v1_int8_32x48.tflite"
    assert str(tflite) in printed
    assert sorted(p.name for p in tflite.parent.iterdir()) == [tflite.name]
    segmenter = TFLiteSegmenter(tflite)
    assert segmenter.input_size == (32, 48)
    assert np.mean(segmenter(images)[CLASS_MAP] == expected) >= 0.5

    # Never overwritten: an explicit existing version, and the next free
    # version's TFLite file, are refused before anything is written.
    args = _parse([str(path), "--name", "shapes", "--out", str(out), "--version", "1"])
    with pytest.raises(FileExistsError, match=str(version)):
        args.func(args)
    taken = out / "shapes" / "tflite" / "shapes_v2_float32_32x48.tflite"
    taken.touch()
    args = _parse(
        [str(path), "--name", "shapes", "--out", str(out), "--tflite", "float32"]
        + ["--input-size", "32", "48"]
    )
    with pytest.raises(FileExistsError, match=str(taken)):
        args.func(args)
    assert sorted(p.name for p in (out / "shapes").iterdir()) == ["1", "tflite"]


def test_bad_options(fcn_file, tmp_path):
    path, _ = fcn_file
    out = ["--out", str(tmp_path)]
    args = _parse([str(path), "--name", "m", *out, "--tflite", "int8"])
    with pytest.raises(ValueError, match=r"--recipe NAME\|FILE"):
        args.func(args)
    args = _parse([str(tmp_path / "missing.keras"), "--name", "m", *out])
    with pytest.raises(FileNotFoundError, match="missing.keras"):
        args.func(args)
    args = _parse([str(path), "--name", "m", *out, "--tflite", "float32"])
    with pytest.raises(ValueError, match="fixed input size"):
        args.func(args)
    assert not (tmp_path / "m").exists()
    for argv in [
        ["--name", "a/b"],
        ["--name", "m", "--version", "0"],
        ["--name", "m", "--tflite", "int4"],
        ["--name", "m", "--input-size", "32"],
        ["--name", "m", "--recipe", "quickstart", "--calibration-dir", "x"],
        [],
    ]:
        with pytest.raises(SystemExit):
            _parse([str(path), *argv])


def test_calibration_from_a_folder(tmp_path):
    for index in range(5):
        image = np.full((20, 30, 3), 40 * index, np.uint8)
        (tmp_path / f"{index}.png").write_bytes(tf.io.encode_png(image).numpy())
    (tmp_path / "notes.txt").write_text("not an image")
    args = _parse(
        ["m.keras", "--name", "m", "--calibration-dir", str(tmp_path)]
        + ["--calibration-images", "3"]
    )
    images = list(_calibration_source(args)())
    assert [image[0, 0, 0] for image in images] == [0, 80, 160]
    assert all(image.shape == (20, 30, 3) for image in images)
    args = _parse(["m.keras", "--name", "m", "--calibration-dir", str(tmp_path / "x")])
    with pytest.raises(FileNotFoundError, match="calibration folder"):
        _calibration_source(args)
