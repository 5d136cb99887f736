import cv2
import keras
import numpy as np
import pytest

from kseg.layers.guided_filter import GuidanceCRF, GuidedFilter, guided_filter
from kseg.testing import TestCase, input_gradients, weight_gradients


def _window(y, x, height, width, radius):
    return (
        slice(max(0, y - radius), min(height, y + radius + 1)),
        slice(max(0, x - radius), min(width, x + radius + 1)),
    )


def reference_guided_filter(guide, inputs, radius, epsilon):
    """He et al.'s guided filter of one image, float64, window by window.

    guide (H, W, K), inputs (H, W, C); windows clipped at the border, every
    mean over the pixels actually inside the image.
    """
    guide = np.asarray(guide, np.float64)
    inputs = np.asarray(inputs, np.float64)
    height, width, k = guide.shape
    channels = inputs.shape[-1]
    a = np.zeros((height, width, k, channels))
    b = np.zeros((height, width, channels))
    for y in range(height):
        for x in range(width):
            ys, xs = _window(y, x, height, width, radius)
            g = guide[ys, xs].reshape(-1, k)
            p = inputs[ys, xs].reshape(-1, channels)
            mu, p_mean = g.mean(0), p.mean(0)
            sigma = (g - mu).T @ (g - mu) / len(g)
            cov = (g - mu).T @ (p - p_mean) / len(g)
            a[y, x] = np.linalg.solve(sigma + epsilon * np.eye(k), cov)
            b[y, x] = p_mean - mu @ a[y, x]
    out = np.zeros((height, width, channels))
    for y in range(height):
        for x in range(width):
            ys, xs = _window(y, x, height, width, radius)
            a_mean = a[ys, xs].reshape(-1, k, channels).mean(0)
            out[y, x] = guide[y, x] @ a_mean + b[ys, xs].reshape(-1, channels).mean(0)
    return out


def reference_batch(guide, inputs, radius, epsilon):
    return np.stack(
        [
            reference_guided_filter(g, p, radius, epsilon)
            for g, p in zip(guide, inputs, strict=True)
        ]
    )


def _window_counts(height, width, radius):
    rows = [
        len(range(max(0, y - radius), min(height, y + radius + 1)))
        for y in range(height)
    ]
    cols = [
        len(range(max(0, x - radius), min(width, x + radius + 1))) for x in range(width)
    ]
    return np.outer(rows, cols)[None, :, :, None].astype(np.float64)


def _images(seed, batch, height, width, guide_channels, channels):
    rng = np.random.default_rng(seed)
    guide = rng.uniform(0, 255, (batch, height, width, guide_channels))
    inputs = rng.normal(size=(batch, height, width, channels))
    return guide.astype("float32"), inputs.astype("float32")


@pytest.mark.parametrize("guide_channels", [1, 3])
@pytest.mark.parametrize(
    "height, width, radius, epsilon",
    [
        (5, 9, 1, 50.0),
        (7, 11, 3, 400.0),  # 2r + 1 = H: every column window spans both borders
        (12, 8, 2, 1.0),
        (9, 17, 4, 1e4),  # 2r + 1 = H again, non-square
    ],
)
def test_matches_brute_force(guide_channels, height, width, radius, epsilon):
    guide, inputs = _images(radius, 2, height, width, guide_channels, 3)
    out = guided_filter(guide, inputs, radius, epsilon)
    expected = reference_batch(guide, inputs, radius, epsilon)
    np.testing.assert_allclose(np.asarray(out), expected, atol=2e-5, rtol=1e-4)


def test_matches_brute_force_on_axes_longer_than_one_scan():
    # 37 and 70 pixels: the cumulative sums are nested in blocks (with padding).
    guide, inputs = _images(2, 1, 37, 70, 3, 2)
    out = guided_filter(guide, inputs, 5, 20.0)
    expected = reference_batch(guide, inputs, 5, 20.0)
    np.testing.assert_allclose(np.asarray(out), expected, atol=2e-5, rtol=1e-4)


