import math
import os

import keras
import numpy as np
import pytest

from kseg.backbones import (
    BACKBONES,
    build_backbone,
    build_resnet,
    count_multiply_adds,
    exfuse_resnext101_rearranged,
    pan_resnet101,
    resnet50,
    resnet101,
    resnet152,
    resnext101_32x4d,
    se_resnext131,
    segmodel_resnet101,
)
from kseg.testing import weight_gradients

STAGES = ("res2", "res3", "res4", "res5")
TINY = {"block_counts": (1, 1, 1, 1), "widths": (8, 16, 32, 64)}


def tiny(**kwargs):
    return build_resnet(**{**TINY, **kwargs})


def _images(shape, seed=0):
    return np.random.default_rng(seed).normal(size=shape).astype("float32")


# --- NumPy float64 reference, written from the architecture description ---


def np_conv(x, kernel, stride=1, dilation=1, groups=1, bias=None):
    """Conv with symmetric zero padding d·(k−1)/2 (Caffe / PyTorch)."""
    kh, kw, cin_g, cout = kernel.shape
    ph, pw = dilation * (kh - 1) // 2, dilation * (kw - 1) // 2
    n, h, w, _ = x.shape
    xp = np.pad(x, ((0, 0), (ph, ph), (pw, pw), (0, 0)))
    ho = (h + 2 * ph - dilation * (kh - 1) - 1) // stride + 1
    wo = (w + 2 * pw - dilation * (kw - 1) - 1) // stride + 1
    out = np.zeros((n, ho, wo, cout))
    cout_g = cout // groups
    for g in range(groups):
        for i in range(kh):
            for j in range(kw):
                patch = xp[
                    :,
                    i * dilation : i * dilation + stride * (ho - 1) + 1 : stride,
                    j * dilation : j * dilation + stride * (wo - 1) + 1 : stride,
                    g * cin_g : (g + 1) * cin_g,
                ]
                out[..., g * cout_g : (g + 1) * cout_g] += (
                    patch @ kernel[i, j, :, g * cout_g : (g + 1) * cout_g]
                )
    return out if bias is None else out + bias


def np_max_pool_3x3_s2(x):
    n, h, w, c = x.shape
    xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-np.inf)
    ho, wo = (h - 1) // 2 + 1, (w - 1) // 2 + 1
    out = np.full((n, ho, wo, c), -np.inf)
    for i in range(3):
        for j in range(3):
            out = np.maximum(out, xp[:, i : i + 2 * ho - 1 : 2, j : j + 2 * wo - 1 : 2])
    return out


class NumpyResNet:
    """Inference-mode forward pass reading the weights by layer name."""

    def __init__(self, model, cfg):
        self.model, self.cfg = model, cfg

    def w(self, name):
        return [np.asarray(v, "float64") for v in self.model.get_layer(name).weights]

    def bn(self, x, name):
        gamma, beta, mean, var = self.w(name)
        return (x - mean) / np.sqrt(var + self.cfg["eps"]) * gamma + beta

    def conv_bn(self, x, name, relu=True, **conv_kwargs):
        x = self.bn(np_conv(x, self.w(f"{name}_conv")[0], **conv_kwargs), f"{name}_bn")
        return np.maximum(x, 0) if relu else x

    def __call__(self, x):
        cfg = self.cfg
        if cfg["deep_stem"]:
            x = self.conv_bn(x, "stem1", stride=2)
            x = self.conv_bn(x, "stem2")
            x = self.conv_bn(x, "stem3")
        else:
            x = self.conv_bn(x, "stem", stride=2)
        x = np_max_pool_3x3_s2(x)
        out = {}
        for stage, stride, dilation in zip(
            STAGES, cfg["strides"], cfg["dilations"], strict=True
        ):
            p = f"{stage}_block1"
            shortcut = self.conv_bn(x, f"{p}_shortcut", relu=False, stride=stride)
            y = self.conv_bn(x, f"{p}_1")
            y = self.conv_bn(
                y, f"{p}_2", stride=stride, dilation=dilation, groups=cfg["groups"]
            )
            y = self.conv_bn(y, f"{p}_3", relu=False)
            if cfg["se"]:
                s = y.mean(axis=(1, 2), keepdims=True)
                s = np.maximum(
                    np_conv(s, *self.w(f"{p}_se_reduce")[:1])
                    + self.w(f"{p}_se_reduce")[1],
                    0,
                )
                s = (
                    np_conv(s, self.w(f"{p}_se_expand")[0])
                    + self.w(f"{p}_se_expand")[1]
                )
                y = y / (1 + np.exp(-s))
            x = np.maximum(shortcut + y, 0)
            out[stage] = x
        return out


