import keras
import numpy as np
import pytest

from kseg.layers.segmodel import (
    ContextCRF,
    LearnableUpsampling,
    StructuredPatchPrediction,
    bilinear_upsampling_kernel,
)
from kseg.testing import (
    TestCase,
    input_gradients,
    numpy_bilinear_resize,
    weight_gradients,
)


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


def _patch_reference(x, kernel, bias, n, classes):
    """Structured patch prediction, float64: conv, then channel
    `(a·n + b)·C + c` of position `(i, j)` to pixel `(i·n + a, j·n + b)`."""
    conv = _conv_same(x.astype("float64"), kernel, bias)
    batch, height, width, _ = x.shape
    expected = np.zeros((batch, height * n, width * n, classes))
    for i in range(height):
        for j in range(width):
            for a in range(n):
                for b in range(n):
                    for c in range(classes):
                        channel = (a * n + b) * classes + c
                        expected[:, i * n + a, j * n + b, c] = conv[:, i, j, channel]
    return expected


class StructuredPatchPredictionTest(TestCase):
    def test_matches_numpy(self):
        for kernel_size in (1, 3):
            classes, n = 3, 2
            x = np.random.default_rng(1).normal(size=(2, 3, 4, 5)).astype("float32")
            layer = StructuredPatchPrediction(classes, n, kernel_size=kernel_size)
            layer.build(x.shape)
            kernel, bias = _random_weights(layer, kernel_size)
            expected = _patch_reference(x, kernel, bias, n, classes)
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
        layer = StructuredPatchPrediction(3, kernel_size=3, dtype="mixed_float16")
        layer.build(x.shape)
        kernel, bias = _random_weights(layer, 4)
        out = layer(x)
        self.assertEqual(keras.backend.standardize_dtype(out.dtype), "float16")
        self.assertEqual(layer.conv.kernel.dtype, "float32")
        # The float32 layer is exact to 1e-5 (test_matches_numpy); float16
        # keeps ~3 significant digits of these logits (|z| < 10).
        float32_layer = StructuredPatchPrediction(3, kernel_size=3)
        float32_layer.build(x.shape)
        float32_layer.set_weights(layer.get_weights())
        expected = _patch_reference(x, kernel, bias, 2, 3)
        np.testing.assert_allclose(float32_layer(x), expected, atol=1e-5)
        np.testing.assert_allclose(
            np.asarray(out, "float32"), expected, atol=2e-2, rtol=1e-2
        )

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
        weights = _random_weights(layer, 9)
        expected = _context_crf(
            features.astype("float64"),
            unary.astype("float64"),
            weights,
            (1, 3),
            (1, 2),
            iterations=2,
        )
        np.testing.assert_allclose(
            model([features, unary]), expected, atol=1e-4, rtol=1e-4
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

    def test_weight_gradients_match_finite_differences(self):
        # d/dε of the float64 NumPy CRF along one random direction per
        # weight, against the autodiff gradient projected on it.
        features, unary = _inputs(shape=(1, 4, 5))
        box_sizes, dilations = (1, 3, 9), (1, 3, 9)
        layer = ContextCRF(
            4, box_sizes=box_sizes, dilations=dilations, filters=5, iterations=2
        )
        layer.build([features.shape, unary.shape])
        weights = _random_weights(layer, 10)
        target = np.random.default_rng(11).normal(size=unary.shape)

        def loss(ws):
            out = _context_crf(
                features.astype("float64"),
                unary.astype("float64"),
                ws,
                box_sizes,
                dilations,
                2,
            )
            return np.sum(out * target)

        grads = weight_gradients(
            layer,
            [features, unary],
            lambda out: keras.ops.sum(out * target.astype("float32")),
        )
        self.assertLen(grads, 8)
        rng = np.random.default_rng(12)
        eps = 1e-5
        for index, weight in enumerate(layer.trainable_weights):
            direction = rng.normal(size=weight.shape)
            plus, minus = list(weights), list(weights)
            plus[index] = weights[index] + eps * direction
            minus[index] = weights[index] - eps * direction
            numeric = (loss(plus) - loss(minus)) / (2 * eps)
            analytic = np.sum(grads[weight.path] * direction)
            np.testing.assert_allclose(
                analytic, numeric, rtol=1e-3, atol=1e-3, err_msg=weight.path
            )

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


def _transposed_conv_reference(x, kernel, factor):
    """`LearnableUpsampling` from its definition, float64: every input pixel
    `i` of the edge-extended map (`-1 <= i <= h`) adds
    `x[i] · kernel[o - factor·i + (k - factor) // 2]` to output pixel `o`."""
    x = np.asarray(x, "float64")
    n, h, w, c = x.shape
    k = kernel.shape[0]
    offset = (k - factor) // 2
    extended = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
    out = np.zeros((n, h * factor, w * factor, c))
    for i in range(-1, h + 1):
        for j in range(-1, w + 1):
            for ty in range(k):
                for tx in range(k):
                    oy, ox = factor * i + ty - offset, factor * j + tx - offset
                    if 0 <= oy < h * factor and 0 <= ox < w * factor:
                        out[:, oy, ox] += extended[:, i + 1, j + 1] * kernel[ty, tx]
    return out


class LearnableUpsamplingTest(TestCase):
    def test_bilinear_taps(self):
        taps = {
            1: [1],
            2: np.array([1, 3, 3, 1]) / 4,
            3: np.array([1, 2, 3, 2, 1]) / 3,
            4: np.array([1, 3, 5, 7, 7, 5, 3, 1]) / 8,
        }
        for factor, expected in taps.items():
            np.testing.assert_allclose(bilinear_upsampling_kernel(factor), expected)

    def test_initial_layer_equals_bilinear_resize_everywhere(self):
        # Borders included: the edge-extended input reproduces the resize's
        # clamped sampling, so every output pixel matches to float rounding.
        x = np.random.default_rng(13).normal(size=(2, 5, 3, 4)).astype("float32")
        for factor in (1, 2, 3, 4):
            out = np.asarray(LearnableUpsampling(factor)(x))
            expected = numpy_bilinear_resize(x, (5 * factor, 3 * factor))
            self.assertEqual(out.shape, expected.shape)
            np.testing.assert_allclose(out, expected, atol=1e-5, err_msg=factor)

    def test_learned_kernel_matches_numpy(self):
        x = np.random.default_rng(14).normal(size=(2, 4, 3, 3)).astype("float32")
        for factor in (2, 3, 4):
            layer = LearnableUpsampling(factor)
            layer.build(x.shape)
            (kernel,) = _random_weights(layer, factor)
            self.assertEqual(kernel.shape, (2 * factor - factor % 2,) * 2 + (3,))
            np.testing.assert_allclose(
                layer(x), _transposed_conv_reference(x, kernel, factor), atol=1e-5
            )

    def test_kernel_gradient_is_the_analytic_one(self):
        # The output is linear in the kernel: the gradient of sum(out · w)
        # with respect to kernel[ty, tx, c] is the reference evaluated with
        # a one-hot kernel, times w.
        factor = 2
        x = np.random.default_rng(15).normal(size=(1, 3, 4, 2)).astype("float32")
        target = np.random.default_rng(16).normal(size=(1, 6, 8, 2))
        layer = LearnableUpsampling(factor)
        grads = weight_gradients(
            layer, x, lambda out: keras.ops.sum(out * target.astype("float32"))
        )
        (grad,) = grads.values()
        expected = np.zeros(grad.shape)
        for index in np.ndindex(*grad.shape):
            one_hot = np.zeros(grad.shape)
            one_hot[index] = 1.0
            expected[index] = np.sum(
                _transposed_conv_reference(x, one_hot, factor) * target
            )
        np.testing.assert_allclose(grad, expected, atol=1e-4, rtol=1e-5)

    def test_input_gradient_is_the_transposed_map(self):
        # d sum(out · w) / dx is the adjoint of the linear map x → out.
        factor = 3
        x = np.random.default_rng(17).normal(size=(1, 3, 2, 1)).astype("float32")
        target = np.random.default_rng(18).normal(size=(1, 9, 6, 1))
        layer = LearnableUpsampling(factor)
        layer.build(x.shape)
        (kernel,) = _random_weights(layer, 19)
        (grad,) = input_gradients(
            lambda inputs: layer(inputs) * target.astype("float32"), x
        )
        expected = np.zeros(x.shape)
        for index in np.ndindex(*x.shape):
            one_hot = np.zeros(x.shape)
            one_hot[index] = 1.0
            expected[index] = np.sum(
                _transposed_conv_reference(one_hot, kernel, factor) * target
            )
        np.testing.assert_allclose(grad, expected, atol=1e-4, rtol=1e-5)

    def test_unknown_spatial_size(self):
        x = np.random.default_rng(20).normal(size=(2, 3, 5, 2)).astype("float32")
        inputs = keras.Input((None, None, 2))
        layer = LearnableUpsampling(4)
        model = keras.Model(inputs, layer(inputs))
        self.assertEqual(model.output.shape, (None, None, None, 2))
        self.assertEqual(
            layer.compute_output_shape((None, 3, None, 2)), (None, 12, None, 2)
        )
        np.testing.assert_allclose(
            model(x), numpy_bilinear_resize(x, (12, 20)), atol=1e-5
        )

    def test_layer(self):
        self.run_layer_test(
            LearnableUpsampling,
            init_kwargs={"factor": 2},
            input_shape=(2, 3, 4, 5),
            expected_output_shape=(2, 6, 8, 5),
            expected_num_trainable_weights=1,
            expected_num_non_trainable_weights=0,
        )

    def test_serialization_round_trip(self):
        x = np.random.default_rng(21).normal(size=(2, 3, 3, 2)).astype("float32")
        layer = LearnableUpsampling(4)
        layer.build(x.shape)
        _random_weights(layer, 22)
        restored = self.run_serialization_round_trip(layer, x, atol=1e-6)
        self.assertEqual(restored.layers[-1].factor, 4)

    def test_mixed_precision(self):
        x = np.random.default_rng(23).normal(size=(1, 4, 4, 3)).astype("float32")
        layer = LearnableUpsampling(4, dtype="mixed_float16")
        out = layer(x)
        self.assertEqual(keras.backend.standardize_dtype(out.dtype), "float16")
        self.assertEqual(layer.kernel.dtype, "float32")
        np.testing.assert_allclose(
            np.asarray(out, "float32"),
            numpy_bilinear_resize(x, (16, 16)),
            atol=1e-2,
            rtol=1e-2,
        )

    def test_xla_matches_eager(self):
        x = np.random.default_rng(24).normal(size=(2, 3, 5, 2)).astype("float32")
        self.assert_xla_matches_eager(LearnableUpsampling(2), x)

    def test_rejects_bad_options_and_inputs(self):
        for factor in (0, 1.5, True):
            with pytest.raises(ValueError, match="factor"):
                LearnableUpsampling(factor)
        with pytest.raises(ValueError, match="expected ndim=4"):
            LearnableUpsampling(2)(np.zeros((2, 4, 3), "float32"))
