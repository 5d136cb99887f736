import functools

import keras
import numpy as np
import pytest

from kseg.backbones import build_resnet
from kseg.layers.common import resize_like
from kseg.layers.exfuse import BoundaryRefinement, GlobalConvolution
from kseg.models import GCN, build_gcn_resnext101
from kseg.models.gcn import CropLike
from kseg.testing import TestCase, numpy_conv, numpy_deconv_x2

NUM_CLASSES = 3
KERNEL_SIZE = 3
STAGES = ("res2", "res3", "res4", "res5")


def build_tiny_backbone(output_stride=32):
    """One bottleneck block per stage, width 8, 16 channels per stage."""
    return build_resnet(
        (1, 1, 1, 1),
        (8, 8, 8, 8),
        expansion=2,
        stem_width=8,
        output_stride=output_stride,
    )


@functools.cache
def tiny_backbone(output_stride=32):
    """A float32 `build_tiny_backbone` shared by the tests that do not change
    its weights (models may share an encoder), to keep the file fast."""
    return build_tiny_backbone(output_stride)


def random_images(shape, seed=1):
    return np.random.default_rng(seed).uniform(size=shape).astype("float32")


def random_labels(shape, seed=2):
    labels = np.random.default_rng(seed).integers(0, NUM_CLASSES, size=shape)
    labels[:, :3, :3] = 255
    return labels


def to_numpy(x):
    return keras.ops.convert_to_numpy(x)


def reference_logits(model, images):
    """The GCN graph recomposed from the model's own layers, with the ×2
    maps cropped at the bottom / right in NumPy."""
    features = model.backbone(images, training=False)
    levels = {
        stage: model.get_layer(f"gcn_br_{stage}")(
            model.get_layer(f"gcn_{stage}")(features[stage])
        )
        for stage in STAGES
    }
    x = levels["res5"]
    for stage in ("res4", "res3", "res2"):
        up = to_numpy(model.get_layer(f"up_{stage}")(x))
        height, width = levels[stage].shape[1:3]
        assert up.shape[1] - height in (0, 1) and up.shape[2] - width in (0, 1)
        x = model.get_layer(f"fuse_br_{stage}")(up[:, :height, :width] + levels[stage])
    x = model.get_layer("final_br")(x)
    if model.decoder_width not in (None, model.num_classes):
        x = model.get_layer("classifier")(x)
    return to_numpy(resize_like(x, images))


