import argparse
import struct

import cv2
import keras
import numpy as np
import pytest

from kseg.data import CITYSCAPES_PALETTE, decode_image, read_label, voc_colormap
from kseg.inference import PAN_TTA_SCALES, predict, register
from kseg.inference.visualize import overlay_with_legend
from kseg.layers.common import ConvBNReLU

NUM_CLASSES = 3


def _parse(argv):
    parser = argparse.ArgumentParser(prog="kseg")
    register(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


def _run(argv):
    args = _parse(argv)
    return args.func(args)


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    # A kseg layer inside makes loading depend on kseg's registered objects.
    inputs = keras.Input((None, None, 3))
    features = ConvBNReLU(4, 3, name="features")(inputs / 255.0)
    logits = keras.layers.Conv2D(NUM_CLASSES, 1, name="classifier")(features)
    model = keras.Model(inputs, {"logits": logits})
    path = tmp_path_factory.mktemp("model") / "tiny.keras"
    model.save(path)
    return path


@pytest.fixture
def images(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "images"
    folder.mkdir()
    first = rng.integers(0, 256, (20, 26, 3)).astype(np.uint8)
    second = rng.integers(0, 256, (17, 13, 3)).astype(np.uint8)
    cv2.imwrite(str(folder / "first.png"), first[..., ::-1])
    cv2.imwrite(str(folder / "second.jpg"), second[..., ::-1])
    (folder / "broken.jpg").write_bytes(b"this is not an image")
    return folder


def _png_color_type(path):
    data = path.read_bytes()
    width, height, depth, color_type = struct.unpack(">IIBB", data[16:26])
    return color_type


def test_two_good_images_and_one_unreadable(model_path, images, tmp_path, capsys):
    out = tmp_path / "out"
    inputs = [images / "first.png", images / "broken.jpg", images / "second.jpg"]
    status = _run(
        ["predict", str(model_path), *map(str, inputs), "--out", str(out), "--overlay"]
    )
    captured = capsys.readouterr()
    assert status == 1
    assert "broken.jpg" in captured.err
    assert "not a decodable image" in captured.err
    assert "first.png" not in captured.err and "second.jpg" not in captured.err
    assert "1 of 3 images failed" in captured.err
    assert sorted(p.name for p in out.iterdir()) == [
        "first.png",
        "first_overlay.png",
        "second.png",
        "second_overlay.png",
    ]

    model = keras.saving.load_model(model_path)
    for name in ("first.png", "second.jpg"):
        image = decode_image((images / name).read_bytes()).numpy()
        expected = predict(model, image).class_map
        stem = name.split(".")[0]
        label_path = out / f"{stem}.png"
        assert _png_color_type(label_path) == 3
        label = read_label(label_path)
        np.testing.assert_array_equal(label, expected)
        rgb = cv2.imread(str(label_path), cv2.IMREAD_COLOR)[..., ::-1]
        np.testing.assert_array_equal(rgb, voc_colormap(NUM_CLASSES)[expected])

        overlay_path = out / f"{stem}_overlay.png"
        assert _png_color_type(overlay_path) == 2
        written = cv2.imread(str(overlay_path), cv2.IMREAD_UNCHANGED)[..., ::-1]
        palette = voc_colormap(NUM_CLASSES)
        # The overlay, then the legend of the classes present (no recipe
        # beside the model: `class <k>`).
        np.testing.assert_array_equal(
            written, overlay_with_legend(image, expected, palette)
        )
        assert written.shape[0] >= image.shape[0]
        assert written.shape[1] > image.shape[1]


def test_missing_image_is_reported(model_path, images, tmp_path, capsys):
    out = tmp_path / "out"
    missing = images / "missing.png"
    status = _run(
        ["predict", str(model_path), str(missing), str(images / "first.png"),
         "--out", str(out)]
    )  # fmt: skip
    captured = capsys.readouterr()
    assert status == 1
    assert f"{missing}: cannot read the image file" in captured.err
    assert (out / "first.png").exists()


def test_existing_outputs_are_not_overwritten(model_path, images, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "first.png").write_bytes(b"keep me")
    argv = ["predict", str(model_path), str(images / "first.png"), "--out", str(out)]
    assert _run(argv) == 1
    assert "already exists" in capsys.readouterr().err
    assert (out / "first.png").read_bytes() == b"keep me"

    assert _run([*argv, "--overwrite"]) == 0
    assert read_label(out / "first.png").shape == (20, 26)


def test_existing_overlay_is_not_overwritten(model_path, images, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "first_overlay.png").write_bytes(b"keep me")
    argv = ["predict", str(model_path), str(images / "first.png"), "--out", str(out)]
    assert _run([*argv, "--overlay"]) == 1
    assert "first_overlay.png already exists" in capsys.readouterr().err
    assert not (out / "first.png").exists()
    assert _run(argv) == 0


def test_inputs_with_the_same_output_name(model_path, images, tmp_path, capsys):
    other = tmp_path / "other"
    other.mkdir()
    (other / "first.jpg").write_bytes((images / "second.jpg").read_bytes())
    out = tmp_path / "out"
    status = _run(
        ["predict", str(model_path), str(images / "first.png"),
         str(other / "first.jpg"), "--out", str(out)]
    )  # fmt: skip
    assert status == 1
    err = capsys.readouterr().err
    assert f"{other / 'first.jpg'}: its output" in err
    np.testing.assert_array_equal(read_label(out / "first.png").shape, (20, 26))


def test_tta_window_and_palette_options(model_path, images, tmp_path):
    out = tmp_path / "out"
    status = _run(
        ["predict", str(model_path), str(images / "first.png"), "--out", str(out),
         "--tta", "--window", "12", "16", "--palette", "cityscapes"]
    )  # fmt: skip
    assert status == 0
    model = keras.saving.load_model(model_path)
    image = decode_image((images / "first.png").read_bytes()).numpy()
    expected = predict(
        model, image, scales=PAN_TTA_SCALES, flip=True, window=(12, 16)
    ).class_map
    np.testing.assert_array_equal(read_label(out / "first.png"), expected)
    rgb = cv2.imread(str(out / "first.png"), cv2.IMREAD_COLOR)[..., ::-1]
    np.testing.assert_array_equal(rgb, CITYSCAPES_PALETTE[expected])


def test_missing_model_file(images, tmp_path, capsys):
    status = _run(
        ["predict", str(tmp_path / "nope.keras"), str(images / "first.png"),
         "--out", str(tmp_path / "out")]
    )  # fmt: skip
    assert status == 1
    assert "model file not found" in capsys.readouterr().err


@pytest.mark.parametrize(
    "extra",
    [
        ["--window", "0", "8"],
        ["--window", "8"],
        ["--overlap", "1"],
        ["--scales", "1", "-0.5"],
        ["--tta", "--scales", "1"],
        ["--alpha", "2"],
        ["--palette", "pascal"],
        ["--batch-size", "x"],
    ],
)
def test_bad_options_are_usage_errors(extra, capsys):
    with pytest.raises(SystemExit) as error:
        _parse(["predict", "m.keras", "a.png", "--out", "o", *extra])
    assert error.value.code == 2


def test_overlay_legend_names_the_classes_of_the_runs_recipe(
    model_path, images, tmp_path
):
    from kseg.data import SYNTHETIC_CLASSES
    from kseg.training.recipe import dump_recipe, load_recipe

    run = tmp_path / "run"
    run.mkdir()
    (run / "model.keras").write_bytes(model_path.read_bytes())
    (run / "recipe.yaml").write_text(dump_recipe(load_recipe("quickstart")))
    out = tmp_path / "out"
    argv = ["predict", str(run / "model.keras"), str(images / "first.png")]
    assert _run([*argv, "--out", str(out), "--overlay"]) == 0
    written = cv2.imread(str(out / "first_overlay.png"))[..., ::-1]
    image = decode_image((images / "first.png").read_bytes()).numpy()
    expected = read_label(out / "first.png")
    palette = voc_colormap(NUM_CLASSES)
    named = overlay_with_legend(image, expected, palette, class_names=SYNTHETIC_CLASSES)
    np.testing.assert_array_equal(written, named)
    assert not np.array_equal(written, overlay_with_legend(image, expected, palette))
