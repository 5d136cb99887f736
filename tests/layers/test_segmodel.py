import keras
import numpy as np
import pytest

from kseg.layers.segmodel import ContextCRF, StructuredPatchPrediction
from kseg.testing import TestCase, weight_gradients


def _random_weights(layer, seed):
    rng = np.random.default_rng(seed)
    weights = [rng.normal(scale=0.5, size=w.shape) for w in layer.get_weights()]
    layer.set_weights([w.astype("float32") for w in weights])
    return [w.astype("float64") for w in weights]


def _conv_same(x, kernel, bias, dilation=1):
    """Stride-1 "same" convolution, zero padding, explicit loops (float64)."""
    n, h, w, _ = x.shape
    kh, kw = kernel.shape[:2]
    out = np.zeros((n, h, w, kernel.shape[-1])) + bias
    for i in range(h):
        for j in range(w):
            for ky in range(kh):
                for kx in range(kw):
                    y = i + (ky - kh // 2) * dilation
                    z = j + (kx - kw // 2) * dilation
                    if 0 <= y < h and 0 <= z < w:
                        out[:, i, j] += x[:, y, z] @ kernel[ky, kx]
    return out


def _box_mean(x, size):
    """Mean over the in-image part of each size × size window."""
    r = size // 2
    _, h, w, _ = x.shape
    out = np.zeros(x.shape)
    for i in range(h):
        for j in range(w):
            window = x[:, max(i - r, 0) : i + r + 1, max(j - r, 0) : j + r + 1]
            out[:, i, j] = window.sum(axis=(1, 2)) / (window.shape[1] * window.shape[2])
    return out


def _softmax(z):
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _context_crf(features, unary, weights, box_sizes, dilations, iterations):
    groups = [
        (size, dilation, weights[2 * g], weights[2 * g + 1])
        for g, (size, dilation) in enumerate(zip(box_sizes, dilations, strict=True))
    ]
    message_kernel, message_bias = weights[-2:]
    z = unary
    for _ in range(iterations):
        ctx = np.concatenate([_softmax(z), features], axis=-1)
        hidden = sum(
            _conv_same(_box_mean(ctx, size), kernel, bias, dilation)
            for size, dilation, kernel, bias in groups
        )
        message = _conv_same(np.maximum(hidden, 0), message_kernel, message_bias)
        z = unary - message
    return z


def _inputs(shape=(2, 5, 7), features=3, classes=4, seed=0):
    rng = np.random.default_rng(seed)
    f = rng.normal(size=(*shape, features)).astype("float32")
    u = (2 * rng.normal(size=(*shape, classes))).astype("float32")
    return f, u


class StructuredPatchPredictionTest(TestCase):
    def test_matches_numpy(self):
        for kernel_size in (1, 3):
            classes, n = 3, 2
            x = np.random.default_rng(1).normal(size=(2, 3, 4, 5)).astype("float32")
            layer = StructuredPatchPrediction(classes, n, kernel_size=kernel_size)
            layer.build(x.shape)
            kernel, bias = _random_weights(layer, kernel_size)
            conv = _conv_same(x.astype("float64"), kernel, bias)
            expected = np.zeros((2, 3 * n, 4 * n, classes))
            for i in range(3):
                for j in range(4):
                    for a in range(n):
                        for b in range(n):
                            for c in range(classes):
                                channel = (a * n + b) * classes + c
                                expected[:, i * n + a, j * n + b, c] = conv[
                                    :, i, j, channel
                                ]
            np.testing.assert_allclose(layer(x), expected, atol=1e-5)

    def test_patch_size_three(self):
        x = np.random.default_rng(2).normal(size=(1, 2, 3, 4)).astype("float32")
        layer = StructuredPatchPrediction(2, patch_size=3)
        out = np.asarray(layer(x))
        self.assertEqual(out.shape, (1, 6, 9, 2))
        conv = np.asarray(layer.conv(x))
        # Output pixel (i·3 + a, j·3 + b), class c reads channel (a·3 + b)·2 + c.
        np.testing.assert_allclose(out[0, 1 * 3 + 2, 2 * 3 + 0, 1], conv[0, 1, 2, 13])

    def test_layer(self):
        self.run_layer_test(
            StructuredPatchPrediction,
            init_kwargs={"num_classes": 3, "patch_size": 2, "kernel_size": 3},
            input_shape=(2, 4, 5, 6),
            expected_output_shape=(2, 8, 10, 3),
            expected_num_trainable_weights=2,
            expected_num_non_trainable_weights=0,
        )

    def test_serialization_round_trip(self):
        x = np.random.default_rng(3).normal(size=(2, 3, 3, 4)).astype("float32")
        self.run_serialization_round_trip(StructuredPatchPrediction(3), x)

    def test_mixed_precision(self):
        x = np.random.default_rng(4).normal(size=(1, 3, 3, 4)).astype("float32")
        layer = StructuredPatchPrediction(3, dtype="mixed_float16")
        out = layer(x)
        self.assertEqual(keras.backend.standardize_dtype(out.dtype), "float16")
        self.assertEqual(layer.conv.kernel.dtype, "float32")

    def test_compute_output_shape_with_unknown_dims(self):
        layer = StructuredPatchPrediction(5, patch_size=2)
        self.assertEqual(
            layer.compute_output_shape((None, None, 7, 3)), (None, None, 14, 5)
        )

    def test_rejects_bad_options(self):
        for kwargs, match in [
            ({"num_classes": 0}, "num_classes"),
            ({"num_classes": 2, "patch_size": 0}, "patch_size"),
            ({"num_classes": 2, "patch_size": 1.5}, "patch_size"),
            ({"num_classes": 2, "kernel_size": -1}, "kernel_size"),
        ]:
            with pytest.raises(ValueError, match=match):
                StructuredPatchPrediction(**kwargs)

    def test_rejects_bad_input(self):
        with pytest.raises(ValueError, match="expected ndim=4"):
            StructuredPatchPrediction(2)(np.zeros((2, 4, 3), "float32"))


class ContextCRFTest(TestCase):
    def _check_numpy(self, inputs, iterations, box_sizes, dilations, seed):
        features, unary = inputs
        layer = ContextCRF(
            unary.shape[-1],
            box_sizes=box_sizes,
            dilations=dilations,
            filters=5,
            iterations=iterations,
        )
        layer.build([features.shape, unary.shape])
        weights = _random_weights(layer, seed)
        expected = _context_crf(
            features.astype("float64"),
            unary.astype("float64"),
            weights,
            box_sizes,
            dilations,
            iterations,
        )
        np.testing.assert_allclose(
            layer([features, unary]), expected, atol=1e-4, rtol=1e-4
        )

    def test_one_iteration_matches_numpy(self):
        self._check_numpy(_inputs(), 1, (1, 3, 9), (1, 3, 9), seed=5)

    def test_two_iterations_match_numpy(self):
        self._check_numpy(_inputs(), 2, (1, 3, 9), (1, 3, 9), seed=6)

    def test_boxes_larger_than_the_image(self):
        # 7- and 9-boxes on a 5×7 map: every window is clipped, some on all sides.
        self._check_numpy(_inputs(seed=7), 2, (3, 9, 7), (2, 1, 1), seed=8)

    def test_same_weights_every_iteration(self):
        layer = ContextCRF(4, filters=5, iterations=3)
        layer(list(_inputs()))
        self.assertLen(layer.trainable_weights, 8)

    def test_unknown_spatial_size(self):
        features, unary = _inputs()
        layer = ContextCRF(4, box_sizes=(1, 3), dilations=(1, 2), filters=5)
        inputs = [keras.Input((None, None, 3)), keras.Input((None, None, 4))]
        model = keras.Model(inputs, layer(inputs))
        self.assertEqual(model.output.shape, (None, None, None, 4))
        np.testing.assert_allclose(
            model([features, unary]), layer([features, unary]), atol=1e-6
        )

    def test_layer(self):
        self.run_layer_test(
            ContextCRF,
            init_kwargs={
                "num_classes": 4,
                "box_sizes": (1, 3),
                "dilations": (1, 2),
                "filters": 5,
                "iterations": 2,
            },
            # A tuple, not a list: TF datasets reject list signatures.
            input_shape=((2, 5, 7, 3), (2, 5, 7, 4)),
            expected_output_shape=(2, 5, 7, 4),
            expected_num_trainable_weights=6,
            expected_num_non_trainable_weights=0,
        )

    def test_serialization_round_trip(self):
        layer = ContextCRF(4, box_sizes=(1, 3), dilations=(1, 2), filters=5)
        self.run_serialization_round_trip(layer, list(_inputs()), atol=1e-5)

    def test_mixed_precision(self):
        features, unary = _inputs()
        reference = ContextCRF(4, filters=5)
        expected = np.asarray(reference([features, unary]))
        layer = ContextCRF(4, filters=5, dtype="mixed_float16")
        layer.build([features.shape, unary.shape])
        layer.set_weights(reference.get_weights())
        out = layer([features, unary])
        self.assertEqual(keras.backend.standardize_dtype(out.dtype), "float16")
        np.testing.assert_allclose(
            np.asarray(out, "float32"), expected, atol=5e-2, rtol=1e-2
        )

    def test_gradients_reach_every_weight(self):
        layer = ContextCRF(4, filters=5)
        grads = weight_gradients(
            layer, list(_inputs()), lambda out: keras.ops.sum(out**2)
        )
        self.assertLen(grads, 8)
        for path, grad in grads.items():
            self.assertIsNotNone(grad, path)
            self.assertTrue(np.any(grad != 0), path)

    def test_xla_matches_eager(self):
        layer = ContextCRF(4, box_sizes=(1, 3, 9), dilations=(1, 2, 9), filters=5)
        self.assert_xla_matches_eager(layer, list(_inputs()))

    def test_compute_output_shape_with_unknown_dims(self):
        layer = ContextCRF(4)
        self.assertEqual(
            layer.compute_output_shape([(None, None, 5, 8), (None, 6, None, 4)]),
            (None, 6, 5, 4),
        )

    def test_rejects_bad_options(self):
        for kwargs, match in [
            ({"box_sizes": (1, 3), "dilations": (1,)}, "same length"),
            ({"box_sizes": (1, 4), "dilations": (1, 2)}, "odd"),
            ({"box_sizes": (0, 3), "dilations": (1, 2)}, "box size"),
            ({"box_sizes": (1, 3), "dilations": (1, 0)}, "dilation"),
            ({"box_sizes": (), "dilations": ()}, "at least one"),
            ({"iterations": 0}, "iterations"),
            ({"filters": 0}, "filters"),
        ]:
            with pytest.raises(ValueError, match=match):
                ContextCRF(3, **kwargs)
        with pytest.raises(ValueError, match="num_classes"):
            ContextCRF(0)

    def test_rejects_bad_inputs(self):
        f, u = _inputs()
        with pytest.raises(ValueError, match="num_classes=3"):
            ContextCRF(3)([f, u])
        with pytest.raises(ValueError, match="same spatial size"):
            ContextCRF(4)([f[:, :4], u])
        with pytest.raises(ValueError, match="expected ndim=4"):
            ContextCRF(4)([f[0], u])
        with pytest.raises(ValueError, match="expects 2 input"):
            ContextCRF(4)(u)
        with pytest.raises(ValueError, match="features, unary_logits"):
            ContextCRF(4).build([f.shape, u.shape, u.shape])
