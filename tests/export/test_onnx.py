"""ONNX export run in ONNX Runtime: every semantic model converts, with
dynamic batch, height and width, and its class maps match Keras; `kseg
export --onnx` writes the file without overwriting.

FCN is covered by the command test, PAN by the dynamic-shape tests, GCN,
ExFuse and SegModel (guided filter, guidance CRF) by `test_model_converts`
(GCN and ExFuse in the slow stage); PANet, NMS included, in the slow stage
too. Skipped without the onnx extra.
"""

import argparse

import keras
import numpy as np
import pytest

pytest.importorskip(
    "onnxruntime",
    reason="the ONNX export tests need the onnx extra: pip install kseg[onnx] "
    "(onnx, tf2onnx, onnxruntime)",
)
pytest.importorskip("tf2onnx", reason="the ONNX export needs tf2onnx (onnx extra)")

from kseg.export import CLASS_MAP, PROBABILITIES  # noqa: E402
from kseg.export.instance_saved_model import DETECTION_OUTPUTS  # noqa: E402
from kseg.export.onnx import (  # noqa: E402
    ONNXSegmenter,
    convert_to_onnx,
    export_onnx,
)
from kseg.testing import matched_detections  # noqa: E402

AGREEMENT = 0.995


def _keras(model, images):
    outputs = model(np.asarray(images, np.float32), training=False)
    logits = keras.ops.convert_to_numpy(outputs["logits"])
    return logits.argmax(-1), keras.ops.convert_to_numpy(keras.ops.softmax(logits))


def _images(shape, seed=0):
    return np.random.default_rng(seed).integers(0, 256, shape, np.uint8)


@pytest.fixture(scope="module")
def pan_onnx(pan_model):
    return convert_to_onnx(pan_model)


def test_pan_interface_and_dynamic_shapes(pan_model, pan_onnx):
    segmenter = ONNXSegmenter(pan_onnx, num_threads=1)
    (images,) = segmenter.session.get_inputs()
    assert images.name == "images" and images.type == "tensor(uint8)"
    # Batch, height and width are symbolic (dynamic) dimensions.
    assert [isinstance(d, str) for d in images.shape] == [True, True, True, False]
    outputs = {o.name: o.type for o in segmenter.session.get_outputs()}
    assert outputs == {
        CLASS_MAP: "tensor(int32)",
        PROBABILITIES: "tensor(float)",
    }
    for shape in [(2, 40, 56, 3), (1, 64, 64, 3), (3, 33, 47, 3)]:
        batch = _images(shape)
        expected, probabilities = _keras(pan_model, batch)
        result = segmenter(batch)
        assert result[CLASS_MAP].shape == shape[:3]
        assert np.mean(result[CLASS_MAP] == expected) >= AGREEMENT
        np.testing.assert_allclose(result[PROBABILITIES], probabilities, atol=1e-4)
    one = segmenter(batch[0])
    assert one[CLASS_MAP].shape == shape[1:3]
    with pytest.raises(ValueError, match="uint8"):
        segmenter(batch.astype(np.float32))


def test_pan_parity_on_synthetic_images(pan_model, pan_onnx, synthetic_val):
    expected, _ = _keras(pan_model, synthetic_val.images)
    class_map = ONNXSegmenter(pan_onnx)(synthetic_val.images)[CLASS_MAP]
    assert np.mean(class_map == expected) >= AGREEMENT


@pytest.mark.slow
def test_fixed_size_model_resizes_in_the_graph(build_tiny_pan):
    """A model built for 64×64 takes any size: the image is resized to 64×64
    and the logits back, as in the SavedModel."""
    import tensorflow as tf

    from kseg.export.saved_model import predict_images

    keras.utils.set_random_seed(2)
    model = build_tiny_pan(input_shape=(64, 64, 3))
    images = _images((2, 40, 56, 3), seed=1)
    expected = predict_images(model, tf.constant(images))
    result = ONNXSegmenter(convert_to_onnx(model))(images)
    assert np.mean(result[CLASS_MAP] == expected[CLASS_MAP].numpy()) >= AGREEMENT
    # ONNX Runtime's Resize and TensorFlow's ResizeBilinear (both half-pixel
    # centres) differ by float rounding: up to ~6e-4 here after two resizes.
    np.testing.assert_allclose(
        result[PROBABILITIES], expected[PROBABILITIES].numpy(), atol=2e-3
    )


