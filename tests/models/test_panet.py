"""PANet: the predict contract, every ablation row, saving, training on TF,
JAX and XLA, the targets against NumPy references, and a slow overfit to mask
AP50 ≥ 0.9 measured with the COCO API."""

import os
import textwrap
import warnings

import keras
import numpy as np
import pytest

from kseg.backbones import build_resnet
from kseg.data import crop_instance_mask
from kseg.models.panet import (
    LOSS_NAMES,
    TORCHVISION_CONVENTIONS,
    PANet,
    roi_heads,
    rpn,
    sampling,
)
from kseg.testing import (
    TestCase,
    network_reductions,
    rounding_tolerance,
    run_on_jax,
)

SIZE = 64
TINY = dict(
    filters=8,
    fc_units=16,
    max_detections=6,
    max_instances=3,
    rpn_pre_nms_top_k_train=100,
    rpn_post_nms_top_k_train=40,
    rpn_pre_nms_top_k_test=60,
    rpn_post_nms_top_k_test=30,
    rpn_batch_size=64,
    roi_batch_size=32,
    seed=1,
)

# Every row of Tables 3-5 (MST is data, not a model switch).
BASELINE = dict(
    bottom_up_path=False, adaptive_pooling=False, fully_connected_fusion=False
)
ROWS = {
    "RBL": BASELINE,
    "+BPA": {**BASELINE, "bottom_up_path": True},
    "+AFP": {**BASELINE, "adaptive_pooling": True},
    "BPA+AFP": {**BASELINE, "bottom_up_path": True, "adaptive_pooling": True},
    "+FF": {},
    "+HHD": {"heavier_head": True},
    "fu.fc1fc2": {"fusion_position": "before"},
    "fc1fu.fc2 SUM": {"fusion": "sum"},
    "FF conv2": {"fusion_branch": "conv2"},
    "FF conv4": {"fusion_branch": "conv4"},
    "FF product": {"mask_fusion": "product"},
    "FF max": {"mask_fusion": "max"},
    "HHD before": {"heavier_head": True, "fusion_position": "before"},
}


def tiny_panet(**kwargs):
    backbone = build_resnet((1, 1, 1, 1), (4, 4, 4, 4), input_shape=(SIZE, SIZE, 3))
    return PANet(backbone, 2, **{**TINY, **kwargs})


def batch(num_objects=(0, 3), size=SIZE, max_instances=3, seed=0):
    """Images with filled rectangles; `num_objects` per image."""
    rng = np.random.default_rng(seed)
    n = len(num_objects)
    images = rng.uniform(0, 40, (n, size, size, 3)).astype("float32")
    boxes = np.zeros((n, max_instances, 4), "float32")
    classes = np.zeros((n, max_instances), "int32")
    masks = np.zeros((n, max_instances, 112, 112), "uint8")
    for b, count in enumerate(num_objects):
        for m in range(count):
            y, x = rng.integers(0, size - 24, 2)
            h, w = rng.integers(12, 24, 2)
            full = np.zeros((size, size), "uint8")
            full[y : y + h, x : x + w] = 1
            images[b, y : y + h, x : x + w] = 220.0 if m % 2 else 120.0
            boxes[b, m] = [y, x, y + h, x + w]
            classes[b, m] = 1 + m % 2
            masks[b, m] = crop_instance_mask(full, boxes[b, m])
    return {"images": images}, {"boxes": boxes, "classes": classes, "masks": masks}


