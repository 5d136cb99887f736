"""Tiny models and exported artifacts shared by the export tests.

Exporting is slow (tracing, saving, TFLite conversion), so each artifact is
made once per session and shared.
"""

from pathlib import Path

import keras
import numpy as np
import pytest


def pytest_collection_modifyitems(config, items):
    if keras.backend.backend() == "tensorflow":
        return
    skip = pytest.mark.skip(
        reason="export builds TensorFlow graphs: TensorFlow backend only"
    )
    here = Path(__file__).parent
    for item in items:
        if here in item.path.parents:
            item.add_marker(skip)


IMAGE_SIZE = 64


def tiny_backbone(output_stride=16, input_shape=(None, None, 3)):
    """The quickstart recipe's encoder: a 4-block ResNet behind the trainer's
    input normalization, so models take RGB in 0–255 like trained ones."""
    from kseg.backbones import build_resnet
    from kseg.training.task import with_input_normalization

    backbone = build_resnet(
        block_counts=(1, 1, 1, 1),
        widths=(8, 16, 32, 64),
        stem_width=8,
        output_stride=output_stride,
        input_shape=input_shape,
    )
    return with_input_normalization(backbone)


def tiny_pan(num_classes=6, input_shape=(None, None, 3)):
    from kseg.models import PAN

    return PAN(tiny_backbone(input_shape=input_shape), num_classes, filters=16)


def calibrate_batch_norm(model, images):
    """Sets every batch-norm layer's moving statistics to those of `images`
    (one training-mode pass with momentum 0, no weight update), so an
    untrained model has the activation ranges of a trained one and int8
    calibration is realistic."""
    layers = [
        layer
        for layer in model._flatten_layers()
        if isinstance(layer, keras.layers.BatchNormalization)
    ]
    momenta = [layer.momentum for layer in layers]
    for layer in layers:
        layer.momentum = 0.0
    model(np.asarray(images, dtype="float32"), training=True)
    for layer, momentum in zip(layers, momenta, strict=True):
        layer.momentum = momentum


@pytest.fixture(scope="session")
def build_tiny_backbone():
    return tiny_backbone


@pytest.fixture(scope="session")
def build_tiny_pan():
    return tiny_pan


def tiny_semantic_models(num_classes=6):
    """`{name: build(backbone_builder)}` of tiny FCN, GCN, ExFuse (every
    component) and SegModel (every component) for the export tests."""
    from kseg.models import FCN, GCN, ExFuse, SegModel

    return {
        "fcn": lambda backbone: FCN(backbone(), num_classes, head_filters=8),
        "gcn": lambda backbone: GCN(
            backbone(output_stride=32), num_classes, kernel_size=5
        ),
        "exfuse": lambda backbone: ExFuse(
            backbone(output_stride=32),
            num_classes,
            kernel_size=5,
            semantic_supervision=True,
            ecre=True,
            seb=True,
            dap=True,
        ),
        "segmodel": lambda backbone: SegModel(
            backbone(),
            num_classes,
            context_crf=True,
            patch_prediction=True,
            guidance_crf=True,
            feature_filters=16,
            guidance_radius=2,
        ),
    }


@pytest.fixture(scope="session")
def build_tiny_semantic_model():
    return tiny_semantic_models()


@pytest.fixture(scope="session")
def synthetic_train():
    from kseg.data import make_synthetic

    return make_synthetic("train", num_images=16, image_size=IMAGE_SIZE)


@pytest.fixture(scope="session")
def synthetic_val():
    from kseg.data import make_synthetic

    return make_synthetic("val", num_images=8, image_size=IMAGE_SIZE)


@pytest.fixture(scope="session")
def pan_model(synthetic_train):
    keras.utils.set_random_seed(1)
    model = tiny_pan()
    calibrate_batch_norm(model, synthetic_train.images)
    return model


@pytest.fixture(scope="session")
def pan_saved_model(pan_model, tmp_path_factory):
    """`(model_dir, version_dir)` of `pan_model` exported as version 1."""
    from kseg.export import export_saved_model

    model_dir = tmp_path_factory.mktemp("saved_models") / "pan"
    return model_dir, export_saved_model(pan_model, model_dir)


@pytest.fixture(scope="session")
def pan_loaded(pan_saved_model):
    """The exported `pan_model` loaded back with `tf.saved_model.load`."""
    import tensorflow as tf

    return tf.saved_model.load(str(pan_saved_model[1]))