class GCNTest(TestCase):
    def test_score_map_decoder(self):
        model = GCN(tiny_backbone(), NUM_CLASSES, kernel_size=KERNEL_SIZE)
        expected = {"logits": (1, 64, 64, NUM_CLASSES)}
        images, outputs = self.run_model_test(model, (1, 64, 64, 3), expected)
        names = {layer.name for layer in model.layers}
        # The decoder carries the class scores: no classifier.
        self.assertNotIn("classifier", names)
        for stage in STAGES:
            gcn = model.get_layer(f"gcn_{stage}")
            self.assertIsInstance(gcn, GlobalConvolution)
            self.assertEqual((gcn.filters, gcn.kernel_size), (NUM_CLASSES, 3))
            self.assertIsInstance(
                model.get_layer(f"gcn_br_{stage}"), BoundaryRefinement
            )
        for stage in ("res4", "res3", "res2"):
            up = model.get_layer(f"up_{stage}")
            self.assertIsInstance(up, keras.layers.Conv2DTranspose)
            self.assertEqual((up.kernel_size, up.strides), ((4, 4), (2, 2)))
            self.assertEqual(up.filters, NUM_CLASSES)
        np.testing.assert_allclose(
            to_numpy(outputs["logits"]), reference_logits(model, images), atol=1e-5
        )
        self.assert_gradients_reach_backbone(model, images, random_labels((1, 64, 64)))

    def test_wider_decoder_odd_input_size_and_round_trip(self):
        model = GCN(tiny_backbone(), NUM_CLASSES, kernel_size=5, decoder_width=8)
        # 65×47: res2..res5 are 17×12, 9×6, 5×3, 3×2 and every ×2 map is
        # cropped by one row or column somewhere.
        images, outputs = self.run_model_test(
            model, (1, 65, 47, 3), {"logits": (1, 65, 47, NUM_CLASSES)}
        )
        self.assertEqual(model.get_layer("gcn_res3").filters, 8)
        self.assertEqual(model.get_layer("classifier").kernel.shape, (1, 1, 8, 3))
        np.testing.assert_allclose(
            to_numpy(outputs["logits"]), reference_logits(model, images), atol=1e-5
        )
        restored = self.run_model_saving_test(model, images)
        self.assertIsInstance(restored, GCN)
        self.assertEqual((restored.kernel_size, restored.decoder_width), (5, 8))

    def test_mixed_precision(self):
        keras.config.set_dtype_policy("mixed_float16")
        model = GCN(build_tiny_backbone(), NUM_CLASSES, kernel_size=KERNEL_SIZE)
        self.run_model_test(model, (1, 64, 64, 3), {"logits": (1, 64, 64, 3)})
        self.assertEqual(model.get_layer("gcn_res2").compute_dtype, "float16")
        self.assertEqual(model.get_layer("up_res2").compute_dtype, "float16")
        self.assertEqual(model.get_layer("final_br").variable_dtype, "float32")

    def test_bad_options(self):
        backbone = tiny_backbone()
        cases = [
            (dict(num_classes=0), "num_classes must be a positive int"),
            (dict(num_classes=2.0), "num_classes must be a positive int"),
            (dict(kernel_size=4), "kernel_size must be odd"),
            (dict(kernel_size=0), "kernel_size must be a positive int"),
            (dict(decoder_width=0), "decoder_width must be a positive int"),
        ]
        for kwargs, message in cases:
            kwargs = {"num_classes": NUM_CLASSES, **kwargs}
            with pytest.raises(ValueError, match=message):
                GCN(backbone, **kwargs)

    def test_bad_backbones(self):
        inputs = keras.Input((None, None, 3))
        tensor_backbone = keras.Model(inputs, keras.layers.Conv2D(4, 3)(inputs))
        with pytest.raises(ValueError, match="must return a dict"):
            GCN(tensor_backbone, NUM_CLASSES)
        x = keras.layers.Conv2D(4, 3, strides=4, padding="same")(inputs)
        with pytest.raises(ValueError, match=r"missing \['res4', 'res5'\]"):
            GCN(keras.Model(inputs, {"res2": x, "res3": x}), NUM_CLASSES)
        # A dilated encoder keeps res5 at res4's size: the ×2 steps would
        # not line up.
        with pytest.raises(ValueError, match="'res5' is \\(16, 16\\) and 'res4'"):
            GCN(tiny_backbone(output_stride=16), NUM_CLASSES)


class CropLikeTest(TestCase):
    def test_crops_bottom_and_right(self):
        x = np.arange(2 * 6 * 4 * 3, dtype="float32").reshape((2, 6, 4, 3))
        reference = np.zeros((2, 5, 3, 7), "float32")
        np.testing.assert_array_equal(
            to_numpy(CropLike()([x, reference])), x[:, :5, :3]
        )
        symbolic = CropLike().compute_output_shape(
            [(None, None, 8, 3), (None, 7, 5, 1)]
        )
        self.assertEqual(symbolic, (None, 7, 5, 3))
        self.run_serialization_round_trip(CropLike(), [x, reference])

    def test_bad_inputs(self):
        with pytest.raises(ValueError, match="larger reference height 7"):
            CropLike()(
                [keras.KerasTensor((1, 6, 4, 3)), keras.KerasTensor((1, 7, 4, 1))]
            )
        with pytest.raises(ValueError, match="rank 4"):
            CropLike()([keras.KerasTensor((1, 6, 3)), keras.KerasTensor((1, 6, 4, 1))])


@pytest.mark.slow
class GCNResNeXt101Test(TestCase):
    def test_paper_model(self):
        model = build_gcn_resnext101(21)
        self.assertEqual(model.backbone.name, "resnext101_32x4d")
        self.assertEqual(model.get_layer("gcn_res5").kernel_size, 15)
        self.run_model_test(model, (1, 64, 96, 3), {"logits": (1, 64, 96, 21)})


