"""Convert a kseg model to TensorFlow Lite (LiteRT) with builtin ops only.

TFLite needs a fixed input size: a model is converted for one `(H, W)` and
batch 1. The `.tflite` file has one signature, `serving_default`, with the
interface of the SavedModel's: input `images`, uint8 `(1, H, W, 3)` RGB (cast
to float32 0–255 in the graph, as for training), outputs `class_map` int32
`(1, H, W)` and `probabilities` float32 `(1, H, W, num_classes)`. Resize other
images to `(H, W)` first (and the class map back), or export one file per
size.

Quantizations (`QUANTIZATIONS`):

- `"float32"`: no quantization.
- `"float16"`: float16 weights, float32 compute (half the file size).
- `"int8"`: full-integer post-training quantization, calibrated on a
  representative set of images drawn from the training data: weights and
  activations int8, ops from `TFLITE_BUILTINS_INT8`. The uint8 image input
  stays the raw pixels (the cast to the first quantized layer is in the
  graph) and the class map is the arg-max of the int8 logits, so no float
  I/O is needed for it; `probabilities` is dequantized to float32 so all
  three files share one interface. The layers of `FLOAT32_LAYERS` (guided
  filter, guidance CRF) keep float32 ops inside int8 files, as they keep
  float32 under mixed precision.

An instance model (PANet) converts at its own fixed size, batch 1, with
the interface of `kseg.export.instance_graph`: input `images` uint8
`(1, H, W, 3)`, outputs `num_detections`, `boxes` (input pixels), `scores`,
`classes` and `masks`, as the SavedModel's (without its resize and
`instance_map`). Its NMS runs as TFLite's `NON_MAX_SUPPRESSION_V5`
(`SelectedNMS`, see `kseg.export.instance_graph`). In int8 files the box
geometry (`INSTANCE_FLOAT32_LAYERS`: proposals, RoIAlign, detections) stays
float32; the backbone, FPN and heads are int8. `TFLiteInstanceSegmenter`
runs such a file, and `kseg.inference.predict_instances` fits images of any
size into it.

Only `tf.lite.OpsSet.TFLITE_BUILTINS` (and `TFLITE_BUILTINS_INT8`) are
allowed, never `SELECT_TF_OPS`: a model that needs a TensorFlow op fails to
convert instead of producing a file that needs the Flex delegate.

Run the files with LiteRT (`pip install ai-edge-litert`): `TFLiteSegmenter`
(`TFLiteInstanceSegmenter` for PANet).
"""

import re
import warnings
from pathlib import Path

import numpy as np
import tensorflow as tf

# Private TensorFlow functions the converter itself runs: freezing first
# lets the converter save a variable-free module (fast) that keeps the
# signature's names; `mlir_quantize` takes a node denylist (`_quantize_except`).
# Private API: TF <= 2.21's converter has no public per-node quantization denylist.
from tensorflow.lite.python.convert import mlir_quantize

# Private API: TF <= 2.21 has no public freezing of a function's variables.
from tensorflow.python.framework.convert_to_constants import (
    convert_variables_to_constants_v2,
)

from kseg.console import native_output_quieted
from kseg.data import instance_eval_transform
from kseg.export.categories import categories_file
from kseg.export.defaults import DEFAULT_CALIBRATION_IMAGES, QUANTIZATIONS
from kseg.export.instance_graph import (
    SelectedNMS,
    instance_function,
    instance_input_size,
    swapped_nms,
)
from kseg.export.instance_saved_model import (
    DETECTION_OUTPUTS,
    check_instance_model,
)
from kseg.export.saved_model import (
    IMAGES,
    SERVING_SIGNATURE,
    categories_json,
    check_segmentation_model,
    predict_images,
    refuse_existing,
)
from kseg.files import write_bytes
from kseg.layers.common import check_choice, resize
from kseg.layers.detection import DetectionLayer, ProposalLayer
from kseg.layers.guided_filter import GuidanceCRF, GuidedFilter
from kseg.layers.roi_align import PyramidRoIAlign
from kseg.tasks import is_instance_model

