"""The PANet (instance) SavedModel: hand-made detections through a
fixed-output model checked against `paste_masks` and hand-computed boxes,
kseg-free loading, saved_model_cli, the TF1 session loader, gRPC requests,
`kseg predict` on the export, `kseg export` dispatch, `kseg export --tflite`
and `kseg predict` on the file; a slow test exports a tiny PANet and compares
it with `predict_instances` (PANet's own TFLite tests: test_tflite.py)."""

import argparse
import json
import os
import subprocess
import sys
import textwrap

import cv2
import keras
import numpy as np
import pytest
import tensorflow as tf

from kseg import testing
from kseg.data.instance_transform import paste_masks
from kseg.export import export_saved_model
from kseg.export.instance_saved_model import INSTANCE_OUTPUTS

SIZE = 64
BOXES = np.array(
    [[0, 0, 16, 64], [4, 8, 12, 40], [10, 50, 20, 70], [0, 0, 0, 0]], np.float32
)
SCORES = np.array([0.3, 0.9, 0.7, 0.0], np.float32)
CLASSES = np.array([1, 2, 1, 0], np.int32)


def _masks():
    masks = np.zeros((4, 28, 28), np.float32)
    # A ramp crossing 0.5 on a diagonal: bilinear sampling decides pixels.
    masks[0] = np.add.outer(np.arange(28), np.arange(28)) / 54.0
    masks[1, :14] = 1.0  # the top half of its box
    masks[2, :, :7] = 0.8  # the left quarter
    return masks


def fixed_detector():
    return testing.fixed_detector(BOXES, SCORES, CLASSES, _masks(), 3, (SIZE, SIZE))


def _images(shape, seed=0):
    return np.random.default_rng(seed).integers(20, 256, shape, dtype=np.uint8)


def _reference_map(boxes, scores, masks, count, height, width):
    """`instance_map` from `paste_masks`: the best-scoring covering row."""
    pasted = paste_masks(masks[:count], boxes[:count], height, width)
    result = np.full((height, width), -1, np.int32)
    order = sorted(range(count), key=lambda k: (scores[k], -k))
    for k in order:  # ascending score: the best is written last
        result[pasted[k]] = k
    return result


def _subprocess_env():
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    env.pop("PYTHONPATH", None)
    return env


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model_dir = tmp_path_factory.mktemp("saved_models") / "fixed"
    path = export_saved_model(
        fixed_detector(), model_dir, categories=([7, 9], ["cat", "dog"])
    )
    return model_dir, path


@pytest.fixture(scope="module")
def serve(exported):
    loaded = tf.saved_model.load(str(exported[1]))
    return loaded.signatures["serving_default"], loaded.signatures["serving_bytes"]


def _check_first_image(outputs, height=32, width=128):
    """Image 0 of `outputs` for a 32 × 128 image (scale 0.5 into 64 × 64)."""
    assert int(outputs["num_detections"][0]) == 3
    expected_boxes = np.array(
        [[0, 0, 32, 128], [8, 16, 24, 80], [20, 100, 32, 128], [0, 0, 0, 0]]
    )
    np.testing.assert_allclose(outputs["boxes"][0], expected_boxes, atol=1e-5)
    np.testing.assert_allclose(outputs["scores"][0], SCORES)
    np.testing.assert_array_equal(outputs["classes"][0], CLASSES)
    np.testing.assert_allclose(outputs["masks"][0], _masks())
    instance_map = np.asarray(outputs["instance_map"][0])
    reference = _reference_map(
        expected_boxes.astype(float), SCORES, _masks(), 3, height, width
    )
    assert np.mean(instance_map == reference) >= 0.99
    # By hand: detection 1 (score 0.9) is the top half of its box.
    assert (instance_map[8:16, 16:80] == 1).all()
    assert (instance_map == 1).sum() == 8 * 64
    return instance_map, reference


