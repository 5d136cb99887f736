"""`kseg predict` runs every model `kseg train` writes, and large images in
bounded memory."""

import numpy as np
import pytest

from kseg.cli import main
from kseg.inference import open_model, predict, predict_tiled
from kseg.training.recipe import apply_overrides, load_recipe
from kseg.training.semantic import compile_model
from kseg.training.task import build_model

TINY = [
    "model.kwargs.filters=8",
    "backbone.kwargs.widths=[4, 4, 4, 4]",
    "backbone.kwargs.stem_width=4",
]


@pytest.fixture(scope="module")
def trained_like(tmp_path_factory):
    """A model saved as `kseg train` saves it: compiled with the recipe's
    optimizer and its kseg `PolyWarmup` learning-rate schedule."""
    recipe = apply_overrides(load_recipe("quickstart"), TINY)
    model = compile_model(build_model(recipe, 6), recipe, 6, total_steps=10)
    run = tmp_path_factory.mktemp("run")
    model.save(run / "model.keras")
    (run / "recipe.yaml").write_text("name: quickstart\n")
    return run, model


def test_predict_loads_a_model_saved_with_its_training_optimizer(
    trained_like, tmp_path
):
    # Before: "Could not locate class 'PolyWarmup'" for every trained model.
    run, model = trained_like
    image = np.random.default_rng(0).integers(0, 256, (20, 24, 3), dtype=np.uint8)
    source = open_model(run / "model.keras")
    assert source.kind == "keras" and source.input_size is None
    expected = predict(model, image).class_map
    np.testing.assert_array_equal(predict(source.model, image).class_map, expected)
    # What open_model returns runs as it is too (before: not callable).
    np.testing.assert_array_equal(predict(source, image).class_map, expected)
    tiled = predict_tiled(source, image, (16, 16))
    np.testing.assert_array_equal(tiled, predict(model, image, window=(16, 16))[0])
    # A run directory means its model.keras.
    assert open_model(run).path == run / "model.keras"


def test_unfinished_runs_and_damaged_files_get_clear_messages(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "recipe.yaml").write_text("name: x\n")
    with pytest.raises(ValueError, match=r"has no model.keras yet .*best.keras"):
        open_model(tmp_path / "run")
    cut = tmp_path / "cut.keras"
    cut.write_bytes(b"PK\x03\x04 cut off")
    with pytest.raises(ValueError, match=r"cut.keras is not a complete .keras"):
        open_model(cut)
    with pytest.raises(FileNotFoundError, match="model file not found"):
        open_model(tmp_path / "nope.keras")


def test_tiled_prediction_equals_windowed_prediction(trained_like):
    _, model = trained_like
    image = np.random.default_rng(1).integers(0, 256, (50, 37, 3), dtype=np.uint8)
    expected = predict(model, image, window=(16, 16), overlap=0.5).class_map
    tiled = predict_tiled(model, image, (16, 16), overlap=0.5)
    np.testing.assert_array_equal(tiled, expected)
    # A side shorter than the window is padded as predict pads it.
    narrow = image[:10]
    np.testing.assert_array_equal(
        predict_tiled(model, narrow, (16, 16)),
        predict(model, narrow, window=(16, 16)).class_map,
    )


def test_predict_command_runs_large_images_by_windows(trained_like, tmp_path, capsys):
    import cv2

    from kseg.data import read_label

    run, model = trained_like
    image = np.random.default_rng(2).integers(0, 256, (40, 30, 3), dtype=np.uint8)
    cv2.imwrite(str(tmp_path / "big.png"), image[..., ::-1])
    status = main(
        ["predict", str(run), str(tmp_path / "big.png"), "--out",
         str(tmp_path / "out"), "--max-pixels", "500", "--window", "16", "16"]
    )  # fmt: skip
    assert status == 0, capsys.readouterr().err
    expected = predict(model, image, window=(16, 16)).class_map
    np.testing.assert_array_equal(read_label(tmp_path / "out" / "big.png"), expected)


