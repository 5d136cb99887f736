"""Test helpers shared by kseg's test suite (and usable by downstream projects).

Everything here is backend-agnostic: the same tests run under
`KERAS_BACKEND=tensorflow` and `KERAS_BACKEND=jax`.
"""

import copy
import inspect
import json
import math
import os
import subprocess
import sys
import tempfile
import textwrap

import keras
import numpy as np

# Private API: Keras <= 3.15 publishes no TestCase with run_layer_test.
from keras.src import testing


def _to_numpy(x):
    return np.asarray(keras.ops.convert_to_numpy(x))


class TestCase(testing.TestCase):
    """`keras.src.testing.TestCase` plus kseg's extra checks.

    `run_layer_test` (inherited) checks the config round trip, symbolic and
    eager calls, one training step and a mixed-precision call.
    """

    def run_serialization_round_trip(self, layer, inputs, atol=1e-6):
        """Saves `layer` inside a model to `.keras`, reloads it and checks that
        the outputs are identical."""
        if isinstance(inputs, (list, tuple)):
            model_inputs = [
                keras.Input(shape=np.shape(x)[1:], dtype=_to_numpy(x).dtype)
                for x in inputs
            ]
        else:
            model_inputs = keras.Input(
                shape=np.shape(inputs)[1:], dtype=_to_numpy(inputs).dtype
            )
        model = keras.Model(model_inputs, layer(model_inputs))
        expected = model(inputs, training=False)
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "model.keras")
            model.save(path)
            restored = keras.saving.load_model(path)
        got = restored(inputs, training=False)
        for e, g in zip(
            keras.tree.flatten(expected), keras.tree.flatten(got), strict=True
        ):
            np.testing.assert_allclose(_to_numpy(g), _to_numpy(e), atol=atol)
        return restored

    def assert_xla_matches_eager(self, layer, inputs, atol=1e-5, rtol=1e-5):
        """Runs `layer` in a functional model compiled with `jit_compile=True`
        and checks the result against the eager call."""
        if isinstance(inputs, (list, tuple)):
            model_inputs = [keras.Input(shape=np.shape(x)[1:]) for x in inputs]
        else:
            model_inputs = keras.Input(shape=np.shape(inputs)[1:])
        model = keras.Model(model_inputs, layer(model_inputs))
        eager = model(inputs, training=False)
        model.compile(jit_compile=True)
        batch = np.shape(inputs[0] if isinstance(inputs, (list, tuple)) else inputs)
        compiled = model.predict(inputs, batch_size=batch[0], verbose=0)
        for e, c in zip(
            keras.tree.flatten(eager), keras.tree.flatten(compiled), strict=True
        ):
            np.testing.assert_allclose(c, _to_numpy(e), atol=atol, rtol=rtol)

    def run_model_test(self, model, input_shape, expected_output_shapes, seed=0):
        """Calls a kseg segmentation model on random images and checks its
        outputs.

        The outputs must be a dict with exactly the names of
        `expected_output_shapes` (name → full shape, batch included), each
        eager output finite and of that shape, the symbolic outputs for the
        same input shape (`compute_output_spec`) of that shape wherever a
        dimension is known, and `"logits"` float32 (also under mixed
        precision). Returns `(images, outputs)`.
        """
        images = np.random.default_rng(seed).uniform(size=input_shape)
        images = images.astype("float32")
        outputs = model(images, training=False)
        self.assertIsInstance(outputs, dict, "a kseg model returns a dict")
        self.assertEqual(sorted(outputs), sorted(expected_output_shapes))
        symbolic = model.compute_output_spec(keras.KerasTensor(tuple(input_shape)))
        self.assertIsInstance(symbolic, dict)
        self.assertEqual(sorted(symbolic), sorted(expected_output_shapes))
        for name, shape in expected_output_shapes.items():
            value = _to_numpy(outputs[name])
            self.assertEqual(value.shape, tuple(shape), f"shape of output {name!r}")
            self.assertTrue(
                np.all(np.isfinite(value.astype("float64"))),
                f"output {name!r} has non-finite values",
            )
            spec_shape = tuple(symbolic[name].shape)
            self.assertEqual(len(spec_shape), len(shape), f"rank of {name!r}")
            for got, want in zip(spec_shape, shape, strict=True):
                if got is not None:
                    self.assertEqual(
                        got, want, f"symbolic shape {spec_shape} of {name!r}"
                    )
        if "logits" in expected_output_shapes:
            for logits in (outputs["logits"], symbolic["logits"]):
                self.assertEqual(
                    keras.backend.standardize_dtype(logits.dtype), "float32"
                )
        return images, outputs

    def run_model_saving_test(self, model, inputs, atol=1e-6):
        """Checks that a model's config and its `.keras` file rebuild it.

        `type(model).from_config(model.get_config())` must give the same
        config and, with the weights copied, the same outputs; saving to
        `.keras` and loading must give the same class, config and outputs.
        Returns the loaded model.
        """
        expected = model(inputs, training=False)
        config = model.get_config()

        revived = type(model).from_config(copy.deepcopy(config))
        self.assertEqual(_config_json(revived.get_config()), _config_json(config))
        revived.set_weights(model.get_weights())
        self._assert_outputs_equal(revived(inputs, training=False), expected, atol)

        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "model.keras")
            model.save(path)
            restored = keras.saving.load_model(path)
        self.assertIs(type(restored), type(model))
        self.assertEqual(_config_json(restored.get_config()), _config_json(config))
        self._assert_outputs_equal(restored(inputs, training=False), expected, atol)
        return restored

    def assert_gradients_reach_backbone(
        self, model, inputs, labels, output="logits", ignore_label=255
    ):
        """Checks that the pixel cross-entropy of `output` trains the model.

        Every trainable weight must get a finite, non-`None` gradient (no
        detached branch) and every trainable weight of `model.backbone` a
        gradient that is not all zero. `labels` has the spatial size of
        `output`; `ignore_label` pixels do not count. Returns the gradients
        (weight path → array).
        """
        labels = np.asarray(labels)
        valid = (labels != ignore_label).astype("float32")
        targets = np.where(labels == ignore_label, 0, labels).astype("int32")

        def loss_fn(outputs):
            logits = keras.ops.cast(outputs[output], "float32")
            pixel_losses = keras.ops.sparse_categorical_crossentropy(
                targets, logits, from_logits=True
            )
            return keras.ops.sum(pixel_losses * valid) / max(valid.sum(), 1.0)

        grads = weight_gradients(model, inputs, loss_fn)
        self.assertEqual(
            len(grads),
            len(model.trainable_weights),
            "trainable weight paths must be unique to compare gradients",
        )
        for path, grad in grads.items():
            self.assertIsNotNone(grad, f"no gradient reaches {path}")
            self.assertTrue(np.all(np.isfinite(grad)), f"non-finite grad: {path}")
        backbone_paths = [w.path for w in model.backbone.trainable_weights]
        self.assertNotEqual(backbone_paths, [], "the backbone has no weights")
        for path in backbone_paths:
            self.assertTrue(np.any(grads[path] != 0), f"zero gradient at {path}")
        return grads

    def _assert_outputs_equal(self, got, expected, atol):
        if isinstance(expected, dict):
            self.assertEqual(sorted(got), sorted(expected))
        for g, e in zip(
            keras.tree.flatten(got), keras.tree.flatten(expected), strict=True
        ):
            np.testing.assert_allclose(_to_numpy(g), _to_numpy(e), atol=atol)


