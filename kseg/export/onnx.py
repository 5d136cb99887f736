"""Convert a kseg segmentation model to ONNX, for ONNX Runtime.

`convert_to_onnx(model)` converts the serving graph of the SavedModel
(`kseg.export.saved_model.predict_images`) with tf2onnx, so the `.onnx` file
has the SavedModel's `serving_default` interface:

- input `images`: uint8 `(N, H, W, 3)` RGB in 0–255, with dynamic batch,
  height and width (the uint8 → float32 cast is in the graph, as for
  training; a model built for a fixed input size gets the image resized to
  it and its logits resized back, in the graph);
- outputs `class_map`, int32 `(N, H, W)` (the arg-max class), and
  `probabilities`, float32 `(N, H, W, num_classes)` (softmax of the logits),
  at the input size.

`input_size=(H, W)` fixes the height and width instead (the batch stays
dynamic). Every semantic kseg model converts (FCN, GCN, ExFuse, PAN,
SegModel with its guided filter and guidance CRF) with ONNX opset
`ONNX_OPSET`; the file holds standard ONNX ops only.

PANet (instance segmentation) converts too, NMS included, with input
`images` uint8 `(N, H, W, 3)` at the model's own fixed `(H, W)` (dynamic
batch) and the model's outputs (`DETECTION_OUTPUTS`): `boxes` float32
`(N, D, 4)` `[y1, x1, y2, x2]` in image pixels, `scores` float32 `(N, D)`,
`classes` int32 `(N, D)` (0 for padding rows), `masks` float32
`(N, D, 28, 28)` (the detected class's mask probabilities inside its box)
and `num_detections` int32 `(N,)`. tf2onnx cannot convert the nested
`while` loops of the padded NMS that `BatchedNMS` runs ("Graph has
cycles"), so the graph is traced with the same greedy NMS as TensorFlow's
`CombinedNonMaxSuppression` (`onnx_convertible_nms`), which tf2onnx maps to
ONNX's `NonMaxSuppression` (`kseg.export.instance_graph`).

`export_onnx` writes a PANet file's categories beside it
(`NAME.categories.json`, as for a `.tflite` file), where `kseg predict`
finds the dataset's category ids and class names.

Needs the `onnx` extra (`pip install kseg[onnx]`: onnx, tf2onnx and
onnxruntime). `ONNXSegmenter` runs a file with ONNX Runtime,
`ONNXInstanceSegmenter` a PANet file; `kseg.inference.open_model` opens
either for `kseg predict`, `predict` and `predict_instances`.
"""

import contextlib
import logging
from pathlib import Path

import numpy as np
import tensorflow as tf

# Private API: TF <= 2.21 has no public freezing of a function's variables
# (tf2onnx's own `from_function` leaves Keras' captured constants as graph
# inputs).
from tensorflow.python.framework.convert_to_constants import (
    convert_variables_to_constants_v2,
)

from kseg.export.categories import categories_file, categories_json
from kseg.export.instance_graph import (
    CombinedNMS,
    instance_function,
    swapped_nms,
)
from kseg.export.instance_saved_model import DETECTION_OUTPUTS
from kseg.export.saved_model import (
    IMAGES,
    check_segmentation_model,
    predict_images,
    refuse_existing,
)
from kseg.files import write_bytes
from kseg.tasks import is_instance_model

# ONNX Runtime >= 1.14 runs opset 17 on every execution provider; it has
# every op a kseg semantic model needs (Resize with half-pixel centres).
ONNX_OPSET = 17


def _tf2onnx():
    try:
        import tf2onnx
    except ImportError as error:
        raise ImportError(
            "ONNX export needs tf2onnx and onnx: pip install kseg[onnx] "
            "(or pip install onnx tf2onnx onnxruntime)"
        ) from error
    # tf2onnx logs every graph rewrite at INFO.
    logging.getLogger("tf2onnx").setLevel(logging.ERROR)
    return tf2onnx


