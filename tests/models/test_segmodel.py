import keras
import numpy as np
import pytest
from absl.testing import parameterized

from kseg.backbones import build_resnet
from kseg.layers.common import resize_like
from kseg.layers.guided_filter import GuidanceCRF
from kseg.layers.segmodel import (
    ContextCRF,
    LearnableUpsampling,
    StructuredPatchPrediction,
)
from kseg.models import SegModel, build_segmodel_resnet101
from kseg.testing import (
    TestCase,
    network_reductions,
    numpy_bilinear_resize,
    rounding_tolerance,
    weight_gradients,
)

NUM_CLASSES = 3
FEATURE_FILTERS = 8
RADIUS = 2

# The four columns of Table 3, one constructor call each.
ROWS = {
    "unary": dict(),
    "context": dict(context_crf=True),
    "patch": dict(context_crf=True, patch_prediction=True),
    "guide": dict(context_crf=True, patch_prediction=True, guidance_crf=True),
}
ALL_ON = ROWS["guide"]


def tiny_backbone():
    """SegModel's encoder layout (output stride 16), one block per stage,
    bottleneck width 8."""
    return build_resnet(
        (1, 1, 1, 1), (8, 8, 8, 8), expansion=2, stem_width=8, output_stride=16
    )


def tiny_segmodel(**kwargs):
    kwargs = {"guidance_radius": RADIUS, "guidance_crf_iterations": 2, **kwargs}
    return SegModel(
        tiny_backbone(), NUM_CLASSES, feature_filters=FEATURE_FILTERS, **kwargs
    )


def random_images(shape, seed=1):
    """0–255 intensities, as kseg.data yields them."""
    return np.random.default_rng(seed).uniform(0, 255, size=shape).astype("float32")


def random_labels(shape, seed=2):
    labels = np.random.default_rng(seed).integers(0, NUM_CLASSES, size=shape)
    labels[:, :3, :3] = 255
    return labels