# Layers that compute in float32 under every dtype policy: their ops stay
# float32 in int8 files too. The guided filter's window statistics and its
# covariance determinant span ranges int8 cannot hold (int8 division by a
# determinant quantized to zero fails at run time).
FLOAT32_LAYERS = (GuidedFilter, GuidanceCRF)
# The box geometry of an instance model (anchors, box decoding, clipping,
# NMS, class scores, RoIAlign's sampling weights) stays float32 in int8
# files: box coordinates in pixels need more than 256 levels (with RoIAlign
# in int8 no detection survives), and TFLite's NMS takes float32 only.
INSTANCE_FLOAT32_LAYERS = (ProposalLayer, PyramidRoIAlign, DetectionLayer)


def tflite_input_size(model, input_size=None):
    """The `(height, width)` a TFLite file of `model` takes.

    `input_size` if given; else the model's own input size when it is fixed.
    """
    model_size = tuple(model.input_shape[1:3])
    if input_size is None:
        if None in model_size:
            raise ValueError(
                "TFLite needs a fixed input size: pass input_size=(height, width) "
                f"(the model takes any size, input shape {model.input_shape})"
            )
        return model_size
    if (
        not isinstance(input_size, (tuple, list))
        or len(input_size) != 2
        or not all(
            isinstance(s, (int, np.integer)) and not isinstance(s, bool) and s > 0
            for s in input_size
        )
    ):
        raise ValueError(
            f"input_size must be (height, width), two positive ints, got {input_size!r}"
        )
    return int(input_size[0]), int(input_size[1])


def calibration_images(images, size, limit=DEFAULT_CALIBRATION_IMAGES, fit=False):
    """Up to `limit` uint8 images `(1, H, W, 3)` for int8 calibration.

    Args:
        images: an iterable, or a callable returning one, of images
            `(h, w, 3)` or batches `(n, h, w, 3)` (NumPy arrays or tensors,
            RGB in 0–255, any real or integer dtype), or of `(image, label)`
            pairs (a training `tf.data.Dataset` fits). Images of another size
            are resized to `size` (bilinear, half-pixel centres).
        size: `(height, width)` of the TFLite input.
        limit: int. Maximum number of images taken. Defaults to `100`.
        fit: bool. Fit images of another size into `size` as an instance
            model's inputs are fitted (`kseg.data.instance_eval_transform`:
            aspect ratio kept, zero padding) instead of resizing them to it.
            Defaults to `False`.

    Returns:
        A list of uint8 arrays `(1, height, width, 3)`.
    """
    if images is None:
        raise ValueError(
            "int8 quantization needs representative images from the training "
            "data (representative_images=...)"
        )
    if limit < 1:
        raise ValueError(f"the calibration image limit must be >= 1, got {limit}")
    source = images() if callable(images) else images
    taken = []
    for item in source:
        if isinstance(item, (tuple, list)):
            item = item[0]
        batch = np.asarray(item)
        if batch.ndim == 3:
            batch = batch[None]
        if batch.ndim != 4 or batch.shape[-1] != 3:
            raise ValueError(
                "representative images must be RGB (height, width, 3) or batches "
                f"(n, height, width, 3), got shape {batch.shape}"
            )
        for image in batch:
            if image.shape[:2] != tuple(size) and fit:
                image = np.asarray(instance_eval_transform(image, size)[0])
            elif image.shape[:2] != tuple(size):
                image = np.asarray(resize(image[None].astype(np.float32), size))[0]
            taken.append(np.clip(np.round(image), 0, 255).astype(np.uint8)[None])
            if len(taken) == limit:
                return taken
    if not taken:
        raise ValueError("representative_images gave no image")
    return taken