# Converting takes 5-30 s a model on a loaded 2-core machine: SegModel (the
# guided filter and guidance CRF, the ops most likely to break) runs by
# default, GCN and ExFuse in CI's slow stage.
MODELS = [
    pytest.param("gcn", marks=pytest.mark.slow),
    pytest.param("exfuse", marks=pytest.mark.slow),
    pytest.param("segmodel"),
]
# SegModel's guided filter takes window statistics as differences of large
# sums (and divides by their covariance determinant), which amplifies the
# float32 rounding differences of the two runtimes: up to ~2.3e-3 on ~1% of
# the probabilities of the synthetic images (the class maps still agree).
PROBABILITY_TOLERANCE = {"segmodel": 5e-3}


@pytest.mark.parametrize("name", MODELS)
def test_model_converts(
    name, build_tiny_backbone, build_tiny_semantic_model, synthetic_val
):
    keras.utils.set_random_seed(5)
    model = build_tiny_semantic_model[name](build_tiny_backbone)
    segmenter = ONNXSegmenter(convert_to_onnx(model))
    for images in (synthetic_val.images, _images((2, 40, 56, 3))):
        expected, probabilities = _keras(model, images)
        result = segmenter(images)
        assert np.mean(result[CLASS_MAP] == expected) >= AGREEMENT
        np.testing.assert_allclose(
            result[PROBABILITIES],
            probabilities,
            atol=PROBABILITY_TOLERANCE.get(name, 1e-4),
        )


def test_export_onnx_never_overwrites(pan_model, tmp_path):
    path = tmp_path / "taken.onnx"
    path.write_bytes(b"old")
    with pytest.raises(FileExistsError, match="taken.onnx"):
        export_onnx(pan_model, path)
    assert path.read_bytes() == b"old"


def _parse(argv):
    from kseg.export.commands import register

    parser = argparse.ArgumentParser(prog="kseg")
    register(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["export", *argv])


def test_kseg_export_onnx(
    build_tiny_backbone, build_tiny_semantic_model, tmp_path, capsys
):
    keras.utils.set_random_seed(6)
    model = build_tiny_semantic_model["fcn"](build_tiny_backbone)
    model_file = tmp_path / "model.keras"
    model.save(model_file)
    out = tmp_path / "saved_models"
    args = _parse([str(model_file), "--name", "shapes", "--out", str(out), "--onnx"])
    assert args.func(args) == 0
    path = out / "shapes" / "onnx" / "shapes_v1.onnx"
    assert str(path) in capsys.readouterr().out
    # Only the file: no temporary left beside it.
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]
    images = _images((2, 48, 40, 3))
    expected, _ = _keras(model, images)
    assert np.mean(ONNXSegmenter(path)(images)[CLASS_MAP] == expected) >= AGREEMENT

    # The next version's file, if present, is refused before anything is
    # written (no SavedModel version 2 either).
    taken = out / "shapes" / "onnx" / "shapes_v2.onnx"
    taken.write_bytes(b"")
    with pytest.raises(FileExistsError, match=str(taken)):
        args.func(args)
    assert not (out / "shapes" / "2").exists()


# === PANet ===

PANET_SIZE = 64


