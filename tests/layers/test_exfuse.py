import keras
import numpy as np
import pytest

from kseg.layers.exfuse import (
    BoundaryRefinement,
    DenselyAdjacentPrediction,
    GlobalConvolution,
    SemanticEmbeddingBranch,
    SemanticSupervisionHead,
    SubPixelUpsample,
)
from kseg.testing import TestCase, input_gradients, numpy_bilinear_resize


def _normal(*shape, seed=0):
    return np.random.default_rng(seed).normal(size=shape).astype("float32")


def _randomize_weights(layer, seed=1):
    rng = np.random.default_rng(seed)
    for weight in layer.weights:
        weight.assign(rng.normal(scale=0.5, size=weight.shape).astype("float32"))


def _numpy(x):
    return np.asarray(keras.ops.convert_to_numpy(x), dtype="float64")


def conv2d_same(x, kernel, bias):
    """Stride-1 "same" convolution with explicit loops (TF padding rule)."""
    x, kernel = np.asarray(x, "float64"), np.asarray(kernel, "float64")
    n, h, w, _ = x.shape
    kh, kw, _, filters = kernel.shape
    top, left = (kh - 1) // 2, (kw - 1) // 2
    out = np.zeros((n, h, w, filters))
    for i in range(h):
        for j in range(w):
            for a in range(kh):
                for b in range(kw):
                    y, z = i + a - top, j + b - left
                    if 0 <= y < h and 0 <= z < w:
                        out[:, i, j] += x[:, y, z] @ kernel[a, b]
    return out + np.asarray(bias, "float64")


def dap_reference(x, k):
    """DAP from the SPEC formula, one output element at a time."""
    x = np.asarray(x, "float64")
    n, h, w, channels = x.shape
    classes, half = channels // (k * k), k // 2
    out = np.zeros((n, h, w, classes))
    for i in range(h):
        for j in range(w):
            for c in range(classes):
                for l in range(k):
                    for m in range(k):
                        y, z = i + l - half, j + m - half
                        if 0 <= y < h and 0 <= z < w:
                            out[:, i, j, c] += x[:, y, z, c * k * k + l * k + m]
    return out / (k * k)


class GlobalConvolutionTest(TestCase):
    def test_matches_numpy(self):
        layer = GlobalConvolution(4, kernel_size=5)
        x = _normal(2, 6, 7, 3)
        layer.build(x.shape)
        _randomize_weights(layer)
        self.assertEqual(layer.conv_a1.kernel.shape, (5, 1, 3, 4))
        self.assertEqual(layer.conv_a2.kernel.shape, (1, 5, 4, 4))
        self.assertEqual(layer.conv_b1.kernel.shape, (1, 5, 3, 4))
        self.assertEqual(layer.conv_b2.kernel.shape, (5, 1, 4, 4))

        def apply(conv, inputs):
            return conv2d_same(inputs, _numpy(conv.kernel), _numpy(conv.bias))

        branch_a = apply(layer.conv_a2, apply(layer.conv_a1, x))
        branch_b = apply(layer.conv_b2, apply(layer.conv_b1, x))
        np.testing.assert_allclose(
            _numpy(layer(x)), branch_a + branch_b, rtol=1e-5, atol=1e-5
        )

    def test_layer(self):
        self.run_layer_test(
            GlobalConvolution,
            init_kwargs={"filters": 4, "kernel_size": 3},
            input_shape=(2, 5, 6, 3),
            expected_output_shape=(2, 5, 6, 4),
            expected_num_trainable_weights=8,
            expected_num_non_trainable_weights=0,
        )

    def test_default_kernel_size_is_15(self):
        layer = GlobalConvolution(2)
        layer.build((None, None, None, 3))
        self.assertEqual(layer.conv_a1.kernel.shape, (15, 1, 3, 2))
        self.assertEqual(layer.compute_output_shape((None, None, None, 3))[-1], 2)

    def test_serialization_round_trip(self):
        self.run_serialization_round_trip(
            GlobalConvolution(3, kernel_size=3), _normal(1, 5, 5, 2)
        )

    def test_rejects_bad_options_and_rank(self):
        with pytest.raises(ValueError, match="filters"):
            GlobalConvolution(0)
        with pytest.raises(ValueError, match="kernel_size"):
            GlobalConvolution(4, kernel_size=2.5)
        with pytest.raises(TypeError, match="unexpected keyword argument"):
            GlobalConvolution(4, padding="valid")
        with pytest.raises(ValueError, match="ndim=4"):
            GlobalConvolution(4)(np.zeros((2, 8, 3), "float32"))


