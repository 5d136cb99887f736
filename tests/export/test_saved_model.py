"""The TF Serving SavedModel: signatures, kseg-free loading, saved_model_cli,
TF1 session loading (TF Serving's C++ path), gRPC requests, versioning."""

import json
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf

from kseg.data import eval_transform
from kseg.export import (
    BYTES_SIGNATURE,
    CLASS_MAP,
    IMAGE_BYTES,
    IMAGES,
    PROBABILITIES,
    SERVING_SIGNATURE,
    build_serving_module,
    export_saved_model,
    next_version,
)

NUM_CLASSES = 6
IMAGE_SIZE = 64


def _images(shape, seed=0):
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def _keras_outputs(model, images):
    """Reference: the model on the evaluation pipeline's transform of the
    images (one preprocessing definition for training and serving)."""
    inputs = np.stack(
        [
            eval_transform(image, np.zeros(image.shape[:2], np.uint8))[0]
            for image in images
        ]
    )
    logits = keras.ops.convert_to_numpy(model(inputs, training=False)["logits"])
    return logits.argmax(-1), keras.ops.convert_to_numpy(keras.ops.softmax(logits))


def _assert_class_maps_match(class_map, probabilities):
    """`class_map` is the arg-max of `probabilities` wherever the top two
    are not tied within float32 noise (graph and eager kernels differ in
    the last bits)."""
    top_two = np.sort(probabilities, axis=-1)[..., -2:]
    decided = top_two[..., 1] - top_two[..., 0] > 1e-4
    np.testing.assert_array_equal(
        np.asarray(class_map)[decided], probabilities.argmax(-1)[decided]
    )


def _subprocess_env():
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    # A loader must not need kseg: keep the checkout off the import path.
    env.pop("PYTHONPATH", None)
    return env


def test_serving_default_matches_keras_at_any_size(pan_model, pan_loaded):
    serve = pan_loaded.signatures[SERVING_SIGNATURE]
    for shape in [(2, 40, 56, 3), (1, IMAGE_SIZE, IMAGE_SIZE, 3), (1, 33, 17, 3)]:
        images = _images(shape)
        outputs = serve(**{IMAGES: tf.constant(images)})
        assert set(outputs) == {CLASS_MAP, PROBABILITIES}
        assert outputs[CLASS_MAP].dtype == tf.int32
        assert outputs[CLASS_MAP].shape == shape[:3]
        assert outputs[PROBABILITIES].dtype == tf.float32
        assert outputs[PROBABILITIES].shape == (*shape[:3], NUM_CLASSES)
        _, probabilities = _keras_outputs(pan_model, images)
        np.testing.assert_allclose(
            outputs[PROBABILITIES].numpy(), probabilities, atol=1e-4
        )
        _assert_class_maps_match(outputs[CLASS_MAP], probabilities)


def test_signatures_have_dynamic_shapes(pan_loaded):
    (images,) = (
        pan_loaded.signatures[SERVING_SIGNATURE].structured_input_signature[1].values()
    )
    assert images.shape.as_list() == [None, None, None, 3]
    assert images.dtype == tf.uint8
    (encoded,) = (
        pan_loaded.signatures[BYTES_SIGNATURE].structured_input_signature[1].values()
    )
    assert encoded.shape.as_list() == [None]
    assert encoded.dtype == tf.string


def test_bytes_signature_decodes_png_and_jpeg(pan_loaded):
    images = _images((2, 48, 40, 3), seed=1)
    expected = pan_loaded.signatures[SERVING_SIGNATURE](**{IMAGES: tf.constant(images)})
    png = tf.constant([tf.io.encode_png(image).numpy() for image in images])
    outputs = pan_loaded.signatures[BYTES_SIGNATURE](**{IMAGE_BYTES: png})
    np.testing.assert_array_equal(outputs[CLASS_MAP], expected[CLASS_MAP])
    np.testing.assert_allclose(
        outputs[PROBABILITIES], expected[PROBABILITIES], atol=1e-6
    )

    jpeg = [tf.io.encode_jpeg(image).numpy() for image in images]
    decoded = np.stack([tf.io.decode_jpeg(data).numpy() for data in jpeg])
    outputs = pan_loaded.signatures[BYTES_SIGNATURE](**{IMAGE_BYTES: tf.constant(jpeg)})
    expected = pan_loaded.signatures[SERVING_SIGNATURE](
        **{IMAGES: tf.constant(decoded)}
    )
    np.testing.assert_array_equal(outputs[CLASS_MAP], expected[CLASS_MAP])

    gray = tf.io.encode_png(images[0][..., :1]).numpy()
    outputs = pan_loaded.signatures[BYTES_SIGNATURE](
        **{IMAGE_BYTES: tf.constant([gray])}
    )
    assert outputs[CLASS_MAP].shape == (1, 48, 40)