def rounding_tolerance(scale, terms, depth=1, dtype="float32"):
    """How far two evaluations of one computation in `dtype` may differ when
    they differ only in the order of their sums: XLA's fusions against
    TensorFlow's kernels, or the oneDNN kernels a CPU picks (AVX2, AVX-512,
    AMX). `depth` chained reductions of at most `terms` products each, on
    values up to `scale` in magnitude.

    A sum of `n` terms rounds to within about `√n · eps` of its magnitude
    (the probabilistic bound of Higham and Mary, 2019; `n · eps` is the worst
    case, far from what rounding does), each of the two evaluations that
    far from the exact value, and the errors of chained layers add up:
    `2 · depth · √terms · eps · scale`. Derived from the computation, so it
    holds on every CPU; never a number measured on one machine.

    Args:
        scale: float. The largest magnitude among the values compared (or
            the intermediate values they come from).
        terms: int. The longest reduction (a conv's `kh · kw · C_in`).
        depth: int. Chained reductions on the path to the output.
        dtype: the computation's float dtype. Defaults to `"float32"`.
    """
    eps = float(np.finfo(dtype).eps)
    return 2.0 * depth * math.sqrt(terms) * eps * float(scale)


def network_reductions(model):
    """`(depth, terms)` of `model` for `rounding_tolerance`: the number of
    kernels (conv, dense, transposed conv: an upper bound on the chained
    reductions of any path) and the longest reduction, the largest kernel
    fan-in."""
    kernels = [w for w in model.weights if len(w.shape) >= 2 and "kernel" in w.path]
    fan_in = max(int(np.prod(w.shape[:-1])) for w in kernels)
    return len(kernels), fan_in


