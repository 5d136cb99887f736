import os

import keras
import numpy as np
import pytest

from kseg.backbones import (
    build_resnet,
    build_semantic_supervision_pretrainer,
    semantic_supervision_features,
)
from kseg.layers.exfuse import SemanticSupervisionHead

STAGES = ("res2", "res3", "res4", "res5")
NUM_CLASSES = 5


@pytest.fixture(scope="module")
def backbone():
    return build_resnet((1, 1, 1, 1), (4, 8, 8, 8), input_shape=(32, 32, 3))


def _images(n=2, seed=0):
    return np.random.default_rng(seed).normal(size=(n, 32, 32, 3)).astype("float32")


def test_pretrainer_outputs_and_loss_weights(backbone):
    model, loss_weights = build_semantic_supervision_pretrainer(
        backbone, NUM_CLASSES, aux_weights=(0.1, 0.2, 0.3, 0.4), head_filters=6
    )
    assert loss_weights == {
        "main": 1.0,
        "ss_res2": 0.1,
        "ss_res3": 0.2,
        "ss_res4": 0.3,
        "ss_res5": 0.4,
    }
    out = model(_images())
    assert set(out) == set(loss_weights)
    for value in out.values():
        assert tuple(value.shape) == (2, NUM_CLASSES)
    heads = [l for l in model.layers if isinstance(l, SemanticSupervisionHead)]
    assert [h.name for h in heads] == [f"ss_{s}" for s in STAGES]
    assert all(h.filters == 6 and h.num_classes == NUM_CLASSES for h in heads)

    # The main logits are GAP(res5) → dense.
    x = _images()
    res5 = np.asarray(backbone(x)["res5"])
    kernel, bias = (np.asarray(w) for w in model.get_layer("main_classifier").weights)
    np.testing.assert_allclose(
        np.asarray(model(x)["main"]), res5.mean(axis=(1, 2)) @ kernel + bias, atol=1e-5
    )


def test_compiled_loss_is_main_plus_weighted_aux(backbone):
    aux_weights = (0.5, 0.25, 2.0, 1.0)
    model, loss_weights = build_semantic_supervision_pretrainer(
        backbone, NUM_CLASSES, aux_weights=aux_weights
    )
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    model.compile(loss={name: loss for name in loss_weights}, loss_weights=loss_weights)
    x = _images(4)
    y = np.array([0, 1, 2, 4])
    targets = {name: y for name in loss_weights}
    logits = model(x, training=False)
    total = model.compute_loss(x=x, y=targets, y_pred=logits, training=False)
    expected = float(loss(y, logits["main"]))
    for stage, w in zip(STAGES, aux_weights, strict=True):
        expected += w * float(loss(y, logits[f"ss_{stage}"]))
    assert float(total) == pytest.approx(expected, rel=1e-5)


def test_features_come_from_the_heads_second_conv(backbone, tmp_path):
    pretrainer, _ = build_semantic_supervision_pretrainer(
        backbone, NUM_CLASSES, head_filters=6
    )
    path = os.path.join(tmp_path, "pretrainer.keras")
    pretrainer.save(path)
    restored = keras.saving.load_model(path)

    x = _images()
    for model in (pretrainer, restored):
        encoder = semantic_supervision_features(model)
        got = encoder(x, training=False)
        assert list(got) == list(STAGES)
        stage_features = model.get_layer(backbone.name)(x, training=False)
        for stage in STAGES:
            head = model.get_layer(f"ss_{stage}")
            expected = head.conv2(head.conv1(stage_features[stage], training=False))
            np.testing.assert_allclose(np.asarray(got[stage]), np.asarray(expected))
            assert got[stage].shape[1:] == (*stage_features[stage].shape[1:3], 6)
        # Shared weights, and no classifier in the fine-tuning encoder.
        names = {v.path for v in encoder.weights}
        assert not any("classifier" in n for n in names)
        assert {id(v) for v in encoder.weights} <= {id(v) for v in model.weights}

    # The fine-tuning encoder itself round-trips through .keras.
    encoder_path = os.path.join(tmp_path, "encoder.keras")
    encoder.save(encoder_path)
    reloaded = keras.saving.load_model(encoder_path)(x, training=False)
    for stage in STAGES:
        np.testing.assert_array_equal(
            np.asarray(reloaded[stage]), np.asarray(got[stage])
        )

    restored_out = restored(x, training=False)
    for key, value in pretrainer(x, training=False).items():
        np.testing.assert_allclose(np.asarray(restored_out[key]), np.asarray(value))


def test_mixed_float16(backbone):
    keras.config.set_dtype_policy("mixed_float16")
    backbone16 = build_resnet((1, 1, 1, 1), (4, 8, 8, 8), input_shape=(32, 32, 3))
    model, _ = build_semantic_supervision_pretrainer(backbone16, NUM_CLASSES)
    out = model(_images())
    assert all(
        keras.backend.standardize_dtype(v.dtype) == "float16" for v in out.values()
    )
    features = semantic_supervision_features(model)(_images())
    assert keras.backend.standardize_dtype(features["res3"].dtype) == "float16"


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"num_classes": 0}, "num_classes"),
        ({"num_classes": 5, "aux_weights": (1.0, 1.0)}, "aux_weights"),
        ({"num_classes": 5, "aux_weights": (1.0, -1.0, 1.0, 1.0)}, "aux_weights"),
    ],
)
def test_rejects_bad_options(backbone, kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_semantic_supervision_pretrainer(backbone, **kwargs)


def test_rejects_models_it_cannot_use(backbone):
    inputs = keras.Input((8, 8, 3))
    plain = keras.Model(inputs, keras.layers.Conv2D(2, 1)(inputs))
    with pytest.raises(ValueError, match="dict of stage features"):
        build_semantic_supervision_pretrainer(plain, NUM_CLASSES)
    with pytest.raises(ValueError, match="build_semantic_supervision_pretrainer"):
        semantic_supervision_features(backbone)