def randomize_weights(model, seed=0):
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            c = layer.gamma.shape[0]
            layer.set_weights(
                [
                    rng.uniform(0.5, 1.5, c),
                    rng.normal(0, 0.1, c),
                    rng.normal(0, 0.1, c),
                    rng.uniform(0.5, 1.5, c),
                ]
            )
        elif layer.weights:
            values = []
            for v in layer.weights:
                fan_in = int(np.prod(v.shape[:-1])) if len(v.shape) > 1 else 1
                values.append(rng.normal(0, 1 / math.sqrt(fan_in), v.shape))
            layer.set_weights(values)


@pytest.mark.parametrize(
    "cfg",
    [
        {"output_stride": 32, "deep_stem": False, "cardinality": 1, "se": False},
        {"output_stride": 8, "deep_stem": True, "cardinality": 2, "se": True},
    ],
    ids=["plain_os32", "deepstem_grouped_se_os8"],
)
def test_matches_numpy_reference(cfg):
    model = tiny(
        output_stride=cfg["output_stride"],
        deep_stem=cfg["deep_stem"],
        cardinality=cfg["cardinality"],
        squeeze_excitation=cfg["se"],
        se_ratio=4,
        stem_width=4,
        input_shape=(None, None, 3),
    )
    randomize_weights(model)
    strides, dilations = {
        32: ((1, 2, 2, 2), (1, 1, 1, 1)),
        8: ((1, 2, 1, 1), (1, 1, 2, 4)),
    }[cfg["output_stride"]]
    reference = NumpyResNet(
        model,
        {
            "deep_stem": cfg["deep_stem"],
            "groups": cfg["cardinality"],
            "se": cfg["se"],
            "eps": 1e-5,
            "strides": strides,
            "dilations": dilations,
        },
    )
    # Odd and even sizes: symmetric padding is visible only when they differ.
    x = _images((2, 30, 23, 3))
    got = model(x, training=False)
    expected = reference(x.astype("float64"))
    for stage in STAGES:
        assert got[stage].shape == expected[stage].shape
        np.testing.assert_allclose(
            np.asarray(got[stage]), expected[stage], rtol=1e-4, atol=1e-4
        )


@pytest.mark.parametrize(
    "output_stride, strides, dilations",
    [
        (32, (4, 8, 16, 32), (1, 1, 1, 1)),
        (16, (4, 8, 16, 16), (1, 1, 1, 2)),
        (8, (4, 8, 8, 8), (1, 1, 2, 4)),
    ],
)
def test_feature_shapes_per_output_stride(output_stride, strides, dilations):
    model = tiny(output_stride=output_stride)
    for size in ((64, 64), (65, 47)):
        out = model(_images((2, *size, 3)))
        assert list(out) == list(STAGES)
        for stage, stride, width in zip(STAGES, strides, TINY["widths"], strict=True):
            expected = (2, math.ceil(size[0] / stride), math.ceil(size[1] / stride))
            assert tuple(out[stage].shape) == (*expected, 4 * width)
            assert keras.backend.standardize_dtype(out[stage].dtype) == "float32"
    for stage, dilation in zip(STAGES, dilations, strict=True):
        conv = model.get_layer(f"{stage}_block1_2_conv")
        assert tuple(conv.dilation_rate) == (dilation, dilation)


def test_dynamic_input_size_symbolic_shapes_and_bn_settings():
    model = tiny(bn_momentum=0.97, bn_epsilon=1e-3)
    bn = model.get_layer("res3_block1_2_bn")
    assert (bn.momentum, bn.epsilon) == (0.97, 1e-3)
    assert {k: tuple(v.shape) for k, v in model.output.items()} == {
        "res2": (None, None, None, 32),
        "res3": (None, None, None, 64),
        "res4": (None, None, None, 128),
        "res5": (None, None, None, 256),
    }
    assert tuple(model(_images((1, 33, 17, 3)))["res5"].shape) == (1, 2, 1, 256)