def test_tflite_files_run_other_sizes_by_resizing_to_their_input():
    # `kseg predict --tta` on a .tflite file: each test scale is resized to
    # the file's fixed input and its probabilities back (before: "images
    # must be (N, 64, 64, 3) for this file" on every image).
    import cv2

    from kseg.inference.sources import _ExportRunner

    class Segmenter:
        input_size = (8, 8)

        def __call__(self, pixels):
            assert pixels.shape[1:] == (8, 8, 3) and pixels.dtype == np.uint8
            red = pixels[..., :1].astype(np.float32) / 255.0
            return {"probabilities": np.concatenate([red, 1 - red], axis=-1)}

    runner = _ExportRunner(Segmenter())
    images = np.random.default_rng(3).uniform(0, 255, (2, 12, 6, 3))
    logits = runner(images)["logits"]
    assert logits.shape == (2, 12, 6, 2)
    for image, result in zip(images, logits, strict=True):
        small = cv2.resize(image.astype(np.float32), (8, 8))
        red = np.round(small[..., 0]) / 255.0
        expected = cv2.resize(np.stack([red, 1 - red], -1), (6, 12))
        np.testing.assert_allclose(np.exp(result), expected, atol=1e-6)


def test_predict_instances_runs_what_open_model_returns(tmp_path):
    # Before: predict_instances(open_model(...), images) said it "needs an
    # instance segmentation model"; only `open_model(...).model` ran.
    from kseg import testing
    from kseg.export import export_saved_model, export_tflite
    from kseg.inference import predict_instances

    masks = np.zeros((2, 28, 28), np.float32)
    masks[0, :, :20] = 1.0
    detector = testing.fixed_detector(
        boxes=[[6, 4, 40, 50], [0, 0, 0, 0]],
        scores=[0.8, 0.0],
        classes=[1, 0],
        masks=masks,
        count=1,
        image_size=(64, 64),
    )
    detector.save(tmp_path / "fixed.keras")
    paths = {
        "keras": tmp_path / "fixed.keras",
        "saved_model": export_saved_model(detector, tmp_path / "saved_models" / "f"),
        "tflite": export_tflite(detector, tmp_path / "fixed_float32.tflite"),
    }
    try:
        from kseg.export.onnx import export_onnx

        paths["onnx"] = export_onnx(detector, tmp_path / "fixed.onnx")
    except ImportError:  # no onnx extra: the other kinds still run
        pass
    image = np.random.default_rng(4).integers(20, 256, (50, 70, 3), dtype=np.uint8)
    (expected,) = predict_instances(detector, [image])
    assert len(expected.scores) == 1
    for kind, path in paths.items():
        source = open_model(path)
        assert source.kind == kind
        for model in (source, source.model):
            (result,) = predict_instances(model, [image])
            np.testing.assert_array_equal(result.classes, expected.classes)
            np.testing.assert_allclose(result.boxes, expected.boxes, atol=1e-3)
            np.testing.assert_array_equal(result.masks, expected.masks)


def test_class_names_come_with_what_open_model_returns(trained_like, tmp_path):
    import json

    from kseg import testing
    from kseg.inference import class_names

    # A semantic run: its recipe's class names, indexed by class.
    run, model = trained_like
    expected = ("background", "disc", "square", "triangle", "ring", "plus")
    assert class_names(open_model(run)) == expected
    assert class_names(open_model(run / "model.keras")) == expected
    # A model file without a run: nothing to name its classes by.
    model.save(tmp_path / "bare.keras")
    assert class_names(open_model(tmp_path / "bare.keras")) is None
    # An instance model: class k at k - 1, from its categories file ...
    detector = testing.fixed_detector(
        boxes=[[6, 4, 40, 50]],
        scores=[0.8],
        classes=[2],
        masks=np.ones((1, 28, 28), np.float32),
        count=1,
    )
    detector.save(tmp_path / "fixed.keras")
    assert class_names(open_model(tmp_path / "fixed.keras")) == ("class_1", "class_2")
    categories = [{"id": 11, "name": "cat"}, {"id": 27, "name": "dog"}]
    (tmp_path / "fixed.categories.json").write_text(json.dumps(categories))
    assert class_names(open_model(tmp_path / "fixed.keras")) == ("cat", "dog")