class BoundaryRefinementTest(TestCase):
    def test_matches_numpy(self):
        layer = BoundaryRefinement()
        x = _normal(2, 5, 4, 3)
        layer.build(x.shape)
        _randomize_weights(layer)
        conv1, conv2 = layer.conv1, layer.conv2
        hidden = conv2d_same(x, _numpy(conv1.kernel), _numpy(conv1.bias))
        expected = x + conv2d_same(
            np.maximum(hidden, 0), _numpy(conv2.kernel), _numpy(conv2.bias)
        )
        self.assertEqual(conv1.kernel.shape, (3, 3, 3, 3))
        np.testing.assert_allclose(_numpy(layer(x)), expected, rtol=1e-5, atol=1e-5)

    def test_layer(self):
        self.run_layer_test(
            BoundaryRefinement,
            init_kwargs={},
            input_shape=(2, 5, 6, 3),
            expected_output_shape=(2, 5, 6, 3),
            expected_num_trainable_weights=4,
            expected_num_non_trainable_weights=0,
        )

    def test_serialization_round_trip(self):
        self.run_serialization_round_trip(BoundaryRefinement(), _normal(1, 4, 4, 2))

    def test_rejects_bad_input(self):
        with pytest.raises(ValueError, match="ndim=4"):
            BoundaryRefinement()(np.zeros((2, 4, 4, 4, 2), "float32"))
        with pytest.raises(ValueError, match="channel"):
            BoundaryRefinement().build((None, 4, 4, None))
        with pytest.raises(TypeError, match="unexpected keyword argument"):
            BoundaryRefinement(filters=3)


class SemanticEmbeddingBranchTest(TestCase):
    def test_matches_numpy_with_three_levels(self):
        layer = SemanticEmbeddingBranch(3)
        inputs = [
            _normal(2, 6, 8, 2, seed=0),
            _normal(2, 3, 4, 4, seed=1),
            _normal(2, 2, 3, 5, seed=2),
        ]
        layer.build([x.shape for x in inputs])
        _randomize_weights(layer)
        self.assertEqual(len(layer.convs), 3)
        expected = np.ones((2, 6, 8, 3))
        for conv, x in zip(layer.convs, inputs, strict=True):
            self.assertEqual(conv.kernel.shape, (3, 3, x.shape[-1], 3))
            y = conv2d_same(x, _numpy(conv.kernel), _numpy(conv.bias))
            expected *= numpy_bilinear_resize(y, (6, 8))
        np.testing.assert_allclose(
            _numpy(layer(inputs)), expected, rtol=1e-4, atol=1e-4
        )

    def test_layer(self):
        self.run_layer_test(
            SemanticEmbeddingBranch,
            init_kwargs={"filters": 4},
            input_shape=((2, 6, 6, 3), (2, 3, 3, 5)),
            expected_output_shape=(2, 6, 6, 4),
            expected_num_trainable_weights=4,
            expected_num_non_trainable_weights=0,
        )

    def test_dynamic_spatial_size(self):
        low = keras.Input((None, None, 2))
        high = keras.Input((None, None, 3))
        model = keras.Model([low, high], SemanticEmbeddingBranch(2)([low, high]))
        out = model([_normal(1, 8, 6, 2), _normal(1, 4, 3, 3)])
        self.assertEqual(tuple(out.shape), (1, 8, 6, 2))

    def test_serialization_round_trip(self):
        self.run_serialization_round_trip(
            SemanticEmbeddingBranch(2), [_normal(1, 4, 4, 2), _normal(1, 2, 2, 3)]
        )

    def test_rejects_bad_input(self):
        x = np.zeros((1, 4, 4, 2), "float32")
        with pytest.raises(ValueError, match="list of at least 2"):
            SemanticEmbeddingBranch(2)(x)
        with pytest.raises(ValueError, match="list of at least 2"):
            SemanticEmbeddingBranch(2)([x])
        with pytest.raises(ValueError, match="rank 4"):
            SemanticEmbeddingBranch(2)([x, np.zeros((1, 2, 2), "float32")])
        with pytest.raises(ValueError, match="filters"):
            SemanticEmbeddingBranch(-1)
        with pytest.raises(TypeError, match="unexpected keyword argument"):
            SemanticEmbeddingBranch(2, mode="sum")