@contextlib.contextmanager
def _tensorflow_warnings_quieted():
    """tf2onnx calls TensorFlow v1 graph functions, each of which logs a
    deprecation warning (16 lines per export) meant for tf2onnx's authors."""
    logger = logging.getLogger("tensorflow")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def convert_function_to_onnx(function, opset=ONNX_OPSET):
    """Converts a `tf.function` with an `input_signature` of named
    `tf.TensorSpec`s to an ONNX model whose inputs keep the spec names and
    whose outputs are the keys of the function's output dict.

    The generic converter behind `convert_to_onnx`. Variables are frozen
    into constants first; unknown dimensions stay dynamic.

    Returns:
        The `onnx.ModelProto`.
    """
    tf2onnx = _tf2onnx()
    specs = function.input_signature
    if specs is None:
        raise ValueError("function must be a tf.function with an input_signature")
    concrete = function.get_concrete_function()
    outputs = concrete.structured_outputs
    if not isinstance(outputs, dict):
        raise ValueError(
            f"function must return a dict of tensors, it returns {type(outputs)}"
        )
    frozen = convert_variables_to_constants_v2(concrete)
    # Both lists follow `tf.nest.flatten` order: sorted keys.
    output_keys = sorted(outputs)
    renames = {
        tensor.name: spec.name or f"input_{index}"
        for index, (tensor, spec) in enumerate(zip(frozen.inputs, specs, strict=True))
    }
    renames.update(
        {
            tensor.name: key
            for tensor, key in zip(frozen.outputs, output_keys, strict=True)
        }
    )
    with _tensorflow_warnings_quieted():
        proto, _ = tf2onnx.convert.from_graph_def(
            frozen.graph.as_graph_def(),
            input_names=[tensor.name for tensor in frozen.inputs],
            output_names=[tensor.name for tensor in frozen.outputs],
            opset=opset,
        )
    # tf2onnx names the graph's inputs and outputs after TensorFlow tensors
    # ("images:0", "Identity:0"): give them the signature's names.
    for node in proto.graph.node:
        node.input[:] = [renames.get(name, name) for name in node.input]
        node.output[:] = [renames.get(name, name) for name in node.output]
    for value in [*proto.graph.input, *proto.graph.output]:
        value.name = renames.get(value.name, value.name)
    import onnx

    onnx.checker.check_model(proto)
    return proto


@contextlib.contextmanager
def onnx_convertible_nms(model):
    """Within the block, every built `kseg.layers.detection.BatchedNMS` of
    `model` runs its NMS as `CombinedNonMaxSuppression`, which tf2onnx
    converts (see `kseg.export.instance_graph`); restored afterwards."""
    with swapped_nms(model, CombinedNMS):
        yield


def onnx_function(model, input_size=None):
    """The `tf.function` converted to ONNX: `predict_images` of `model` on
    uint8 `images (N, H, W, 3)`, with `H, W` fixed to `input_size` if given;
    for an instance model (PANet), its detections at its own input size.
    Trace an instance model's function inside `onnx_convertible_nms`."""
    if is_instance_model(model):
        return instance_function(model, input_size)
    check_segmentation_model(model)
    height, width = None, None
    if input_size is not None:
        from kseg.export.tflite import tflite_input_size

        height, width = tflite_input_size(model, input_size)
    return tf.function(
        lambda images: predict_images(model, images),
        input_signature=[
            tf.TensorSpec([None, height, width, 3], tf.uint8, name=IMAGES)
        ],
        autograph=False,
    )


def convert_to_onnx(model, input_size=None, opset=ONNX_OPSET):
    """Converts a kseg segmentation model (semantic, or PANet) to a
    serialized ONNX model (see the module docstring for the interfaces).

    Example:
    >>> data = convert_to_onnx(model)  # doctest: +SKIP
    >>> ONNXSegmenter(data)(images)["class_map"].shape
    (2, 64, 64)

    Args:
        model: a kseg segmentation `keras.Model` (TensorFlow backend).
        input_size: `(height, width)` to fix, or `None` for a dynamic
            height and width. Defaults to `None`.
        opset: int. ONNX opset. Defaults to `ONNX_OPSET` (17).

    Returns:
        The `.onnx` file content as `bytes`.
    """
    function = onnx_function(model, input_size)
    with onnx_convertible_nms(model):
        return convert_function_to_onnx(function, opset).SerializeToString()


def export_onnx(model, path, input_size=None, opset=ONNX_OPSET, categories=None):
    """Converts `model` (see `convert_to_onnx`) and writes it to `path`; for
    an instance model also its categories, `NAME.categories.json` beside it
    (`kseg predict` reads the dataset's ids and names there).

    Never overwrites: an existing `path` (or categories file) raises
    `FileExistsError`, checked before the conversion and again when the
    file is created (the file is written under a temporary name and renamed
    into place).

    Args:
        categories: instance models: `(category_ids, class_names)` of
            classes 1..C; `None` for ids 1..C named `class_<k>`.
            Defaults to `None`.

    Returns:
        `path` as a `Path`.
    """
    path = Path(path)
    refuse_existing(path, "ONNX file")
    text = categories_json(model, categories)
    if text is not None:
        refuse_existing(categories_file(path), "categories file")
    data = convert_to_onnx(model, input_size, opset)
    path.parent.mkdir(parents=True, exist_ok=True)
    if text is not None:
        write_bytes(categories_file(path), text.encode(), overwrite=False)
    try:
        write_bytes(path, data, overwrite=False)
    except FileExistsError:
        refuse_existing(path, "ONNX file")
    return path