def test_serving_default_on_a_batch_with_an_empty_image(serve):
    images = np.stack([_images((32, 128, 3)), np.zeros((32, 128, 3), np.uint8)])
    outputs = serve[0](images=tf.constant(images))
    assert set(outputs) == set(INSTANCE_OUTPUTS)
    assert outputs["instance_map"].dtype == tf.int32
    assert outputs["instance_map"].shape == (2, 32, 128)
    assert outputs["masks"].shape == (2, 4, 28, 28)
    instance_map, reference = _check_first_image(outputs)
    np.testing.assert_array_equal(instance_map, reference)
    # The black image: nothing found.
    assert int(outputs["num_detections"][1]) == 0
    assert (np.asarray(outputs["instance_map"][1]) == -1).all()
    assert not np.asarray(outputs["classes"][1]).any()

    png = [tf.io.encode_png(image).numpy() for image in images]
    from_bytes = serve[1](image_bytes=tf.constant(png))
    for key in INSTANCE_OUTPUTS:
        np.testing.assert_array_equal(from_bytes[key], outputs[key])


def test_in_graph_pasting_agrees_with_paste_masks():
    """Random boxes (fractional, beyond the image, empty) and smooth random
    masks: the graph's `instance_map` is the one `paste_masks` gives (both
    sum the same float64 taps per pixel)."""
    from kseg.export.instance_saved_model import paste_instance_map

    rng = np.random.default_rng(7)
    height, width, count = 45, 70, 12
    y = rng.uniform(-10, 50, (2, count, 2))
    x = rng.uniform(-10, 80, (2, count, 2))
    boxes = np.stack([y.min(-1), x.min(-1), y.max(-1), x.max(-1)], axis=-1).astype(
        np.float32
    )
    boxes[0, 3, 2] = boxes[0, 3, 0]  # an empty box
    coarse = rng.uniform(0, 1, (2, count, 4, 4)).astype(np.float32)
    masks = tf.image.resize(coarse.reshape(-1, 4, 4, 1), (28, 28)).numpy()
    masks = masks.reshape(2, count, 28, 28)
    scores = rng.uniform(0, 1, (2, count)).astype(np.float32)
    counts = np.array([count, 7], np.int32)
    result = paste_instance_map(
        tf.constant(boxes),
        tf.constant(scores),
        tf.constant(masks),
        tf.constant(counts),
        tf.constant(height),
        tf.constant(width),
    ).numpy()
    for b in range(2):
        reference = _reference_map(
            boxes[b].astype(float), scores[b], masks[b], counts[b], height, width
        )
        assert (reference >= 0).mean() > 0.3  # not vacuous
        np.testing.assert_array_equal(result[b], reference)
    assert not np.isin(np.arange(7, count), result[1]).any()


_INSTANCE_MAP_MEMORY = textwrap.dedent(
    """
    import resource, sys
    import numpy as np, tensorflow as tf
    from kseg.export.instance_saved_model import paste_instance_map

    side, count = int(sys.argv[1]), int(sys.argv[2])
    rng = np.random.default_rng(0)
    corners = rng.uniform(0, side - 60, (2, count, 2))
    boxes = np.concatenate([corners, corners + 50], axis=-1).astype(np.float32)
    masks = rng.uniform(0, 1, (2, count, 28, 28)).astype(np.float32)
    scores = rng.uniform(0, 1, (2, count)).astype(np.float32)
    paste = tf.function(paste_instance_map)
    inputs = [tf.constant(v) for v in (boxes, scores, masks, [count, count])]
    paste(*inputs, tf.constant(64), tf.constant(64))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    paste(*inputs, tf.constant(side), tf.constant(side))
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print((after - before) * 1024)
    """
)


