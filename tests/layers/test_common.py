import numpy as np
import pytest

from kseg.layers.common import ConvBNReLU, ResizeLike, depth_to_space, resize
from kseg.testing import TestCase, numpy_bilinear_resize


class ConvBNReLUTest(TestCase):
    def test_layer(self):
        self.run_layer_test(
            ConvBNReLU,
            init_kwargs={"filters": 4, "kernel_size": 3},
            input_shape=(2, 8, 8, 3),
            expected_output_shape=(2, 8, 8, 4),
            expected_num_trainable_weights=3,
            expected_num_non_trainable_weights=2,
        )

    def test_matches_numpy_without_batch_norm(self):
        layer = ConvBNReLU(2, 1, use_batch_norm=False)
        x = np.random.default_rng(0).normal(size=(1, 3, 3, 2)).astype("float32")
        out = layer(x)
        kernel, bias = (np.asarray(w) for w in layer.conv.get_weights())
        expected = np.maximum(x @ kernel[0, 0] + bias, 0)
        np.testing.assert_allclose(out, expected, atol=1e-6)

    def test_rejects_wrong_rank(self):
        with pytest.raises(ValueError, match="expected ndim=4"):
            ConvBNReLU(2, 3)(np.zeros((2, 8, 3)))


def test_resize_half_pixel_centres():
    x = np.arange(4, dtype="float32").reshape(1, 1, 4, 1)
    out = np.asarray(resize(x, (1, 8)))[0, 0, :, 0]
    # Half-pixel centres: output pixel j samples input at (j + 0.5) / 2 - 0.5.
    src = np.clip((np.arange(8) + 0.5) / 2 - 0.5, 0, 3)
    np.testing.assert_allclose(out, np.interp(src, np.arange(4), np.arange(4)))


def test_resize_rejects_unknown_interpolation():
    with pytest.raises(ValueError, match="interpolation"):
        resize(np.zeros((1, 2, 2, 1)), (4, 4), interpolation="bicubicx")


def test_depth_to_space_matches_dcr_ordering():
    s, c = 2, 3
    x = np.random.default_rng(1).normal(size=(2, 3, 4, c * s * s)).astype("float32")
    out = np.asarray(depth_to_space(x, s))
    expected = np.zeros((2, 6, 8, c), "float32")
    for i in range(3):
        for j in range(4):
            for a in range(s):
                for b in range(s):
                    expected[:, i * s + a, j * s + b] = x[:, i, j, (a * s + b) * c :][
                        :, :c
                    ]
    np.testing.assert_array_equal(out, expected)


def test_depth_to_space_rejects_indivisible_channels():
    with pytest.raises(ValueError, match="divisible"):
        depth_to_space(np.zeros((1, 2, 2, 6), "float32"), 2)


class ResizeLikeTest(TestCase):
    def test_layer(self):
        self.run_layer_test(
            ResizeLike,
            init_kwargs={"interpolation": "bilinear"},
            input_shape=[(2, 4, 3, 5), (2, 8, 7, 1)],
            expected_output_shape=(2, 8, 7, 5),
            run_training_check=False,
        )

    def test_functional_model_with_unknown_size(self):
        import keras

        inputs = keras.Input((None, None, 3))
        pool = keras.layers.AveragePooling2D(4, padding="same")
        model = keras.Model(inputs, ResizeLike()([pool(inputs), inputs]))
        x = np.random.default_rng(0).normal(size=(1, 13, 9, 3)).astype("float32")
        out = model(x)
        self.assertEqual(tuple(out.shape), (1, 13, 9, 3))
        # 4×4 "same" windows: 13 rows pad 3 (1 above, 2 below), 9 columns 3
        # (1 left, 2 right); the padding is left out of each mean.
        pooled = np.zeros((1, 4, 3, 3))
        for i in range(4):
            for j in range(3):
                rows = slice(max(4 * i - 1, 0), min(4 * i + 3, 13))
                cols = slice(max(4 * j - 1, 0), min(4 * j + 3, 9))
                pooled[:, i, j] = x[:, rows, cols].mean(axis=(1, 2))
        np.testing.assert_allclose(
            out, numpy_bilinear_resize(pooled, (13, 9)), atol=1e-5
        )

    def test_nearest_keeps_values(self):
        x = np.array([[[[1.0], [2.0]], [[3.0], [4.0]]]], "float32")
        out = np.asarray(ResizeLike("nearest")([x, np.zeros((1, 4, 4, 1))]))
        # Each input pixel fills the 2×2 block it covers, in place.
        np.testing.assert_array_equal(
            out[0, :, :, 0],
            [[1, 1, 2, 2], [1, 1, 2, 2], [3, 3, 4, 4], [3, 3, 4, 4]],
        )
        # ×3 rows, ×1.5 columns (half-pixel centres): output pixel o reads
        # input floor((o + 0.5) · in / out): columns 0, 1, 1.
        out = np.asarray(ResizeLike("nearest")([x, np.zeros((1, 6, 3, 1))]))
        np.testing.assert_array_equal(
            out[0, :, :, 0],
            [[1, 2, 2], [1, 2, 2], [1, 2, 2], [3, 4, 4], [3, 4, 4], [3, 4, 4]],
        )

    def test_rejects_unknown_interpolation(self):
        with pytest.raises(ValueError, match="interpolation"):
            ResizeLike("area")


def test_resize_to_a_traced_dynamic_size():
    import keras

    if keras.backend.backend() != "tensorflow":
        pytest.skip("dynamic traced sizes are a tf.function concern")
    import tensorflow as tf

    @tf.function(input_signature=[tf.TensorSpec((1, None, None, 1), "float32")])
    def upsample(x):
        shape = tf.shape(x)
        return resize(x, (shape[1] * 2, shape[2] * 2))

    x = np.random.default_rng(1).normal(size=(1, 2, 3, 1)).astype("float32")
    np.testing.assert_allclose(upsample(x), numpy_bilinear_resize(x, (4, 6)), atol=1e-6)
    x = np.random.default_rng(2).normal(size=(1, 3, 5, 1)).astype("float32")
    np.testing.assert_allclose(
        upsample(x), numpy_bilinear_resize(x, (6, 10)), atol=1e-6
    )