class PANetTest(TestCase):
    def test_predict_contract(self):
        model = tiny_panet()
        x, _ = batch()
        out = model.predict(x["images"], verbose=0)
        self.assertEqual(
            sorted(out), ["boxes", "classes", "masks", "num_detections", "scores"]
        )
        self.assertEqual(out["boxes"].shape, (2, 6, 4))
        self.assertEqual(out["masks"].shape, (2, 6, 28, 28))
        self.assertEqual(out["classes"].dtype, np.int32)
        self.assertEqual(out["num_detections"].dtype, np.int32)
        for b in range(2):
            n = out["num_detections"][b]
            self.assertTrue(np.all(out["classes"][b, :n] >= 1))
            self.assertTrue(np.all(out["classes"][b, n:] == 0))
            self.assertTrue(np.all(out["masks"][b, n:] == 0))
        self.assertTrue(np.all((out["masks"] >= 0) & (out["masks"] <= 1)))
        self.assertTrue(np.all(out["boxes"] >= 0) and np.all(out["boxes"] <= SIZE))

    def test_every_ablation_row_builds(self):
        for name, switches in ROWS.items():
            model = tiny_panet(**switches)
            self.assertEqual(
                model.get_config()["bottom_up_path"],
                switches.get("bottom_up_path", True),
                name,
            )
            self.assertEqual(tuple(model.outputs[0].shape), (None, 6, 4), name)

    def test_baseline_has_no_panet_parts(self):
        model = tiny_panet(**BASELINE)
        names = {layer.name for layer in model.layers}
        self.assertNotIn(model.bottom_up.name, names)
        self.assertFalse(model.roi_heads.box_pool.adaptive)
        self.assertFalse(model.roi_heads.mask_head.fully_connected_fusion)

    def test_keras_round_trip(self):
        model = tiny_panet(heavier_head=True, mask_fusion="max")
        x, _ = batch()
        self.run_model_saving_test(model, x["images"], atol=1e-5)

    def test_rejects_unknown_keyword_and_dynamic_size(self):
        with self.assertRaisesRegex(TypeError, "fusoin"):
            tiny_panet(fusoin="max")
        with self.assertRaisesRegex(ValueError, "static image size"):
            PANet(build_resnet((1, 1, 1, 1), (4, 4, 4, 4)), 2, **TINY)

    def test_train_step_logs_five_losses_empty_and_full_images(self):
        # max_instances=2 < 3 rows: the extra row is dropped with a warning.
        model = tiny_panet(max_instances=2)
        model.compile(optimizer=keras.optimizers.SGD(0.01))
        x, y = batch(num_objects=(0, 3))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            history = model.fit(x, y, batch_size=2, epochs=2, verbose=0).history
        self.assertTrue(any("max_instances" in str(w.message) for w in caught))
        self.assertEqual(sorted(history), sorted(("loss",) + LOSS_NAMES))
        for name in LOSS_NAMES:
            self.assertTrue(np.all(np.isfinite(history[name])), name)
        total = sum(history[name][0] for name in LOSS_NAMES)
        np.testing.assert_allclose(history["loss"][0], total, rtol=1e-5)
        # Only empty images: no foreground anywhere, still finite.
        x, y = batch(num_objects=(0, 0))
        logs = model.train_on_batch(x, y, return_dict=True)
        self.assertTrue(all(np.isfinite(v) for v in logs.values()))
        self.assertEqual(logs["mask"], 0.0)

    def test_stages_round_trip_their_config(self):
        model = tiny_panet(anchor_sizes=(16, 32, 64, 128, 256), mask_size=14)
        for stage in (model.rpn, model.roi_heads):
            config = stage.get_config()
            self.assertEqual(type(stage).from_config(config).get_config(), config)
        self.assertEqual(model.rpn.get_config()["anchor_sizes"][0], 16.0)
        self.assertEqual(model.output["masks"].shape[-1], 14)

    def test_torchvision_conventions_reach_the_stages(self):
        model = tiny_panet(**{**BASELINE, **TORCHVISION_CONVENTIONS})
        proposals = model.rpn.proposal_layer
        self.assertTrue(proposals.per_level_nms)
        self.assertTrue(proposals.anchor_generator.round_base)
        self.assertEqual(proposals.post_nms_top_k_train, 2000)
        self.assertFalse(model.roi_heads.box_pool.roi_align.aligned)
        self.assertFalse(model.roi_heads.mask_pool.roi_align.aligned)
        revived = PANet.from_config(model.get_config())
        self.assertEqual(revived.get_config(), model.get_config())
        self.assertFalse(revived.roi_heads.mask_pool.roi_align.aligned)
        # SPEC's choices stay the defaults.
        spec = tiny_panet()
        self.assertFalse(spec.rpn.proposal_layer.per_level_nms)
        self.assertTrue(spec.roi_heads.box_pool.roi_align.aligned)

    def test_loss_weights_weigh_the_total(self):
        model = tiny_panet(loss_weights={"mask": 2.0, "rpn_box": 0.0})
        model.compile(optimizer=keras.optimizers.SGD(0.0), run_eagerly=True)
        logs = model.train_on_batch(*batch(), return_dict=True)
        weights = {**dict.fromkeys(LOSS_NAMES, 1.0), "mask": 2.0, "rpn_box": 0.0}
        total = sum(weights[name] * logs[name] for name in LOSS_NAMES)
        np.testing.assert_allclose(logs["loss"], total, rtol=1e-5)
        self.assertGreater(logs["rpn_box"], 0.0)
        with self.assertRaisesRegex(ValueError, "unknown losses"):
            tiny_panet(loss_weights={"masks": 1.0})

    def test_mixed_precision_train_step(self):
        keras.config.set_dtype_policy("mixed_float16")
        model = tiny_panet()
        # Eager: the graph-mode step is covered above; tracing costs ~30 s.
        model.compile(optimizer=keras.optimizers.SGD(0.01), run_eagerly=True)
        x, y = batch()
        logs = model.train_on_batch(x, y, return_dict=True)
        self.assertTrue(all(np.isfinite(v) for v in logs.values()))
        out = model.predict(x["images"], verbose=0)
        self.assertEqual(out["masks"].dtype, np.float32)

    @pytest.mark.slow  # ~30 s of XLA compilation; the JAX tests compile too
    def test_xla_predict_matches_eager(self):
        model = tiny_panet()
        x, _ = batch()
        eager = model.predict(x["images"], verbose=0)
        # The head outputs before the sigmoid / softmax / box decoding give
        # the scale of the values whose float32 rounding XLA may reorder.
        stages = model.detect(x["images"])
        mask_scale, class_scale, delta_scale = (
            np.abs(keras.ops.convert_to_numpy(stages[name])).max()
            for name in ("mask_logits", "class_logits", "box_deltas")
        )
        depth, terms = network_reductions(model)
        model.compile(jit_compile=True)
        compiled = model.predict(x["images"], verbose=0)
        for name in ("classes", "num_detections"):
            np.testing.assert_array_equal(compiled[name], eager[name])
        tolerance = {
            # A sigmoid's slope is at most 1/4; a softmax probability moves
            # at most half the largest change of the logits.
            "masks": rounding_tolerance(mask_scale, terms, depth) / 4,
            "scores": rounding_tolerance(class_scale, terms, depth) / 2,
            "boxes": rounding_tolerance(SIZE * (1 + delta_scale), terms, depth),
        }
        for name, atol in tolerance.items():
            np.testing.assert_allclose(compiled[name], eager[name], atol=atol)

    def test_seeded_sampling_is_reproducible(self):
        x, y = batch()
        results = []
        for _ in range(2):
            keras.utils.set_random_seed(3)
            model = tiny_panet(seed=5)
            model.compile(optimizer=keras.optimizers.SGD(0.01), run_eagerly=True)
            results.append(model.train_on_batch(x, y, return_dict=True))
        for name in LOSS_NAMES:
            np.testing.assert_allclose(results[0][name], results[1][name], rtol=1e-5)


