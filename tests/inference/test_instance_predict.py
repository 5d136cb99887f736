"""`predict_instances` and `kseg predict` on instance models (PANet): hand-made
detections through a fixed-output model, and a tiny PANet against the COCO
evaluation's own conversion (`detections_to_coco`)."""

import argparse
import json

import cv2
import keras
import numpy as np
import pytest

from kseg import testing
from kseg.data import instance_eval_transform
from kseg.inference import Instances, paste_masks, predict_instances, register
from kseg.inference.instance_outputs import (
    draw_instances,
    encode_instance_png,
    instance_colors,
)
from kseg.inference.visualize import contrast_ratio, text_color

SIZE = 64
# Hand-made detections in model-input pixels (64 × 64), best score not first.
BOXES = np.array(
    [[0, 0, 16, 64], [4, 8, 12, 40], [10, 50, 20, 70], [0, 0, 0, 0]], np.float32
)
SCORES = np.array([0.3, 0.9, 0.7, 0.0], np.float32)
CLASSES = np.array([1, 2, 1, 0], np.int32)


def _masks():
    masks = np.zeros((4, 28, 28), np.float32)
    masks[0] = 1.0
    masks[1, :14] = 1.0  # the top half of its box
    masks[2, :, :7] = 0.8  # the left quarter
    return masks


def fixed_detector():
    return testing.fixed_detector(BOXES, SCORES, CLASSES, _masks(), 3, (SIZE, SIZE))


