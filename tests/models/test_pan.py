import inspect

import keras
import numpy as np
import pytest
from absl.testing import parameterized

from kseg.backbones import build_resnet
from kseg.layers.common import resize_like
from kseg.layers.pan import FeaturePyramidAttention, GlobalAttentionUpsample
from kseg.models import PAN, build_pan_resnet101
from kseg.testing import TestCase, numpy_conv

NUM_CLASSES = 3
FILTERS = 8

# One constructor call per ablation row of the paper (Tables 1, 3 and 5).
ROWS = {
    "table1_se": dict(decoder="naive", fpa_attention="se", fpa_global_pooling=False),
    "table1_c333_max": dict(
        decoder="naive",
        fpa_kernel_sizes=(3, 3, 3),
        fpa_pooling="max",
        fpa_global_pooling=False,
    ),
    "table1_c333_ave": dict(
        decoder="naive",
        fpa_kernel_sizes=(3, 3, 3),
        fpa_pooling="avg",
        fpa_global_pooling=False,
    ),
    "table1_c357_ave": dict(decoder="naive", fpa_global_pooling=False),
    "table1_c357_ave_gp": dict(decoder="naive"),
    "table3_gau_3x3": dict(fpa=False, gau_global_context=False),
    "table3_gau_gp_1x1": dict(fpa=False, gau_low_kernel_size=1),
    "table3_gau_gp_3x3": dict(fpa=False),
    "table5_pan": dict(),
}

PAN_DEFAULTS = {
    name: parameter.default
    for name, parameter in inspect.signature(PAN).parameters.items()
    if parameter.default is not inspect.Parameter.empty
}


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


def tiny_pan(**kwargs):
    return PAN(tiny_backbone(), NUM_CLASSES, filters=FILTERS, **kwargs)


def random_images(shape, seed=1):
    return np.random.default_rng(seed).uniform(size=shape).astype("float32")


def random_labels(shape, seed=2):
    labels = np.random.default_rng(seed).integers(0, NUM_CLASSES, size=shape)
    labels[:, :3, :3] = 255
    return labels


def layer_names(model):
    return {layer.name for layer in model.layers}


def reference_logits(model, images):
    """The PAN graph recomposed from the model's own layers, step by step."""
    features = model.backbone(images, training=False)
    if model.fpa:
        x = model.get_layer("fpa")(features["res5"], training=False)
    else:
        x = model.get_layer("res5_projection")(features["res5"], training=False)
    if model.decoder == "gau":
        for stage in ("res4", "res3", "res2"):
            gau = model.get_layer(f"gau_{stage}")
            x = gau([features[stage], x], training=False)
    return resize_like(model.get_layer("classifier")(x), images)