def test_every_block_of_a_dilated_stage_is_dilated():
    model = build_resnet((1, 2, 2, 3), (4, 8, 16, 32), output_stride=8)
    for stage, rate in (("res3", 1), ("res4", 2), ("res5", 4)):
        blocks = {"res3": 2, "res4": 2, "res5": 3}[stage]
        for b in range(1, blocks + 1):
            conv = model.get_layer(f"{stage}_block{b}_2_conv")
            assert tuple(conv.dilation_rate) == (rate, rate)
            assert tuple(conv.strides) == (
                (2, 2) if stage == "res3" and b == 1 else (1, 1)
            )
    # Identity shortcuts inside a stage, projections only where shapes change.
    names = {layer.name for layer in model.layers}
    assert "res4_block2_shortcut_conv" not in names
    assert model.get_layer("res4_block1_shortcut_conv").strides == (1, 1)
    # No projection when neither stride nor channels change.
    same_width = build_resnet((1, 1, 1, 1), (4, 8, 8, 8), output_stride=8)
    assert "res4_block1_shortcut_conv" not in {l.name for l in same_width.layers}


def test_grouped_se_deep_stem_variant():
    model = tiny(
        cardinality=2,
        group_width=4,
        squeeze_excitation=True,
        se_ratio=4,
        deep_stem=True,
        stem_width=16,
        input_shape=(64, 64, 3),
    )
    # group_width 4 at widths[0] = 8 → 3×3 convs of 2·4·w/8 = w channels.
    for stage, width in zip(STAGES, TINY["widths"], strict=True):
        conv = model.get_layer(f"{stage}_block1_2_conv")
        assert conv.groups == 2
        assert conv.filters == width
        assert conv.kernel.shape == (3, 3, width // 2, width)
        reduce = model.get_layer(f"{stage}_block1_se_reduce")
        assert reduce.filters == 4 * width // 4
    assert [model.get_layer(f"stem{i}_conv").filters for i in (1, 2, 3)] == [16, 16, 32]
    assert model.get_layer("stem1_conv").strides == (2, 2)
    assert "stem_conv" not in {layer.name for layer in model.layers}
    out = model(_images((1, 64, 64, 3)))
    assert tuple(out["res2"].shape) == (1, 16, 16, 32)
    assert tuple(out["res5"].shape) == (1, 2, 2, 256)


def test_group_width_follows_resnext_template():
    model = build_resnet(
        (1, 1, 1, 1), cardinality=32, group_width=4, input_shape=(None, None, 3)
    )
    filters = [model.get_layer(f"{s}_block1_2_conv").filters for s in STAGES]
    assert filters == [128, 256, 512, 1024]


def test_save_load_round_trip(tmp_path):
    model = tiny(
        cardinality=2, squeeze_excitation=True, deep_stem=True, output_stride=16
    )
    randomize_weights(model, seed=3)
    x = _images((2, 40, 36, 3))
    expected = model(x, training=False)
    path = os.path.join(tmp_path, "backbone.keras")
    model.save(path)
    restored = keras.saving.load_model(path)
    got = restored(x, training=False)
    assert list(got) == list(STAGES)
    for stage in STAGES:
        np.testing.assert_array_equal(
            np.asarray(got[stage]), np.asarray(expected[stage])
        )


def test_gradients_reach_every_weight_and_bn_statistics_update():
    model = tiny(squeeze_excitation=True, se_ratio=4, input_shape=(32, 32, 3))
    x = _images((2, 32, 32, 3))
    grads = weight_gradients(
        model, x, lambda out: sum(keras.ops.mean(v**2) for v in out.values())
    )
    assert len(grads) == len(model.trainable_weights)
    for path, grad in grads.items():
        assert grad is not None and np.any(grad != 0), path
    bn = model.get_layer("res5_block1_3_bn")
    before = np.asarray(bn.moving_mean).copy()
    model(x, training=True)
    assert not np.allclose(np.asarray(bn.moving_mean), before)


@pytest.mark.skipif(
    keras.backend.backend() != "tensorflow", reason="synchronized BN is TF-only"
)
def test_synchronized_batch_norm():
    model = tiny(synchronized_bn=True, input_shape=(32, 32, 3))
    bns = [l for l in model.layers if isinstance(l, keras.layers.BatchNormalization)]
    assert len(bns) == 1 + 4 * 4
    assert all(bn.synchronized for bn in bns)
    assert not any(
        bn.synchronized
        for bn in tiny(input_shape=(32, 32, 3)).layers
        if isinstance(bn, keras.layers.BatchNormalization)
    )
    assert tuple(model(_images((1, 32, 32, 3)))["res5"].shape) == (1, 1, 1, 256)


@pytest.mark.skipif(
    keras.backend.backend() == "tensorflow", reason="other backends reject it"
)
def test_synchronized_batch_norm_needs_tensorflow():
    with pytest.raises(ValueError, match="synchronized_bn"):
        tiny(synchronized_bn=True)


@pytest.mark.parametrize("how", ["global_policy", "dtype_argument"])
def test_mixed_float16(how):
    if how == "global_policy":
        keras.config.set_dtype_policy("mixed_float16")
        model = tiny(squeeze_excitation=True, input_shape=(32, 32, 3))
    else:
        model = tiny(
            squeeze_excitation=True, dtype="mixed_float16", input_shape=(32, 32, 3)
        )
    out = model(_images((1, 32, 32, 3)))
    for stage in STAGES:
        assert keras.backend.standardize_dtype(out[stage].dtype) == "float16"
        assert np.all(np.isfinite(np.asarray(out[stage], "float32")))
    assert all(w.dtype == "float32" for w in model.weights)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"output_stride": 4}, "output_stride"),
        ({"output_stride": 24}, "output_stride"),
        ({"block_counts": (1, 1, 1), "widths": (8, 16, 32)}, "block_counts"),
        ({"widths": (8, 16, 32)}, "widths"),
        ({"block_counts": (1, 0, 1, 1)}, "block_counts"),
        ({"widths": (8, 16, -32, 64)}, "widths"),
        ({"block_counts": 3}, "block_counts"),
        ({"cardinality": 3}, "cardinality"),
        ({"cardinality": 0}, "cardinality"),
        ({"group_width": 3, "widths": (8, 12, 16, 20)}, "integer"),
        ({"group_width": 0}, "group_width"),
        ({"expansion": 1.5}, "expansion"),
        ({"se_ratio": 0}, "se_ratio"),
        ({"stem_width": None}, "stem_width"),
        ({"input_shape": (32, 32)}, "input_shape"),
        ({"input_shape": (32, 32, None)}, "input_shape"),
    ],
)
def test_rejects_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        tiny(**kwargs)