class ONNXSegmenter:
    """Runs an exported `.onnx` file with ONNX Runtime (CPU).

    Example:
    >>> segmenter = ONNXSegmenter("shapes_v1.onnx")  # doctest: +SKIP
    >>> segmenter(images)["class_map"].shape
    (2, 64, 64)

    Args:
        model: str or Path of a `.onnx` file, or its `bytes`.
        num_threads: int or `None`. Intra-op threads; `None` lets ONNX
            Runtime choose. Defaults to `None`.

    Attributes:
        input_size: `(height, width)` of the file's input when it is fixed
            (`input_size` at export, PANet), else `None`.
        output_names: the names of the file's outputs, sorted.
    """

    task = "semantic"

    def __init__(self, model, num_threads=None):
        try:
            import onnxruntime
        except ImportError as error:
            raise ImportError(
                f"{type(self).__name__} needs ONNX Runtime: pip install "
                "kseg[onnx] (or pip install onnxruntime)"
            ) from error
        options = onnxruntime.SessionOptions()
        if num_threads is not None:
            options.intra_op_num_threads = num_threads
            options.inter_op_num_threads = 1
        source = model if isinstance(model, bytes) else str(model)
        self.session = onnxruntime.InferenceSession(
            source, options, providers=["CPUExecutionProvider"]
        )
        inputs = {i.name: i for i in self.session.get_inputs()}
        if IMAGES not in inputs:
            raise ValueError(
                f"not a kseg export: its inputs are {sorted(inputs)}, not [{IMAGES!r}]"
            )
        height, width = inputs[IMAGES].shape[1:3]
        fixed = all(isinstance(side, int) for side in (height, width))
        self.input_size = (height, width) if fixed else None
        self.output_names = sorted(o.name for o in self.session.get_outputs())

    def __call__(self, images):
        """The file's outputs (`{"class_map", "probabilities"}` for a
        semantic file) as NumPy arrays, of uint8 images `(N, H, W, 3)` (or
        one `(H, W, 3)` image), at the input size if the file has one."""
        images = np.asarray(images)
        single = images.ndim == 3
        if single:
            images = images[None]
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(
                f"images must be (N, H, W, 3) RGB, got shape {images.shape}"
            )
        if self.input_size is not None and images.shape[1:3] != self.input_size:
            raise ValueError(
                f"images must be (N, {self.input_size[0]}, {self.input_size[1]}, 3) "
                f"for this file, got shape {images.shape}"
            )
        if images.dtype != np.uint8:
            raise ValueError(f"images must be uint8 RGB, got dtype {images.dtype}")
        values = self.session.run(self.output_names, {IMAGES: images})
        outputs = dict(zip(self.output_names, values, strict=True))
        return {key: value[0] for key, value in outputs.items()} if single else outputs


class ONNXInstanceSegmenter(ONNXSegmenter):
    """Runs an exported `.onnx` instance segmentation file (PANet) with ONNX
    Runtime: called on uint8 images `(N, H, W, 3)` at its input size, it
    returns `num_detections`, `boxes` (input pixels), `scores`, `classes`
    and `masks` (see the module docstring).
    `kseg.inference.predict_instances` runs it on images of any size.

    Example:
    >>> detector = ONNXInstanceSegmenter("panet_v1.onnx")  # doctest: +SKIP
    >>> detector(images)["boxes"].shape
    (2, 100, 4)

    Args:
        model: str or Path of a `.onnx` file, or its `bytes`.
        num_threads: int or `None`. Intra-op threads; `None` lets ONNX
            Runtime choose. Defaults to `None`.
    """

    task = "instance"

    def __init__(self, model, num_threads=None):
        super().__init__(model, num_threads)
        if not is_instance_file(self.output_names) or self.input_size is None:
            raise ValueError(
                f"not an instance segmentation file: its outputs are "
                f"{self.output_names}, not {sorted(DETECTION_OUTPUTS)} at a "
                "fixed input size"
            )


def is_instance_file(output_names):
    """Whether a `.onnx` file with these outputs is an instance model's."""
    return set(DETECTION_OUTPUTS) <= set(output_names)
