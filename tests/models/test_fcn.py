import keras
import numpy as np
import pytest

from kseg.backbones import build_resnet
from kseg.layers.common import ConvBNReLU, resize_like
from kseg.models import FCN, build_fcn_resnet101
from kseg.testing import TestCase

NUM_CLASSES = 3


def tiny_backbone():
    """PAN's encoder layout (deep stem, output stride 16), one block per
    stage, bottleneck width 8."""
    return build_resnet(
        (1, 1, 1, 1),
        (8, 8, 8, 8),
        expansion=2,
        deep_stem=True,
        stem_width=8,
        output_stride=16,
    )


def random_images(shape, seed=1):
    return np.random.default_rng(seed).uniform(size=shape).astype("float32")


def random_labels(shape, seed=2):
    labels = np.random.default_rng(seed).integers(0, NUM_CLASSES, size=shape)
    labels[:, :3, :3] = 255
    return labels


def reference_logits(model, images):
    """The FCN graph recomposed from the model's own layers."""
    x = model.backbone(images, training=False)["res5"]
    if model.head_filters is not None:
        x = model.get_layer("head")(x, training=False)
    return resize_like(model.get_layer("classifier")(x), images)


class FCNTest(TestCase):
    def test_plain_classifier_on_res5(self):
        model = FCN(tiny_backbone(), NUM_CLASSES)
        images, outputs = self.run_model_test(
            model, (2, 64, 64, 3), {"logits": (2, 64, 64, NUM_CLASSES)}
        )
        names = {layer.name for layer in model.layers}
        self.assertNotIn("head", names)
        self.assertNotIn("dropout", names)
        classifier = model.get_layer("classifier")
        self.assertEqual(classifier.kernel_size, (1, 1))
        # Res5 has 8 · 2 channels; the classifier sits right on it.
        self.assertEqual(classifier.kernel.shape, (1, 1, 16, NUM_CLASSES))
        probe = keras.Model(model.input, classifier.output)
        self.assertEqual(probe(images).shape, (2, 4, 4, NUM_CLASSES))
        np.testing.assert_allclose(
            keras.ops.convert_to_numpy(outputs["logits"]),
            keras.ops.convert_to_numpy(reference_logits(model, images)),
            atol=1e-5,
        )
        self.assert_gradients_reach_backbone(model, images, random_labels((2, 64, 64)))

    def test_conv_head_and_any_input_size(self):
        model = FCN(tiny_backbone(), NUM_CLASSES, head_filters=12, dropout=0.1)
        images, outputs = self.run_model_test(
            model, (1, 65, 47, 3), {"logits": (1, 65, 47, NUM_CLASSES)}
        )
        head = model.get_layer("head")
        self.assertIsInstance(head, ConvBNReLU)
        self.assertEqual((head.filters, head.kernel_size), (12, 3))
        self.assertEqual(model.get_layer("dropout").rate, 0.1)
        np.testing.assert_allclose(
            keras.ops.convert_to_numpy(outputs["logits"]),
            keras.ops.convert_to_numpy(reference_logits(model, images)),
            atol=1e-5,
        )
        self.assert_gradients_reach_backbone(model, images, random_labels((1, 65, 47)))
        restored = self.run_model_saving_test(model, images)
        self.assertEqual(restored.head_filters, 12)
        self.assertEqual(restored.dropout, 0.1)

    def test_mixed_precision(self):
        keras.config.set_dtype_policy("mixed_float16")
        model = FCN(tiny_backbone(), NUM_CLASSES, head_filters=8)
        images, _ = self.run_model_test(
            model, (2, 64, 64, 3), {"logits": (2, 64, 64, NUM_CLASSES)}
        )
        self.assertEqual(model.get_layer("classifier").compute_dtype, "float16")
        self.assert_gradients_reach_backbone(model, images, random_labels((2, 64, 64)))

    def test_bad_inputs(self):
        inputs = keras.Input((None, None, 3))
        tensor_backbone = keras.Model(inputs, keras.layers.Conv2D(4, 3)(inputs))
        with pytest.raises(ValueError, match="must return a dict"):
            FCN(tensor_backbone, NUM_CLASSES)
        x = keras.layers.Conv2D(4, 3, strides=4, padding="same")(inputs)
        with pytest.raises(ValueError, match=r"missing \['res5'\]"):
            FCN(keras.Model(inputs, {"res2": x, "res3": x, "res4": x}), NUM_CLASSES)

        backbone = tiny_backbone()
        for kwargs, message in [
            (dict(num_classes=0), "num_classes must be a positive int"),
            (dict(num_classes=True), "num_classes must be a positive int"),
            (dict(num_classes=3, head_filters=0), "head_filters"),
            (dict(num_classes=3, dropout=-0.1), "dropout"),
        ]:
            with pytest.raises(ValueError, match=message):
                FCN(backbone, **kwargs)


@pytest.mark.slow
class FCNResNet101Test(TestCase):
    def test_paper_baseline(self):
        model = build_fcn_resnet101(21)
        self.assertEqual(model.backbone.name, "pan_resnet101")
        self.run_model_test(model, (1, 64, 48, 3), {"logits": (1, 64, 48, 21)})


def test_hand_computed_tiny_fcn():
    # A 32×32 gray image of four constant 16×16 blocks: the stride-16
    # average-pooling backbone's res5 is exactly [[1, 2], [3, 4]].
    from kseg.testing import average_pooling_backbone, numpy_bilinear_resize

    image = np.kron(np.array([[1.0, 2.0], [3.0, 4.0]]), np.ones((16, 16)))
    images = image[None, :, :, None].astype("float32")
    model = FCN(average_pooling_backbone((32, 32)), 2)
    # logits_0 = 2·res5 + 0.5, logits_1 = -res5.
    model.get_layer("classifier").set_weights(
        [np.array([[[[2.0, -1.0]]]], "float32"), np.array([0.5, 0.0], "float32")]
    )
    scores = np.stack(
        [[[2.5, 4.5], [6.5, 8.5]], [[-1.0, -2.0], [-3.0, -4.0]]], axis=-1
    )[None]
    logits = keras.ops.convert_to_numpy(model(images)["logits"])
    np.testing.assert_allclose(
        logits, numpy_bilinear_resize(scores, (32, 32)), rtol=1e-6, atol=1e-6
    )
    # By hand: corners keep the block's score (clamped sampling); row 16 of
    # column 0 samples the 2×2 map at y = 16.5 / 16 - 0.5 = 0.53125.
    np.testing.assert_allclose(logits[0, 0, 0], [2.5, -1.0], rtol=1e-6)
    np.testing.assert_allclose(logits[0, 31, 31], [8.5, -4.0], rtol=1e-6)
    np.testing.assert_allclose(
        logits[0, 16, 0], [2.5 + 0.53125 * 4.0, -1.0 - 0.53125 * 2.0], rtol=1e-6
    )