def _image(height, width, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(20, 256, (height, width, 3), dtype=np.uint8)


def test_detections_map_back_to_the_image():
    # 32 × 128 fits the 64 × 64 input at scale 0.5 (content 16 × 64).
    image = _image(32, 128)
    (result,) = predict_instances(fixed_detector(), [image])
    # Score ≥ 0.5, best first: detection 1 (0.9), then 2 (0.7).
    np.testing.assert_allclose(result.scores, [0.9, 0.7])
    np.testing.assert_array_equal(result.classes, [2, 1])
    assert result.classes.dtype == np.int32
    # Boxes ÷ 0.5, clipped to the 32 × 128 image.
    np.testing.assert_allclose(result.boxes, [[8, 16, 24, 80], [20, 100, 32, 128]])
    assert result.masks.dtype == bool and result.masks.shape == (2, 32, 128)
    # Detection 1's mask is the top half of its box, rows 8..15, columns 16..79.
    expected = np.zeros((32, 128), bool)
    expected[8:16, 16:80] = True
    np.testing.assert_array_equal(result.masks[0], expected)
    # Detection 2: the left quarter of its unclipped box [20, 100, 40, 140]
    # is columns 100..109; paste_masks pastes into the clipped box, as the
    # COCO evaluation does.
    np.testing.assert_array_equal(
        result.masks[1], paste_masks(_masks()[[2]], [[20, 100, 32, 128]], 32, 128)[0]
    )
    assert result.masks[1, 20:32, 100:102].all() and not result.masks[1, :20].any()

    instance_map = result.instance_map()
    assert instance_map.dtype == np.uint16
    expected_map = np.zeros((32, 128), np.uint16)
    expected_map[result.masks[1]] = 2
    expected_map[result.masks[0]] = 1
    np.testing.assert_array_equal(instance_map, expected_map)


def test_thresholds_limits_and_empty_images():
    model = fixed_detector()
    images = [_image(64, 64), np.zeros((40, 30, 3), np.uint8), _image(50, 20, 1)]
    results = predict_instances(model, images, score_threshold=0.0, max_detections=2)
    assert [len(r.scores) for r in results] == [2, 0, 2]
    np.testing.assert_allclose(results[0].scores, [0.9, 0.7])
    empty = results[1]
    assert empty.boxes.shape == (0, 4) and empty.scores.shape == (0,)
    assert empty.classes.shape == (0,) and empty.masks.shape == (0, 40, 30)
    assert not empty.instance_map().any()
    (every,) = predict_instances(model, images[:1], score_threshold=0.0)
    np.testing.assert_allclose(every.scores, [0.9, 0.7, 0.3])
    (none,) = predict_instances(model, images[:1], score_threshold=0.95)
    assert none.masks.shape == (0, 64, 64)
    with pytest.raises(ValueError, match="max_detections"):
        predict_instances(model, images, max_detections=0)


def tiny_panet(num_classes=5, **kwargs):
    from kseg.backbones import build_resnet
    from kseg.models import PANet

    keras.utils.set_random_seed(3)
    backbone = build_resnet((1, 1, 1, 1), (4, 4, 4, 4), input_shape=(SIZE, SIZE, 3))
    settings = dict(
        filters=8,
        fc_units=16,
        max_detections=6,
        max_instances=3,
        rpn_pre_nms_top_k_test=60,
        rpn_post_nms_top_k_test=30,
        seed=1,
    )
    return PANet(backbone, num_classes, **{**settings, **kwargs})


@pytest.fixture(scope="module")
def panet():
    return tiny_panet()


def test_panet_matches_the_coco_evaluation_conversion(panet):
    """The same image through the evaluation's path: `instance_eval_transform`,
    the model, `detections_to_coco` (boxes ÷ scale, `paste_masks`, RLE)."""
    from kseg.data.instances import mask_api
    from kseg.training.coco_evaluation import detections_to_coco

    images = [_image(48, 100, 4), _image(64, 40, 5)]
    results = predict_instances(panet, images, score_threshold=0.0)
    for index, (image, result) in enumerate(zip(images, results, strict=True)):
        x, scale = instance_eval_transform(image, (SIZE, SIZE))
        outputs = panet(np.asarray(x)[None], training=False)
        meta = {
            "image_id": [index],
            "height": [image.shape[0]],
            "width": [image.shape[1]],
            "scale": np.asarray(scale)[None],
        }
        reference = detections_to_coco(outputs, meta, list(range(1, 6)))
        reference.sort(key=lambda d: -d["score"])
        assert len(reference) == len(result.scores) > 0
        for k, expected in enumerate(reference):
            y1, x1, y2, x2 = result.boxes[k]
            np.testing.assert_allclose(
                [x1, y1, x2 - x1, y2 - y1], expected["bbox"], atol=1e-3
            )
            assert result.scores[k] == pytest.approx(expected["score"], abs=1e-5)
            assert result.classes[k] == expected["category_id"]
            rle = dict(expected["segmentation"])
            rle["counts"] = rle["counts"].encode()
            np.testing.assert_array_equal(result.masks[k], mask_api().decode(rle))


def test_overlay_blends_masks_and_draws_boxes_and_labels():
    image = np.full((60, 80, 3), 100, np.uint8)
    masks = np.zeros((1, 60, 80), bool)
    masks[0, 30:50, 20:40] = True
    instances = Instances(
        boxes=np.array([[28.0, 18.0, 52.0, 44.0]], np.float32),
        scores=np.array([0.87], np.float32),
        classes=np.array([2], np.int32),
        masks=masks,
    )
    drawn = draw_instances(image, instances, ["disc", "square"])
    color = instance_colors(1)[0].astype(float)
    blended = np.round(0.5 * 100 + 0.5 * color)
    np.testing.assert_array_equal(
        drawn[35:45, 25:35], np.broadcast_to(blended, (10, 10, 3))
    )
    # The box: columns 18 and 43, rows 28 and 51, in the instance's colour.
    np.testing.assert_array_equal(drawn[40, 18], color)
    np.testing.assert_array_equal(drawn[40, 43], color)
    np.testing.assert_array_equal(drawn[51, 30], color)
    # The label "square 0.87" sits right above the box, filled with the
    # instance's colour, its text in black or white whichever contrasts more
    # (kseg.inference.visualize.draw_labels); nothing else changes.
    filled = np.all(drawn[:28] == color, axis=-1)
    rows = np.flatnonzero(filled[:, 0])  # the label's padding (it fills the width)
    assert len(rows) >= 12 and rows[-1] == 27 and np.all(np.diff(rows) == 1)
    label = drawn[rows[0] : 28].reshape(-1, 3).astype(float)
    ink = np.array(text_color(color), float)
    assert (np.abs(label - ink).max(-1) < 60).sum() >= 20
    assert contrast_ratio(ink, color) >= 4.5
    np.testing.assert_array_equal(drawn[: rows[0]], image[: rows[0]])
    np.testing.assert_array_equal(drawn[55:, :], image[55:, :])


def test_instance_png_reads_back_exactly(tmp_path):
    instance_map = np.zeros((9, 700), np.uint16)
    instance_map[0] = np.arange(700)
    instance_map[4, :3] = [300, 65535, 1]
    path = tmp_path / "map.png"
    path.write_bytes(encode_instance_png(instance_map))
    read = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    assert read.dtype == np.uint16
    np.testing.assert_array_equal(read, instance_map)
    with pytest.raises(ValueError, match="uint16"):
        encode_instance_png(instance_map.astype(np.int32))


def _predict(argv):
    parser = argparse.ArgumentParser(prog="kseg")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["predict", *argv])
    return args.func(args)


