import functools
import inspect

import keras
import numpy as np
import pytest
from absl.testing import parameterized

from kseg.backbones import (
    build_resnet,
    build_semantic_supervision_pretrainer,
    prepend_normalization,
    semantic_supervision_features,
)
from kseg.layers.common import ConvBNReLU, resize_like
from kseg.layers.exfuse import (
    DenselyAdjacentPrediction,
    SemanticEmbeddingBranch,
    SubPixelUpsample,
)
from kseg.models import GCN, ExFuse, build_exfuse_resnext101
from kseg.models.exfuse import AUXILIARY_LOSS_WEIGHTS
from kseg.testing import TestCase, numpy_conv, numpy_deconv_x2

NUM_CLASSES = 3
KERNEL_SIZE = 3
DAP_WIDTH = NUM_CLASSES * 9
STAGES = ("res2", "res3", "res4", "res5")
SS = dict(semantic_supervision=True)
SEB = dict(semantic_supervision=True, seb=True)

# One constructor call per ablation row: (layer-rearranged backbone?, kwargs).
ROWS = {
    "table3_1_baseline": (False, {}),
    "table3_2_ss": (False, SS),
    "table3_3_ss_lr": (True, SS),
    "table3_4_ecre": (True, {**SS, "ecre": True}),
    "table3_5_seb": (True, SEB),
    "table3_6_dap": (True, {**SEB, "dap": True}),
    "table3_7_all": (True, {**SEB, "ecre": True, "dap": True}),
    "table4_deconv_supervised": (
        True,
        {**SS, "ecre": True, "ecre_upsampling": "deconv"},
    ),
    "table4_subpixel_only": (True, {**SS, "ecre": True, "ecre_supervision": False}),
    "table5_more_channels": (True, {**SEB, "decoder_width": DAP_WIDTH}),
}

# Rows whose every weight must get a gradient from the main loss: together
# they hold every kind of layer the switches add (the baseline's are checked
# in test_gcn.py).
GRADIENT_ROWS = ("table3_7_all", "table5_more_channels")

EXFUSE_DEFAULTS = {
    name: parameter.default
    for name, parameter in inspect.signature(ExFuse).parameters.items()
    if parameter.default is not inspect.Parameter.empty
}


def build_tiny_backbone(rearranged=False, output_stride=32):
    """One bottleneck block per stage (width 8, 16 channels per stage), or a
    tiny "layer rearrangement" with blocks moved out of res4."""
    blocks = (2, 2, 1, 2) if rearranged else (1, 1, 1, 1)
    return build_resnet(
        blocks, (8, 8, 8, 8), expansion=2, stem_width=8, output_stride=output_stride
    )


@functools.cache
def tiny_backbone(rearranged=False, output_stride=32):
    """A float32 `build_tiny_backbone` shared by the tests that do not change
    its weights (models may share an encoder), to keep the file fast."""
    return build_tiny_backbone(rearranged, output_stride)


def tiny_exfuse(rearranged=False, **kwargs):
    return ExFuse(
        tiny_backbone(rearranged), NUM_CLASSES, kernel_size=KERNEL_SIZE, **kwargs
    )


def random_images(shape, seed=1):
    return np.random.default_rng(seed).uniform(size=shape).astype("float32")


def random_labels(shape, seed=2):
    labels = np.random.default_rng(seed).integers(0, NUM_CLASSES, size=shape)
    labels[:, :3, :3] = 255
    return labels


def to_numpy(x):
    return keras.ops.convert_to_numpy(x)


def layer_names(model):
    return {layer.name for layer in model.layers}


def apply_scores(model, x, prefix):
    names = layer_names(model)
    if f"{prefix}classifier" in names:
        x = model.get_layer(f"{prefix}classifier")(x)
    if f"{prefix}dap" in names:
        x = model.get_layer(f"{prefix}dap")(x)
    return x


