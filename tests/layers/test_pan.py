import keras
import numpy as np
import pytest

from kseg.layers.pan import FeaturePyramidAttention, GlobalAttentionUpsample
from kseg.testing import TestCase, numpy_bilinear_resize

BN_EPSILON = 1e-3  # Keras BatchNormalization default, used by ConvBNReLU.


# --- NumPy float64 reference, written from SPEC "PAN" -----------------------


def np_conv_same(x, kernel, bias=None):
    """Stride-1 convolution with "same" zero padding (odd kernels)."""
    kh, kw = kernel.shape[:2]
    n, h, w, _ = x.shape
    padded = np.pad(x, ((0, 0), (kh // 2, kh // 2), (kw // 2, kw // 2), (0, 0)))
    out = np.zeros((n, h, w, kernel.shape[-1]))
    for i in range(h):
        for j in range(w):
            for a in range(kh):
                for b in range(kw):
                    out[:, i, j] += padded[:, i + a, j + b] @ kernel[a, b]
    return out if bias is None else out + bias


def np_batch_norm(x, gamma, beta, mean, variance):
    return (x - mean) / np.sqrt(variance + BN_EPSILON) * gamma + beta


def np_relu(x):
    return np.maximum(x, 0.0)


def np_conv_bn(x, block, relu=True):
    """Conv (no bias) → BN (inference) → optional ReLU with `block`'s weights."""
    kernel = to_f64(block.conv.kernel)
    gamma, beta, mean, variance = (
        to_f64(w)
        for w in (
            block.bn.gamma,
            block.bn.beta,
            block.bn.moving_mean,
            block.bn.moving_variance,
        )
    )
    y = np_batch_norm(np_conv_same(x, kernel), gamma, beta, mean, variance)
    return np_relu(y) if relu else y


def np_pool_same(x, mode):
    """2×2 pooling, stride 2, "same" padding: windows clipped to the image."""
    n, h, w, c = x.shape
    out_h, out_w = -(-h // 2), -(-w // 2)
    out = np.zeros((n, out_h, out_w, c))
    for i in range(out_h):
        for j in range(out_w):
            window = x[:, 2 * i : min(2 * i + 2, h), 2 * j : min(2 * j + 2, w)]
            if mode == "avg":
                out[:, i, j] = window.mean(axis=(1, 2))
            else:
                out[:, i, j] = window.max(axis=(1, 2))
    return out


def np_resize_like(x, reference):
    return numpy_bilinear_resize(x, reference.shape[1:3])


def np_sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def np_fpa(layer, x):
    x = x.astype("float64")
    main = np_conv_bn(x, layer.main)
    if layer.attention == "pyramid":
        levels = []
        d = x
        for down_conv, level_conv in zip(
            layer.down_convs, layer.level_convs, strict=True
        ):
            d = np_conv_bn(np_pool_same(d, layer.pooling), down_conv)
            levels.append(np_conv_bn(d, level_conv))
        e1, e2, e3 = levels
        u2 = np_resize_like(e3, e2) + e2
        u1 = np_resize_like(u2, e1) + e1
        attention = np_resize_like(u1, x)
    else:
        pooled = x.mean(axis=(1, 2), keepdims=True)
        hidden = np_relu(
            np_conv_same(
                pooled, to_f64(layer.se_reduce.kernel), to_f64(layer.se_reduce.bias)
            )
        )
        attention = np_sigmoid(
            np_conv_same(
                hidden, to_f64(layer.se_expand.kernel), to_f64(layer.se_expand.bias)
            )
        )
    out = main * attention
    if layer.global_pooling:
        pooled = x.mean(axis=(1, 2), keepdims=True)
        out = out + np_resize_like(np_conv_bn(pooled, layer.global_branch), x)
    return out


def np_gau(layer, low, high):
    low, high = low.astype("float64"), high.astype("float64")
    out = np_conv_bn(low, layer.low_conv, relu=False)
    if layer.global_context:
        pooled = high.mean(axis=(1, 2), keepdims=True)
        out = out * np_conv_bn(pooled, layer.context)
    if high.shape[-1] != layer.filters:
        high = np_conv_bn(high, layer.high_projection)
    return out + np_resize_like(high, low)


# --- helpers -----------------------------------------------------------------


def to_f64(variable):
    return np.asarray(keras.ops.convert_to_numpy(variable), dtype="float64")


def randomize_weights(layer, seed=0):
    """Sets every weight of `layer` (BN moving statistics included) to fixed
    random values, so that no weight sits at its trivial initial value."""
    rng = np.random.default_rng(seed)
    for weight in layer.weights:
        shape = tuple(weight.shape)
        name = weight.path.split("/")[-1]
        if name == "kernel":
            fan_in = int(np.prod(shape[:-1]))
            value = rng.normal(size=shape) / np.sqrt(fan_in)
        elif name in ("gamma", "moving_variance"):
            value = rng.uniform(0.5, 1.5, size=shape)
        else:
            value = rng.normal(scale=0.5, size=shape)
        weight.assign(value.astype(weight.dtype))


def random_inputs(*shapes, seed=1):
    rng = np.random.default_rng(seed)
    return [rng.normal(size=s).astype("float32") for s in shapes]


# --- FeaturePyramidAttention -------------------------------------------------


class FeaturePyramidAttentionTest(TestCase):
    def check_against_numpy(self, layer, shape):
        (x,) = random_inputs(shape)
        layer.build(shape)
        randomize_weights(layer)
        got = keras.ops.convert_to_numpy(layer(x, training=False))
        np.testing.assert_allclose(got, np_fpa(layer, x), rtol=1e-4, atol=1e-4)
        return layer

    def test_default_matches_numpy_odd_size(self):
        layer = self.check_against_numpy(FeaturePyramidAttention(4), (2, 9, 7, 3))
        # C357: the 7×7 convs sit at the largest pyramid level.
        self.assertEqual(
            [tuple(c.conv.kernel.shape[:2]) for c in layer.down_convs],
            [(7, 7), (5, 5), (3, 3)],
        )
        self.assertEqual(
            [tuple(c.conv.kernel.shape[:2]) for c in layer.level_convs],
            [(7, 7), (5, 5), (3, 3)],
        )

    def test_c333_max_pooling_without_global_branch_matches_numpy(self):
        layer = FeaturePyramidAttention(
            3, kernel_sizes=(3, 3, 3), pooling="max", global_pooling=False
        )
        self.check_against_numpy(layer, (2, 6, 11, 2))
        self.assertIsNone(layer.global_branch)

    def test_se_attention_matches_numpy(self):
        layer = self.check_against_numpy(
            FeaturePyramidAttention(4, attention="se"), (2, 5, 6, 3)
        )
        self.assertEqual(tuple(layer.se_reduce.kernel.shape), (1, 1, 3, 1))
        self.assertEqual(tuple(layer.se_expand.kernel.shape), (1, 1, 1, 4))
        self.assertEqual(layer.down_convs, [])

    def test_se_bottleneck_is_filters_over_16(self):
        layer = FeaturePyramidAttention(48, attention="se")
        layer.build((1, 4, 4, 8))
        self.assertEqual(tuple(layer.se_reduce.kernel.shape), (1, 1, 8, 3))

    def test_layer(self):
        self.run_layer_test(
            FeaturePyramidAttention,
            init_kwargs={"filters": 4},
            input_shape=(2, 8, 6, 3),
            expected_output_shape=(2, 8, 6, 4),
            expected_num_trainable_weights=24,
            expected_num_non_trainable_weights=16,
        )

    def test_layer_se(self):
        self.run_layer_test(
            FeaturePyramidAttention,
            init_kwargs={"filters": 4, "attention": "se", "global_pooling": False},
            input_shape=(2, 5, 5, 3),
            expected_output_shape=(2, 5, 5, 4),
            expected_num_trainable_weights=7,
            expected_num_non_trainable_weights=2,
        )

    def test_dynamic_spatial_size(self):
        layer = FeaturePyramidAttention(2, kernel_sizes=(3, 3, 3))
        inputs = keras.Input(shape=(None, None, 3))
        model = keras.Model(inputs, layer(inputs))
        self.assertEqual(tuple(model.output.shape), (None, None, None, 2))
        randomize_weights(layer)
        for shape in [(1, 5, 3, 3), (1, 4, 8, 3)]:
            (x,) = random_inputs(shape)
            got = keras.ops.convert_to_numpy(model(x, training=False))
            np.testing.assert_allclose(got, np_fpa(layer, x), rtol=1e-4, atol=1e-4)

    def test_serialization_round_trip(self):
        layer = FeaturePyramidAttention(3, kernel_sizes=(3, 5, 3), pooling="max")
        (x,) = random_inputs((2, 7, 5, 2))
        layer.build(x.shape)
        randomize_weights(layer)
        restored = self.run_serialization_round_trip(layer, x, atol=1e-5)
        self.assertEqual(restored.layers[-1].get_config(), layer.get_config())

    def test_mixed_precision(self):
        (x,) = random_inputs((2, 7, 6, 3))
        reference = FeaturePyramidAttention(4)
        reference.build(x.shape)
        randomize_weights(reference)
        layer = FeaturePyramidAttention(4, dtype="mixed_float16")
        layer.build(x.shape)
        layer.set_weights(reference.get_weights())
        out = layer(x, training=False)
        self.assertEqual(keras.backend.standardize_dtype(out.dtype), "float16")
        self.assertEqual(layer.main.conv.kernel.dtype, "float32")
        np.testing.assert_allclose(
            keras.ops.convert_to_numpy(out).astype("float32"),
            keras.ops.convert_to_numpy(reference(x, training=False)),
            rtol=2e-2,
            atol=2e-2,
        )

    def test_xla_matches_eager(self):
        layer = FeaturePyramidAttention(2, kernel_sizes=(3, 3, 3))
        (x,) = random_inputs((1, 7, 5, 2))
        self.assert_xla_matches_eager(layer, x)

    def test_compute_output_shape(self):
        layer = FeaturePyramidAttention(5)
        self.assertEqual(
            layer.compute_output_shape((None, None, 9, 3)), (None, None, 9, 5)
        )

    def test_rejects_unknown_pooling(self):
        with pytest.raises(ValueError, match="pooling 'median'"):
            FeaturePyramidAttention(4, pooling="median")

    def test_rejects_unknown_attention(self):
        with pytest.raises(ValueError, match="attention 'channel'"):
            FeaturePyramidAttention(4, attention="channel")

    def test_rejects_bad_kernel_sizes(self):
        bad = [(3, 3), (3, 3, 3, 3), (3, 4, 3), (3, 0, 3), (-3, 3, 3), 3, "357"]
        for kernel_sizes in [*bad, (3, 3.0, 3)]:
            with pytest.raises(ValueError, match="kernel_sizes"):
                FeaturePyramidAttention(4, kernel_sizes=kernel_sizes)

    def test_rejects_bad_filters(self):
        for filters in [0, -2, 2.5, True]:
            with pytest.raises(ValueError, match="filters"):
                FeaturePyramidAttention(filters)

    def test_rejects_wrong_rank(self):
        with pytest.raises(ValueError, match="expected ndim=4"):
            FeaturePyramidAttention(4)(np.zeros((2, 8, 3), "float32"))
        with pytest.raises(ValueError, match="rank 4"):
            FeaturePyramidAttention(4).build((2, 8, 3))

    def test_rejects_unknown_channels(self):
        with pytest.raises(ValueError, match="channel"):
            FeaturePyramidAttention(4).build((2, 8, 8, None))


# --- GlobalAttentionUpsample -------------------------------------------------


class GlobalAttentionUpsampleTest(TestCase):
    def check_against_numpy(self, layer, low_shape, high_shape):
        low, high = random_inputs(low_shape, high_shape)
        layer.build([low_shape, high_shape])
        randomize_weights(layer)
        got = keras.ops.convert_to_numpy(layer([low, high], training=False))
        self.assertEqual(got.shape, (*low_shape[:3], layer.filters))
        np.testing.assert_allclose(got, np_gau(layer, low, high), rtol=1e-4, atol=1e-4)
        return layer

    def test_projection_3x3_matches_numpy(self):
        layer = self.check_against_numpy(
            GlobalAttentionUpsample(4), (2, 9, 7, 3), (2, 5, 4, 6)
        )
        self.assertIsNotNone(layer.high_projection)
        self.assertEqual(tuple(layer.low_conv.conv.kernel.shape), (3, 3, 3, 4))
        self.assertIsNone(layer.low_conv.conv.bias)

    def test_no_projection_1x1_matches_numpy(self):
        layer = self.check_against_numpy(
            GlobalAttentionUpsample(4, low_kernel_size=1), (2, 8, 6, 3), (2, 4, 3, 4)
        )
        self.assertIsNone(layer.high_projection)
        self.assertEqual(tuple(layer.low_conv.conv.kernel.shape), (1, 1, 3, 4))

    def test_without_global_context_matches_numpy(self):
        layer = self.check_against_numpy(
            GlobalAttentionUpsample(3, global_context=False),
            (1, 7, 10, 2),
            (1, 3, 5, 5),
        )
        self.assertIsNone(layer.context)

    def test_layer(self):
        self.run_layer_test(
            GlobalAttentionUpsample,
            init_kwargs={"filters": 4},
            input_shape=((2, 8, 6, 3), (2, 4, 3, 5)),
            expected_output_shape=(2, 8, 6, 4),
            expected_num_trainable_weights=9,
            expected_num_non_trainable_weights=6,
        )

    def test_layer_without_projection(self):
        self.run_layer_test(
            GlobalAttentionUpsample,
            init_kwargs={"filters": 4, "low_kernel_size": 1, "global_context": False},
            input_shape=((2, 6, 6, 3), (2, 3, 3, 4)),
            expected_output_shape=(2, 6, 6, 4),
            expected_num_trainable_weights=3,
            expected_num_non_trainable_weights=2,
        )

    def test_serialization_round_trip(self):
        layer = GlobalAttentionUpsample(3, low_kernel_size=1)
        low, high = random_inputs((2, 6, 5, 2), (2, 3, 3, 4))
        layer.build([low.shape, high.shape])
        randomize_weights(layer)
        restored = self.run_serialization_round_trip(layer, [low, high], atol=1e-5)
        self.assertEqual(restored.layers[-1].get_config(), layer.get_config())

    def test_mixed_precision(self):
        low, high = random_inputs((2, 6, 5, 3), (2, 3, 3, 4))
        shapes = [low.shape, high.shape]
        reference = GlobalAttentionUpsample(4)
        reference.build(shapes)
        randomize_weights(reference)
        # high already has `filters` channels: the unprojected path must be
        # cast to the compute dtype too.
        layer = GlobalAttentionUpsample(4, dtype="mixed_float16")
        layer.build(shapes)
        layer.set_weights(reference.get_weights())
        out = layer([low, high], training=False)
        self.assertEqual(keras.backend.standardize_dtype(out.dtype), "float16")
        np.testing.assert_allclose(
            keras.ops.convert_to_numpy(out).astype("float32"),
            keras.ops.convert_to_numpy(reference([low, high], training=False)),
            rtol=2e-2,
            atol=2e-2,
        )

    def test_compute_output_shape(self):
        layer = GlobalAttentionUpsample(5)
        self.assertEqual(
            layer.compute_output_shape([(None, None, 9, 3), (None, 4, None, 8)]),
            (None, None, 9, 5),
        )

    def test_rejects_bad_low_kernel_size(self):
        for kernel_size in [0, 2, -1, 3.0, "3", None]:
            with pytest.raises(ValueError, match="low_kernel_size"):
                GlobalAttentionUpsample(4, low_kernel_size=kernel_size)

    def test_rejects_bad_filters(self):
        with pytest.raises(ValueError, match="filters"):
            GlobalAttentionUpsample(0)

    def test_rejects_wrong_number_of_inputs(self):
        x = np.zeros((1, 4, 4, 2), "float32")
        with pytest.raises(ValueError, match="expects 2 input"):
            GlobalAttentionUpsample(2)(x)
        with pytest.raises(ValueError, match="expects 2 input"):
            GlobalAttentionUpsample(2)([x, x, x])
        with pytest.raises(ValueError, match=r"two inputs \[low, high\]"):
            GlobalAttentionUpsample(2).build((1, 4, 4, 2))

    def test_rejects_wrong_rank(self):
        low, high = np.zeros((1, 4, 2), "float32"), np.zeros((1, 2, 2, 2), "float32")
        with pytest.raises(ValueError, match="expected ndim=4"):
            GlobalAttentionUpsample(2)([low, high])
        with pytest.raises(ValueError, match="high input must have rank 4"):
            GlobalAttentionUpsample(2).build([(1, 4, 4, 2), (1, 2, 2)])

    def test_rejects_unknown_channels(self):
        with pytest.raises(ValueError, match="channel"):
            GlobalAttentionUpsample(2).build([(1, 4, 4, None), (1, 2, 2, 2)])