def convert_function(
    function, quantization="float32", representative_dataset=None, float_scopes=()
):
    """Converts a `tf.function` with a fully defined `input_signature` to
    TFLite builtins; the file's `serving_default` signature keeps the input
    spec names and the output dict keys.

    The generic converter behind `convert_to_tflite`, for graphs that are not
    image → segmentation, e.g. a model with `RoIAlign` taking boxes.

    Args:
        function: `tf.function` with an `input_signature` of named,
            fully defined `tf.TensorSpec`s.
        quantization: str. One of `QUANTIZATIONS`. Defaults to `"float32"`.
        representative_dataset: for `"int8"`, a list of input lists (one
            array per input, in signature order). Defaults to `None`.
        float_scopes: names of Keras layers whose ops stay float32 in an int8
            file (see `FLOAT32_LAYERS`). Defaults to `()`.

    Returns:
        The `.tflite` flatbuffer as `bytes`.
    """
    check_choice(quantization, QUANTIZATIONS, "quantization")
    specs = function.input_signature
    if specs is None:
        raise ValueError("function must be a tf.function with an input_signature")
    names = []
    for index, spec in enumerate(specs):
        if not spec.shape.is_fully_defined():
            raise ValueError(
                f"TFLite needs fully defined input shapes, input {index} "
                f"({spec.name}) is {spec.shape}"
            )
        names.append(spec.name or f"input_{index}")
    if quantization == "int8" and not representative_dataset:
        raise ValueError("int8 quantization needs a representative_dataset")

    concrete = function.get_concrete_function()
    frozen = convert_variables_to_constants_v2(concrete)
    signature = [
        tf.TensorSpec(spec.shape, spec.dtype, name=name)
        for spec, name in zip(specs, names, strict=True)
    ]
    module = tf.Module()
    module.serve = tf.function(
        lambda *inputs: tf.nest.pack_sequence_as(
            concrete.structured_outputs, frozen(*inputs)
        ),
        input_signature=signature,
        autograph=False,
    )
    converter = tf.lite.TFLiteConverter.from_concrete_functions(
        [module.serve.get_concrete_function()], module
    )
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    if quantization == "float16":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.target_spec.supported_types = [tf.float16]
    elif quantization == "int8":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.representative_dataset = lambda: (
            dict(zip(names, inputs, strict=True)) for inputs in representative_dataset
        )
    try:
        with warnings.catch_warnings():
            # int8 calibration runs TensorFlow's own deprecated tf.lite.Interpreter.
            warnings.filterwarnings(
                "ignore", ".*tf.lite.Interpreter is deprecated", UserWarning
            )
            # The quantizer prints `fully_quantize: 0, inference_type: 6, ...`.
            with native_output_quieted():
                if quantization == "int8" and float_scopes:
                    return _quantize_except(converter, float_scopes)
                return converter.convert()
    except Exception as error:  # the converter's own (private) ConverterError
        needed = re.search(r"TF Select ops: (.*)", str(error))
        if needed is None:
            raise
        raise ValueError(
            "The graph needs TensorFlow ops that TFLite has no builtin for "
            f"({needed.group(1)}); kseg converts with TFLITE_BUILTINS only, "
            "never SELECT_TF_OPS"
        ) from error


def _quantize_except(converter, scopes):
    """int8 quantization of everything but the ops under the Keras layer
    name scopes `scopes`, which stay float32.

    The converter has no option for this; its quantization debugger does it
    with these two steps (calibrate only, then quantize with a node
    denylist), without building the debugger's instrumented model.
    """
    from ai_edge_litert import schema_py_generated as schema

    # Private API: TF <= 2.21's converter has no public calibrate-only mode.
    converter._experimental_calibrate_only = True
    calibrated = converter.convert()
    subgraph = schema.Model.GetRootAs(calibrated, 0).Subgraphs(0)
    # Tensor names carry the layer's name scope, uniquified with `_<n>`.
    pattern = re.compile(
        "|".join(rf"(^|/){re.escape(scope)}(_\d+)?/" for scope in scopes)
    )
    float_nodes = [
        name
        for name in (
            subgraph.Tensors(i).Name().decode() for i in range(subgraph.TensorsLength())
        )
        if pattern.search(name)
    ]
    return mlir_quantize(calibrated, denylisted_nodes=float_nodes)


