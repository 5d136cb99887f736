"""Export a kseg model as a TensorFlow SavedModel laid out for TF Serving.

`export_saved_model(model, "saved_models/<name>")` writes version
`saved_models/<name>/<version>/` (the next free integer unless given) with two
signatures, both traced with dynamic batch, height and width:

- `serving_default`: input `images`, uint8 `(N, H, W, 3)` RGB of any size
  (at most `max_pixels` pixels, N·H·W, per request: 16 megapixels unless
  set at export; rank and channels checked in the graph);
- `serving_bytes`: input `image_bytes`, string `(N,)` of encoded JPEG, PNG,
  BMP or GIF (first frame) images, decoded by `kseg.data.decode_image` (the
  decoder of kseg's input pipelines) — every image of one request must have
  the same size.

Both return `class_map`, int32 `(N, H, W)` (the arg-max class), and
`probabilities`, float32 `(N, H, W, num_classes)` (softmax of the logits), at
the input size. The preprocessing in the graph is `kseg.data.preprocess_images`,
the step the training pipeline and `kseg.inference.predict` use too: the
uint8 image cast to float32 RGB in 0–255, nothing else — kseg models
normalise inside their encoder (the trainer's `with_input_normalization`).
A model built for a fixed input size
gets the image resized to it and its logits resized back (bilinear,
half-pixel centres: `kseg.layers.common.resize`).

The SavedModel holds only TensorFlow ops: it loads without kseg (or Keras) in
TF Serving, `saved_model_cli` and `tf.saved_model.load`.
"""

import re
import shutil
import uuid
from pathlib import Path

import keras
import tensorflow as tf

from kseg.data import preprocess_images
from kseg.export.categories import categories_file, categories_json
from kseg.export.defaults import DEFAULT_MAX_PIXELS
from kseg.export.requests import (  # noqa: F401 (the export's names, re-exported)
    BYTES_SIGNATURE,
    IMAGE_BYTES,
    IMAGES,
    SERVING_SIGNATURE,
    check_request,
    decode_images,
)
from kseg.layers.common import resize
from kseg.tasks import is_instance_model

CLASS_MAP = "class_map"
PROBABILITIES = "probabilities"

_VERSION_NAME = re.compile(r"[1-9][0-9]*")


def check_segmentation_model(model, instances=False):
    """Raises `ValueError` unless `model` is a kseg-style segmentation model.

    That is: a `keras.Model` on the TensorFlow backend with one image input
    `(batch, height, width, 3)` whose output is a dict holding 4D `"logits"`
    (semantic) or, with `instances=True` (the SavedModel export), `boxes`,
    `scores`, `classes`, `masks`, `num_detections` with a fixed input size
    (instance: PANet). Without it an instance model is refused by name
    (the semantic serving graph, `predict_images`, has no detections).
    """
    if keras.backend.backend() != "tensorflow":
        raise ValueError(
            "Exporting needs the TensorFlow backend (KERAS_BACKEND=tensorflow), "
            f"the backend is {keras.backend.backend()!r}"
        )
    if not isinstance(model, keras.Model):
        raise ValueError(f"model must be a keras.Model, got {type(model).__name__}")
    shape = model.input_shape
    if not isinstance(shape, tuple) or len(shape) != 4 or shape[-1] != 3:
        raise ValueError(
            "The model must take one RGB image input (batch, height, width, 3), "
            f"its input shape is {shape}"
        )
    outputs = model.output
    if is_instance_model(model):
        if not instances:
            raise ValueError(
                "This is an instance segmentation model (PANet): it has no "
                "class map; export it with export_saved_model, export_tflite "
                "or export_onnx"
            )
        from kseg.export.instance_saved_model import check_instance_model

        # An instance model (PANet): `kseg.export.instance_saved_model`.
        check_instance_model(model)
        return
    if not isinstance(outputs, dict) or "logits" not in outputs:
        raise ValueError(
            "The model must return a dict with a 'logits' entry (as every kseg "
            f"model does), it returns {type(outputs).__name__}"
        )
    if len(outputs["logits"].shape) != 4:
        raise ValueError(
            "The model's 'logits' must be (batch, height, width, classes), got "
            f"shape {outputs['logits'].shape}"
        )


def predict_images(model, images):
    """`{"class_map", "probabilities"}` of uint8 images `(N, H, W, 3)`, at
    the images' size; graph-safe with unknown `N`, `H` and `W`."""
    inputs = preprocess_images(images)
    model_size = tuple(model.input_shape[1:3])
    if model_size == (None, None) or tuple(images.shape[1:3]) == model_size:
        logits = model(inputs, training=False)["logits"]
    else:
        size = tf.shape(images)[1:3]
        fixed = tuple(
            size[axis] if length is None else length
            for axis, length in enumerate(model_size)
        )
        logits = model(resize(inputs, fixed), training=False)["logits"]
        logits = resize(tf.cast(logits, tf.float32), (size[0], size[1]))
    logits = tf.cast(logits, tf.float32)
    return {
        CLASS_MAP: tf.argmax(logits, axis=-1, output_type=tf.int32),
        PROBABILITIES: tf.nn.softmax(logits, axis=-1),
    }