def _config_json(config):
    """A config as canonical JSON, so tuples and lists compare equal."""
    return json.dumps(config, sort_keys=True, default=repr)


def numpy_bilinear_resize(x, size):
    """Slow, obvious float64 reference of `kseg.layers.common.resize`.

    Bilinear resize of NHWC `x` to `size = (height, width)` with half-pixel
    centres and no antialiasing: output pixel `o` of an axis samples the
    input at `(o + 0.5) * in_size / out_size - 0.5`, clamped to
    `[0, in_size - 1]`, interpolating linearly between its two neighbours.

    Example:
    >>> numpy_bilinear_resize(np.arange(2.0).reshape(1, 1, 2, 1), (1, 4))[0, 0, :, 0]
    array([0.  , 0.25, 0.75, 1.  ])

    Args:
        x: array `(batch, height, width, channels)`.
        size: 2 ints. Output `(height, width)`.

    Returns:
        float64 array `(batch, size[0], size[1], channels)`.
    """

    def axis_matrix(out_size, in_size):
        m = np.zeros((out_size, in_size))
        for o in range(out_size):
            src = min(max((o + 0.5) * in_size / out_size - 0.5, 0.0), in_size - 1)
            lo = int(math.floor(src))
            hi = min(lo + 1, in_size - 1)
            m[o, lo] += 1.0 - (src - lo)
            m[o, hi] += src - lo
        return m

    x = np.asarray(x, np.float64)
    rows = axis_matrix(size[0], x.shape[1])
    cols = axis_matrix(size[1], x.shape[2])
    return np.einsum("Hh,Ww,nhwc->nHWc", rows, cols, x)


def numpy_logits_at_label_size(logits, labels):
    """Float64 reference of how kseg's losses and metrics read a batch.

    Labels `(N, H, W)` or `(N, H, W, 1)` become `(N, H, W)`; logits
    `(N, h, w, C)` at another size are resized to `(H, W)` with
    `numpy_bilinear_resize`. Returns `(logits, labels)`.
    """
    labels = np.asarray(labels)
    if labels.ndim == 4:
        labels = labels[..., 0]
    logits = np.asarray(logits, np.float64)
    if logits.shape[1:3] != labels.shape[1:3]:
        logits = numpy_bilinear_resize(logits, labels.shape[1:3])
    return logits, labels