def convert_to_tflite(
    model,
    input_size=None,
    quantization="float32",
    representative_images=None,
    num_calibration_images=DEFAULT_CALIBRATION_IMAGES,
):
    """Converts a kseg segmentation model to a `.tflite` flatbuffer.

    Example:
    >>> data = make_synthetic("train", 100, 64)  # doctest: +SKIP
    >>> flatbuffer = convert_to_tflite(model, (64, 64), "int8", data.images)

    Args:
        model: a kseg segmentation `keras.Model`.
        input_size: `(height, width)` of the file's fixed input, or `None`
            for the model's own fixed size. Defaults to `None`.
        quantization: str. `"float32"`, `"float16"` or `"int8"`.
            Defaults to `"float32"`.
        representative_images: for `"int8"`, images drawn from the training
            data (see `calibration_images`). Defaults to `None`.
        num_calibration_images: int. At most this many of them calibrate the
            int8 ranges. Defaults to `100`.

    Returns:
        The `.tflite` flatbuffer as `bytes`.
    """
    if is_instance_model(model):
        return _convert_instance_model(
            model,
            input_size,
            quantization,
            representative_images,
            num_calibration_images,
        )
    check_segmentation_model(model)
    check_choice(quantization, QUANTIZATIONS, "quantization")
    height, width = tflite_input_size(model, input_size)
    dataset = None
    if quantization == "int8":
        dataset = [
            [image]
            for image in calibration_images(
                representative_images, (height, width), num_calibration_images
            )
        ]
    function = tf.function(
        lambda images: predict_images(model, images),
        input_signature=[tf.TensorSpec([1, height, width, 3], tf.uint8, name=IMAGES)],
        autograph=False,
    )
    # Private API: Keras <= 3.15 lists the sublayers built in `build` nowhere public.
    float_scopes = [
        layer.name
        for layer in model._flatten_layers()
        if isinstance(layer, FLOAT32_LAYERS)
    ]
    return convert_function(function, quantization, dataset, float_scopes)


def _convert_instance_model(
    model, input_size, quantization, representative_images, num_calibration_images
):
    """`convert_to_tflite` of an instance model (PANet): batch 1 at the
    model's own size, NMS as `NON_MAX_SUPPRESSION_V5`."""
    check_instance_model(model)
    check_choice(quantization, QUANTIZATIONS, "quantization")
    size = instance_input_size(model, input_size)
    dataset = None
    if quantization == "int8":
        dataset = [
            [image]
            for image in calibration_images(
                representative_images, size, num_calibration_images, fit=True
            )
        ]
    # Private API: Keras <= 3.15 lists the sublayers built in `build` nowhere public.
    float_scopes = [
        layer.name
        for layer in model._flatten_layers()
        if isinstance(layer, INSTANCE_FLOAT32_LAYERS)
    ]
    function = instance_function(model, size, batch_size=1)
    with swapped_nms(model, SelectedNMS):
        return convert_function(function, quantization, dataset, float_scopes)