@pytest.mark.slow
def test_train_step_on_jax_backend():
    # About 3 minutes of JAX compilation on a 2-core CPU: the slow stage.
    script = textwrap.dedent(
        """
        import sys
        sys.path.insert(0, {tests!r})
        import numpy as np, keras
        from test_panet import batch, tiny_panet
        model = tiny_panet()
        model.compile(optimizer=keras.optimizers.SGD(0.01))
        x, y = batch()
        logs = model.train_on_batch(x, y, return_dict=True)
        assert all(np.isfinite(v) for v in logs.values()), logs
        out = model.predict(x["images"], verbose=0)
        assert out["masks"].shape == (2, 6, 28, 28)
        print("OK", sorted(logs))
        """
    ).format(tests=os.path.dirname(__file__))
    output = run_on_jax(script)
    assert "OK" in output and "rpn_objectness" in output


# === Targets ===


def np_iou(a, b):
    ih = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iw = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - ih * iw
    return ih * iw / union if union > 0 else 0.0


class TargetsTest(TestCase):
    def test_rpn_labels_match_reference(self):
        rng = np.random.default_rng(0)
        anchors = np.concatenate(
            [rng.uniform(0, 40, (60, 2)), rng.uniform(0, 40, (60, 2))], 1
        )
        anchors[:, 2:] = anchors[:, :2] + rng.uniform(4, 30, (60, 2))
        gt = np.zeros((1, 3, 4), "float32")
        gt[0, 0] = anchors[5] + 1.0
        gt[0, 1] = [0, 0, 3, 3]  # small: only its best anchor
        valid = np.array([[True, True, False]])
        seed = keras.random.SeedGenerator(0)
        labels, sampled, positive, targets = rpn.rpn_targets(
            anchors.astype("float32"),
            gt,
            valid,
            seed,
            batch_size=1000,
            positive_fraction=1.0,
        )
        labels, sampled = np.asarray(labels), np.asarray(sampled)
        iou = np.array([[np_iou(a, g) for g in gt[0, :2]] for a in anchors])
        best = iou.max(0)
        for k in range(60):
            forced = any(iou[k, m] == best[m] and best[m] > 0 for m in range(2))
            if iou[k].max() >= 0.7 or forced:
                want = 1
            elif iou[k].max() < 0.3:
                want = 0
            else:
                want = -1
            self.assertEqual(labels[0, k], float(want == 1), k)
            self.assertEqual(sampled[0, k], want >= 0, k)

    def test_sampling_respects_counts(self):
        seed = keras.random.SeedGenerator(1)
        candidates = np.random.default_rng(0).uniform(size=(3, 500)) < 0.3
        kept = np.asarray(
            sampling.sample_mask(candidates, np.array([10, 0, 400]), seed)
        )
        self.assertTrue(np.all(kept <= candidates))
        np.testing.assert_array_equal(
            kept.sum(1), np.minimum([10, 0, 400], candidates.sum(1))
        )

    def test_sample_rois_puts_foreground_first(self):
        gt = np.array([[[0, 0, 20, 20], [30, 30, 60, 60]]], "float32")
        proposals = np.tile(
            np.array([[1, 1, 20, 20], [40, 0, 50, 10]], "float32"), (1, 10, 1)
        )
        samples = roi_heads.sample_rois(
            proposals,
            np.ones((1, 20), bool),
            gt,
            np.array([[1, 2]]),
            np.array([[True, True]]),
            keras.random.SeedGenerator(0),
            batch_size=16,
            positive_fraction=0.25,
        )
        fg = np.asarray(samples["foreground"])[0]
        self.assertEqual(fg.sum(), 4)
        self.assertTrue(np.all(fg[:4]))
        self.assertTrue(np.all(np.asarray(samples["classes"])[0, 4:] == 0))
        # 4 foreground, then all 10 background candidates (12 allowed).
        np.testing.assert_array_equal(
            np.asarray(samples["valid"])[0], np.arange(16) < 14
        )

    def test_mask_targets_of_the_gt_box_are_the_crop(self):
        full = np.zeros((64, 64), "uint8")
        full[10:40, 8:30] = 1
        full[10:20, 8:18] = 0
        box = np.array([10, 8, 40, 30], "float32")
        crop = crop_instance_mask(full, box)
        from kseg.layers.panet import RoIAlign

        target = roi_heads.mask_targets(
            box[None, None],
            np.zeros((1, 1), "int32"),
            box[None, None],
            crop[None, None],
            RoIAlign(28, sampling_ratio=2, strides=1),
        )
        want = crop_instance_mask(full, box, size=28)
        agree = (np.asarray(target)[0, 0] == want).mean()
        self.assertGreater(agree, 0.97)

    def test_crop_is_the_mask_sampled_inside_its_box(self):
        # Crop pixel (i, j) is the bilinear value of the mask at image point
        # (y1 + (i + 0.5)·h / S, x1 + (j + 0.5)·w / S), edge values held,
        # thresholded at 0.5: a float64 loop reference.
        rng = np.random.default_rng(0)
        masks = (rng.uniform(size=(3, 40, 50)) > 0.5).astype("uint8")
        boxes = np.array(
            [[0, 0, 40, 50], [5.5, 3.2, 30.1, 20.7], [10, 10, 12, 30]], "float32"
        )
        for mask, box in zip(masks, boxes, strict=True):
            got = crop_instance_mask(mask, box, 16)
            y1, x1, y2, x2 = (float(v) for v in box)
            steps = (np.arange(16) + 0.5) / 16
            ys = np.clip(y1 + steps * (y2 - y1) - 0.5, 0, 39)
            xs = np.clip(x1 + steps * (x2 - x1) - 0.5, 0, 49)
            y0, x0 = np.floor(ys).astype(int), np.floor(xs).astype(int)
            y1_, x1_ = np.minimum(y0 + 1, 39), np.minimum(x0 + 1, 49)
            fy, fx = (ys - y0)[:, None], (xs - x0)[None, :]
            m = mask.astype("float64")
            value = (m[y0][:, x0] * (1 - fx) + m[y0][:, x1_] * fx) * (1 - fy) + (
                m[y1_][:, x0] * (1 - fx) + m[y1_][:, x1_] * fx
            ) * fy
            clear = np.abs(value - 0.5) > 1e-4
            np.testing.assert_array_equal(got[clear], (value >= 0.5)[clear])