def test_build_backbone_by_name():
    model = build_backbone("pan_resnet101", **TINY, input_shape=(64, 64, 3))
    assert model.name == "pan_resnet101"
    with pytest.raises(ValueError, match="Unknown backbone"):
        build_backbone("resnet18")


@pytest.mark.parametrize(
    "constructor, deep_stem", [(pan_resnet101, True), (segmodel_resnet101, False)]
)
def test_paper_presets_keep_stem_and_stride(constructor, deep_stem):
    model = constructor(**TINY, input_shape=(64, 64, 3))
    names = {layer.name for layer in model.layers}
    assert ("stem1_conv" in names) == deep_stem
    assert ("stem_conv" in names) != deep_stem
    assert len([n for n in names if n.endswith("_2_conv")]) == 4
    assert tuple(model.output["res4"].shape) == (None, 4, 4, 128)
    assert tuple(model.output["res5"].shape) == (None, 4, 4, 256)
    assert tuple(model.get_layer("res5_block1_2_conv").dilation_rate) == (2, 2)


def test_presets_accept_overrides():
    model = pan_resnet101(
        **TINY, output_stride=8, deep_stem=False, input_shape=(64, 64, 3)
    )
    assert "stem_conv" in {layer.name for layer in model.layers}
    assert tuple(model.output["res4"].shape) == (None, 8, 8, 128)


# --- Full-size named constructors: parameter counts and multiply-adds ---


def reference_parameters(
    block_counts, widths, expansion=4, cardinality=1, group_width=None, se=False
):
    """(trainable, non-trainable) of a bottleneck ResNet without classifier."""
    trainable = 7 * 7 * 3 * 64 + 2 * 64
    bn_channels = 64
    c_in = 64
    for count, width in zip(block_counts, widths, strict=True):
        inner = (
            width if group_width is None else cardinality * group_width * width // 64
        )
        out = width * expansion
        for b in range(count):
            trainable += c_in * inner + 9 * inner * inner // cardinality + inner * out
            trainable += 2 * (inner + inner + out)
            bn_channels += inner + inner + out
            if b == 0:
                trainable += c_in * out + 2 * out
                bn_channels += out
            if se:
                hidden = out // 16
                trainable += out * hidden + hidden + hidden * out + out
            c_in = out
    return trainable, 2 * bn_channels


