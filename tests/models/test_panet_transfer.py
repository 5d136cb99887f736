"""Fine-tuning helpers: PANet initialised by name from the converted
torchvision fixture (another class count, PANet's components on), and
freezing as torchvision and matterport do."""

from pathlib import Path

import keras
import numpy as np

from kseg.backbones import build_resnet, prepend_normalization
from kseg.models import from_torchvision
from kseg.models.panet import PANet
from kseg.models.panet.transfer import (
    load_weights_by_name,
    set_trainable,
    weights_by_name,
)
from kseg.testing import TestCase

WEIGHTS = Path(__file__).parent / "data" / "torchvision_tiny.npz"
SIZE = 128


def tiny_panet_like_fixture(num_classes=2):
    """PANet (every component on) with the fixture's backbone and widths."""
    backbone = build_resnet(
        (1, 1, 1, 1), expansion=1, group_width=16, input_shape=(SIZE, SIZE, 3)
    )
    backbone = prepend_normalization(backbone, (0, 0, 0), (1, 1, 1))
    return PANet(backbone, num_classes, filters=32, fc_units=64)


class LoadByNameTest(TestCase):
    def test_panet_from_the_converted_baseline(self):
        source = from_torchvision(WEIGHTS, image_size=(SIZE, SIZE))
        model = tiny_panet_like_fixture(num_classes=2)
        report = load_weights_by_name(model, source)
        # The class-specific layers: 4 classes in the source, 2 here.
        self.assertEqual(
            sorted(report.skipped),
            [
                "roi_heads/box_head/box_deltas/bias",
                "roi_heads/box_head/box_deltas/kernel",
                "roi_heads/box_head/class_logits/bias",
                "roi_heads/box_head/class_logits/kernel",
                "roi_heads/mask_head/mask_logits/bias",
                "roi_heads/mask_head/mask_logits/kernel",
            ],
        )
        self.assertIn("shape (64, 3), the source's", report.skipped[
            "roi_heads/box_head/class_logits/kernel"])  # fmt: skip
        # Fresh: the bottom-up path and the fully-connected fusion only.
        self.assertTrue(report.fresh)
        for name in report.fresh:
            self.assertRegex(
                name, r"^bottom_up_path/|/mask_head/(fc|conv4_fc|conv5_fc)"
            )
        target, origin = weights_by_name(model), weights_by_name(source)
        for level in range(4):
            np.testing.assert_array_equal(
                target[f"roi_heads/box_head/adaptive_pooling/level_{level}/kernel"],
                origin["roi_heads/box_head/fc1/kernel"],
            )
            np.testing.assert_array_equal(
                target[f"roi_heads/mask_head/conv1/level_{level}/kernel"],
                origin["roi_heads/mask_head/conv1/kernel"],
            )
        for name in (
            "stem_conv/kernel",
            "feature_pyramid/output_3/kernel",
            "rpn/rpn_head/deltas/kernel",
            "roi_heads/box_head/fc2/kernel",
        ):
            np.testing.assert_array_equal(target[name], origin[name])  # fmt: skip
            self.assertIn(name, report.loaded)
        self.assertIn("loaded", report.summary())

    def test_same_model_from_a_keras_file_loads_everything(self):
        source = tiny_panet_like_fixture()
        path = Path(self.get_temp_dir()) / "earlier.keras"
        source.save(path)
        model = tiny_panet_like_fixture()
        report = load_weights_by_name(model, path)
        self.assertEqual((report.skipped, report.fresh), ({}, []))
        self.assertEqual(len(report.loaded), len(model.weights))
        for a, b in zip(model.weights, source.weights, strict=True):
            np.testing.assert_array_equal(a, b)

    def test_torchvision_file_and_bad_paths(self):
        model = tiny_panet_like_fixture(num_classes=4)
        report = load_weights_by_name(model, WEIGHTS)
        self.assertEqual(report.skipped, {})
        with self.assertRaisesRegex(FileNotFoundError, "nowhere.keras: no such"):
            load_weights_by_name(model, WEIGHTS.with_name("nowhere.keras"))
        other = Path(self.get_temp_dir()) / "weights.h5"
        other.write_bytes(b"x")
        with self.assertRaisesRegex(ValueError, r"not '\.h5'"):
            load_weights_by_name(model, other)


class SetTrainableTest(TestCase):
    def _trainable_stages(self, model):
        stages = set()
        for layer in model.backbone.layers:
            if layer.trainable and layer.weights:
                stages.add(layer.name.split("_", 1)[0])
        return stages

    def test_modes(self):
        model = tiny_panet_like_fixture()
        self.assertEqual(set_trainable(model, 3), ("res5", "res4", "res3"))
        self.assertEqual(self._trainable_stages(model), {"res5", "res4", "res3"})
        bn = [
            l
            for l in model.backbone.layers
            if isinstance(l, keras.layers.BatchNormalization)
        ]  # noqa: E501, E741
        self.assertFalse(any(layer.trainable for layer in bn))
        self.assertTrue(model.rpn.trainable and model.roi_heads.trainable)
        set_trainable(model, "heads")
        self.assertEqual(self._trainable_stages(model), set())
        self.assertTrue(model.fpn.trainable)
        set_trainable(model, "all", freeze_batch_norm=False)
        self.assertEqual(
            self._trainable_stages(model), {"stem", "res2", "res3", "res4", "res5"}
        )
        self.assertTrue(all(layer.trainable for layer in bn))
        # Fewer trainable weights when frozen.
        all_count = len(model.trainable_weights)
        set_trainable(model, 0)
        self.assertLess(len(model.trainable_weights), all_count)

    def test_rejects_unknown_modes(self):
        model = tiny_panet_like_fixture()
        for bad in (6, -1):
            with self.assertRaisesRegex(ValueError, r"in 0\.\.5, got"):
                set_trainable(model, bad)
        for bad in ("backbone", True):
            with self.assertRaisesRegex(ValueError, "'all', 'heads'"):
                set_trainable(model, bad)