# === Overfit ===


def _coco_mask_ap50(gt_masks, gt_classes, predictions, num_classes):
    from pycocotools import mask as mask_utils
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    from kseg.data.instance_transform import paste_masks

    def rle(mask):
        encoded = mask_utils.encode(np.asfortranarray(mask.astype("uint8")))
        encoded["counts"] = encoded["counts"].decode()
        return encoded

    size = gt_masks[0].shape[-1]
    images, annotations, results = [], [], []
    for i, (masks, classes) in enumerate(zip(gt_masks, gt_classes, strict=True)):
        images.append({"id": i + 1, "height": size, "width": size})
        for mask, k in zip(masks, classes, strict=True):
            ys, xs = np.nonzero(mask)
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": i + 1,
                    "category_id": int(k),
                    "segmentation": rle(mask),
                    "area": float(mask.sum()),
                    "iscrowd": 0,
                    "bbox": [
                        float(xs.min()),
                        float(ys.min()),
                        float(xs.max() + 1 - xs.min()),
                        float(ys.max() + 1 - ys.min()),
                    ],
                }
            )
        for d in range(predictions["num_detections"][i]):
            box = predictions["boxes"][i, d]
            mask = paste_masks(predictions["masks"][i, d][None], box[None], size, size)
            results.append(
                {
                    "image_id": i + 1,
                    "category_id": int(predictions["classes"][i, d]),
                    "segmentation": rle(mask[0]),
                    "score": float(predictions["scores"][i, d]),
                }
            )
    coco = COCO()
    coco.dataset = {
        "images": images,
        "annotations": annotations,
        "categories": [{"id": k} for k in range(1, num_classes + 1)],
    }
    coco.createIndex()
    evaluator = COCOeval(coco, coco.loadRes(results), "segm")
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
    return evaluator.stats[1]