def reference_outputs(model, images):
    """The ExFuse graph of Fig. 2, recomposed from the model's own layers."""
    layer = model.get_layer
    features = model.backbone(images, training=False)
    if model.semantic_supervision:
        features = {
            stage: layer(f"ss_{stage}_conv2")(
                layer(f"ss_{stage}_conv1")(features[stage], training=False),
                training=False,
            )
            for stage in STAGES
        }
    inputs = dict(features)
    if model.seb:
        for index, stage in enumerate(STAGES[:-1]):
            inputs[stage] = layer(f"seb_{stage}")([features[s] for s in STAGES[index:]])
    levels = {
        stage: layer(f"gcn_br_{stage}")(layer(f"gcn_{stage}")(inputs[stage]))
        for stage in STAGES
    }
    x, upsampled = levels["res5"], {}
    for stage in ("res4", "res3", "res2"):
        height, width = levels[stage].shape[1:3]
        upsampled[stage] = to_numpy(layer(f"up_{stage}")(x))[:, :height, :width]
        x = layer(f"fuse_br_{stage}")(upsampled[stage] + levels[stage])
    x = layer("final_br")(x)
    outputs = {"logits": resize_like(apply_scores(model, x, ""), images)}
    if model.ecre and model.ecre_supervision:
        outputs["ecre_logits"] = apply_scores(model, upsampled["res4"], "ecre_")
    return {name: to_numpy(value) for name, value in outputs.items()}