def test_constant_input_is_unchanged():
    guide, _ = _images(1, 1, 10, 12, 3, 1)
    inputs = np.full((1, 10, 12, 2), 7.5, "float32")
    out = guided_filter(guide, inputs, 3, 1.0)
    np.testing.assert_allclose(np.asarray(out), inputs, atol=1e-4)


@pytest.mark.parametrize("guide_channels", [1, 3])
def test_matches_opencv_away_from_border(guide_channels):
    # OpenCV's eps is ours unchanged (float32 guides, and also 8-bit ones in
    # OpenCV 5: it does not rescale). OpenCV reflects at the border; q_i
    # depends on pixels up to 2r away from i, so compare pixels >= 2r inside.
    radius, epsilon = 3, 100.0
    guide, inputs = _images(4, 1, 24, 41, guide_channels, 3)
    expected = cv2.ximgproc.guidedFilter(
        guide[0] if guide_channels == 3 else guide[0, ..., 0],
        inputs[0],
        radius,
        epsilon,
    )
    out = np.asarray(guided_filter(guide, inputs, radius, epsilon))[0]
    m = 2 * radius
    np.testing.assert_allclose(out[m:-m, m:-m], expected[m:-m, m:-m], atol=1e-4)


def _numeric_gradient(fn, x, h):
    grad = np.zeros_like(x)
    for index in np.ndindex(x.shape):
        step = np.zeros_like(x)
        step[index] = h
        grad[index] = (fn(x + step) - fn(x - step)) / (2 * h)
    return grad


@pytest.mark.parametrize("guide_channels", [1, 3])
def test_input_gradient_matches_finite_differences(guide_channels):
    guide, inputs = _images(5, 1, 5, 6, guide_channels, 2)
    weights = np.random.default_rng(6).normal(size=inputs.shape)
    radius, epsilon = 1, 30.0

    def loss(p):
        return np.sum(
            reference_guided_filter(guide[0], p[0], radius, epsilon) * weights[0]
        )

    expected = _numeric_gradient(loss, inputs.astype(np.float64), 1e-3)
    (got,) = input_gradients(
        lambda p: guided_filter(guide, p, radius, epsilon) * weights.astype("float32"),
        inputs,
    )
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=1e-4)


def test_input_gradient_is_the_filter_reweighted_by_window_counts():
    # q = F p with rows of F summing to one and w_ij·n_i = w_ji·n_j (n the
    # clipped window pixel count), so dL/dp = n · F(g / n); in the interior,
    # where n is constant, that is the same filter applied to g.
    height, width, radius, epsilon = 9, 10, 2, 50.0
    guide, inputs = _images(7, 2, height, width, 3, 2)
    incoming = np.random.default_rng(8).normal(size=inputs.shape).astype("float32")
    (got,) = input_gradients(
        lambda p: guided_filter(guide, p, radius, epsilon) * incoming, inputs
    )
    counts = _window_counts(height, width, radius)
    expected = counts * reference_batch(guide, incoming / counts, radius, epsilon)
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=1e-4)


def test_guide_gradient_is_finite_and_matches_finite_differences():
    guide, inputs = _images(9, 1, 5, 5, 3, 2)
    radius, epsilon = 1, 200.0

    def loss(g):
        return np.sum(reference_guided_filter(g[0], inputs[0], radius, epsilon))

    (got,) = input_gradients(lambda g: guided_filter(g, inputs, radius, epsilon), guide)
    assert np.all(np.isfinite(got))
    assert np.any(got != 0)
    expected = _numeric_gradient(loss, guide.astype(np.float64), 1e-2)
    np.testing.assert_allclose(got, expected, atol=2e-4 * np.abs(expected).max())


def _compiled_filter_and_gradients(guide, inputs, incoming, radius, epsilon):
    """XLA-compiled `q` and the gradients of `sum(q · incoming)` with respect
    to the guide and the inputs."""
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        @tf.function(jit_compile=True)
        def run(g, p):
            with tf.GradientTape() as tape:
                tape.watch([g, p])
                q = guided_filter(g, p, radius, epsilon)
                loss = tf.reduce_sum(q * incoming)
            return q, tape.gradient(loss, [g, p])

        q, grads = run(tf.constant(guide), tf.constant(inputs))
    else:
        import jax

        def loss(g, p):
            q = guided_filter(g, p, radius, epsilon)
            return keras.ops.sum(q * incoming), q

        (_, q), grads = jax.jit(jax.value_and_grad(loss, (0, 1), has_aux=True))(
            guide, inputs
        )
    return np.asarray(q), [np.asarray(g) for g in grads]