FAST_FULL_SIZE = (resnet50, resnext101_32x4d, exfuse_resnext101_rearranged)
SLOW_FULL_SIZE = (resnet101, resnet152, se_resnext131)


def _build_full_size(constructors):
    # Variables stay uninitialized in a StatelessScope: shapes only, fast.
    with keras.StatelessScope():
        return {f.__name__: f(input_shape=(224, 224, 3)) for f in constructors}


@pytest.fixture(scope="module")
def full_size_models():
    return _build_full_size(FAST_FULL_SIZE)


@pytest.fixture(scope="module")
def slow_full_size_models():
    return _build_full_size(SLOW_FULL_SIZE)


def _split_counts(model):
    trainable = sum(int(np.prod(w.shape)) for w in model.trainable_weights)
    return trainable, model.count_params() - trainable


RESNEXT = {"cardinality": 32, "group_width": 4}
# torchvision / timm totals minus their 2048·1000 + 1000 classifier.
PUBLISHED = {
    "resnet50": 25_557_032 - 2_049_000,
    "resnet101": 44_549_160 - 2_049_000,
    "resnet152": 60_192_808 - 2_049_000,
    "resnext101_32x4d": 44_177_704 - 2_049_000,
}
REFERENCE_CONFIGS = {
    "resnet50": {"block_counts": (3, 4, 6, 3)},
    "resnet101": {"block_counts": (3, 4, 23, 3)},
    "resnet152": {"block_counts": (3, 8, 36, 3)},
    "resnext101_32x4d": {"block_counts": (3, 4, 23, 3), **RESNEXT},
    "exfuse_resnext101_rearranged": {"block_counts": (8, 8, 9, 8), **RESNEXT},
    "se_resnext131": {"block_counts": (8, 8, 19, 8), "se": True, **RESNEXT},
}


def _check_full_size(models):
    for name, model in models.items():
        trainable, non_trainable = _split_counts(model)
        if name in PUBLISHED:
            assert trainable == PUBLISHED[name], name
        expected = reference_parameters(
            widths=(64, 128, 256, 512), **REFERENCE_CONFIGS[name]
        )
        assert (trainable, non_trainable) == expected, name
        shapes = {k: tuple(v.shape) for k, v in model.output.items()}
        assert shapes == {
            "res2": (None, 56, 56, 256),
            "res3": (None, 28, 28, 512),
            "res4": (None, 14, 14, 1024),
            "res5": (None, 7, 7, 2048),
        }, name
        assert BACKBONES[name] is not None


def test_parameter_counts(full_size_models):
    _check_full_size(full_size_models)


@pytest.mark.slow
def test_parameter_counts_of_the_deepest_models(slow_full_size_models):
    _check_full_size(slow_full_size_models)


def test_resnet50_matches_keras_applications(full_size_models):
    with keras.StatelessScope():
        reference = keras.applications.ResNet50(
            include_top=False, weights=None, input_shape=(224, 224, 3)
        )
    conv_biases = sum(
        l.filters for l in reference.layers if isinstance(l, keras.layers.Conv2D)
    )
    # keras.applications' convs carry biases; ours don't (BN follows).
    assert full_size_models["resnet50"].count_params() == (
        reference.count_params() - conv_biases
    )
    assert reference.count_params() == 23_587_712


def test_multiply_adds(full_size_models):
    resnet50_madds = count_multiply_adds(full_size_models["resnet50"])
    assert resnet50_madds == pytest.approx(4.1e9, rel=0.01)
    baseline = count_multiply_adds(full_size_models["resnext101_32x4d"])
    rearranged = count_multiply_adds(full_size_models["exfuse_resnext101_rearranged"])
    assert abs(rearranged - baseline) / baseline < 0.05
    assert baseline == pytest.approx(8.0e9, rel=0.01)


def test_count_multiply_adds_needs_static_shapes():
    with pytest.raises(ValueError, match="static shapes"):
        count_multiply_adds(tiny())