def export_tflite(
    model,
    path,
    input_size=None,
    quantization="float32",
    representative_images=None,
    num_calibration_images=DEFAULT_CALIBRATION_IMAGES,
    categories=None,
):
    """Converts `model` (see `convert_to_tflite`) and writes it to `path`;
    for an instance model also its categories, `NAME.categories.json`
    beside it (`kseg predict` reads the dataset's ids and names there).

    Never overwrites: an existing `path` (or categories file) raises
    `FileExistsError`, checked before the conversion and again when the
    file is created.

    Args:
        categories: instance models: `(category_ids, class_names)` of
            classes 1..C; `None` for ids 1..C named `class_<k>`.
            Defaults to `None`.

    Returns:
        `path` as a `Path`.
    """
    path = Path(path)
    refuse_existing(path, "TFLite file")
    text = categories_json(model, categories)
    if text is not None:
        refuse_existing(categories_file(path), "categories file")
    flatbuffer = convert_to_tflite(
        model, input_size, quantization, representative_images, num_calibration_images
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    if text is not None:
        write_bytes(categories_file(path), text.encode(), overwrite=False)
    try:
        # A temporary file renamed into place: a kill never leaves a partial
        # .tflite, and a file that appeared meanwhile is never replaced.
        write_bytes(path, flatbuffer, overwrite=False)
    except FileExistsError:
        refuse_existing(path, "TFLite file")
    return path


def operator_names(flatbuffer):
    """The operator codes a `.tflite` flatbuffer uses, sorted: builtin names
    (`"CONV_2D"`), custom ops as `"CUSTOM:<name>"` (Flex ops are
    `"CUSTOM:Flex<Op>"`). Needs LiteRT's schema (`ai-edge-litert`)."""
    from ai_edge_litert import schema_py_generated as schema

    model = schema.Model.GetRootAs(flatbuffer, 0)
    builtins = {
        value: name
        for name, value in vars(schema.BuiltinOperator).items()
        if not name.startswith("_")
    }
    names = set()
    for index in range(model.OperatorCodesLength()):
        code = model.OperatorCodes(index)
        if code.CustomCode():
            names.add(f"CUSTOM:{code.CustomCode().decode()}")
        else:
            # Codes above 127 live in `BuiltinCode`, older ones in both.
            value = max(code.BuiltinCode(), code.DeprecatedBuiltinCode())
            names.add(builtins[value])
    return sorted(names)


class TFLiteSegmenter:
    """Runs an exported `.tflite` segmentation file with LiteRT.

    Example:
    >>> segmenter = TFLiteSegmenter("shapes_int8.tflite")  # doctest: +SKIP
    >>> segmenter(images)["class_map"].shape
    (2, 64, 64)

    Args:
        model: str or Path of a `.tflite` file, or its `bytes`.
        num_threads: int or `None`. Interpreter threads; `None` lets LiteRT
            choose. Defaults to `None`.

    Attributes:
        input_size: `(height, width)` of the file's fixed input.
        output_names: the names of the file's outputs, sorted.
    """

    task = "semantic"

    def __init__(self, model, num_threads=None):
        try:
            from ai_edge_litert.interpreter import Interpreter
        except ImportError as error:
            raise ImportError(
                f"{type(self).__name__} needs LiteRT: pip install ai-edge-litert"
            ) from error
        # LiteRT prints "INFO: Created TensorFlow Lite XNNPACK delegate for
        # CPU." when it first allocates the tensors: done here, quietly.
        source = (
            {"model_content": model}
            if isinstance(model, bytes)
            else {"model_path": str(model)}
        )
        with native_output_quieted():
            interpreter = Interpreter(**source, num_threads=num_threads)
            interpreter.allocate_tensors()
        self.interpreter = interpreter
        self._runner = interpreter.get_signature_runner(SERVING_SIGNATURE)
        shape = self._runner.get_input_details()[IMAGES]["shape"]
        self.input_size = (int(shape[1]), int(shape[2]))
        self.output_names = sorted(self._runner.get_output_details())

    def __call__(self, images):
        """The file's outputs (`{"class_map", "probabilities"}` for a
        semantic file) as NumPy arrays, of uint8 images `(N, H, W, 3)` (or
        one `(H, W, 3)` image) at the input size."""
        images = np.asarray(images)
        single = images.ndim == 3
        if single:
            images = images[None]
        if images.ndim != 4 or tuple(images.shape[1:]) != (*self.input_size, 3):
            raise ValueError(
                f"images must be (N, {self.input_size[0]}, {self.input_size[1]}, 3) "
                f"for this file, got shape {images.shape}"
            )
        if images.dtype != np.uint8:
            raise ValueError(f"images must be uint8 RGB, got dtype {images.dtype}")
        results = [self._runner(**{IMAGES: image[None]}) for image in images]
        outputs = {
            key: np.concatenate([result[key] for result in results])
            for key in results[0]
        }
        return {key: value[0] for key, value in outputs.items()} if single else outputs


class TFLiteInstanceSegmenter(TFLiteSegmenter):
    """Runs an exported `.tflite` instance segmentation file (PANet) with
    LiteRT: called on uint8 images `(N, H, W, 3)` at its input size, it
    returns `num_detections`, `boxes` (input pixels), `scores`, `classes`
    and `masks` (see `kseg.export.instance_graph`).
    `kseg.inference.predict_instances` runs it on images of any size.

    Example:
    >>> detector = TFLiteInstanceSegmenter("shapes_int8.tflite")  # doctest: +SKIP
    >>> detector(images)["boxes"].shape
    (2, 20, 4)

    Args:
        model: str or Path of a `.tflite` file, or its `bytes`.
        num_threads: int or `None`. Interpreter threads; `None` lets LiteRT
            choose. Defaults to `None`.
    """

    task = "instance"

    def __init__(self, model, num_threads=None):
        super().__init__(model, num_threads)
        if not is_instance_file(self.output_names):
            raise ValueError(
                f"not an instance segmentation file: its outputs are "
                f"{self.output_names}, not {sorted(DETECTION_OUTPUTS)}"
            )


def is_instance_file(output_names):
    """Whether a `.tflite` file with these outputs is an instance model's."""
    return set(DETECTION_OUTPUTS) <= set(output_names)