@pytest.mark.parametrize("guide_channels", [1, 3])
def test_compiled_filter_on_long_axes_and_its_gradients(guide_channels):
    # Axes longer than one plain scan: under XLA the box sums are loops with a
    # custom gradient (the box sum is symmetric). Output against brute force,
    # input gradient against n · F(g / n), guide gradient against a central
    # difference along a random direction.
    height, width, radius, epsilon = 36, 41, 4, 50.0
    guide, inputs = _images(30, 1, height, width, guide_channels, 2)
    rng = np.random.default_rng(31)
    incoming = rng.normal(size=inputs.shape).astype("float32")
    direction = rng.normal(size=guide.shape)
    q, (guide_grad, input_grad) = _compiled_filter_and_gradients(
        guide, inputs, incoming, radius, epsilon
    )
    np.testing.assert_allclose(
        q, reference_batch(guide, inputs, radius, epsilon), atol=2e-5, rtol=1e-4
    )
    counts = _window_counts(height, width, radius)
    np.testing.assert_allclose(
        input_grad,
        counts * reference_batch(guide, incoming / counts, radius, epsilon),
        atol=1e-5,
        rtol=1e-4,
    )

    def loss(g):
        return np.sum(reference_batch(g, inputs, radius, epsilon) * incoming)

    step = 1e-3
    g64 = guide.astype(np.float64)
    numeric = (loss(g64 + step * direction) - loss(g64 - step * direction)) / (2 * step)
    np.testing.assert_allclose(np.sum(guide_grad * direction), numeric, rtol=1e-3)


def test_float16_inputs_are_filtered_in_float32():
    guide, inputs = _images(10, 1, 8, 8, 3, 2)
    out = guided_filter(guide.astype("float16"), inputs.astype("float16"), 2, 10.0)
    assert keras.backend.standardize_dtype(out.dtype) == "float32"
    expected = reference_batch(
        guide.astype("float16"), inputs.astype("float16"), 2, 10.0
    )
    np.testing.assert_allclose(np.asarray(out), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    "guide_shape, input_shape, radius, epsilon, match",
    [
        ((8, 8, 3), (1, 8, 8, 2), 1, 1.0, "guide must have rank 4"),
        ((1, 8, 8, 3), (8, 8, 2), 1, 1.0, "inputs must have rank 4"),
        ((1, 8, 8, 2), (1, 8, 8, 2), 1, 1.0, "1 \\(gray\\) or 3 \\(RGB\\)"),
        ((1, 8, 8, 3), (1, 8, 9, 2), 1, 1.0, "same width"),
        ((1, 8, 8, 3), (1, 7, 8, 2), 1, 1.0, "same height"),
        ((2, 8, 8, 3), (1, 8, 8, 2), 1, 1.0, "same batch size"),
        ((1, 8, 8, 3), (1, 8, 8, 2), 0, 1.0, "radius must be a positive int"),
        ((1, 8, 8, 3), (1, 8, 8, 2), 1.5, 1.0, "radius must be a positive int"),
        ((1, 8, 8, 3), (1, 8, 8, 2), True, 1.0, "radius must be a positive int"),
        ((1, 8, 9, 3), (1, 8, 9, 2), 4, 1.0, "radius=4 is too large"),
        ((1, 8, 8, 3), (1, 8, 8, 2), 1, 0.0, "epsilon must be a positive number"),
        ((1, 8, 8, 3), (1, 8, 8, 2), 1, -1.0, "epsilon must be a positive number"),
    ],
)
def test_guided_filter_rejects_bad_arguments(
    guide_shape, input_shape, radius, epsilon, match
):
    with pytest.raises(ValueError, match=match):
        guided_filter(
            np.zeros(guide_shape, "float32"),
            np.zeros(input_shape, "float32"),
            radius,
            epsilon,
        )