class ExFuseTest(TestCase):
    @parameterized.named_parameters((row, row) for row in sorted(ROWS))
    def test_ablation_rows(self, row):
        rearranged, row_kwargs = ROWS[row]
        model = tiny_exfuse(rearranged, **row_kwargs)
        kwargs = {**EXFUSE_DEFAULTS, **row_kwargs}
        expected = {"logits": (1, 64, 64, NUM_CLASSES)}
        aux = kwargs["ecre"] and kwargs["ecre_supervision"]
        if aux:
            expected["ecre_logits"] = (1, 4, 4, NUM_CLASSES)
        images, outputs = self.run_model_test(model, (1, 64, 64, 3), expected)
        for name in expected:
            self.assertEqual(
                keras.backend.standardize_dtype(outputs[name].dtype), "float32"
            )
        self.assertEqual(set(model.output_loss_weights()), set(expected))

        names = layer_names(model)
        width = kwargs["decoder_width"] or (DAP_WIDTH if kwargs["dap"] else NUM_CLASSES)
        subpixel = kwargs["ecre"] and kwargs["ecre_upsampling"] == "subpixel"
        self.assertEqual(
            any(
                layer.name.startswith("res3_block2") for layer in model.backbone.layers
            ),
            rearranged,
        )
        for stage in STAGES:
            self.assertEqual(
                f"ss_{stage}_conv2" in names, kwargs["semantic_supervision"]
            )
            self.assertEqual(f"seb_{stage}" in names, kwargs["seb"] and stage != "res5")
            gcn_width = 4 * width if subpixel and stage == "res5" else width
            self.assertEqual(model.get_layer(f"gcn_{stage}").filters, gcn_width)
        up_res4 = model.get_layer("up_res4")
        if subpixel:
            self.assertIsInstance(up_res4, SubPixelUpsample)
        else:
            self.assertIsInstance(up_res4, keras.layers.Conv2DTranspose)
        self.assertEqual("dap" in names, kwargs["dap"])
        self.assertEqual(
            "classifier" in names, width != NUM_CLASSES and not kwargs["dap"]
        )
        self.assertEqual("ecre_logits" in names, aux)

        reference = reference_outputs(model, images)
        for name in expected:
            np.testing.assert_allclose(
                to_numpy(outputs[name]), reference[name], atol=1e-5, err_msg=name
            )
        if row in GRADIENT_ROWS:
            self.assert_gradients_reach_backbone(
                model, images, random_labels((1, 64, 64))
            )
        if not row_kwargs:
            # Every switch off is GCN: same weights, same outputs.
            gcn = GCN(model.backbone, NUM_CLASSES, kernel_size=KERNEL_SIZE)
            self.assertEqual(
                [w.path for w in gcn.weights], [w.path for w in model.weights]
            )
            gcn.set_weights(model.get_weights())
            np.testing.assert_allclose(
                to_numpy(gcn(images)["logits"]), to_numpy(outputs["logits"])
            )

    def test_semantic_embedding_branch_inputs(self):
        model = tiny_exfuse(**SEB)
        # SEB of level l multiplies x_l with every higher level: 4, 3, 2 convs.
        for stage, levels in (("res2", 4), ("res3", 3), ("res4", 2)):
            seb = model.get_layer(f"seb_{stage}")
            self.assertIsInstance(seb, SemanticEmbeddingBranch)
            self.assertEqual(len(seb.convs), levels)
            self.assertEqual(seb.filters, 16)
            ss_conv2 = model.get_layer(f"ss_{stage}_conv2")
            self.assertIs(seb.input[0], ss_conv2.output)
        self.assertIsInstance(model.get_layer("ss_res3_conv1"), ConvBNReLU)

    def test_ecre_and_dap_add_no_weights(self):
        backbone = tiny_backbone()
        ecre = ExFuse(backbone, NUM_CLASSES, kernel_size=KERNEL_SIZE, ecre=True)
        # The sub-pixel upsampling has no weights, and with the decoder
        # carrying the class scores nothing lies between the auxiliary loss
        # and the upsampled channels.
        self.assertEqual(ecre.get_layer("up_res4").count_params(), 0)
        self.assertNotIn("ecre_classifier", layer_names(ecre))
        self.assertEqual(AUXILIARY_LOSS_WEIGHTS, {"ecre_logits": 1.0})
        self.assertEqual(
            ecre.output_loss_weights(), {"logits": 1.0, "ecre_logits": 1.0}
        )
        deconv = ExFuse(
            backbone,
            NUM_CLASSES,
            kernel_size=KERNEL_SIZE,
            ecre=True,
            ecre_upsampling="deconv",
        )
        self.assertGreater(deconv.get_layer("up_res4").count_params(), 0)

        dap = ExFuse(backbone, NUM_CLASSES, kernel_size=KERNEL_SIZE, dap=True)
        more = ExFuse(
            backbone, NUM_CLASSES, kernel_size=KERNEL_SIZE, decoder_width=DAP_WIDTH
        )
        self.assertIsInstance(dap.get_layer("dap"), DenselyAdjacentPrediction)
        self.assertEqual(dap.get_layer("dap").count_params(), 0)
        # Same decoder; DAP replaces the 1×1 classifier (27 → 3) and adds no
        # weight of its own.
        self.assertEqual(
            dap.count_params(),
            more.count_params() - more.get_layer("classifier").count_params(),
        )

    def test_auxiliary_heads_of_wider_decoders(self):
        backbone = tiny_backbone()
        wide = ExFuse(backbone, NUM_CLASSES, kernel_size=3, ecre=True, decoder_width=8)
        self.assertEqual(wide.get_layer("ecre_classifier").kernel.shape, (1, 1, 8, 3))
        both = ExFuse(
            backbone, NUM_CLASSES, kernel_size=3, ecre=True, dap=True, decoder_width=18
        )
        # 18 channels (2·k²) become the 27 = 3·k² DAP inputs through 1×1
        # classifiers; the default width (27) would need none.
        self.assertEqual(both.get_layer("classifier").kernel.shape, (1, 1, 18, 27))
        self.assertEqual(both.get_layer("ecre_classifier").kernel.shape, (1, 1, 18, 27))
        images = random_images((1, 65, 47, 3))
        outputs = both(images)
        self.assertEqual(outputs["ecre_logits"].shape, (1, 5, 3, NUM_CLASSES))
        reference = reference_outputs(both, images)
        for name, value in reference.items():
            np.testing.assert_allclose(to_numpy(outputs[name]), value, atol=1e-5)

    def test_odd_input_size_and_round_trip(self):
        model = tiny_exfuse(True, **SEB, ecre=True, dap=True)
        expected = {"logits": (1, 65, 47, NUM_CLASSES), "ecre_logits": (1, 5, 3, 3)}
        images, outputs = self.run_model_test(model, (1, 65, 47, 3), expected)
        reference = reference_outputs(model, images)
        for name in expected:
            np.testing.assert_allclose(
                to_numpy(outputs[name]), reference[name], atol=1e-5
            )
        restored = self.run_model_saving_test(model, images)
        self.assertIsInstance(restored, ExFuse)
        self.assertEqual(
            (restored.ecre, restored.seb, restored.dap, restored.semantic_supervision),
            (True, True, True, True),
        )

    def test_mixed_precision(self):
        keras.config.set_dtype_policy("mixed_float16")
        model = ExFuse(
            build_tiny_backbone(), 3, kernel_size=3, **SEB, ecre=True, dap=True
        )
        expected = {"logits": (1, 64, 64, 3), "ecre_logits": (1, 4, 4, 3)}
        images, outputs = self.run_model_test(model, (1, 64, 64, 3), expected)
        self.assertEqual(
            keras.backend.standardize_dtype(outputs["ecre_logits"].dtype), "float32"
        )
        for name in ("ss_res2_conv1", "seb_res3", "gcn_res5", "up_res4", "dap"):
            self.assertEqual(model.get_layer(name).compute_dtype, "float16", name)
        self.assert_gradients_reach_backbone(model, images, random_labels((1, 64, 64)))

    def test_semantic_supervision_weight_transfer(self):
        # Separate encoders, so the transfer has weights to copy.
        pretrainer, _ = build_semantic_supervision_pretrainer(build_tiny_backbone(), 5)
        model = ExFuse(build_tiny_backbone(), NUM_CLASSES, kernel_size=3, **SS)
        model.load_semantic_supervision_weights(pretrainer)
        encoder = semantic_supervision_features(pretrainer)
        images = random_images((1, 32, 32, 3))
        expected = encoder(images, training=False)
        probe = keras.Model(
            model.input,
            {stage: model.get_layer(f"ss_{stage}_conv2").output for stage in STAGES},
        )
        got = probe(images, training=False)
        for stage in STAGES:
            np.testing.assert_allclose(
                to_numpy(got[stage]), to_numpy(expected[stage]), atol=1e-6
            )

        # The shapes are checked before anything is written, so the shared
        # encoder keeps its weights.
        narrow = tiny_exfuse(**SS, semantic_supervision_filters=4)
        with pytest.raises(ValueError, match="Cannot load head ss_res2.conv1"):
            narrow.load_semantic_supervision_weights(pretrainer)
        with pytest.raises(ValueError, match="semantic_supervision=True"):
            tiny_exfuse().load_semantic_supervision_weights(pretrainer)

    def test_semantic_supervision_weights_into_a_normalized_encoder(self):
        # As the trainer builds models: normalization inside the encoder.
        # Pretrained on a bare encoder or on a normalized one, the weights
        # land in the model's encoder and the features match.
        mean, std = (120.0, 110.0, 100.0), (60.0, 50.0, 40.0)
        model = ExFuse(
            prepend_normalization(build_tiny_backbone(), mean, std),
            NUM_CLASSES,
            kernel_size=KERNEL_SIZE,
            **SS,
        )
        self.assertEqual(model.backbone.name, "resnet")
        self.assertEqual(model.backbone.layers[1].name, "input_normalization")
        images = random_images((1, 32, 32, 3)) * 255.0
        for normalized in (False, True):
            encoder = build_tiny_backbone()
            if normalized:
                encoder = prepend_normalization(encoder, mean, std)
            pretrainer, _ = build_semantic_supervision_pretrainer(encoder, 5)
            model.load_semantic_supervision_weights(pretrainer)
            pretrained = semantic_supervision_features(pretrainer)
            probe = keras.Model(
                model.input,
                {s: model.get_layer(f"ss_{s}_conv2").output for s in STAGES},
            )
            inputs = images
            if not normalized:
                inputs = (images - np.array(mean, "float32")) / np.array(std, "float32")
            expected = pretrained(inputs, training=False)
            got = probe(images, training=False)
            for stage in STAGES:
                np.testing.assert_allclose(
                    to_numpy(got[stage]), to_numpy(expected[stage]), atol=1e-5
                )

    def test_bad_options(self):
        backbone = tiny_backbone()
        cases = [
            (dict(num_classes=0), "num_classes must be a positive int"),
            (dict(kernel_size=14), "kernel_size must be odd"),
            (dict(dap=True, decoder_width=10), "multiple of dap_window_size"),
            (dict(dap=True, dap_window_size=2), "dap_window_size must be odd"),
            (dict(dap_window_size=0), "dap_window_size must be a positive int"),
            (dict(decoder_width=-1), "decoder_width must be a positive int"),
            (dict(ecre=True, ecre_upsampling="bilinear"), "ecre_upsampling"),
            (dict(ecre_upsampling="deconv"), "need ecre=True"),
            (dict(ecre_supervision=False), "need ecre=True"),
            (
                dict(semantic_supervision_filters=8),
                "needs semantic_supervision=True",
            ),
        ]
        for kwargs, message in cases:
            kwargs = {"num_classes": NUM_CLASSES, "kernel_size": 3, **kwargs}
            with pytest.raises(ValueError, match=message):
                ExFuse(backbone, **kwargs)

    def test_bad_backbones(self):
        inputs = keras.Input((None, None, 3))
        tensor_backbone = keras.Model(inputs, keras.layers.Conv2D(4, 3)(inputs))
        with pytest.raises(ValueError, match="must return a dict"):
            ExFuse(tensor_backbone, NUM_CLASSES)
        no_channels = keras.Input((None, None, None))
        unknown = keras.Model(no_channels, dict.fromkeys(STAGES, no_channels))
        with pytest.raises(ValueError, match="known channels"):
            ExFuse(unknown, NUM_CLASSES)
        with pytest.raises(ValueError, match="stage strides"):
            ExFuse(tiny_backbone(output_stride=16), NUM_CLASSES, seb=True)