def run_on_jax(script, timeout=900):
    """Runs a Python `script` in a subprocess on the JAX backend (CPU) and
    returns its standard output; a failure raises `AssertionError` with the
    end of its output. For tests of a Keras API on JAX from a TensorFlow
    test process (the backend is chosen at import)."""
    env = {**os.environ, "KERAS_BACKEND": "jax", "JAX_PLATFORMS": "cpu"}
    result = subprocess.run(
        [sys.executable, "-c", script],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def run_mirrored_cpu_script(script, replicas=2, timeout=300):
    """Runs `script` on `replicas` logical CPUs in a fresh TensorFlow process
    and checks that it exits 0 with `OK` as its last output.

    The process's CPU is split into the logical devices `/cpu:0`,
    `/cpu:1`, ... before `script` runs, so that
    `tf.distribute.MirroredStrategy` can place one replica on each. A fresh
    process is needed because TensorFlow splits a device only before it
    initializes. `script` is dedented first.
    """
    split_cpu = textwrap.dedent(
        f"""
        import tensorflow as tf

        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * {int(replicas)}
        )
        """
    )
    env = {**os.environ, "KERAS_BACKEND": "tensorflow", "TF_CPP_MIN_LOG_LEVEL": "3"}
    result = subprocess.run(
        [sys.executable, "-c", split_cpu + textwrap.dedent(script)],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if result.returncode != 0 or not result.stdout.strip().endswith("OK"):
        raise AssertionError(
            f"the script exited with {result.returncode}:\n"
            + result.stdout[-3000:]
            + result.stderr[-3000:]
        )


def input_gradients(fn, *inputs):
    """Gradients of `sum(fn(*inputs))` with respect to every input, as NumPy."""
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        xs = [tf.convert_to_tensor(x) for x in inputs]
        with tf.GradientTape() as tape:
            tape.watch(xs)
            y = keras.ops.sum(fn(*xs))
        return [_to_numpy(g) for g in tape.gradient(y, xs)]
    if backend == "jax":
        import jax

        grad = jax.grad(
            lambda *xs: keras.ops.sum(fn(*xs)), argnums=tuple(range(len(inputs)))
        )
        return [_to_numpy(g) for g in grad(*inputs)]
    raise NotImplementedError(f"input_gradients does not support backend {backend}")


def weight_gradients(layer, inputs, loss_fn, training=True):
    """Gradients of `loss_fn(layer(inputs))` w.r.t. each trainable weight.

    Returns a dict mapping each trainable weight's path to its gradient
    (NumPy). A `None` gradient (the weight does not affect the loss) is
    returned as `None`.
    """
    backend = keras.backend.backend()
    if not layer.built:
        layer(inputs)
    weights = layer.trainable_weights
    if backend == "tensorflow":
        import tensorflow as tf

        with tf.GradientTape() as tape:
            loss = loss_fn(layer(inputs, training=training))
        grads = tape.gradient(loss, [w.value for w in weights])
    elif backend == "jax":
        import jax

        non_trainable = [v.value for v in layer.non_trainable_variables]
        # `stateless_call` hands every keyword to `call`: pass `training`, as
        # `layer(...)` does, only to a `call` that takes it.
        parameters = inspect.signature(layer.call).parameters.values()
        takes_training = any(
            p.name == "training" or p.kind is p.VAR_KEYWORD for p in parameters
        )
        call_kwargs = {"training": training} if takes_training else {}

        def compute(trainable):
            out, _ = layer.stateless_call(
                trainable, non_trainable, inputs, **call_kwargs
            )
            return loss_fn(out)

        grads = jax.grad(compute)([w.value for w in weights])
    else:
        raise NotImplementedError(
            f"weight_gradients does not support backend {backend}"
        )
    return {
        w.path: (None if g is None else _to_numpy(g))
        for w, g in zip(weights, grads, strict=True)
    }


def average_pooling_backbone(image_size, channels=1, output_stride=16):
    """A weightless kseg backbone for hand-computable model tests: stage
    `resN` is the image averaged over `stride × stride` blocks (strides 4, 8,
    16 and 32, the last capped at `output_stride`).

    With block-constant images the features are the block values, so a model
    on it can be computed by hand or in a few lines of NumPy.

    Args:
        image_size: `(height, width)`, multiples of the largest stride.
        channels: int. Image channels. Defaults to `1`.
        output_stride: int. Stride of `"res5"` (16 or 32). Defaults to `16`.
    """
    images = keras.Input((*image_size, channels), name="images")
    strides = {"res2": 4, "res3": 8, "res4": 16, "res5": min(32, output_stride)}
    features = {
        name: keras.layers.AveragePooling2D(stride, name=f"{name}_pool")(images)
        for name, stride in strides.items()
    }
    return keras.Model(images, features, name="average_pooling_backbone")


def numpy_conv(x, kernel, bias=0.0):
    """Zero-padded ("same") cross-correlation of `x` `(H, W, C_in)` with an
    odd `kernel` `(kh, kw, C_in, C_out)`, float64: the NumPy reference of a
    stride-1 `Conv2D(padding="same")` in the hand-computed model tests."""
    kh, kw = kernel.shape[:2]
    height, width = x.shape[:2]
    padded = np.pad(x, ((kh // 2, kh // 2), (kw // 2, kw // 2), (0, 0)))
    out = np.zeros((height, width, kernel.shape[3])) + bias
    for a in range(kh):
        for b in range(kw):
            out += padded[a : a + height, b : b + width] @ kernel[a, b]
    return out


def numpy_deconv_x2(x, kernel, bias=0.0):
    """Transposed conv, 4×4 kernel `(4, 4, C_out, C_in)`, stride 2, "same":
    input pixel `i` adds `x[i]·w[k]` to output pixel `2i + k - 1`."""
    height, width = x.shape[:2]
    full = np.zeros((2 * height + 2, 2 * width + 2, kernel.shape[2]))
    for i in range(height):
        for j in range(width):
            full[2 * i : 2 * i + 4, 2 * j : 2 * j + 4] += kernel @ x[i, j]
    return full[1:-1, 1:-1] + bias


def _box_iou(a, b):
    """IoU matrix of `[y1, x1, y2, x2]` boxes `a (n, 4)` and `b (m, 4)`."""
    top_left = np.maximum(a[:, None, :2], b[None, :, :2])
    bottom_right = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(bottom_right - top_left, 0, None), axis=-1)
    area_a = np.prod(a[:, 2:] - a[:, :2], axis=-1)
    area_b = np.prod(b[:, 2:] - b[:, :2], axis=-1)
    return inter / np.maximum(area_a[:, None] + area_b[None] - inter, 1e-9)


def matched_detections(expected, actual, min_score=0.5, min_iou=0.9):
    """`(matched, total)`: of `expected`'s detections scoring above
    `min_score`, how many have a detection of the same class in `actual`
    (same image) with IoU >= `min_iou` (each matched once, greedily) — the
    parity of an exported instance model (ONNX, TFLite) with Keras.

    Args:
        expected, actual: dicts of NumPy arrays `boxes (N, D, 4)`,
            `scores (N, D)`, `classes (N, D)`, `num_detections (N,)`, as a
            PANet returns them.
        min_score: float. Defaults to `0.5`.
        min_iou: float. Defaults to `0.9`.
    """
    matched = total = 0
    for image in range(len(expected["num_detections"])):
        keep = np.asarray(expected["scores"][image]) > min_score
        keep[int(expected["num_detections"][image]) :] = False
        count = int(actual["num_detections"][image])
        boxes = np.asarray(actual["boxes"][image][:count])
        classes = np.asarray(actual["classes"][image][:count])
        free = np.ones(count, bool)
        for box, label in zip(
            np.asarray(expected["boxes"][image])[keep],
            np.asarray(expected["classes"][image])[keep],
            strict=True,
        ):
            total += 1
            iou = _box_iou(box[None], boxes)[0]
            iou[(classes != label) | ~free] = 0
            if count and iou.max() >= min_iou:
                free[iou.argmax()] = False
                matched += 1
    return matched, total


@keras.saving.register_keras_serializable(package="kseg_testing")
class FixedDetections(keras.layers.Layer):
    """Hand-made detections (the same for every image whose mean pixel
    exceeds 1, none for nearly black images), in the outputs of an
    `InstanceSegmenter`: for tests of everything downstream of a detector
    (prediction, pasting, COCO results, exports) with known answers.

    Args:
        boxes: `(D, 4)` boxes in input pixels.
        scores: `(D,)`.
        classes: `(D,)` ints (0 for padding rows).
        masks: `(D, s, s)` probabilities.
        count: int. Detections reported for a non-black image.
    """

    def __init__(self, boxes, scores, classes, masks, count, **kwargs):
        super().__init__(**kwargs)
        self.boxes = np.asarray(boxes, np.float32)
        self.scores = np.asarray(scores, np.float32)
        self.classes = np.asarray(classes, np.int32)
        self.masks = np.asarray(masks, np.float32)
        self.count = int(count)

    def call(self, images):
        found = keras.ops.mean(images, axis=(1, 2, 3)) > 1.0
        batch = keras.ops.shape(images)[0]

        def tile(value):
            value = keras.ops.convert_to_tensor(value)
            return keras.ops.repeat(value[None], batch, axis=0)

        keep = keras.ops.cast(found, "int32")
        return {
            "boxes": tile(self.boxes),
            "scores": tile(self.scores),
            "classes": tile(self.classes) * keep[:, None],
            "masks": tile(self.masks),
            "num_detections": self.count * keep,
        }

    def get_config(self):
        return {
            **super().get_config(),
            "boxes": self.boxes.tolist(),
            "scores": self.scores.tolist(),
            "classes": self.classes.tolist(),
            "masks": self.masks.tolist(),
            "count": self.count,
        }


def fixed_detector(boxes, scores, classes, masks, count, image_size=(64, 64)):
    """A `kseg.models.InstanceSegmenter` returning `FixedDetections` for
    `image_size` inputs; saves and loads as a `.keras` file."""
    return _fixed_detector_class()(
        np.asarray(boxes).tolist(),
        np.asarray(scores).tolist(),
        np.asarray(classes).tolist(),
        np.asarray(masks).tolist(),
        count,
        tuple(image_size),
    )


def _fixed_detector_class():
    # Defined on first use: kseg.models imports TensorFlow-backed layers,
    # which kseg.testing's layer helpers do not need.
    if "FixedDetector" in _FIXED:
        return _FIXED["FixedDetector"]
    from kseg.models.segmenter import InstanceSegmenter

    @keras.saving.register_keras_serializable(package="kseg_testing")
    class FixedDetector(InstanceSegmenter):
        """`FixedDetections` as an instance model."""

        def __init__(self, boxes, scores, classes, masks, count, image_size, **kwargs):
            inputs = keras.Input((*image_size, 3), name="images")
            layer = FixedDetections(boxes, scores, classes, masks, count)
            super().__init__(inputs=inputs, outputs=layer(inputs), **kwargs)
            self.config = {
                "boxes": boxes,
                "scores": scores,
                "classes": classes,
                "masks": masks,
                "count": count,
                "image_size": tuple(image_size),
            }
            self.num_classes = int(max(classes))
            self.mask_size = int(np.shape(masks)[-1])

        def get_config(self):
            return {"name": self.name, "trainable": self.trainable, **self.config}

    _FIXED["FixedDetector"] = FixedDetector
    return FixedDetector


_FIXED = {}


def folder_dataset_with_a_corrupt_image(root):
    """A `folder` dataset under `root` (`train`: 8, `val`: 4 random 32×32
    images with 6-class labels) whose training image `train1.png` is cut in
    half (does not decode); the tests of errors in training use it."""
    from kseg.data.png import encode_index_png, encode_rgb_png

    rng = np.random.default_rng(0)
    for split, count in (("train", 8), ("val", 4)):
        (root / split / "images").mkdir(parents=True)
        (root / split / "labels").mkdir(parents=True)
        for i in range(count):
            image = encode_rgb_png(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
            if (split, i) == ("train", 1):
                image = image[: len(image) // 2]
            (root / split / "images" / f"{split}{i}.png").write_bytes(image)
            label = rng.integers(0, 6, (32, 32)).astype(np.uint8)
            (root / split / "labels" / f"{split}{i}.png").write_bytes(
                encode_index_png(label)
            )