def build_serving_module(
    model, max_pixels=DEFAULT_MAX_PIXELS, short_edge=None, max_size=None
):
    """A `tf.Module` whose `serving_default` and `serving_bytes` tf.functions
    are the two signatures (callable in-process too). An instance model
    (PANet) gets `kseg.export.instance_saved_model`'s, whose fitting into
    the model's input takes `short_edge` and `max_size` (the evaluation
    resize, `instance_eval_transform`; semantic models ignore them).

    It holds the TensorFlow variables the functions read, each once
    (`keras.export.ExportArchive` in Keras 3.15 saves every weight twice,
    as the Keras variable and as its TensorFlow variable). Save it with
    `tf.saved_model.save(module, path, signatures=serving_signatures(module))`;
    `export_saved_model` adds the TF Serving layout and the no-overwrite rule.
    """
    check_segmentation_model(model, instances=True)
    max_pixels = _check_max_pixels(max_pixels)
    from kseg.export.instance_saved_model import build_instance_serving_module

    if is_instance_model(model):
        return build_instance_serving_module(model, max_pixels, short_edge, max_size)
    module = tf.Module()
    module.serving_default = tf.function(
        lambda images: predict_images(model, check_request(images, max_pixels)),
        input_signature=[tf.TensorSpec([None, None, None, 3], tf.uint8, name=IMAGES)],
        autograph=False,
    )
    # The bytes signature calls the images graph instead of tracing the
    # model a second time.
    module.serving_bytes = tf.function(
        lambda image_bytes: module.serving_default(
            decode_images(image_bytes, max_pixels)
        ),
        input_signature=[tf.TensorSpec([None], tf.string, name=IMAGE_BYTES)],
        autograph=False,
    )
    module.model_variables = list(
        module.serving_default.get_concrete_function().variables
    )
    return module


def serving_signatures(module):
    """The `signatures` argument of `tf.saved_model.save` for a
    `build_serving_module` module."""
    return {
        SERVING_SIGNATURE: module.serving_default.get_concrete_function(),
        BYTES_SIGNATURE: module.serving_bytes.get_concrete_function(),
    }


def existing_versions(model_dir):
    """The version numbers under a TF Serving model directory, ascending."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        return []
    return sorted(
        int(child.name)
        for child in model_dir.iterdir()
        if child.is_dir() and _VERSION_NAME.fullmatch(child.name)
    )


def next_version(model_dir):
    """One more than the highest version under `model_dir`; 1 when none."""
    versions = existing_versions(model_dir)
    return versions[-1] + 1 if versions else 1


def check_version(version):
    """Returns `version` as an int, or raises `ValueError`: TF Serving
    versions are positive integers (directory names)."""
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ValueError(f"version must be a positive int, got {version!r}")
    return version


def refuse_existing(path, what):
    """Raises `FileExistsError` naming `path` if it exists: exports never
    overwrite."""
    if Path(path).exists():
        raise FileExistsError(
            f"{path} already exists; kseg never overwrites an exported {what} "
            "(choose another version or output path)"
        )


def _write_categories(model, path, categories):
    """An instance model's `assets.extra/categories.json`."""
    text = categories_json(model, categories)
    if text is None:
        return
    file = categories_file(path)
    file.parent.mkdir(exist_ok=True)
    file.write_text(text)


def _check_max_pixels(max_pixels):
    if (
        isinstance(max_pixels, bool)
        or not isinstance(max_pixels, int)
        or max_pixels < 1
    ):
        raise ValueError(f"max_pixels must be a positive int, got {max_pixels!r}")
    return max_pixels


def export_saved_model(
    model,
    model_dir,
    version=None,
    max_pixels=DEFAULT_MAX_PIXELS,
    *,
    short_edge=None,
    max_size=None,
    categories=None,
):
    """Exports `model` as version `version` of the TF Serving model `model_dir`.

    The SavedModel is written to a hidden staging directory beside the
    version and renamed into place, so a TF Serving instance watching
    `model_dir` never loads a half-written version.

    Example:
    >>> path = export_saved_model(model, "saved_models/shapes")  # doctest: +SKIP
    >>> path
    PosixPath('saved_models/shapes/1')

    Args:
        model: a kseg segmentation `keras.Model` (see `check_segmentation_model`).
        model_dir: str or Path. The model's base path
            (`saved_models/<name>`), created if missing.
        version: int or `None`. Version directory name; `None` takes
            `next_version(model_dir)`. Defaults to `None`.
        max_pixels: int. The most pixels (N·H·W) one request may hold; a
            larger one gets an `InvalidArgument` error naming the cap.
            Defaults to `DEFAULT_MAX_PIXELS` (16 megapixels).
        short_edge, max_size: instance models: the evaluation resize in the
            graph (`instance_eval_transform`); None fits each image into the
            model's input without enlarging it. Default to None.
        categories: instance models: `(category_ids, class_names)` of
            classes 1..C, written to `assets.extra/categories.json` (a list
            of `{"id", "name"}`; TF Serving ignores `assets.extra`) for
            `kseg predict`; None: ids 1..C named `class_<k>`.

    Returns:
        The `Path` of the version directory.

    Raises:
        FileExistsError: the version directory already exists.
        ValueError: `model` is not a segmentation model, or a bad `version`.
    """
    check_segmentation_model(model, instances=True)
    model_dir = Path(model_dir)
    version = next_version(model_dir) if version is None else check_version(version)
    path = model_dir / str(version)
    refuse_existing(path, "SavedModel version")
    module = build_serving_module(model, max_pixels, short_edge, max_size)
    model_dir.mkdir(parents=True, exist_ok=True)
    # Hidden, not an integer: TF Serving ignores it while it is written.
    staging = model_dir / f".{version}-staging-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        tf.saved_model.save(module, str(staging), signatures=serving_signatures(module))
        _write_categories(model, staging, categories)
        refuse_existing(path, "SavedModel version")
        staging.rename(path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return path