@pytest.mark.slow
class ExFuseResNeXt101Test(TestCase):
    def test_paper_model(self):
        model = build_exfuse_resnext101(21)
        self.assertEqual(model.backbone.name, "exfuse_resnext101_rearranged")
        self.assertEqual(model.get_layer("gcn_res5").filters, 4 * 189)
        self.assertEqual(model.get_layer("up_res3").filters, 189)
        expected = {"logits": (1, 64, 96, 21), "ecre_logits": (1, 4, 6, 21)}
        self.run_model_test(model, (1, 64, 96, 3), expected)


def numpy_subpixel_x2(x):
    """Depth-to-space ×2 (DCR): `out[2i + a, 2j + b, c] = x[i, j, (2a + b)·C + c]`."""
    height, width, channels = x.shape
    c = channels // 4
    out = np.zeros((2 * height, 2 * width, c))
    for a in range(2):
        for b in range(2):
            out[a::2, b::2] = x[:, :, (2 * a + b) * c : (2 * a + b + 1) * c]
    return out


def numpy_dap(x, k=3):
    """DAP from its formula: `r[i, j, c] = (1/k²) Σ_{l,m<k} x[i + l - k//2,
    j + m - k//2, c·k² + l·k + m]`, positions outside the image adding 0."""
    height, width, channels = x.shape
    out = np.zeros((height, width, channels // k**2))
    for i, j, c, l, m in np.ndindex(*out.shape, k, k):
        y, z = i + l - k // 2, j + m - k // 2
        if 0 <= y < height and 0 <= z < width:
            out[i, j, c] += x[y, z, c * k * k + l * k + m] / k**2
    return out


def test_hand_computed_tiny_exfuse():
    # Table 3 #7 (SS, SEB, ECRE, DAP) on a 64×64 gray image of 4×4 constant
    # 16×16 blocks: the stride-32 average-pooling backbone gives res4 =
    # blocks, res5 their 2×2 quadrant means, res3 / res2 the blocks with
    # every value repeated 2×2 / 4×4. 2 classes, DAP k = 3: the decoder
    # carries 18 channels (class c's window position g in channel 9c + g),
    # res5 72 for the sub-pixel ×2.
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
    model = ExFuse(
        average_pooling_backbone((64, 64), output_stride=32),
        2,
        semantic_supervision=True,
        ecre=True,
        seb=True,
        dap=True,
        kernel_size=3,
    )
    # The decoder holds the DAP maps: no 1×1 classifier before either DAP.
    names = {layer.name for layer in model.layers}
    assert "classifier" not in names and "ecre_classifier" not in names

    # Known weights: variable number n (in model order) gets the
    # non-repeating pattern p_n = cos(0.9·index + n) over its flattened
    # entries; kernels p / fan-in (a ×2 transposed conv pixel sees 2×2
    # taps), plus 1 at the centre tap of the 1-channel SS and SEB convs so
    # that they pass the image on; biases p / 2, BN gamma 1 + p / 4,
    # beta p / 2, mean p / 4, variance 1 + |p| / 2.
    # Kernel sizes from the definitions, not read from the model: GC k×1
    # then 1×k (branch a) and 1×k then k×1 (b), 4×4 transposed convs, 3×3
    # SS, SEB and BR convs.
    sizes = {"conv_a1": (3, 1), "conv_a2": (1, 3), "conv_b1": (1, 3)}
    sizes.update(conv_b2=(3, 1), up_res3=(4, 4), up_res2=(4, 4))
    w = {}
    for n, variable in enumerate(model.weights):
        shape = tuple(variable.shape)
        if variable.path.endswith("kernel"):
            size = sizes.get(variable.path.split("/")[-2], (3, 3))
            assert shape[:2] == size, (variable.path, shape)
        p = np.cos(0.9 * np.arange(np.prod(shape)) + n).reshape(shape)
        kind = variable.path.rsplit("/", 1)[1]
        if kind == "kernel":
            fan_in = 4 * shape[3] if variable.path.startswith("up_") else p[..., 0].size
            value = p / fan_in
            if shape == (3, 3, 1, 1):
                value[1, 1] += 1.0
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
    def conv(x, name):
        return numpy_conv(x, w[f"{name}/kernel"], w[f"{name}/bias"])

    def conv_bn_relu(x, name):
        y = numpy_conv(x, w[f"{name}/conv/kernel"])
        y = (y - w[f"{name}/bn/moving_mean"]) / np.sqrt(
            w[f"{name}/bn/moving_variance"] + 1e-3
        )
        return np.maximum(y * w[f"{name}/bn/gamma"] + w[f"{name}/bn/beta"], 0.0)

    def global_conv(x, name):
        a = conv(conv(x, f"{name}/conv_a1"), f"{name}/conv_a2")
        b = conv(conv(x, f"{name}/conv_b1"), f"{name}/conv_b2")
        return a + b

    def boundary_refinement(x, name):
        return x + conv(np.maximum(conv(x, f"{name}/conv1"), 0.0), f"{name}/conv2")

    def seb(levels, name):
        out = conv(levels[0], f"{name}/conv_0")
        for m, high in enumerate(levels[1:], start=1):
            high = conv(high, f"{name}/conv_{m}")
            out = out * numpy_bilinear_resize(high[None], out.shape[:2])[0]
        return out

    backbone = {
        "res2": np.kron(blocks, np.ones((4, 4))),
        "res3": np.kron(blocks, np.ones((2, 2))),
        "res4": blocks,
        "res5": blocks.reshape(2, 2, 2, 2).mean(axis=(1, 3)),
    }
    # SS: each stage's feature is its head's second conv–BN–ReLU.
    features = {
        s: conv_bn_relu(conv_bn_relu(f[:, :, None], f"ss_{s}_conv1"), f"ss_{s}_conv2")
        for s, f in backbone.items()
    }
    # SEB on res2..res4 with every higher level.
    inputs = dict(features)
    for index, stage in enumerate(STAGES[:-1]):
        inputs[stage] = seb([features[s] for s in STAGES[index:]], f"seb_{stage}")
    levels = {
        s: boundary_refinement(global_conv(x, f"gcn_{s}"), f"gcn_br_{s}")
        for s, x in inputs.items()
    }
    # ECRE: res5 → res4 by sub-pixel ×2 (72 → 18 channels), then deconvs.
    ecre = numpy_subpixel_x2(levels["res5"])
    x = boundary_refinement(ecre + levels["res4"], "fuse_br_res4")
    for stage in ("res3", "res2"):
        up = numpy_deconv_x2(x, w[f"up_{stage}/kernel"], w[f"up_{stage}/bias"])
        x = boundary_refinement(up + levels[stage], f"fuse_br_{stage}")
    x = boundary_refinement(x, "final_br")
    expected = {
        "logits": numpy_bilinear_resize(numpy_dap(x)[None], (64, 64)),
        "ecre_logits": numpy_dap(ecre)[None],
    }

    outputs = model(images)
    assert sorted(outputs) == sorted(expected)
    for name in ("ecre_logits", "logits"):  # the auxiliary one is nearer ECRE
        np.testing.assert_allclose(
            to_numpy(outputs[name]), expected[name], rtol=1e-4, atol=1e-5, err_msg=name
        )