def numpy_downsample_x4(images):
    """×4 average pooling with TensorFlow's "same" windows (padding split
    floor / ceil, padded pixels left out of the mean), in float64."""
    images = np.asarray(images, "float64")
    _, height, width, channels = images.shape

    def windows(size):
        out = -(-size // 4)
        before = max((out - 1) * 4 + 4 - size, 0) // 2
        return [
            (max(4 * i - before, 0), min(4 * i - before + 4, size)) for i in range(out)
        ]

    rows, cols = windows(height), windows(width)
    out = np.zeros((images.shape[0], len(rows), len(cols), channels))
    for i, (r0, r1) in enumerate(rows):
        for j, (c0, c1) in enumerate(cols):
            out[:, i, j] = images[:, r0:r1, c0:c1].mean(axis=(1, 2))
    return out


def reference_logits(model, images):
    """The SegModel graph recomposed from the model's own layers, with the
    guide downsampled in NumPy."""
    features = model.backbone(images, training=False)["res5"]
    features = model.get_layer("feature_conv")(features, training=False)
    if model.patch_prediction:
        scores = model.get_layer("patch_prediction")(features)
    else:
        scores = model.get_layer("unary_classifier")(features)
    if model.context_crf:
        features = resize_like(features, scores)
        scores = model.get_layer("context_crf")([features, scores])
    if model.guidance_crf:
        guide = numpy_downsample_x4(images).astype("float32")
        scores = keras.ops.cast(scores, "float32")
        if model.score_upsampling == "deconv":
            scores = model.get_layer("score_upsampling")(scores)
        scores = resize_like(scores, guide)
        scores = model.get_layer("guidance_crf")([scores, guide])
    return keras.ops.convert_to_numpy(resize_like(scores, images))


def probe(model, layer_name):
    """The eager output of one inner layer of `model`."""
    return keras.Model(model.input, model.get_layer(layer_name).output)


class SegModelTest(TestCase):
    @parameterized.named_parameters((row, row) for row in ROWS)
    def test_table3_rows(self, row):
        model = tiny_segmodel(**ROWS[row])
        kwargs = {"context_crf": False, "patch_prediction": False, **ROWS[row]}
        kwargs.setdefault("guidance_crf", False)
        self.run_model_test(model, (2, 64, 64, 3), {"logits": (2, 64, 64, NUM_CLASSES)})
        images = random_images((2, 64, 64, 3))
        outputs = model(images)

        names = {layer.name for layer in model.layers}
        self.assertEqual("patch_prediction" in names, kwargs["patch_prediction"])
        self.assertEqual("unary_classifier" in names, not kwargs["patch_prediction"])
        self.assertEqual("context_crf" in names, kwargs["context_crf"])
        self.assertEqual("guidance_crf" in names, kwargs["guidance_crf"])
        # Local scores at stride 16, or stride 8 from 2×2 patches.
        local = "patch_prediction" if kwargs["patch_prediction"] else "unary_classifier"
        size = 8 if kwargs["patch_prediction"] else 4
        local_scores = probe(model, local)(images)
        self.assertEqual(local_scores.shape, (2, size, size, NUM_CLASSES))
        if kwargs["patch_prediction"]:
            layer = model.get_layer("patch_prediction")
            self.assertIsInstance(layer, StructuredPatchPrediction)
            self.assertEqual(layer.patch_size, 2)
        if kwargs["context_crf"]:
            crf = model.get_layer("context_crf")
            self.assertIsInstance(crf, ContextCRF)
            self.assertEqual(crf.iterations, 2)
            crf_scores = probe(model, "context_crf")(images)
            self.assertEqual(crf_scores.shape, (2, size, size, NUM_CLASSES))
        self.assertEqual("score_upsampling" in names, kwargs["guidance_crf"])
        if kwargs["guidance_crf"]:
            upsampling = model.get_layer("score_upsampling")
            self.assertIsInstance(upsampling, LearnableUpsampling)
            # Stride-16 scores (8 after the 2×2 patches) to the ¼ guide.
            self.assertEqual(upsampling.factor, 2 if kwargs["patch_prediction"] else 4)
            crf = model.get_layer("guidance_crf")
            self.assertIsInstance(crf, GuidanceCRF)
            self.assertEqual((crf.radius, crf.epsilon), (RADIUS, 1.0))
            guided = probe(model, "guidance_crf")(images)
            self.assertEqual(guided.shape, (2, 16, 16, NUM_CLASSES))

        np.testing.assert_allclose(
            keras.ops.convert_to_numpy(outputs["logits"]),
            reference_logits(model, images),
            rtol=1e-5,
            atol=1e-5,
        )

        grads = self.assert_gradients_reach_backbone(
            model, images, random_labels((2, 64, 64))
        )
        crf_weights = [
            weight
            for name in ("context_crf", "guidance_crf", "score_upsampling")
            if name in names
            for weight in model.get_layer(name).trainable_weights
        ]
        self.assertEqual(
            len(crf_weights), 8 * kwargs["context_crf"] + 3 * kwargs["guidance_crf"]
        )
        for weight in crf_weights:
            self.assertTrue(np.any(grads[weight.path] != 0), weight.path)

    def test_any_input_size(self):
        model = tiny_segmodel(**ALL_ON)
        images = random_images((1, 65, 47, 3))
        outputs = model(images)
        self.assertEqual(outputs["logits"].shape, (1, 65, 47, NUM_CLASSES))
        self.assertEqual(
            probe(model, "guidance_crf")(images).shape, (1, 17, 12, NUM_CLASSES)
        )
        np.testing.assert_allclose(
            keras.ops.convert_to_numpy(outputs["logits"]),
            reference_logits(model, images),
            rtol=1e-5,
            atol=1e-5,
        )

    def _deconv_and_bilinear(self, **kwargs):
        """An untrained "deconv" model and a "bilinear" one with its weights."""
        deconv = tiny_segmodel(**kwargs)
        bilinear = tiny_segmodel(**kwargs, score_upsampling="bilinear")
        weights = {weight.path: weight for weight in bilinear.weights}
        for weight in deconv.weights:
            if weight.path in weights:
                weights.pop(weight.path).assign(weight)
        self.assertEqual(list(weights), [])
        return deconv, bilinear

    def test_score_upsampling_starts_as_the_bilinear_resize(self):
        for row in ("guide", "unary_guide"):
            kwargs = ALL_ON if row == "guide" else {"guidance_crf": True}
            deconv, bilinear = self._deconv_and_bilinear(**kwargs)
            self.assertNotIn("score_upsampling", {x.name for x in bilinear.layers})
            self.assertEqual(
                len(deconv.trainable_weights), len(bilinear.trainable_weights) + 1
            )
            # 64×48: the ×4 (×2) map is the guide's 16×12, borders included.
            images = random_images((2, 64, 48, 3))
            local = "patch_prediction" if row == "guide" else "unary_classifier"
            local = "context_crf" if row == "guide" else local
            scores = keras.ops.convert_to_numpy(probe(deconv, local)(images))
            upsampled = probe(deconv, "guidance_scores_resize")(images)
            np.testing.assert_allclose(
                upsampled,
                numpy_bilinear_resize(scores, (16, 12)),
                rtol=1e-5,
                atol=1e-5 * np.abs(scores).max(),
            )
            # The untrained logits in the hundreds: float32 rounding of that.
            expected = bilinear(images)["logits"]
            scale = np.abs(keras.ops.convert_to_numpy(expected)).max()
            np.testing.assert_allclose(
                deconv(images)["logits"], expected, rtol=1e-5, atol=1e-6 * scale
            )
        # Sides whose ×4 map is not the guide's size (5 → 20 rows against the
        # 17-row guide) are resized twice: no longer the one bilinear resize.
        deconv, bilinear = self._deconv_and_bilinear(guidance_crf=True)
        images = random_images((1, 65, 64, 3))
        self.assertFalse(
            np.allclose(
                probe(deconv, "guidance_scores_resize")(images),
                probe(bilinear, "guidance_scores_resize")(images),
                rtol=1e-3,
            )
        )

    def test_score_upsampling_kernel_gradient_matches_finite_differences(self):
        model = tiny_segmodel(guidance_crf=True)
        kernel = model.get_layer("score_upsampling").kernel
        # Small images keep the untrained logits of order 1, where the loss
        # is smooth enough for a float32 central difference.
        images = random_images((1, 64, 48, 3)) / 255.0
        labels = random_labels((1, 64, 48))
        valid = labels != 255
        onehot = np.eye(NUM_CLASSES)[np.where(valid, labels, 0)] * valid[..., None]

        def loss(outputs):
            log_probs = keras.ops.log_softmax(outputs["logits"], axis=-1)
            return -keras.ops.sum(log_probs * onehot.astype("float32"))

        grad = weight_gradients(model, images, loss, training=False)[kernel.path]
        direction = np.random.default_rng(3).normal(size=kernel.shape)
        initial = keras.ops.convert_to_numpy(kernel)
        eps = 1e-2
        losses = []
        for sign in (1, -1):
            kernel.assign(initial + sign * eps * direction)
            losses.append(float(loss(model(images, training=False))))
        kernel.assign(initial)
        numeric = (losses[0] - losses[1]) / (2 * eps)
        analytic = float(np.sum(grad * direction))
        self.assertGreater(abs(analytic), 1e-3)
        np.testing.assert_allclose(analytic, numeric, rtol=2e-2)

    def test_keras_file_round_trip(self):
        model = tiny_segmodel(**ALL_ON, context_crf_iterations=1, guidance_epsilon=4.0)
        # A trained kernel, not the bilinear one the constructor recreates.
        kernel = model.get_layer("score_upsampling").kernel
        kernel.assign(np.random.default_rng(4).uniform(0, 0.5, kernel.shape))
        restored = self.run_model_saving_test(
            model, random_images((2, 65, 47, 3)), atol=1e-5
        )
        self.assertIsInstance(restored, SegModel)
        self.assertEqual(restored.score_upsampling, "deconv")
        np.testing.assert_array_equal(
            restored.get_layer("score_upsampling").kernel.numpy(), kernel.numpy()
        )
        self.assertEqual(restored.get_layer("context_crf").iterations, 1)
        self.assertEqual(restored.get_layer("guidance_crf").epsilon, 4.0)
        self.assertEqual(restored.get_layer("guidance_crf").iterations, 2)

    def test_configs_from_before_score_upsampling_load_bilinear(self):
        model = tiny_segmodel(**ALL_ON, score_upsampling="bilinear")
        config = model.get_config()
        del config["score_upsampling"]
        restored = SegModel.from_config(config)
        self.assertEqual(restored.score_upsampling, "bilinear")
        self.assertEqual(len(restored.weights), len(model.weights))

    def test_mixed_precision(self):
        keras.config.set_dtype_policy("mixed_float16")
        model = tiny_segmodel(**ALL_ON)
        self.run_model_test(model, (2, 64, 64, 3), {"logits": (2, 64, 64, NUM_CLASSES)})
        images = random_images((2, 64, 64, 3))
        self.assertEqual(model.get_layer("context_crf").compute_dtype, "float16")
        self.assertEqual(model.get_layer("patch_prediction").compute_dtype, "float16")
        # The guidance branch computes in float32 from the float32 image.
        for name in ("guide_downsample", "guidance_scores_resize", "guidance_crf"):
            output = probe(model, name)(images)
            self.assertEqual(keras.backend.standardize_dtype(output.dtype), "float32")
        self.assert_gradients_reach_backbone(model, images, random_labels((2, 64, 64)))
        # The head's policy is part of the config: it survives a load under
        # another global policy.
        keras.config.set_dtype_policy("float32")
        restored = self.run_model_saving_test(model, images, atol=1e-3)
        self.assertEqual(restored.get_layer("context_crf").compute_dtype, "float16")

    def test_xla_matches_eager(self):
        model = tiny_segmodel(**ALL_ON)
        images = random_images((2, 64, 48, 3))
        eager = keras.ops.convert_to_numpy(model(images, training=False)["logits"])
        model.compile(jit_compile=True)
        compiled = model.predict(images, batch_size=2, verbose=0)["logits"]
        # The untrained encoder on 0–255 images gives logits in the hundreds:
        # the tolerance is float32 rounding relative to that scale, over the
        # model's chain of reductions.
        depth, terms = network_reductions(model)
        atol = rounding_tolerance(np.abs(eager).max(), terms, depth)
        np.testing.assert_allclose(compiled, eager, rtol=0, atol=atol)

    def test_image_too_small_for_guidance_radius(self):
        # 8·radius + 1 = 17 pixels is the smallest side for radius 2.
        model = tiny_segmodel(**ALL_ON)
        model(random_images((1, 17, 40, 3)))
        with pytest.raises(ValueError, match="guidance_radius"):
            model(random_images((1, 40, 16, 3)))
        # Without the guidance CRF the radius does not matter.
        tiny_segmodel(context_crf=True)(random_images((1, 16, 16, 3)))
        # A static input size is checked when the model is built.
        backbone = build_resnet(
            (1, 1, 1, 1),
            (8, 8, 8, 8),
            expansion=2,
            stem_width=8,
            output_stride=16,
            input_shape=(24, 64, 3),
        )
        with pytest.raises(ValueError, match="image side of 24 pixels gives 6"):
            SegModel(backbone, NUM_CLASSES, guidance_crf=True)
        SegModel(backbone, NUM_CLASSES, guidance_crf=True, guidance_radius=2)

    def test_bad_options(self):
        backbone = tiny_backbone()
        cases = [
            (dict(num_classes=0), "num_classes must be a positive int"),
            (dict(feature_filters=0), "feature_filters must be a positive int"),
            (dict(context_crf="yes"), "context_crf must be True or False"),
            (dict(patch_prediction=1), "patch_prediction must be True or False"),
            (dict(guidance_crf=None), "guidance_crf must be True or False"),
            (dict(context_crf_iterations=0), "iterations"),
            (dict(guidance_crf_iterations=0), "iterations"),
            (dict(guidance_radius=0), "radius"),
            (dict(guidance_epsilon=0.0), "epsilon"),
            (dict(score_upsampling="nearest"), "score_upsampling"),
        ]
        for kwargs, message in cases:
            kwargs = {"num_classes": NUM_CLASSES, **kwargs}
            with pytest.raises(ValueError, match=message):
                SegModel(backbone, **kwargs)
        with pytest.raises(ValueError, match="functional keras.Model"):
            SegModel(keras.layers.Conv2D(4, 3), NUM_CLASSES)

    def test_guide_must_be_gray_or_rgb(self):
        backbone = build_resnet(
            (1, 1, 1, 1),
            (8, 8, 8, 8),
            expansion=2,
            stem_width=8,
            output_stride=16,
            input_shape=(None, None, 4),
        )
        SegModel(backbone, NUM_CLASSES, context_crf=True)
        with pytest.raises(ValueError, match="1 \\(gray\\) or 3 \\(RGB\\)"):
            SegModel(backbone, NUM_CLASSES, guidance_crf=True)


@pytest.mark.slow
class SegModelResNet101Test(TestCase):
    def test_paper_model(self):
        model = build_segmodel_resnet101(21)
        self.assertEqual(model.backbone.name, "segmodel_resnet101")
        self.assertTrue(model.context_crf and model.patch_prediction)
        self.assertTrue(model.guidance_crf)
        self.run_model_test(model, (1, 64, 48, 3), {"logits": (1, 64, 48, 21)})


def test_hand_computed_tiny_segmodel():
    # 32×32 gray image of four constant 16×16 blocks: the stride-16
    # average-pooling backbone's res5 is [[1, 2], [3, 4]].
    from kseg.testing import average_pooling_backbone

    image = np.kron(np.array([[1.0, 2.0], [3.0, 4.0]]), np.ones((16, 16)))
    images = image[None, :, :, None].astype("float32")
    model = SegModel(
        average_pooling_backbone((32, 32)),
        2,
        guidance_crf=True,
        feature_filters=1,
        guidance_radius=1,
    )
    # f = ReLU(BN(3·res5)) with BN the identity up to 1/sqrt(1 + 1e-3).
    feature_conv = model.get_layer("feature_conv")
    feature_conv.conv.set_weights([np.full((1, 1, 1, 1), 3.0, "float32")])
    # z_u = [f - 1, -f].
    model.get_layer("unary_classifier").set_weights(
        [np.array([[[[1.0, -1.0]]]], "float32"), np.array([-1.0, 0.0], "float32")]
    )
    # Every 8×8 tap 1/4: each ¼-resolution pixel is the mean of the four
    # (edge-extended) score pixels around it.
    upsampling = model.get_layer("score_upsampling")
    upsampling.kernel.assign(np.full((8, 8, 2), 0.25, "float32"))
    # λ = 0: the guidance CRF returns its unary, z = z_u.
    compatibility, _ = model.get_layer("guidance_crf").get_weights()
    model.get_layer("guidance_crf").set_weights([compatibility, np.float32(0.0)])

    f = 3.0 * np.array([[1.0, 2.0], [3.0, 4.0]]) / np.sqrt(1.0 + 1e-3)
    scores = np.stack([f - 1.0, -f], axis=-1)
    extended = np.pad(scores, ((1, 1), (1, 1), (0, 0)), mode="edge")
    quarter = np.zeros((8, 8, 2))
    for o in range(8):
        for p in range(8):
            # Inputs i with 0 <= o - 4·i + 2 < 8: i = (o + 2) // 4 - 1, +0.
            i, j = (o + 2) // 4, (p + 2) // 4
            quarter[o, p] = extended[i : i + 2, j : j + 2].sum(axis=(0, 1)) / 4
    expected = numpy_bilinear_resize(quarter[None], (32, 32))
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(model(images)["logits"]),
        expected,
        rtol=1e-5,
        atol=1e-5,
    )
    # By hand at the top-left ¼ pixel: all four neighbours are score (0, 0).
    np.testing.assert_allclose(quarter[0, 0], scores[0, 0])