@pytest.fixture(scope="module")
def panet_run(panet, tmp_path_factory):
    """A `kseg train`-style PANet run: model.keras beside the recipe
    (panet_quickstart: the synthetic scenes, 5 classes)."""
    from kseg.training.recipe import dump_recipe, load_recipe

    run = tmp_path_factory.mktemp("panet_run")
    panet.save(run / "model.keras")
    (run / "recipe.yaml").write_text(dump_recipe(load_recipe("panet_quickstart")))
    return run


def _write_images(folder):
    folder.mkdir()
    paths = []
    for name, image in [
        ("a.png", _image(48, 100, 4)),
        ("b.png", _image(64, 40, 5)),
        ("black.png", np.zeros((30, 30, 3), np.uint8)),
    ]:
        cv2.imwrite(str(folder / name), image[..., ::-1])
        paths.append(folder / name)
    return paths


def test_kseg_predict_writes_overlays_instance_pngs_and_coco_results(
    panet, panet_run, tmp_path, capsys
):
    from faster_coco_eval import COCO

    from kseg.data.synthetic_instances import SYNTHETIC_INSTANCE_CLASSES

    paths = _write_images(tmp_path / "images")
    out = tmp_path / "out"
    argv = [str(panet_run), *map(str, paths), "--out", str(out)]
    assert _predict([*argv, "--score-threshold", "0.2", "--max-detections", "4"]) == 0
    printed = capsys.readouterr().out
    assert "recipe.yaml" in printed
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [f"{stem}_{kind}.png" for stem in ("a", "b", "black")
         for kind in ("overlay", "instances")] + ["detections.json", "images.json"]
    )  # fmt: skip

    detections = json.loads((out / "detections.json").read_text())
    listing = json.loads((out / "images.json").read_text())
    assert [c["name"] for c in listing["categories"]] == list(
        SYNTHETIC_INSTANCE_CLASSES
    )
    assert [i["id"] for i in listing["images"]] == [1, 2, 3]
    ground_truth = COCO()
    ground_truth.dataset = {**listing, "annotations": []}
    ground_truth.createIndex()
    loaded = ground_truth.loadRes(detections)
    for image_id, path in enumerate(paths, start=1):
        image = cv2.imread(str(path))[..., ::-1]
        (expected,) = predict_instances(
            panet, [image], score_threshold=0.2, max_detections=4
        )
        instance_map = cv2.imread(
            str(out / f"{path.stem}_instances.png"), cv2.IMREAD_UNCHANGED
        )
        assert instance_map.dtype == np.uint16
        np.testing.assert_array_equal(instance_map, expected.instance_map())
        overlay = cv2.imread(str(out / f"{path.stem}_overlay.png"))[..., ::-1]
        np.testing.assert_array_equal(
            overlay, draw_instances(image, expected, SYNTHETIC_INSTANCE_CLASSES)
        )
        mine = sorted(
            loaded.loadAnns(loaded.getAnnIds(imgIds=[image_id])),
            key=lambda a: -a["score"],
        )
        assert len(mine) == len(expected.scores) <= 4
        for k, annotation in enumerate(mine):
            assert annotation["category_id"] == expected.classes[k]
            np.testing.assert_array_equal(
                loaded.annToMask(annotation), expected.masks[k]
            )
    assert len(detections) > 0

    # Never overwritten without --overwrite.
    before = (out / "detections.json").read_bytes()
    assert _predict(argv) == 1
    assert "already exists" in capsys.readouterr().err
    assert (out / "detections.json").read_bytes() == before
    black = [str(panet_run), str(paths[2]), "--out", str(out), "--overwrite"]
    assert _predict([*black, "--score-threshold", "0.999999"]) == 0
    assert json.loads((out / "detections.json").read_text()) == []
    assert not cv2.imread(str(out / "black_instances.png"), -1).any()


def test_kseg_predict_without_a_recipe_numbers_the_classes(tmp_path, capsys):
    model = fixed_detector()
    path = tmp_path / "fixed.keras"
    model.save(path)
    image = tmp_path / "image.png"
    cv2.imwrite(str(image), _image(32, 128)[..., ::-1])
    assert _predict([str(path), str(image), "--out", str(tmp_path / "out")]) == 0
    listing = json.loads((tmp_path / "out" / "images.json").read_text())
    assert listing["categories"] == [
        {"id": 1, "name": "class_1"},
        {"id": 2, "name": "class_2"},
    ]
    detections = json.loads((tmp_path / "out" / "detections.json").read_text())
    assert [d["category_id"] for d in detections] == [2, 1]
    np.testing.assert_allclose(detections[0]["bbox"], [16, 8, 64, 16])