class SubPixelUpsampleTest(TestCase):
    def test_matches_dcr_ordering(self):
        s, c = 3, 2
        x = _normal(2, 2, 3, c * s * s)
        expected = np.zeros((2, 2 * s, 3 * s, c))
        for i in range(2):
            for j in range(3):
                for a in range(s):
                    for b in range(s):
                        for ch in range(c):
                            expected[:, i * s + a, j * s + b, ch] = x[
                                :, i, j, (a * s + b) * c + ch
                            ]
        out = SubPixelUpsample(s)(x)
        np.testing.assert_array_equal(_numpy(out), expected)

    def test_layer(self):
        self.run_layer_test(
            SubPixelUpsample,
            init_kwargs={"scale": 2},
            input_shape=(2, 3, 4, 8),
            expected_output_shape=(2, 6, 8, 2),
            expected_num_trainable_weights=0,
            expected_num_non_trainable_weights=0,
            run_training_check=False,
        )

    def test_output_shape_with_unknown_dims(self):
        layer = SubPixelUpsample(2)
        self.assertEqual(
            layer.compute_output_shape((None, None, 5, 12)), (None, None, 10, 3)
        )

    def test_serialization_round_trip(self):
        self.run_serialization_round_trip(SubPixelUpsample(2), _normal(1, 2, 2, 4))

    def test_rejects_bad_input(self):
        with pytest.raises(ValueError, match="divisible"):
            SubPixelUpsample(2)(np.zeros((1, 2, 2, 6), "float32"))
        with pytest.raises(ValueError, match="scale"):
            SubPixelUpsample(0)
        with pytest.raises(ValueError, match="ndim=4"):
            SubPixelUpsample(2)(np.zeros((1, 2, 8), "float32"))
        with pytest.raises(TypeError, match="unexpected keyword argument"):
            SubPixelUpsample(2, interpolation="nearest")