def test_largest_radius_is_accepted():
    guide, inputs = _images(11, 1, 7, 9, 1, 1)
    out = guided_filter(guide, inputs, 3, 5.0)
    np.testing.assert_allclose(
        np.asarray(out), reference_batch(guide, inputs, 3, 5.0), atol=2e-5
    )


def _softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def reference_guidance_crf(logits, guide, compatibility, lam, iterations, radius, eps):
    unary = np.asarray(logits, np.float64)
    z = unary
    for _ in range(iterations):
        g = reference_batch(guide, _softmax(z), radius, eps)
        z = unary - lam * np.einsum("nhwc,cd->nhwd", g, compatibility)
    return z


class GuidedFilterTest(TestCase):
    def test_layer(self):
        self.run_layer_test(
            GuidedFilter,
            init_kwargs={"radius": 2, "epsilon": 10.0},
            input_shape=[(2, 8, 9, 3), (2, 8, 9, 4)],
            expected_output_shape=(2, 8, 9, 4),
            expected_output_dtype="float32",
            expected_num_trainable_weights=0,
            run_training_check=False,
        )

    def test_matches_function(self):
        guide, inputs = _images(12, 2, 8, 10, 1, 3)
        out = GuidedFilter(radius=2, epsilon=5.0)([guide, inputs])
        np.testing.assert_allclose(
            np.asarray(out), reference_batch(guide, inputs, 2, 5.0), atol=2e-5
        )

    def test_mixed_precision_outputs_float32(self):
        guide, inputs = _images(13, 1, 8, 8, 3, 2)
        layer = GuidedFilter(radius=1, epsilon=10.0, dtype="mixed_float16")
        out = layer([guide, inputs])
        self.assertEqual(keras.backend.standardize_dtype(out.dtype), "float32")
        np.testing.assert_allclose(
            np.asarray(out), reference_batch(guide, inputs, 1, 10.0), atol=2e-5
        )

    def test_xla_matches_eager(self):
        guide, inputs = _images(14, 2, 16, 12, 3, 3)
        self.assert_xla_matches_eager(
            GuidedFilter(radius=3, epsilon=1.0), [guide, inputs], atol=1e-4
        )

    def test_serialization_round_trip(self):
        guide, inputs = _images(15, 1, 8, 8, 3, 2)
        restored = self.run_serialization_round_trip(
            GuidedFilter(radius=2, epsilon=3.0), [guide, inputs]
        )
        layer = restored.layers[-1]
        self.assertEqual((layer.radius, layer.epsilon), (2, 3.0))

    def test_compute_output_shape_with_unknown_sizes(self):
        layer = GuidedFilter(radius=2, epsilon=1.0)
        shape = layer.compute_output_shape(
            [(None, None, None, 3), (None, None, None, 5)]
        )
        self.assertEqual(shape, (None, None, None, 5))

    def test_rejects_bad_options_and_shapes(self):
        with pytest.raises(ValueError, match="radius must be a positive int"):
            GuidedFilter(radius=0, epsilon=1.0)
        with pytest.raises(ValueError, match="epsilon must be a positive number"):
            GuidedFilter(radius=1, epsilon=0)
        with pytest.raises(ValueError, match="1 \\(gray\\) or 3 \\(RGB\\)"):
            GuidedFilter(radius=1, epsilon=1.0).build([(1, 8, 8, 4), (1, 8, 8, 2)])
        with pytest.raises(ValueError, match="too large"):
            GuidedFilter(radius=4, epsilon=1.0).build([(1, 8, 8, 3), (1, 8, 8, 2)])
        with pytest.raises(ValueError, match="list of two inputs"):
            GuidedFilter(radius=1, epsilon=1.0).build((1, 8, 8, 3))