def test_hand_computed_tiny_gcn():
    # A 64×64 gray image of 4×4 constant 16×16 blocks: the stride-32
    # average-pooling backbone gives res4 = blocks, res5 their 2×2 quadrant
    # means, res3 / res2 the blocks with every value repeated 2×2 / 4×4.
    from kseg.testing import average_pooling_backbone, numpy_bilinear_resize

    blocks = np.array(
        [
            [1.0, 3.0, 0.0, 2.0],
            [4.0, 1.0, 2.0, 0.0],
            [0.0, 2.0, 5.0, 1.0],
            [3.0, 0.0, 1.0, 4.0],
        ]
    )
    images = np.kron(blocks, np.ones((16, 16)))[None, :, :, None].astype("float32")
    model = GCN(
        average_pooling_backbone((64, 64), output_stride=32),
        2,
        kernel_size=3,
        decoder_width=1,
    )

    def taps(*values, vertical):
        shape = (3, 1, 1, 1) if vertical else (1, 3, 1, 1)
        return np.reshape(values, shape).astype("float32")

    # Global convolution: branch a = (3×1 [1, 0, 0.5]ᵀ + 0.1) then
    # (1×3 [0, 1, -0.5] - 0.2); branch b = (1×3 [0.5, 1, 0]) then
    # (3×1 [-0.5, 1, 0]ᵀ + 0.3).
    gc_weights = {
        "conv_a1": (taps(1.0, 0.0, 0.5, vertical=True), 0.1),
        "conv_a2": (taps(0.0, 1.0, -0.5, vertical=False), -0.2),
        "conv_b1": (taps(0.5, 1.0, 0.0, vertical=False), 0.0),
        "conv_b2": (taps(-0.5, 1.0, 0.0, vertical=True), 0.3),
    }
    # Boundary refinement: conv1 = x - (pixel above), so its ReLU zeroes
    # every downward step; conv2 = centre + 0.5·(pixel to the right) - 0.1.
    br_conv1 = np.zeros((3, 3, 1, 1), "float32")
    br_conv1[1, 1], br_conv1[0, 1] = 1.0, -1.0
    br_conv2 = np.zeros((3, 3, 1, 1), "float32")
    br_conv2[1, 1], br_conv2[1, 2] = 1.0, 0.5
    br_weights = {"conv1": (br_conv1, 0.0), "conv2": (br_conv2, -0.1)}
    # ×2 transposed conv: the asymmetric 4×4 kernel k/32, k = 0..15 row-major.
    deconv = (np.arange(16.0).reshape(4, 4, 1, 1) / 32).astype("float32")
    # Classifier: logits = [x, 0.5 - x].
    classifier = [
        np.array([[[[1.0, -1.0]]]], "float32"),
        np.array([0.0, 0.5], "float32"),
    ]

    def set_conv(layer, kernel, bias):
        layer.set_weights([kernel, np.full(layer.bias.shape, bias, "float32")])

    br_names = [f"gcn_br_{s}" for s in STAGES] + ["final_br"]
    br_names += [f"fuse_br_{s}" for s in STAGES[:-1]]
    for stage in STAGES:
        gc = model.get_layer(f"gcn_{stage}")
        for name, weights in gc_weights.items():
            set_conv(getattr(gc, name), *weights)
    for name in br_names:
        br = model.get_layer(name)
        set_conv(br.conv1, *br_weights["conv1"])
        set_conv(br.conv2, *br_weights["conv2"])
    for stage in STAGES[:-1]:
        set_conv(model.get_layer(f"up_{stage}"), deconv, 0.0)
    model.get_layer("classifier").set_weights(classifier)

    # The same graph in NumPy, from the definitions (SPEC.md, ExFuse baseline).
    def gc(x):
        (a1, ba1), (a2, ba2), (b1, bb1), (b2, bb2) = gc_weights.values()
        branch_a = numpy_conv(numpy_conv(x, a1, ba1), a2, ba2)
        branch_b = numpy_conv(numpy_conv(x, b1, bb1), b2, bb2)
        return branch_a + branch_b

    def br(x):
        hidden = np.maximum(numpy_conv(x, br_conv1), 0.0)
        return x + numpy_conv(hidden, br_conv2, -0.1)

    quadrants = blocks.reshape(2, 2, 2, 2).mean(axis=(1, 3))
    features = {
        "res2": np.kron(blocks, np.ones((4, 4))),
        "res3": np.kron(blocks, np.ones((2, 2))),
        "res4": blocks,
        "res5": quadrants,
    }
    levels = {stage: br(gc(f[:, :, None])) for stage, f in features.items()}
    x = levels["res5"]
    for stage in ("res4", "res3", "res2"):
        x = br(numpy_deconv_x2(x, deconv) + levels[stage])
    scores = br(x) @ classifier[0][0, 0] + classifier[1]
    expected = numpy_bilinear_resize(scores[None], (64, 64))

    logits = to_numpy(model(images)["logits"])
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-4)
    # By hand: the classifier's two logits sum to 0.5 at every pixel (the
    # resize interpolates both alike).
    np.testing.assert_allclose(logits.sum(axis=-1), 0.5, atol=1e-3)