@pytest.mark.slow  # the conversion takes ~50 s on a loaded 2-core machine
def test_panet_converts_with_nms(synthetic_val):
    """PANet, NMS included (as ONNX NonMaxSuppression), with a dynamic batch:
    the same detections as Keras on synthetic images."""
    import onnxruntime

    from kseg.backbones import build_resnet
    from kseg.models import PANet

    keras.utils.set_random_seed(3)
    backbone = build_resnet(
        (1, 1, 1, 1), (4, 4, 4, 4), input_shape=(PANET_SIZE, PANET_SIZE, 3)
    )
    model = PANet(
        backbone,
        5,
        filters=8,
        fc_units=16,
        max_detections=6,
        max_instances=3,
        rpn_pre_nms_top_k_test=60,
        rpn_post_nms_top_k_test=30,
        # High enough that some images have fewer than 6 detections: padding
        # rows (class 0) must keep all-zero masks.
        score_threshold=0.98,
        seed=1,
    )
    data = convert_to_onnx(model)
    session = onnxruntime.InferenceSession(data, providers=["CPUExecutionProvider"])
    (images,) = session.get_inputs()
    assert images.type == "tensor(uint8)"
    assert isinstance(images.shape[0], str) and images.shape[1:] == [64, 64, 3]
    names = [output.name for output in session.get_outputs()]
    assert sorted(names) == sorted(DETECTION_OUTPUTS)
    import onnx

    assert "NonMaxSuppression" in {
        n.op_type for n in onnx.load_from_string(data).graph.node
    }

    batch = synthetic_val.images[:4]
    actual = dict(zip(names, session.run(names, {"images": batch}), strict=True))
    expected = {
        key: keras.ops.convert_to_numpy(value)
        for key, value in model(batch.astype(np.float32), training=False).items()
    }
    matched, total = matched_detections(expected, actual)
    assert total > 0 and matched >= 0.95 * total, (matched, total)
    np.testing.assert_array_equal(actual["num_detections"], expected["num_detections"])
    assert (expected["num_detections"] < 6).any(), expected["num_detections"]
    # Same order here (no score ties). Padding rows (class 0) keep all-zero
    # masks; detected masks agree once binarized at 0.5, up to the pixels
    # where this untrained model's mask logits are near 0 or where RoIAlign's
    # adaptive sample count, ceil(box size / bins), flips on a box that
    # differs by float rounding (~1e-4 px).
    np.testing.assert_array_equal(actual["classes"], expected["classes"])
    padding = expected["classes"] == 0
    assert not actual["masks"][padding].any()
    binary = (actual["masks"] > 0.5) != (expected["masks"] > 0.5)
    assert np.mean(binary[~padding]) <= 0.02, np.mean(binary[~padding])
    # The NMS swap is undone: Keras still runs kseg's padded NMS.
    from kseg.layers.nms import BatchedNMS

    assert all(
        type(vars(layer)["nms"]).__name__ == "PaddedNMS"
        for layer in model._flatten_layers()
        if isinstance(layer, BatchedNMS) and "nms" in vars(layer)
    )


# === Running .onnx files: kseg predict, open_model ===


def _write_images(folder, images):
    import cv2

    folder.mkdir()
    paths = []
    for index, image in enumerate(images):
        paths.append(folder / f"image{index}.png")
        cv2.imwrite(str(paths[-1]), image[..., ::-1])
    return paths


def test_kseg_predict_runs_a_semantic_onnx_file(pan_model, pan_onnx, tmp_path, capsys):
    # Before: "is not a complete .keras model file ... damaged".
    import cv2

    from kseg.cli import main
    from kseg.data import read_label
    from kseg.inference import open_model, predict

    path = tmp_path / "pan_v1.onnx"
    path.write_bytes(pan_onnx)
    source = open_model(path)
    assert source.kind == "onnx" and source.input_size is None
    images = [_images((40, 56, 3), seed=3), _images((33, 47, 3), seed=4)]
    paths = _write_images(tmp_path / "images", images)
    out = tmp_path / "out"
    status = main(["predict", str(path), *map(str, paths), "--out", str(out),
                   "--overlay"])  # fmt: skip
    assert status == 0, capsys.readouterr().err
    for image, image_path in zip(images, paths, strict=True):
        written = read_label(out / f"{image_path.stem}.png")
        expected = predict(pan_model, image).class_map
        assert np.mean(written == expected) >= AGREEMENT
        # What `predict` gives the runner `open_model` returns, and its overlay.
        np.testing.assert_array_equal(written, predict(source.model, image).class_map)
        drawn = cv2.imread(str(out / f"{image_path.stem}_overlay.png"))
        assert drawn is not None and drawn.shape[0] >= image.shape[0]