class GuidanceCRFTest(TestCase):
    def _inputs(self, seed=20, batch=2, height=9, width=10, classes=3):
        rng = np.random.default_rng(seed)
        logits = rng.normal(scale=2.0, size=(batch, height, width, classes))
        guide = rng.uniform(0, 255, (batch, height, width, 3))
        return logits.astype("float32"), guide.astype("float32")

    def test_layer(self):
        self.run_layer_test(
            GuidanceCRF,
            init_kwargs={"num_classes": 3, "iterations": 2, "radius": 2},
            # A tuple: the training check's tf.data generator rejects lists.
            input_data=self._inputs(height=8, width=9),
            expected_output_shape=(2, 8, 9, 3),
            expected_output_dtype="float32",
            expected_num_trainable_weights=2,
            expected_num_non_trainable_weights=0,
        )

    def test_default_weights_are_potts_and_one(self):
        layer = GuidanceCRF(num_classes=4)
        layer.build([(1, 8, 8, 4), (1, 8, 8, 3)])
        compatibility, lam = layer.get_weights()
        np.testing.assert_array_equal(compatibility, 1.0 - np.eye(4))
        self.assertEqual(float(lam), 1.0)
        self.assertEqual((layer.iterations, layer.radius, layer.epsilon), (3, 3, 1.0))

    def test_matches_numpy_mean_field(self):
        logits, guide = self._inputs()
        rng = np.random.default_rng(21)
        compatibility = rng.uniform(-1, 2, (3, 3)).astype("float32")
        lam = np.array(0.7, "float32")
        for iterations in (1, 2):
            layer = GuidanceCRF(3, iterations=iterations, radius=2, epsilon=50.0)
            layer.build([logits.shape, guide.shape])
            layer.set_weights([compatibility, lam])
            out = layer([logits, guide])
            expected = reference_guidance_crf(
                logits, guide, compatibility, 0.7, iterations, 2, 50.0
            )
            np.testing.assert_allclose(np.asarray(out), expected, atol=1e-4)

    def test_gray_guide(self):
        logits, guide = self._inputs(seed=22, height=7, width=12)
        guide = guide[..., :1]
        layer = GuidanceCRF(3, iterations=1, radius=3)
        out = layer([logits, guide])
        expected = reference_guidance_crf(
            logits, guide, 1.0 - np.eye(3), 1.0, 1, 3, 1.0
        )
        np.testing.assert_allclose(np.asarray(out), expected, atol=1e-4)

    def test_weight_gradients_match_finite_differences(self):
        # Every entry of the compatibility and λ, by central differences of
        # the float64 NumPy mean field.
        logits, guide = self._inputs(seed=23, batch=1, height=7, width=8)
        rng = np.random.default_rng(24)
        compatibility = rng.uniform(-1, 2, (3, 3))
        lam = 0.7
        target = rng.normal(size=logits.shape)
        layer = GuidanceCRF(3, iterations=2, radius=2, epsilon=50.0)
        layer.build([logits.shape, guide.shape])
        layer.set_weights([compatibility.astype("float32"), np.float32(lam)])
        grads = weight_gradients(
            layer,
            [logits, guide],
            lambda out: keras.ops.sum(out * target.astype("float32")),
        )
        by_name = {path.split("/")[-1]: grad for path, grad in grads.items()}
        self.assertEqual(sorted(by_name), ["compatibility", "lambda"])

        def loss(compatibility, lam):
            z = reference_guidance_crf(logits, guide, compatibility, lam, 2, 2, 50.0)
            return np.sum(z * target)

        eps = 1e-6
        numeric = np.zeros((3, 3))
        for index in np.ndindex(3, 3):
            step = np.zeros((3, 3))
            step[index] = eps
            numeric[index] = (
                loss(compatibility + step, lam) - loss(compatibility - step, lam)
            ) / (2 * eps)
        np.testing.assert_allclose(
            by_name["compatibility"], numeric, rtol=1e-3, atol=1e-3
        )
        numeric_lam = (
            loss(compatibility, lam + eps) - loss(compatibility, lam - eps)
        ) / (2 * eps)
        np.testing.assert_allclose(by_name["lambda"], numeric_lam, rtol=1e-3)

    def test_mixed_precision_outputs_float32(self):
        logits, guide = self._inputs(seed=25)
        layer = GuidanceCRF(3, iterations=1, radius=2, dtype="mixed_float16")
        out = layer([logits, guide])
        self.assertEqual(keras.backend.standardize_dtype(out.dtype), "float32")
        for weight in layer.weights:
            self.assertEqual(keras.backend.standardize_dtype(weight.dtype), "float32")
        expected = reference_guidance_crf(
            logits, guide, 1.0 - np.eye(3), 1.0, 1, 2, 1.0
        )
        np.testing.assert_allclose(np.asarray(out), expected, atol=1e-4)

    def test_xla_matches_eager(self):
        logits, guide = self._inputs(seed=26, height=12, width=16)
        self.assert_xla_matches_eager(
            GuidanceCRF(3, iterations=2, radius=3), [logits, guide], atol=1e-4
        )

    def test_serialization_round_trip(self):
        logits, guide = self._inputs(seed=27)
        layer = GuidanceCRF(
            3,
            iterations=2,
            radius=2,
            epsilon=4.0,
            compatibility_initializer="random_uniform",
            lambda_initializer=0.5,
        )
        restored = self.run_serialization_round_trip(layer, [logits, guide])
        config = restored.layers[-1].get_config()
        self.assertEqual(config["iterations"], 2)
        self.assertEqual(config["lambda_initializer"], 0.5)

    def test_rejects_bad_options_and_shapes(self):
        with pytest.raises(ValueError, match="iterations must be a positive int"):
            GuidanceCRF(3, iterations=0)
        with pytest.raises(ValueError, match="num_classes must be a positive int"):
            GuidanceCRF(0)
        with pytest.raises(ValueError, match="radius must be a positive int"):
            GuidanceCRF(3, radius=-1)
        with pytest.raises(ValueError, match="epsilon must be a positive number"):
            GuidanceCRF(3, epsilon=0.0)
        with pytest.raises(ValueError, match="initializer"):
            GuidanceCRF(3, compatibility_initializer="not_an_initializer")
        with pytest.raises(ValueError, match="num_classes=3"):
            GuidanceCRF(3).build([(1, 8, 8, 4), (1, 8, 8, 3)])
        with pytest.raises(ValueError, match="1 \\(gray\\) or 3 \\(RGB\\)"):
            GuidanceCRF(3).build([(1, 8, 8, 3), (1, 8, 8, 2)])
        with pytest.raises(ValueError, match="same height"):
            GuidanceCRF(3).build([(1, 8, 8, 3), (1, 9, 8, 3)])
        with pytest.raises(ValueError, match="logits must have rank 4"):
            GuidanceCRF(3).build([(8, 8, 3), (1, 8, 8, 3)])
        with pytest.raises(ValueError, match="too large"):
            GuidanceCRF(3, radius=3).build([(1, 6, 8, 3), (1, 6, 8, 3)])