class PANTest(TestCase):
    @parameterized.named_parameters((row, row) for row in sorted(ROWS))
    def test_ablation_rows(self, row):
        model = tiny_pan(**ROWS[row])
        expected = {"logits": (2, 64, 64, NUM_CLASSES)}
        images, outputs = self.run_model_test(model, (2, 64, 64, 3), expected)

        kwargs = {**PAN_DEFAULTS, **ROWS[row]}
        names = layer_names(model)
        self.assertEqual("fpa" in names, kwargs["fpa"])
        self.assertEqual("res5_projection" in names, not kwargs["fpa"])
        gau_names = {"gau_res4", "gau_res3", "gau_res2"}
        self.assertEqual(gau_names <= names, kwargs["decoder"] == "gau")
        self.assertEqual(gau_names & names == set(), kwargs["decoder"] == "naive")
        # The GAU chain ends at res2 (stride 4); the naive decoder classifies
        # at the backbone's output stride (16).
        classifier = model.get_layer("classifier")
        self.assertEqual(classifier.kernel_size, (1, 1))
        probe = keras.Model(model.input, classifier.output)
        size = 16 if kwargs["decoder"] == "gau" else 4
        self.assertEqual(probe(images).shape, (2, size, size, NUM_CLASSES))
        if kwargs["fpa"]:
            fpa = model.get_layer("fpa")
            self.assertIsInstance(fpa, FeaturePyramidAttention)
            self.assertEqual(fpa.filters, FILTERS)
            self.assertEqual(fpa.kernel_sizes, tuple(kwargs["fpa_kernel_sizes"]))
            self.assertEqual(fpa.pooling, kwargs["fpa_pooling"])
            self.assertEqual(fpa.global_pooling, kwargs["fpa_global_pooling"])
            self.assertEqual(fpa.attention, kwargs["fpa_attention"])
        if kwargs["decoder"] == "gau":
            for name in gau_names:
                gau = model.get_layer(name)
                self.assertIsInstance(gau, GlobalAttentionUpsample)
                self.assertEqual(gau.low_kernel_size, kwargs["gau_low_kernel_size"])
                self.assertEqual(gau.global_context, kwargs["gau_global_context"])

        np.testing.assert_allclose(
            keras.ops.convert_to_numpy(outputs["logits"]),
            keras.ops.convert_to_numpy(reference_logits(model, images)),
            atol=1e-5,
        )
        self.assert_gradients_reach_backbone(model, images, random_labels((2, 64, 64)))

        revived = PAN.from_config(model.get_config())
        self.assertEqual(
            {k: v for k, v in revived.get_config().items() if k != "backbone"},
            {k: v for k, v in model.get_config().items() if k != "backbone"},
        )

    def test_any_input_size(self):
        model = tiny_pan()
        images, outputs = self.run_model_test(
            model, (1, 65, 47, 3), {"logits": (1, 65, 47, NUM_CLASSES)}
        )
        np.testing.assert_allclose(
            keras.ops.convert_to_numpy(outputs["logits"]),
            keras.ops.convert_to_numpy(reference_logits(model, images)),
            atol=1e-5,
        )

    def test_keras_file_round_trip(self):
        model = tiny_pan(dropout=0.1)
        restored = self.run_model_saving_test(model, random_images((2, 65, 47, 3)))
        self.assertIsInstance(restored, PAN)
        self.assertEqual(restored.get_layer("dropout").rate, 0.1)

    def test_mixed_precision(self):
        keras.config.set_dtype_policy("mixed_float16")
        model = tiny_pan()
        images, outputs = self.run_model_test(
            model, (2, 64, 64, 3), {"logits": (2, 64, 64, NUM_CLASSES)}
        )
        self.assertEqual(model.get_layer("fpa").compute_dtype, "float16")
        self.assertEqual(model.get_layer("gau_res2").compute_dtype, "float16")
        self.assert_gradients_reach_backbone(model, images, random_labels((2, 64, 64)))
        # The head's policy is part of the config: it survives a load under
        # another global policy.
        keras.config.set_dtype_policy("float32")
        restored = self.run_model_saving_test(model, images)
        self.assertEqual(restored.get_layer("fpa").compute_dtype, "float16")
        self.assertEqual(restored.get_layer("classifier").compute_dtype, "float16")

    def test_explicit_head_dtype(self):
        model = tiny_pan(dtype="mixed_float16")
        self.assertEqual(model.get_layer("gau_res3").compute_dtype, "float16")
        self.assertEqual(model.get_layer("gau_res3").variable_dtype, "float32")
        outputs = model(random_images((1, 32, 32, 3)))
        self.assertEqual(
            keras.backend.standardize_dtype(outputs["logits"].dtype), "float32"
        )

    def test_bad_backbones(self):
        inputs = keras.Input((None, None, 3))
        tensor_backbone = keras.Model(inputs, keras.layers.Conv2D(4, 3)(inputs))
        with pytest.raises(ValueError, match="must return a dict"):
            PAN(tensor_backbone, NUM_CLASSES, filters=FILTERS)

        x = keras.layers.Conv2D(4, 3, strides=4, padding="same")(inputs)
        partial = keras.Model(inputs, {"res2": x, "res3": x})
        with pytest.raises(ValueError, match=r"missing \['res4', 'res5'\]"):
            PAN(partial, NUM_CLASSES, filters=FILTERS)

        flat = keras.layers.GlobalAveragePooling2D()(x)
        rank2 = keras.Model(inputs, {"res2": x, "res3": x, "res4": x, "res5": flat})
        with pytest.raises(ValueError, match="'res5' feature must be 4D"):
            PAN(rank2, NUM_CLASSES, filters=FILTERS)

        with pytest.raises(ValueError, match="functional keras.Model"):
            PAN(keras.layers.Conv2D(4, 3), NUM_CLASSES)

        no_channels = keras.Input((None, None, None))
        unknown = keras.Model(
            no_channels, {k: no_channels for k in ("res2", "res3", "res4", "res5")}
        )
        with pytest.raises(ValueError, match="known channels"):
            PAN(unknown, NUM_CLASSES)

    def test_bad_options(self):
        backbone = tiny_backbone()
        cases = [
            (dict(num_classes=0), "num_classes must be a positive int"),
            (dict(num_classes=2.5), "num_classes must be a positive int"),
            (dict(filters=0), "filters must be a positive int"),
            (dict(decoder="bilinear"), "decoder"),
            (dict(fpa=False, decoder="naive"), "FCN"),
            (dict(fpa_pooling="median"), "pooling"),
            (dict(fpa_attention="cbam"), "attention"),
            (dict(fpa_kernel_sizes=(7, 5)), "kernel_sizes"),
            (dict(fpa_kernel_sizes=(7, 4, 3)), "kernel_sizes"),
            (dict(gau_low_kernel_size=2), "low_kernel_size"),
            (dict(dropout=1.0), "dropout"),
        ]
        for kwargs, message in cases:
            kwargs = {"num_classes": NUM_CLASSES, **kwargs}
            with pytest.raises(ValueError, match=message):
                PAN(backbone, **kwargs)


@pytest.mark.slow
class PANResNet101Test(TestCase):
    def test_paper_model(self):
        model = build_pan_resnet101(21)
        self.assertEqual(model.backbone.name, "pan_resnet101")
        self.assertIn("stem3_conv", {layer.name for layer in model.backbone.layers})
        self.run_model_test(model, (1, 64, 48, 3), {"logits": (1, 64, 48, 21)})


