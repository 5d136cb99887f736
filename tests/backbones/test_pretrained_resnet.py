import os

import keras
import numpy as np
import pytest

from kseg.backbones import build_pretrained_resnet, pretrained_feature_layers

STAGES = ("res2", "res3", "res4", "res5")


def test_feature_layer_names():
    assert pretrained_feature_layers(50) == {
        "res2": "conv2_block3_out",
        "res3": "conv3_block4_out",
        "res4": "conv4_block6_out",
        "res5": "conv5_block3_out",
    }
    assert pretrained_feature_layers(101)["res4"] == "conv4_block23_out"
    assert pretrained_feature_layers(152)["res3"] == "conv3_block8_out"
    assert pretrained_feature_layers(152)["res4"] == "conv4_block36_out"


def test_dilated_adapter_keeps_the_weights(tmp_path):
    # weights=None everywhere: no download. A weights file written from one
    # adapter and loaded into a dilated one proves the weights are copied.
    model = build_pretrained_resnet(50, weights=None, input_shape=(64, 64, 3))
    x = np.random.default_rng(0).normal(size=(1, 64, 64, 3)).astype("float32")
    out = model(x)
    assert list(out) == list(STAGES)
    for stage, size, channels in zip(
        STAGES, (16, 8, 4, 2), (256, 512, 1024, 2048), strict=True
    ):
        assert tuple(out[stage].shape) == (1, size, size, channels)
        assert keras.backend.standardize_dtype(out[stage].dtype) == "float32"

    path = os.path.join(tmp_path, "resnet50.weights.h5")
    model.save_weights(path)
    dilated = build_pretrained_resnet(
        50, weights=path, input_shape=(64, 64, 3), output_stride=8
    )
    got = dilated(x)
    for stage, size in zip(STAGES, (16, 8, 8, 8), strict=True):
        assert tuple(got[stage].shape[1:3]) == (size, size)
    # Stages before the first dilated one compute exactly the same thing.
    np.testing.assert_allclose(np.asarray(got["res3"]), np.asarray(out["res3"]))
    for name, strides, rate in (
        ("conv3_block1_1_conv", 2, 1),
        ("conv4_block1_0_conv", 1, 1),
        ("conv4_block1_1_conv", 1, 1),
        ("conv4_block1_2_conv", 1, 2),
        ("conv4_block6_2_conv", 1, 2),
        ("conv5_block1_1_conv", 1, 1),
        ("conv5_block3_2_conv", 1, 4),
    ):
        layer = dilated.get_layer(name)
        assert tuple(layer.strides) == (strides, strides), name
        assert tuple(layer.dilation_rate) == (rate, rate), name
    for a, b in zip(
        model.get_layer("conv5_block3_2_conv").weights,
        dilated.get_layer("conv5_block3_2_conv").weights,
        strict=True,
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"depth": 34}, "depth"),
        ({"depth": 50, "output_stride": 4}, "output_stride"),
    ],
)
def test_rejects_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_pretrained_resnet(weights=None, input_shape=(64, 64, 3), **kwargs)