@pytest.mark.slow
def test_in_graph_pasting_memory_grows_with_the_boxes():
    # Before: every detection was pasted over the whole batch (N × H × W
    # float32, with its comparisons and selects): 30 bytes a pixel for 50
    # small boxes, and 26.6 s for a request of 2 × 8 MP. Now each is pasted
    # inside its box; what remains is the map and the best score so far.
    side, count = 2048, 50
    result = subprocess.run(
        [sys.executable, "-c", _INSTANCE_MAP_MEMORY, str(side), str(count)],
        capture_output=True,
        text=True,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"),
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    growth = int(result.stdout.split()[-1])
    # Bytes a pixel of the batch: 4 (int32 map) + 4 (float32 best score),
    # twice for slack (a copy of either while it is returned).
    assert growth < 16 * 2 * side * side, growth / (2 * side * side)


_LOAD_WITHOUT_KSEG = textwrap.dedent(
    """
    import json, sys
    sys.modules["kseg"] = sys.modules["keras"] = None
    import numpy as np
    import tensorflow as tf
    for name in ("kseg", "keras"):
        try:
            __import__(name)
            raise SystemExit(f"{name} is importable")
        except ImportError:
            pass
    loaded = tf.saved_model.load(sys.argv[1])
    images = np.load(sys.argv[2])
    outputs = loaded.signatures["serving_default"](images=tf.constant(images))
    png = [tf.io.encode_png(image).numpy() for image in images]
    from_bytes = loaded.signatures["serving_bytes"](image_bytes=tf.constant(png))
    print(json.dumps({
        "outputs": {k: v.numpy().tolist() for k, v in outputs.items()},
        "bytes_instance_map": from_bytes["instance_map"].numpy().tolist(),
        "kseg_loaded": any(name.startswith("kseg.") for name in sys.modules),
    }))
    """
)


def test_loads_and_runs_where_kseg_cannot_be_imported(exported, tmp_path):
    images = np.stack([_images((32, 128, 3)), np.zeros((32, 128, 3), np.uint8)])
    np.save(tmp_path / "images.npy", images)
    result = subprocess.run(
        [sys.executable, "-c", _LOAD_WITHOUT_KSEG, str(exported[1]),
         str(tmp_path / "images.npy")],
        capture_output=True, text=True, env=_subprocess_env(), cwd=tmp_path,
        timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    values = json.loads(result.stdout.strip().splitlines()[-1])
    assert not values["kseg_loaded"]
    outputs = {k: np.asarray(v) for k, v in values["outputs"].items()}
    _check_first_image(outputs)
    assert outputs["num_detections"][1] == 0
    assert (outputs["instance_map"][1] == -1).all()
    np.testing.assert_array_equal(values["bytes_instance_map"], outputs["instance_map"])


def test_saved_model_cli_run(exported, tmp_path):
    # `saved_model_cli show` prints the SignatureDefs the gRPC test reads
    # from saved_model.pb; one subprocess (TensorFlow's start-up) is enough.
    path = str(exported[1])
    image = _images((1, 32, 128, 3), seed=3)
    run = subprocess.run(
        ["saved_model_cli", "run", "--dir", path, "--tag_set", "serve",
         "--signature_def", "serving_default",
         "--input_exprs", f"images={image.tolist()}", "--outdir", str(tmp_path)],
        capture_output=True, text=True, env=_subprocess_env(), timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    outputs = {key: np.load(tmp_path / f"{key}.npy") for key in INSTANCE_OUTPUTS}
    assert outputs["instance_map"].dtype == np.int32
    _check_first_image(outputs)


def test_tf1_session_loading(exported):
    images = np.stack([_images((32, 128, 3), 1), np.zeros((32, 128, 3), np.uint8)])
    encoded = [tf.io.encode_png(image).numpy() for image in images]
    with tf.Graph().as_default(), tf.compat.v1.Session() as session:
        meta_graph = tf.compat.v1.saved_model.loader.load(
            session, ["serve"], str(exported[1])
        )
        signature = meta_graph.signature_def["serving_default"]
        assert signature.method_name == "tensorflow/serving/predict"
        fetches = {key: info.name for key, info in signature.outputs.items()}
        outputs = session.run(fetches, {signature.inputs["images"].name: images})
        signature = meta_graph.signature_def["serving_bytes"]
        from_bytes = session.run(
            signature.outputs["instance_map"].name,
            {signature.inputs["image_bytes"].name: encoded},
        )
    _check_first_image(outputs)
    assert outputs["num_detections"][1] == 0
    np.testing.assert_array_equal(from_bytes, outputs["instance_map"])


def test_grpc_predict_request_fits_the_signatures(exported, serve):
    from tensorflow.core.protobuf import saved_model_pb2
    from tensorflow_serving.apis import predict_pb2

    model_dir, version_dir = exported
    (meta_graph,) = saved_model_pb2.SavedModel.FromString(
        (version_dir / "saved_model.pb").read_bytes()
    ).meta_graphs
    signatures = meta_graph.signature_def
    default = signatures["serving_default"]
    assert set(default.outputs) == set(INSTANCE_OUTPUTS)
    dtypes = {key: info.dtype for key, info in default.outputs.items()}
    assert dtypes["instance_map"] == tf.int32.as_datatype_enum
    assert dtypes["num_detections"] == tf.int32.as_datatype_enum
    assert dtypes["classes"] == tf.int32.as_datatype_enum
    assert dtypes["masks"] == tf.float32.as_datatype_enum
    images = np.stack([_images((32, 128, 3), 2), np.zeros((32, 128, 3), np.uint8)])
    encoded = [tf.io.encode_png(image).numpy() for image in images]
    for name, values in [
        ("serving_default", {"images": images}),
        ("serving_bytes", {"image_bytes": encoded}),
    ]:
        signature = signatures[name]
        request = predict_pb2.PredictRequest()
        request.model_spec.name = model_dir.name
        request.model_spec.signature_name = name
        request.model_spec.version.value = int(version_dir.name)
        for key, info in signature.inputs.items():
            proto = tf.make_tensor_proto(values[key])
            want = [dim.size for dim in info.tensor_shape.dim]
            got = [dim.size for dim in proto.tensor_shape.dim]
            assert proto.dtype == info.dtype and len(want) == len(got)
            assert all(w in (-1, g) for w, g in zip(want, got, strict=True))
            request.inputs[key].CopyFrom(proto)
        request.output_filter.extend(signature.outputs)
        request = predict_pb2.PredictRequest.FromString(request.SerializeToString())
        function = serve[0] if name == "serving_default" else serve[1]
        outputs = function(
            **{k: tf.constant(tf.make_ndarray(p)) for k, p in request.inputs.items()}
        )
        assert set(outputs) == set(request.output_filter)
        for key, output in outputs.items():
            assert output.dtype.as_datatype_enum == signature.outputs[key].dtype
        _check_first_image(outputs)
        assert int(outputs["num_detections"][1]) == 0


def test_request_checks_and_versions(exported):
    from kseg.export import build_serving_module

    module = build_serving_module(fixed_detector(), max_pixels=1000)
    assert module.serving_default(tf.constant(_images((1, 30, 30, 3))))[
        "instance_map"
    ].shape == (1, 30, 30)
    with pytest.raises(tf.errors.InvalidArgumentError, match="cap of 1000 pixels"):
        module.serving_default(tf.constant(_images((2, 30, 30, 3))))
    model_dir, version_dir = exported
    assert version_dir == model_dir / "1"
    with pytest.raises(FileExistsError, match=str(version_dir)):
        export_saved_model(fixed_detector(), model_dir, version=1)
    categories = json.loads(
        (version_dir / "assets.extra" / "categories.json").read_text()
    )
    assert categories == [{"id": 7, "name": "cat"}, {"id": 9, "name": "dog"}]
    # TFLite files of an instance model take its own fixed size only.
    from kseg.export.tflite import convert_to_tflite

    with pytest.raises(ValueError, match="own fixed input size"):
        convert_to_tflite(fixed_detector(), (SIZE, 2 * SIZE))


def _predict(argv):
    from kseg.inference import register

    parser = argparse.ArgumentParser(prog="kseg")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["predict", *argv])
    return args.func(args)


def test_kseg_predict_runs_the_export(exported, tmp_path):
    from kseg.inference import open_model, predict_instances

    image = _images((32, 128, 3), 4)
    source = open_model(exported[0])
    (served,) = predict_instances(source.model, [image], score_threshold=0.0)
    (expected,) = predict_instances(fixed_detector(), [image], score_threshold=0.0)
    for a, b in zip(served, expected, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)
    path = tmp_path / "image.png"
    cv2.imwrite(str(path), image[..., ::-1])
    assert _predict([str(exported[0]), str(path), "--out", str(tmp_path / "o")]) == 0
    detections = json.loads((tmp_path / "o" / "detections.json").read_text())
    # The export's categories: class 2 is id 9, class 1 id 7.
    assert [d["category_id"] for d in detections] == [9, 7]
    instance_map = cv2.imread(str(tmp_path / "o" / "image_instances.png"), -1)
    np.testing.assert_array_equal(
        instance_map, predict_instances(fixed_detector(), [image])[0].instance_map()
    )


def _export(argv):
    from kseg.export.commands import register

    parser = argparse.ArgumentParser(prog="kseg")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["export", *argv])
    return args.func(args)


def test_kseg_export_dispatches_on_instance_models(tmp_path, capsys):
    from kseg.training.recipe import dump_recipe, load_recipe

    run = tmp_path / "run"
    run.mkdir()
    fixed_detector().save(run / "model.keras")
    recipe = load_recipe("panet_quickstart")
    (run / "recipe.yaml").write_text(dump_recipe(recipe))
    out = tmp_path / "saved_models"
    with pytest.raises(ValueError, match="own fixed input size"):
        _export(
            [str(run), "--name", "p", "--out", str(out), "--tflite", "float32",
             "--input-size", "32", "32"]
        )  # fmt: skip
    assert not out.exists()
    assert _export([str(run), "--name", "p", "--out", str(out)]) == 0
    version = out / "p" / "1"
    assert str(version) in capsys.readouterr().out
    names = json.loads((version / "assets.extra" / "categories.json").read_text())
    assert [c["name"] for c in names][:2] == ["disc", "square"]
    serve = tf.saved_model.load(str(version)).signatures["serving_default"]
    outputs = serve(images=tf.constant(_images((1, 32, 128, 3))))
    _check_first_image(outputs)


def test_kseg_export_tflite_and_predict_on_instance_models(tmp_path, capsys):
    """`kseg export --tflite` of an instance model in a run directory and
    `kseg predict` on the file, with the run's categories; an image without
    detections gives an empty result."""
    from kseg.export.tflite import TFLiteInstanceSegmenter, operator_names
    from kseg.inference import open_model, predict_instances
    from kseg.training.recipe import dump_recipe, load_recipe

    run = tmp_path / "run"
    run.mkdir()
    fixed_detector().save(run / "model.keras")
    (run / "recipe.yaml").write_text(dump_recipe(load_recipe("panet_quickstart")))
    calibration = tmp_path / "calibration"
    calibration.mkdir()
    for index in range(3):
        cv2.imwrite(str(calibration / f"{index}.png"), _images((48, 80, 3), index))
    out = tmp_path / "saved_models"
    argv = [str(run), "--name", "p", "--out", str(out), "--tflite", "float32",
            "int8", "--calibration-dir", str(calibration)]  # fmt: skip
    assert _export(argv) == 0
    files = {
        q: out / "p" / "tflite" / f"p_v1_{q}_64x64.tflite" for q in ("float32", "int8")
    }
    printed = capsys.readouterr().out
    for path in files.values():
        assert str(path) in printed
        assert not any(
            name.startswith("CUSTOM") for name in operator_names(path.read_bytes())
        )
    with pytest.raises(FileExistsError, match="version"):
        _export([*argv, "--version", "1"])

    image = _images((32, 128, 3), 4)
    (expected,) = predict_instances(fixed_detector(), [image], score_threshold=0.0)
    for quantization, path in files.items():
        source = open_model(path)
        assert isinstance(source.model, TFLiteInstanceSegmenter)
        assert source.kind == "tflite" and source.input_size == (SIZE, SIZE)
        (got,) = predict_instances(source.model, [image], score_threshold=0.0)
        np.testing.assert_array_equal(got.classes, expected.classes)
        # int8: the constant boxes and scores are quantized (hand-made
        # detections, no detection layer to keep float32).
        atol = 1e-5 if quantization == "float32" else 0.5
        np.testing.assert_allclose(got.boxes, expected.boxes, atol=atol)
        np.testing.assert_allclose(got.scores, expected.scores, atol=atol / 10)

    image_path, black_path = tmp_path / "image.png", tmp_path / "black.png"
    cv2.imwrite(str(image_path), image[..., ::-1])
    cv2.imwrite(str(black_path), np.zeros((40, 40, 3), np.uint8))
    result = tmp_path / "predicted"
    argv = [
        str(files["float32"]),
        str(image_path),
        str(black_path),
        "--out",
        str(result),
    ]
    assert _predict(argv) == 0
    printed = capsys.readouterr().out
    assert "black.png -> 0 instances" in printed
    # The run's categories, kept beside the file.
    assert f"classes: {files['float32'].with_suffix('')}.categories.json" in printed
    categories = json.loads((result / "images.json").read_text())["categories"]
    assert [c["name"] for c in categories][:2] == ["disc", "square"]
    detections = json.loads((result / "detections.json").read_text())
    assert [d["category_id"] for d in detections] == [2, 1]
    assert {d["image_id"] for d in detections} == {1}
    instance_map = cv2.imread(str(result / "image_instances.png"), -1)
    np.testing.assert_array_equal(
        instance_map, predict_instances(fixed_detector(), [image])[0].instance_map()
    )
    assert not cv2.imread(str(result / "black_instances.png"), -1).any()


@pytest.mark.slow
def test_tiny_panet_export_matches_predict_instances(tmp_path):
    from kseg.backbones import build_resnet
    from kseg.inference import open_model, predict_instances
    from kseg.models import PANet

    keras.utils.set_random_seed(3)
    backbone = build_resnet((1, 1, 1, 1), (4, 4, 4, 4), input_shape=(SIZE, SIZE, 3))
    model = PANet(
        backbone, 2, filters=8, fc_units=16, max_detections=6,
        rpn_pre_nms_top_k_test=60, rpn_post_nms_top_k_test=30, seed=1,
    )  # fmt: skip
    # Masks of an untrained model are nearly all ≥ 0.5: a sharper mask
    # predictor makes the threshold decide about half of the pixels.
    mask_logits = model.roi_heads.mask_head.mask_logits
    mask_logits.kernel.assign(mask_logits.kernel.numpy() * 30)
    # Its class scores all round to 1.0, so the detections' order (and which
    # survive the NMS) would hang on 1e-7 differences between a batch of one
    # (the SavedModel) and of two: softer logits keep the scores apart.
    class_logits = model.roi_heads.box_head.class_logits
    class_logits.kernel.assign(class_logits.kernel.numpy() * 1e-3)
    path = export_saved_model(model, tmp_path / "panet")
    serve = tf.saved_model.load(str(path)).signatures["serving_default"]
    # 96 × 96 fills the 64 × 64 input at scale 2/3 (no padding, where an
    # untrained model's boxes would be empty once clipped to the image).
    images = np.stack([_images((96, 96, 3), 4), _images((96, 96, 3), 5)])
    outputs = serve(images=tf.constant(images))
    expected = predict_instances(model, images, score_threshold=0.0)
    for b in range(2):
        count = int(outputs["num_detections"][b])
        assert count == len(expected[b].scores) > 0
        np.testing.assert_allclose(
            outputs["boxes"][b, :count], expected[b].boxes, atol=1e-3
        )
        np.testing.assert_allclose(
            outputs["scores"][b, :count], expected[b].scores, atol=1e-5
        )
        reference = _reference_map(
            outputs["boxes"][b].numpy().astype(float),
            outputs["scores"][b].numpy(),
            outputs["masks"][b].numpy(),
            count,
            96,
            96,
        )
        assert (reference >= 0).mean() > 0.05  # not vacuous
        assert np.mean(outputs["instance_map"][b].numpy() == reference) >= 0.99
        mine = expected[b].instance_map().astype(np.int32) - 1
        assert np.mean(outputs["instance_map"][b].numpy() == mine) >= 0.99
    (served,) = predict_instances(open_model(path).model, images[:1], 0.0)
    np.testing.assert_array_equal(served.masks, expected[0].masks)