class DenselyAdjacentPredictionTest(TestCase):
    def test_matches_formula_k3(self):
        x = _normal(2, 5, 7, 2 * 9)
        out = _numpy(DenselyAdjacentPrediction(3)(x))
        np.testing.assert_allclose(out, dap_reference(x, 3), atol=1e-6)

    def test_matches_formula_k5(self):
        x = _normal(1, 6, 4, 3 * 25, seed=3)
        out = _numpy(DenselyAdjacentPrediction(5)(x))
        np.testing.assert_allclose(out, dap_reference(x, 5), atol=1e-6)

    def test_corner_pixels_by_hand(self):
        k, classes, h, w = 3, 3, 4, 6
        x = _normal(1, h, w, classes * 9, seed=4)[0].astype("float64")
        out = _numpy(DenselyAdjacentPrediction(k)(x[None]))[0]

        def g(l, m):
            return l * k + m

        for c in range(classes):
            base = c * k * k
            # Top-left: only groups with l, m >= 1 read inside the image.
            top_left = sum(
                x[l - 1, m - 1, base + g(l, m)] for l in (1, 2) for m in (1, 2)
            )
            # Bottom-right: only groups with l, m <= 1.
            bottom_right = sum(
                x[h - 2 + l, w - 2 + m, base + g(l, m)] for l in (0, 1) for m in (0, 1)
            )
            # Top-right: l >= 1 and m <= 1.
            top_right = sum(
                x[l - 1, w - 2 + m, base + g(l, m)] for l in (1, 2) for m in (0, 1)
            )
            np.testing.assert_allclose(
                [out[0, 0, c], out[h - 1, w - 1, c], out[0, w - 1, c]],
                np.array([top_left, bottom_right, top_right]) / 9,
                atol=1e-6,
            )

    def test_shift_direction_with_one_group(self):
        k, classes = 3, 2
        x = np.zeros((1, 5, 6, classes * 9), "float32")
        # Class 1, group (l, m) = (0, 2): output (i, j) reads x[i - 1, j + 1].
        x[0, 2, 3, 1 * 9 + 0 * 3 + 2] = 9.0
        out = _numpy(DenselyAdjacentPrediction(k)(x))[0]
        expected = np.zeros((5, 6, classes))
        expected[3, 2, 1] = 1.0
        np.testing.assert_allclose(out, expected, atol=1e-7)

    def test_classes_keep_their_own_maps(self):
        x = np.zeros((1, 3, 3, 2 * 9), "float32")
        # Every group of class 0 is one; class 1 must not see any of it.
        x[..., :9] = 1.0
        out = _numpy(DenselyAdjacentPrediction(3)(x))[0]
        np.testing.assert_array_equal(out[..., 1], 0.0)
        # Border pixels still divide by k², so they see fewer votes.
        np.testing.assert_allclose(
            out[..., 0],
            [[4 / 9, 6 / 9, 4 / 9], [6 / 9, 1, 6 / 9], [4 / 9, 6 / 9, 4 / 9]],
        )

    def test_window_size_one_is_identity(self):
        x = _normal(1, 3, 4, 5)
        out = DenselyAdjacentPrediction(1)(x)
        np.testing.assert_allclose(_numpy(out), x, atol=0)

    def test_layer(self):
        self.run_layer_test(
            DenselyAdjacentPrediction,
            init_kwargs={"window_size": 3},
            input_shape=(2, 4, 5, 18),
            expected_output_shape=(2, 4, 5, 2),
            expected_num_trainable_weights=0,
            expected_num_non_trainable_weights=0,
            run_training_check=False,
        )

    def test_xla_and_dynamic_shape(self):
        x = _normal(2, 5, 4, 2 * 9)
        self.assert_xla_matches_eager(DenselyAdjacentPrediction(3), x)
        inputs = keras.Input((None, None, 18))
        model = keras.Model(inputs, DenselyAdjacentPrediction(3)(inputs))
        np.testing.assert_allclose(_numpy(model(x)), dap_reference(x, 3), atol=1e-6)

    def test_gradient_is_the_transposed_shift(self):
        x = _normal(1, 4, 4, 9)
        layer = DenselyAdjacentPrediction(3)
        (grad,) = input_gradients(layer, x)
        # Input (y, z) in group (l, m) feeds output (y - l + 1, z - m + 1).
        expected = np.zeros((4, 4, 9))
        for y in range(4):
            for z in range(4):
                for l in range(3):
                    for m in range(3):
                        if 0 <= y - l + 1 < 4 and 0 <= z - m + 1 < 4:
                            expected[y, z, l * 3 + m] = 1 / 9
        np.testing.assert_allclose(grad[0], expected, atol=1e-7)

    def test_serialization_round_trip(self):
        self.run_serialization_round_trip(
            DenselyAdjacentPrediction(3), _normal(1, 3, 4, 18)
        )

    def test_rejects_bad_input(self):
        with pytest.raises(ValueError, match="divisible"):
            DenselyAdjacentPrediction(3)(np.zeros((1, 4, 4, 10), "float32"))
        with pytest.raises(ValueError, match="odd"):
            DenselyAdjacentPrediction(4)
        with pytest.raises(ValueError, match="window_size"):
            DenselyAdjacentPrediction(0)
        with pytest.raises(ValueError, match="window_size"):
            DenselyAdjacentPrediction(3.0)
        with pytest.raises(ValueError, match="ndim=4"):
            DenselyAdjacentPrediction(3)(np.zeros((1, 4, 9), "float32"))
        with pytest.raises(TypeError, match="unexpected keyword argument"):
            DenselyAdjacentPrediction(3, padding="same")