def test_bytes_signature_rejects_mixed_sizes(pan_loaded):
    batch = [
        tf.io.encode_png(_images((32, 32, 3))).numpy(),
        tf.io.encode_png(_images((32, 40, 3))).numpy(),
    ]
    with pytest.raises(tf.errors.InvalidArgumentError, match="same height and width"):
        pan_loaded.signatures[BYTES_SIGNATURE](**{IMAGE_BYTES: tf.constant(batch)})


_LOAD_WITHOUT_KSEG = textwrap.dedent(
    """
    import json, sys
    # `import kseg` / `import keras` now raise ImportError: the SavedModel
    # must need TensorFlow only, like TF Serving.
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
        "class_map": outputs["class_map"].numpy().tolist(),
        "bytes_class_map": from_bytes["class_map"].numpy().tolist(),
        "probabilities_sum": float(outputs["probabilities"].numpy().sum()),
        "kseg_loaded": any(name.startswith("kseg.") for name in sys.modules),
    }))
    """
)


def test_loads_and_runs_where_kseg_cannot_be_imported(
    pan_model, pan_saved_model, tmp_path
):
    images = _images((2, 36, 44, 3), seed=2)
    np.save(tmp_path / "images.npy", images)
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            _LOAD_WITHOUT_KSEG,
            str(pan_saved_model[1]),
            str(tmp_path / "images.npy"),
        ],
        capture_output=True,
        text=True,
        env=_subprocess_env(),
        cwd=tmp_path,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    outputs = json.loads(result.stdout.strip().splitlines()[-1])
    assert not outputs["kseg_loaded"]
    _, probabilities = _keras_outputs(pan_model, images)
    _assert_class_maps_match(outputs["class_map"], probabilities)
    np.testing.assert_array_equal(outputs["bytes_class_map"], outputs["class_map"])
    assert outputs["probabilities_sum"] == pytest.approx(probabilities.sum(), rel=1e-5)


