"""The strategy builder, the worker index from TF_CONFIG and synchronized BN."""

import json

import keras
import pytest
import tensorflow as tf

from kseg.backbones import build_resnet
from kseg.models import PAN
from kseg.training.strategy import (
    build_strategy,
    is_chief,
    is_multi_worker,
    multi_worker_fit,
    set_synchronized_batch_norm,
    worker_index,
)


def test_one_device_and_mirrored_strategies(monkeypatch):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    assert isinstance(build_strategy("one_device"), tf.distribute.OneDeviceStrategy)
    mirrored = build_strategy("mirrored")
    assert isinstance(mirrored, tf.distribute.MirroredStrategy)
    assert mirrored.num_replicas_in_sync == len(tf.config.list_logical_devices("CPU"))


def test_multi_worker_fit_leaves_keras_alone_in_a_single_process(monkeypatch):
    # The patched reductions are exercised by the slow two-worker test of
    # tests/training/test_trainer.py; here, none is installed.
    from keras.src.backend.tensorflow import trainer as tf_trainer

    monkeypatch.delenv("TF_CONFIG", raising=False)
    reduce_per_replica = tf_trainer.reduce_per_replica
    symbolic_build = tf_trainer.TensorFlowTrainer._maybe_symbolic_build
    for name in ("one_device", "mirrored"):
        strategy = build_strategy(name)
        assert not is_multi_worker(strategy)
        with multi_worker_fit(strategy):
            assert tf_trainer.reduce_per_replica is reduce_per_replica
            assert tf_trainer.TensorFlowTrainer._maybe_symbolic_build is (
                symbolic_build
            )


def test_bad_strategy_names_and_missing_tf_config(monkeypatch):
    with pytest.raises(ValueError, match="'tpu'.*one_device, mirrored, multi_worker"):
        build_strategy("tpu")
    monkeypatch.delenv("TF_CONFIG", raising=False)
    with pytest.raises(ValueError, match="TF_CONFIG"):
        build_strategy("multi_worker")


@pytest.mark.parametrize(
    "task, cluster, index",
    [
        (None, None, 0),
        ({"type": "worker", "index": 0}, {"worker": ["a", "b"]}, 0),
        ({"type": "worker", "index": 1}, {"worker": ["a", "b"]}, 1),
        ({"type": "chief", "index": 0}, {"chief": ["a"], "worker": ["b"]}, 0),
        ({"type": "worker", "index": 0}, {"chief": ["a"], "worker": ["b"]}, 1),
    ],
)
def test_worker_index_from_tf_config(monkeypatch, task, cluster, index):
    if task is None:
        monkeypatch.delenv("TF_CONFIG", raising=False)
    else:
        monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": cluster, "task": task}))
    assert worker_index() == index
    assert is_chief() == (index == 0)


def test_synchronized_batch_norm_reaches_every_bn_layer():
    backbone = build_resnet((1, 1, 1, 1), (4, 4, 4, 4), stem_width=4)
    model = PAN(backbone, 3, filters=8)
    count = set_synchronized_batch_norm(model, True)
    layers = [
        layer
        for layer in model._flatten_layers(include_self=False, recursive=True)
        if isinstance(layer, keras.layers.BatchNormalization)
    ]
    # The backbone's and the head's (inside ConvBNReLU) layers alike.
    assert count == len(layers) > 10
    assert all(layer.synchronized for layer in layers)
    assert any(layer.path.startswith("fpa") for layer in layers)
    set_synchronized_batch_norm(model, False)
    assert not any(layer.synchronized for layer in layers)