@pytest.mark.parametrize("length", [1, 7, 32, 33, 70, 600])
@pytest.mark.parametrize("axis", [1, 2])
def test_blocked_cumulative_sum_matches_numpy(length, axis):
    # The box sums' scan: plain, blocked with padding, and blocked twice over
    # (600 = 38 blocks of 16 on TensorFlow, 75 of 8 elsewhere).
    from kseg.layers.guided_filter import _cumsum

    shape = [2, 3, 3, 2]
    shape[axis] = length
    x = np.random.default_rng(length).normal(size=shape).astype("float32")
    got = keras.ops.convert_to_numpy(_cumsum(keras.ops.convert_to_tensor(x), axis))
    np.testing.assert_allclose(got, np.cumsum(x.astype("float64"), axis), atol=2e-5)


@pytest.mark.skipif(
    keras.config.backend() != "tensorflow", reason="TensorFlow's scan choice"
)
def test_tensorflow_scans_use_matmuls_outside_xla_only():
    import tensorflow as tf

    from kseg.layers.guided_filter import _matmul_scans

    seen = {}

    def probe(key):
        seen[key] = _matmul_scans()
        return tf.constant(0)

    tf.function(lambda: probe("graph"))()
    tf.function(lambda: probe("xla"), jit_compile=True)()
    assert seen == {"graph": True, "xla": False}
