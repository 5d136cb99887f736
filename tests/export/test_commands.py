"""`kseg export`: the argparse subcommand and its handler."""

import argparse

import keras
import numpy as np
import pytest
import tensorflow as tf

from kseg.export import CLASS_MAP, IMAGES, SERVING_SIGNATURE, TFLiteSegmenter
from kseg.export.commands import _folder_images, register
from kseg.models import FCN

NUM_CLASSES = 6


def _parse(argv):
    parser = argparse.ArgumentParser(prog="kseg")
    register(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["export", *argv])


@pytest.fixture(scope="module")
def fcn_run(build_tiny_backbone, tmp_path_factory):
    """A `kseg train`-style run directory: `model.keras` (a tiny FCN) beside
    `recipe.yaml` (the quickstart recipe with 8 training images)."""
    from kseg.training.recipe import apply_overrides, dump_recipe, load_recipe

    keras.utils.set_random_seed(6)
    model = FCN(build_tiny_backbone(), NUM_CLASSES)
    run_dir = tmp_path_factory.mktemp("run")
    model.save(run_dir / "model.keras")
    recipe = apply_overrides(load_recipe("quickstart"), ["data.num_train_images=8"])
    (run_dir / "recipe.yaml").write_text(dump_recipe(recipe))
    return run_dir, model


def test_export_writes_saved_model_and_tflite(fcn_run, tmp_path, capsys):
    run_dir, model = fcn_run
    out = tmp_path / "saved_models"
    args = _parse(
        [str(run_dir), "--name", "shapes", "--out", str(out), "--tflite", "int8"]
        + ["--calibration-images", "4"]
    )
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    version = out / "shapes" / "1"
    assert str(version) in printed
    assert (version / "saved_model.pb").is_file()

    images = np.random.default_rng(0).integers(0, 256, (1, 64, 64, 3), np.uint8)
    expected = model(images.astype(np.float32))["logits"].numpy().argmax(-1)
    serve = tf.saved_model.load(str(version)).signatures[SERVING_SIGNATURE]
    served = serve(**{IMAGES: tf.constant(images)})[CLASS_MAP].numpy()
    assert np.mean(served == expected) >= 0.995
    # The run's recipe gives the input size (its training crop) and the
    # calibration images (its train split).
    tflite = out / "shapes" / "tflite" / "shapes_v1_int8_64x64.tflite"
    assert str(tflite) in printed
    assert "data.crop_size" in printed
    assert "train split of recipe 'quickstart'" in printed
    assert sorted(p.name for p in tflite.parent.iterdir()) == [tflite.name]
    segmenter = TFLiteSegmenter(tflite)
    assert segmenter.input_size == (64, 64)
    assert np.mean(segmenter(images)[CLASS_MAP] == expected) >= 0.5

    # Never overwritten: an explicit existing version, and the next free
    # version's TFLite file, are refused before anything is written.
    model_file = str(run_dir / "model.keras")
    args = _parse([model_file, "--name", "shapes", "--out", str(out), "--version", "1"])
    with pytest.raises(FileExistsError, match=str(version)):
        args.func(args)
    taken = out / "shapes" / "tflite" / "shapes_v2_float32_32x48.tflite"
    taken.touch()
    args = _parse(
        [model_file, "--name", "shapes", "--out", str(out), "--tflite", "float32"]
        + ["--input-size", "32", "48"]
    )
    with pytest.raises(FileExistsError, match=str(taken)):
        args.func(args)
    assert sorted(p.name for p in (out / "shapes").iterdir()) == ["1", "tflite"]


def test_bad_options(fcn_run, tmp_path):
    path = tmp_path / "elsewhere.keras"
    path.write_bytes((fcn_run[0] / "model.keras").read_bytes())
    out = ["--out", str(tmp_path)]
    args = _parse([str(path), "--name", "m", *out, "--tflite", "int8"])
    with pytest.raises(ValueError, match=r"--recipe NAME\|FILE"):
        args.func(args)
    args = _parse([str(tmp_path / "missing.keras"), "--name", "m", *out])
    with pytest.raises(FileNotFoundError, match="missing.keras"):
        args.func(args)
    args = _parse([str(path), "--name", "m", *out, "--tflite", "float32"])
    with pytest.raises(ValueError, match="fixed input size") as error:
        args.func(args)
    # It says what to pass: a size, or the run directory whose recipe has one.
    assert "pass --input-size H W" in str(error.value)
    assert "run directory" in str(error.value)
    assert "data.crop_size" in str(error.value)
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


def test_kseg_command_line_reports_errors(fcn_run, tmp_path, capsys):
    from kseg.cli import main

    missing = tmp_path / "missing.keras"
    assert main(["export", str(missing), "--name", "m", "--out", str(tmp_path)]) == 1
    assert f"kseg export: error: model file not found: {missing}" in (
        capsys.readouterr().err
    )
    # A loose .keras file of a model that takes any size has no TFLite size.
    loose = tmp_path / "loose.keras"
    loose.write_bytes((fcn_run[0] / "model.keras").read_bytes())
    out = ["--out", str(tmp_path)]
    assert main(["export", str(loose), "--name", "m", *out, "--tflite", "float16"]) == 1
    assert "pass --input-size H W" in capsys.readouterr().err


def test_calibration_from_a_folder(tmp_path):
    for index in range(5):
        image = np.full((20, 30, 3), 40 * index, np.uint8)
        (tmp_path / f"{index}.png").write_bytes(tf.io.encode_png(image).numpy())
    (tmp_path / "notes.txt").write_text("not an image")
    images = list(_folder_images(tmp_path, 3)())
    assert [image[0, 0, 0] for image in images] == [0, 80, 160]
    assert all(image.shape == (20, 30, 3) for image in images)
    with pytest.raises(FileNotFoundError, match="calibration folder"):
        _folder_images(tmp_path / "x", 3)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=r"no \.jpg"):
        _folder_images(empty, 3)