def test_kseg_predict_names_the_model_kinds_it_takes(tmp_path, capsys):
    from kseg.cli import main

    path = tmp_path / "weights.bin"
    path.write_bytes(b"\x00" * 64)
    image = _write_images(tmp_path / "images", [_images((8, 8, 3))])[0]
    assert main(["predict", str(path), str(image), "--out", str(tmp_path)]) == 1
    error = capsys.readouterr().err
    assert "weights.bin is not a model file kseg runs" in error
    assert ".onnx" in error and "damaged" not in error


PANET_CATEGORIES = ((11, 27), ("disc", "square"))


@pytest.fixture(scope="module")
def fixed_onnx(tmp_path_factory):
    """`(detector, path)`: `kseg.testing`'s hand-made instance model and its
    `.onnx` file, exported with category ids 11 and 27 (the conversion takes
    ~2 s: no NMS)."""
    from kseg import testing

    masks = np.zeros((3, 28, 28), np.float32)
    masks[0] = 1.0
    masks[1, :14] = 0.9
    detector = testing.fixed_detector(
        boxes=[[4, 8, 30, 40], [20, 2, 60, 30], [0, 0, 0, 0]],
        scores=[0.9, 0.6, 0.0],
        classes=[2, 1, 0],
        masks=masks,
        count=2,
        image_size=(64, 128),
    )
    path = tmp_path_factory.mktemp("onnx") / "fixed_v1.onnx"
    export_onnx(detector, path, categories=PANET_CATEGORIES)
    return detector, path


def test_instance_onnx_file_runs_like_its_keras_model(fixed_onnx, tmp_path, capsys):
    # Before: ONNXSegmenter failed ("Invalid output name: class_map") and
    # nothing in kseg ran a PANet ONNX file; its export wrote no categories.
    import json

    import cv2

    from kseg.cli import main
    from kseg.export.onnx import ONNXInstanceSegmenter
    from kseg.inference import open_model, predict_instances
    from kseg.inference.instance_outputs import draw_instances

    detector, path = fixed_onnx
    categories = json.loads(path.with_name("fixed_v1.categories.json").read_text())
    assert categories == [{"id": 11, "name": "disc"}, {"id": 27, "name": "square"}]
    outputs = ONNXSegmenter(path)(np.full((2, 64, 128, 3), 100, np.uint8))
    assert sorted(outputs) == sorted(DETECTION_OUTPUTS)
    np.testing.assert_array_equal(outputs["num_detections"], [2, 2])
    with pytest.raises(ValueError, match=r"\(N, 64, 128, 3\) for this file"):
        ONNXSegmenter(path)(np.zeros((1, 64, 64, 3), np.uint8))

    source = open_model(path)
    assert isinstance(source.model, ONNXInstanceSegmenter)
    assert source.kind == "onnx" and source.input_size == (64, 128)
    images = [_images((30, 90, 3), seed=5), _images((96, 64, 3), seed=6)]
    expected = predict_instances(detector, images)
    # What open_model returns, and its model: the same detections as Keras.
    for model in (source, source.model):
        for mine, keras_result in zip(
            predict_instances(model, images), expected, strict=True
        ):
            assert len(keras_result.scores) == 2
            np.testing.assert_array_equal(mine.classes, keras_result.classes)
            np.testing.assert_allclose(mine.scores, keras_result.scores)
            np.testing.assert_allclose(mine.boxes, keras_result.boxes, atol=1e-4)
            np.testing.assert_array_equal(mine.masks, keras_result.masks)

    paths = _write_images(tmp_path / "images", images)
    out = tmp_path / "out"
    assert main(["predict", str(path), *map(str, paths), "--out", str(out)]) == 0
    assert str(path.with_name("fixed_v1.categories.json")) in capsys.readouterr().out
    detections = json.loads((out / "detections.json").read_text())
    assert sorted({d["category_id"] for d in detections}) == [11, 27]
    assert len(detections) == 4
    for image, image_path, result in zip(images, paths, expected, strict=True):
        instance_map = cv2.imread(
            str(out / f"{image_path.stem}_instances.png"), cv2.IMREAD_UNCHANGED
        )
        np.testing.assert_array_equal(instance_map, result.instance_map())
        drawn = cv2.imread(str(out / f"{image_path.stem}_overlay.png"))[..., ::-1]
        np.testing.assert_array_equal(
            drawn, draw_instances(image, result, PANET_CATEGORIES[1])
        )