def test_saved_model_cli_show_and_run(pan_model, pan_saved_model, tmp_path):
    path = str(pan_saved_model[1])
    show = subprocess.run(
        ["saved_model_cli", "show", "--dir", path, "--all"],
        capture_output=True,
        text=True,
        env=_subprocess_env(),
        timeout=300,
    )
    assert show.returncode == 0, show.stderr[-3000:]
    text = show.stdout
    for line in [
        f"signature_def['{SERVING_SIGNATURE}']",
        f"signature_def['{BYTES_SIGNATURE}']",
        f"inputs['{IMAGES}'] tensor_info",
        f"inputs['{IMAGE_BYTES}'] tensor_info",
        f"outputs['{CLASS_MAP}'] tensor_info",
        f"outputs['{PROBABILITIES}'] tensor_info",
        "dtype: DT_UINT8",
        "dtype: DT_STRING",
        "shape: (-1, -1, -1, 3)",
        f"shape: (-1, -1, -1, {NUM_CLASSES})",
        "Method name is: tensorflow/serving/predict",
    ]:
        assert line in text, line

    # `--input_exprs` takes Python literals (`ast.literal_eval`) in TF 2.21.
    image = _images((1, 8, 12, 3), seed=6)
    run = subprocess.run(
        [
            "saved_model_cli",
            "run",
            "--dir",
            path,
            "--tag_set",
            "serve",
            "--signature_def",
            SERVING_SIGNATURE,
            "--input_exprs",
            f"{IMAGES}={image.tolist()}",
            "--outdir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        env=_subprocess_env(),
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    class_map = np.load(tmp_path / f"{CLASS_MAP}.npy")
    probabilities = np.load(tmp_path / f"{PROBABILITIES}.npy")
    assert class_map.shape == (1, 8, 12)
    assert class_map.dtype == np.int32
    _, expected_probabilities = _keras_outputs(pan_model, image)
    _assert_class_maps_match(class_map, expected_probabilities)
    np.testing.assert_allclose(probabilities, expected_probabilities, atol=1e-4)


def test_tf1_session_loading(pan_model, pan_saved_model):
    """`loader.load` + `Session.run` on the signature's tensor names: the
    path of TF Serving's C++ `LoadSavedModel`."""
    images = _images((1, 40, 48, 3), seed=3)
    encoded = tf.io.encode_png(images[0]).numpy()
    with tf.Graph().as_default(), tf.compat.v1.Session() as session:
        meta_graph = tf.compat.v1.saved_model.loader.load(
            session, ["serve"], str(pan_saved_model[1])
        )
        signature = meta_graph.signature_def[SERVING_SIGNATURE]
        assert signature.method_name == "tensorflow/serving/predict"
        fetches = {key: info.name for key, info in signature.outputs.items()}
        outputs = session.run(fetches, {signature.inputs[IMAGES].name: images})

        signature = meta_graph.signature_def[BYTES_SIGNATURE]
        from_bytes = session.run(
            signature.outputs[CLASS_MAP].name,
            {signature.inputs[IMAGE_BYTES].name: [encoded]},
        )
    _, probabilities = _keras_outputs(pan_model, images)
    _assert_class_maps_match(outputs[CLASS_MAP], probabilities)
    np.testing.assert_array_equal(from_bytes, outputs[CLASS_MAP])
    np.testing.assert_allclose(outputs[PROBABILITIES], probabilities, atol=1e-4)


def _signature_metadata(model_dir, version_dir):
    """The `GetModelMetadataResponse` TF Serving would answer for the export,
    serialized and read back as a client does: the SignatureDefs stored in
    `saved_model.pb` (what `saved_model_cli show` prints), in a
    `SignatureDefMap` packed into the response's `signature_def` entry."""
    from tensorflow.core.protobuf import saved_model_pb2
    from tensorflow_serving.apis import get_model_metadata_pb2

    saved_model = saved_model_pb2.SavedModel.FromString(
        (version_dir / "saved_model.pb").read_bytes()
    )
    (meta_graph,) = saved_model.meta_graphs
    signature_map = get_model_metadata_pb2.SignatureDefMap()
    for name, signature in meta_graph.signature_def.items():
        signature_map.signature_def[name].CopyFrom(signature)
    response = get_model_metadata_pb2.GetModelMetadataResponse()
    response.model_spec.name = model_dir.name
    response.model_spec.version.value = int(version_dir.name)
    response.metadata["signature_def"].Pack(signature_map)

    received = get_model_metadata_pb2.GetModelMetadataResponse.FromString(
        response.SerializeToString()
    )
    signatures = get_model_metadata_pb2.SignatureDefMap()
    assert received.metadata["signature_def"].Unpack(signatures)
    return received.model_spec, signatures.signature_def


def _fits(tensor_info, proto):
    """Whether a `TensorProto` has the dtype of a signature's `TensorInfo`
    and a shape its (partly unknown, -1) shape admits."""
    want = [dim.size for dim in tensor_info.tensor_shape.dim]
    got = [dim.size for dim in proto.tensor_shape.dim]
    return (
        proto.dtype == tensor_info.dtype
        and not tensor_info.tensor_shape.unknown_rank
        and len(got) == len(want)
        and all(w in (-1, g) for w, g in zip(want, got, strict=True))
    )


def test_grpc_predict_request_fits_the_signatures(pan_saved_model, pan_loaded):
    """Builds TF Serving `PredictRequest`s (tensorflow-serving-api, a test
    dependency) from the exported signature metadata with
    `tf.make_tensor_proto`, checks every input's name, dtype and shape
    against the SignatureDefs, then runs the request's tensors through the
    SavedModel. No server: the request is checked as TF Serving checks it."""
    from tensorflow_serving.apis import predict_pb2

    model_dir, version_dir = pan_saved_model
    model_spec, signatures = _signature_metadata(model_dir, version_dir)
    assert set(signatures) >= {SERVING_SIGNATURE, BYTES_SIGNATURE}

    default = signatures[SERVING_SIGNATURE]
    assert default.method_name == "tensorflow/serving/predict"
    assert list(default.inputs) == [IMAGES]
    images_info = default.inputs[IMAGES]
    assert images_info.dtype == tf.uint8.as_datatype_enum
    assert [d.size for d in images_info.tensor_shape.dim] == [-1, -1, -1, 3]
    assert set(default.outputs) == {CLASS_MAP, PROBABILITIES}
    assert default.outputs[CLASS_MAP].dtype == tf.int32.as_datatype_enum
    assert default.outputs[PROBABILITIES].dtype == tf.float32.as_datatype_enum
    # The check is not vacuous: float pixels or a missing channel axis do
    # not fit the uint8 (N, H, W, 3) input.
    images = _images((2, 30, 20, 3), seed=4)
    assert not _fits(images_info, tf.make_tensor_proto(images.astype(np.float32)))
    assert not _fits(images_info, tf.make_tensor_proto(images[..., 0]))

    encoded = [tf.io.encode_png(image).numpy() for image in images]
    for signature_name, values in [
        (SERVING_SIGNATURE, {IMAGES: images}),
        (BYTES_SIGNATURE, {IMAGE_BYTES: encoded}),
    ]:
        signature = signatures[signature_name]
        assert set(signature.inputs) == set(values)
        request = predict_pb2.PredictRequest()
        request.model_spec.name = model_spec.name
        request.model_spec.signature_name = signature_name
        request.model_spec.version.value = model_spec.version.value
        for key, info in signature.inputs.items():
            request.inputs[key].CopyFrom(tf.make_tensor_proto(values[key]))
            assert _fits(info, request.inputs[key]), key
        request.output_filter.extend(signature.outputs)
        # What TF Serving receives: the serialized request.
        request = predict_pb2.PredictRequest.FromString(request.SerializeToString())
        assert request.model_spec.name == model_dir.name
        assert request.model_spec.version.value == int(version_dir.name)

        function = pan_loaded.signatures[request.model_spec.signature_name]
        outputs = function(
            **{
                key: tf.constant(tf.make_ndarray(proto))
                for key, proto in request.inputs.items()
            }
        )
        assert set(outputs) == set(request.output_filter)
        for key, output in outputs.items():
            assert output.dtype.as_datatype_enum == signature.outputs[key].dtype
        assert outputs[CLASS_MAP].shape == (2, 30, 20)
        assert outputs[PROBABILITIES].shape == (2, 30, 20, NUM_CLASSES)


def test_versions_are_never_overwritten(pan_model, pan_saved_model):
    model_dir, version_dir = pan_saved_model
    assert version_dir == model_dir / "1"
    assert sorted(p.name for p in model_dir.iterdir()) == ["1"]
    assert (version_dir / "saved_model.pb").is_file()
    assert next_version(model_dir) == 2
    with pytest.raises(FileExistsError, match=str(version_dir)):
        export_saved_model(pan_model, model_dir, version=1)
    (model_dir / "7").mkdir()
    (model_dir / "notes").mkdir()
    (model_dir / "12.tflite").touch()
    assert next_version(model_dir) == 8
    with pytest.raises(FileExistsError, match="7"):
        export_saved_model(pan_model, model_dir, version=7)
    for bad in (0, -1, 1.5, "2", True):
        with pytest.raises(ValueError, match="version must be a positive int"):
            export_saved_model(pan_model, model_dir, version=bad)
    assert next_version(model_dir.parent / "missing") == 1


def test_fixed_size_model_serves_any_size(build_tiny_pan):
    """A model built for one input size gets images resized to it and its
    logits resized back to the image size."""
    keras.utils.set_random_seed(2)
    model = build_tiny_pan(input_shape=(32, 32, 3))
    module = build_serving_module(model)
    images = _images((1, 48, 40, 3), seed=5)
    outputs = module.serving_default(tf.constant(images))
    assert outputs[CLASS_MAP].shape == (1, 48, 40)
    resized = tf.image.resize(tf.cast(images, tf.float32), (32, 32))
    logits = model(resized, training=False)["logits"]
    expected = tf.image.resize(logits, (48, 40))
    np.testing.assert_allclose(
        outputs[PROBABILITIES], tf.nn.softmax(expected), atol=1e-4
    )


def test_rejects_models_that_are_not_segmenters(tmp_path):
    inputs = keras.Input((None, None, 3))
    conv = keras.layers.Conv2D(2, 1)(inputs)
    with pytest.raises(ValueError, match="dict with a 'logits' entry"):
        export_saved_model(keras.Model(inputs, conv), tmp_path / "m")
    with pytest.raises(ValueError, match=r"\(batch, height, width, classes\)"):
        export_saved_model(
            keras.Model(
                inputs, {"logits": keras.layers.GlobalAveragePooling2D()(conv)}
            ),
            tmp_path / "m",
        )
    gray = keras.Input((None, None, 1))
    with pytest.raises(ValueError, match="RGB image input"):
        export_saved_model(
            keras.Model(gray, {"logits": keras.layers.Conv2D(2, 1)(gray)}),
            tmp_path / "m",
        )
    with pytest.raises(ValueError, match="keras.Model"):
        export_saved_model(lambda x: x, tmp_path / "m")
    assert not (tmp_path / "m").exists()


def test_requests_over_the_pixel_cap_are_refused_naming_it(pan_model):
    # Before: a 10000×10000 image aborted the server (std::bad_alloc).
    module = build_serving_module(pan_model, max_pixels=1000)
    small = module.serving_default(images=tf.constant(_images((1, 30, 30, 3))))
    assert small[CLASS_MAP].shape == (1, 30, 30)
    with pytest.raises(tf.errors.InvalidArgumentError, match="cap of 1000 pixels"):
        module.serving_default(images=tf.constant(_images((2, 30, 30, 3))))
    png = tf.io.encode_png(_images((40, 40, 3))).numpy()
    with pytest.raises(tf.errors.InvalidArgumentError, match="cap of 1000 pixels"):
        module.serving_bytes(image_bytes=tf.constant([png]))


def test_a_single_image_without_its_batch_axis_is_refused(pan_saved_model):
    # TF Serving feeds requests to the graph through the C API without
    # checking them against the signature's shapes (before: an (H, W, 3)
    # request returned a wrong-shaped result). The Python session checks
    # feeds, so this test feeds through the same C call TF Serving makes
    # (private `pywrap_tf_session`; only in this test).
    from tensorflow.python.client import pywrap_tf_session

    graph = tf.Graph()
    with graph.as_default(), tf.compat.v1.Session(graph=graph) as session:
        meta = tf.compat.v1.saved_model.loader.load(
            session, ["serve"], str(pan_saved_model[1])
        )
        signature = meta.signature_def[SERVING_SIGNATURE]
        images = graph.get_tensor_by_name(signature.inputs[IMAGES].name)
        class_map = graph.get_tensor_by_name(signature.outputs[CLASS_MAP].name)

        def run(value):
            return pywrap_tf_session.TF_SessionRun_wrapper(
                session._session,
                None,
                {images._as_tf_output(): value},
                [class_map._as_tf_output()],
                [],
                None,
            )[0]

        assert run(_images((1, 16, 16, 3))).shape == (1, 16, 16)
        with pytest.raises(tf.errors.InvalidArgumentError, match="batch of one"):
            run(_images((16, 16, 3)))
        with pytest.raises(tf.errors.InvalidArgumentError, match="3 channels"):
            run(_images((1, 16, 16, 4)))
    # A Python call of the loaded signature (where the traced rank lets
    # Grappler fold the rank test) refuses it with the same message.
    loaded = tf.saved_model.load(str(pan_saved_model[1]))
    with pytest.raises(tf.errors.InvalidArgumentError, match="batch of one"):
        loaded.signatures[SERVING_SIGNATURE](images=tf.constant(_images((16, 16, 3))))


def test_an_empty_bytes_request_is_refused(pan_loaded):
    with pytest.raises(tf.errors.InvalidArgumentError, match="holds no image"):
        pan_loaded.signatures[BYTES_SIGNATURE](
            **{IMAGE_BYTES: tf.constant([], tf.string)}
        )