def test_hand_computed_tiny_pan():
    # A 128×128 gray image of 8×8 constant 16×16 blocks: with output stride
    # 16 the average-pooling backbone gives res5 = res4 = blocks (8×8), res3
    # / res2 the blocks with every value repeated 2×2 / 4×4. One channel
    # throughout (filters=1), 2 classes; FPA's pyramid is 4×4, 2×2, 1×1.
    from kseg.testing import average_pooling_backbone, numpy_bilinear_resize

    i, j = np.indices((8, 8))
    blocks = ((3 * i + 5 * j) % 7 - 2) / 2.0  # values -1, -0.5, ..., 2
    images = np.kron(blocks, np.ones((16, 16)))[None, :, :, None].astype("float32")
    model = PAN(average_pooling_backbone((128, 128)), 2, filters=1)

    # Known weights: variable number n (in model order) gets the
    # non-repeating pattern p_n = cos(0.9·index + n) over its flattened
    # entries; kernels p / fan-in, plus 1 at the centre tap of the 1→1
    # convs (all but the classifier) so that they pass their input on; the
    # classifier's bias p / 2; BN gamma 1 + p / 4, beta p / 2, mean p / 4,
    # variance 1 + |p| / 2. Kernel sizes are from the definitions (C357
    # from the largest level, GAU's 3×3 low conv, 1×1 elsewhere), not read
    # from the model.
    sizes = {"conv1": 7, "conv2": 5, "conv3": 3, "low_conv": 3}
    w = {}
    for n, variable in enumerate(model.weights):
        shape = tuple(variable.shape)
        if variable.path.endswith("kernel"):
            name = variable.path.split("/")[1]  # down_conv1, low_conv, kernel...
            size = sizes.get(name.removeprefix("down_").removeprefix("level_"), 1)
            assert shape[:2] == (size, size), (variable.path, shape)
        p = np.cos(0.9 * np.arange(np.prod(shape)) + n).reshape(shape)
        kind = variable.path.rsplit("/", 1)[1]
        if kind == "kernel":
            value = p / p[..., 0].size
            if shape[2:] == (1, 1):
                value[shape[0] // 2, shape[1] // 2] += 1.0
        else:
            value = {
                "bias": p / 2,
                "gamma": 1 + p / 4,
                "beta": p / 2,
                "moving_mean": p / 4,
                "moving_variance": 1 + np.abs(p) / 2,
            }[kind]
        w[variable.path] = value.astype("float32").astype("float64")
        variable.assign(w[variable.path].astype("float32"))

    # The same graph in NumPy, from SPEC.md's definitions.
    def conv_bn(x, name, relu=True):
        y = numpy_conv(x, w[f"{name}/conv/kernel"])
        y = (y - w[f"{name}/bn/moving_mean"]) / np.sqrt(
            w[f"{name}/bn/moving_variance"] + 1e-3
        )
        y = y * w[f"{name}/bn/gamma"] + w[f"{name}/bn/beta"]
        return np.maximum(y, 0.0) if relu else y

    def down(x):  # 2×2 average pooling, stride 2 (even sizes here)
        height, width, channels = x.shape
        return x.reshape(height // 2, 2, width // 2, 2, channels).mean(axis=(1, 3))

    def up(x, like):
        return numpy_bilinear_resize(x[None], like.shape[:2])[0]

    def gap(x):
        return x.mean(axis=(0, 1), keepdims=True)

    def fpa(x):
        d1 = conv_bn(down(x), "fpa/down_conv1")  # 7×7 on 4×4
        d2 = conv_bn(down(d1), "fpa/down_conv2")  # 5×5 on 2×2
        d3 = conv_bn(down(d2), "fpa/down_conv3")  # 3×3 on 1×1
        e1, e2, e3 = (
            conv_bn(d, f"fpa/level_conv{level}")
            for level, d in enumerate((d1, d2, d3), start=1)
        )
        u2 = up(e3, e2) + e2
        u1 = up(u2, e1) + e1
        att = up(u1, x)
        return conv_bn(x, "fpa/main") * att + conv_bn(gap(x), "fpa/global_branch")

    def gau(low, high, name):
        g = conv_bn(gap(high), f"{name}/context")
        low = conv_bn(low, f"{name}/low_conv", relu=False)
        return low * g + up(high, low)

    features = {
        "res2": np.kron(blocks, np.ones((4, 4)))[:, :, None],
        "res3": np.kron(blocks, np.ones((2, 2)))[:, :, None],
        "res4": blocks[:, :, None],
    }
    x = fpa(blocks[:, :, None])
    for stage in ("res4", "res3", "res2"):
        x = gau(features[stage], x, f"gau_{stage}")
    scores = x @ w["classifier/kernel"][0, 0] + w["classifier/bias"]
    expected = numpy_bilinear_resize(scores[None], (128, 128))

    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(model(images)["logits"]),
        expected,
        rtol=1e-4,
        atol=1e-5,
    )