@pytest.mark.slow
def test_tiny_panet_overfits_synthetic_images():
    # kseg's synthetic instance scenes: discs, squares, triangles, rings and
    # plus signs of five classes, touching and occluding, so a mask is not its
    # box and the class is the shape (colours do not give it away).
    pytest.importorskip("pycocotools")
    from kseg.data.synthetic_instances import make_synthetic_instances

    scenes = make_synthetic_instances("train", num_images=4, image_size=SIZE, seed=1)
    num_classes, max_instances = 5, 5
    y = {
        "boxes": np.zeros((4, max_instances, 4), "float32"),
        "classes": np.zeros((4, max_instances), "int32"),
        "masks": np.zeros((4, max_instances, 112, 112), "uint8"),
    }
    for i, (masks, classes) in enumerate(
        zip(scenes.instance_masks, scenes.instance_classes, strict=True)
    ):
        for m, (mask, k) in enumerate(zip(masks, classes, strict=True)):
            ys, xs = np.nonzero(mask)
            box = [ys.min(), xs.min(), ys.max() + 1, xs.max() + 1]
            y["boxes"][i, m] = box
            y["classes"][i, m] = k
            y["masks"][i, m] = crop_instance_mask(mask, box)
    images = scenes.image_array.astype("float32")
    backbone = build_resnet((1, 1, 1, 1), (8, 8, 16, 16), input_shape=(SIZE, SIZE, 3))
    model = PANet(
        backbone,
        num_classes,
        **{
            **TINY,
            "filters": 16,
            "fc_units": 64,
            "max_detections": 10,
            "max_instances": max_instances,
        },
    )
    model.compile(optimizer=keras.optimizers.Adam(2e-3))
    model.fit(images, y, batch_size=4, epochs=400, verbose=0)
    predictions = model.predict(images, verbose=0)
    ap50 = _coco_mask_ap50(
        scenes.instance_masks, scenes.instance_classes, predictions, num_classes
    )
    assert ap50 >= 0.9, ap50