class SemanticSupervisionHeadTest(TestCase):
    def test_matches_numpy_in_inference(self):
        layer = SemanticSupervisionHead(5, filters=3)
        x = _normal(2, 4, 5, 2)
        layer.build(x.shape)
        _randomize_weights(layer)
        for block in (layer.conv1, layer.conv2):
            block.bn.moving_variance.assign(np.full((3,), 0.8, "float32"))

        def conv_bn_relu(block, inputs):
            bn = block.bn
            y = conv2d_same(inputs, _numpy(block.conv.kernel), 0.0)
            y = (y - _numpy(bn.moving_mean)) / np.sqrt(
                _numpy(bn.moving_variance) + bn.epsilon
            )
            return np.maximum(y * _numpy(bn.gamma) + _numpy(bn.beta), 0)

        feature = conv_bn_relu(layer.conv2, conv_bn_relu(layer.conv1, x))
        logits = feature.mean(axis=(1, 2)) @ _numpy(layer.classifier.kernel) + _numpy(
            layer.classifier.bias
        )
        got_logits, got_feature = layer(x, training=False)
        np.testing.assert_allclose(_numpy(got_feature), feature, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(_numpy(got_logits), logits, rtol=1e-4, atol=1e-4)

    def test_layer(self):
        self.run_layer_test(
            SemanticSupervisionHead,
            init_kwargs={"num_classes": 5, "filters": 6},
            input_shape=(2, 4, 4, 3),
            expected_output_shape=((2, 5), (2, 4, 4, 6)),
            expected_num_trainable_weights=8,
            expected_num_non_trainable_weights=4,
        )

    def test_filters_default_to_input_channels(self):
        logits, feature = SemanticSupervisionHead(7)(_normal(2, 4, 4, 3))
        self.assertEqual(tuple(logits.shape), (2, 7))
        self.assertEqual(tuple(feature.shape), (2, 4, 4, 3))

    def test_serialization_round_trip(self):
        self.run_serialization_round_trip(
            SemanticSupervisionHead(4, filters=2), _normal(1, 4, 4, 3)
        )

    def test_rejects_bad_input(self):
        with pytest.raises(ValueError, match="num_classes"):
            SemanticSupervisionHead(0)
        with pytest.raises(ValueError, match="filters"):
            SemanticSupervisionHead(3, filters=0)
        with pytest.raises(ValueError, match="ndim=4"):
            SemanticSupervisionHead(3)(np.zeros((2, 4, 3), "float32"))
        with pytest.raises(TypeError, match="unexpected keyword argument"):
            SemanticSupervisionHead(3, pooling="max")


@pytest.mark.parametrize(
    "layer_fn, inputs",
    [
        (lambda **kw: GlobalConvolution(2, 3, **kw), [(1, 4, 4, 3)]),
        (lambda **kw: BoundaryRefinement(**kw), [(1, 4, 4, 3)]),
        (
            lambda **kw: SemanticEmbeddingBranch(2, **kw),
            [(1, 4, 4, 3), (1, 2, 2, 2)],
        ),
        (lambda **kw: SubPixelUpsample(2, **kw), [(1, 2, 2, 8)]),
        (lambda **kw: DenselyAdjacentPrediction(3, **kw), [(1, 4, 4, 18)]),
        (lambda **kw: SemanticSupervisionHead(3, **kw), [(1, 4, 4, 2)]),
    ],
)
def test_mixed_precision_matches_float32(layer_fn, inputs):
    xs = [_normal(*shape, seed=i) for i, shape in enumerate(inputs)]
    xs = xs if len(xs) > 1 else xs[0]
    reference = layer_fn()
    reference.build([x.shape for x in xs] if isinstance(xs, list) else xs.shape)
    _randomize_weights(reference)
    expected = [_numpy(t) for t in keras.tree.flatten(reference(xs))]
    layer = layer_fn(dtype="mixed_float16")
    layer.build([x.shape for x in xs] if isinstance(xs, list) else xs.shape)
    layer.set_weights(reference.get_weights())
    out = keras.tree.flatten(layer(xs))
    for tensor, want in zip(out, expected, strict=True):
        assert keras.backend.standardize_dtype(tensor.dtype) == "float16"
        # float16 keeps ~3 significant digits; values are of order 1-10.
        scale = max(np.abs(want).max(), 1.0)
        np.testing.assert_allclose(_numpy(tensor), want, rtol=1e-2, atol=1e-2 * scale)
    for weight in layer.weights:
        assert keras.backend.standardize_dtype(weight.dtype) == "float32"