@pytest.mark.slow  # exporting PANet (SavedModel and ONNX) takes minutes
def test_panet_run_exported_to_onnx_runs_in_kseg_predict(synthetic_val, tmp_path):
    """`kseg export RUN --onnx` then `kseg predict` on the PANet `.onnx`
    file: the run's dataset categories, Keras' detections."""
    import json

    from kseg.backbones import build_resnet
    from kseg.cli import main
    from kseg.data.synthetic_instances import SYNTHETIC_INSTANCE_CLASSES
    from kseg.inference import open_model, predict_instances
    from kseg.models import PANet
    from kseg.training.recipe import dump_recipe, load_recipe

    keras.utils.set_random_seed(3)
    backbone = build_resnet(
        (1, 1, 1, 1), (4, 4, 4, 4), input_shape=(PANET_SIZE, PANET_SIZE, 3)
    )
    model = PANet(
        backbone,
        len(SYNTHETIC_INSTANCE_CLASSES),
        filters=8,
        fc_units=16,
        max_detections=6,
        max_instances=3,
        rpn_pre_nms_top_k_test=60,
        rpn_post_nms_top_k_test=30,
        seed=1,
    )
    run = tmp_path / "run"
    run.mkdir()
    model.save(run / "model.keras")
    (run / "recipe.yaml").write_text(dump_recipe(load_recipe("panet_quickstart")))
    saved_models = tmp_path / "saved_models"
    assert main(["export", str(run), "--name", "panet", "--onnx",
                 "--out", str(saved_models)]) == 0  # fmt: skip
    path = saved_models / "panet" / "onnx" / "panet_v1.onnx"
    assert path.with_name("panet_v1.categories.json").is_file()

    images = [synthetic_val.images[0], _images((40, 90, 3), seed=7)]
    paths = _write_images(tmp_path / "images", images)
    out = tmp_path / "out"
    assert main(["predict", str(path), *map(str, paths), "--out", str(out),
                 "--score-threshold", "0"]) == 0  # fmt: skip
    listing = json.loads((out / "images.json").read_text())
    assert [c["name"] for c in listing["categories"]] == list(
        SYNTHETIC_INSTANCE_CLASSES
    )
    detections = json.loads((out / "detections.json").read_text())
    results = predict_instances(open_model(path), images, score_threshold=0)
    assert len(detections) == sum(len(r.scores) for r in results) > 0
    # Keras gets the fitted float image, the file its uint8 rounding (±0.5
    # levels where the image was resized): on this untrained model's
    # confident detections that moves boxes by < 0.2 px and scores by < 1e-3.
    # (IoU matching fails here: some boxes are clipped to zero height.)
    expected = predict_instances(model, images, score_threshold=0.5)
    mine = predict_instances(open_model(path), images, score_threshold=0.5)
    for result, keras_result in zip(mine, expected, strict=True):
        assert len(keras_result.scores) > 0
        np.testing.assert_array_equal(result.classes, keras_result.classes)
        np.testing.assert_allclose(result.scores, keras_result.scores, atol=5e-3)
        np.testing.assert_allclose(result.boxes, keras_result.boxes, atol=1.0)
