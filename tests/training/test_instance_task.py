"""The instance task: recipes, the step schedule, data inspection on real
COCO-format photos, COCO evaluation of a PANet, and training end to end."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import cv2
import keras
import numpy as np
import pytest
import tensorflow as tf

from kseg.cli import main
from kseg.training.recipe import RecipeError, apply_overrides, load_recipe
from kseg.training.schedules import StepWarmup

REPO = Path(__file__).resolve().parents[2]
LABELME_COCO = Path(
    "/usr/share/doc/labelme-examples/examples/instance_segmentation/data_dataset_coco"
)

# A PANet small enough to build, trace and train in seconds on a CPU.
TINY = [
    "model.kwargs={filters: 16, fc_units: 32, rpn_pre_nms_top_k_train: 100, "
    "rpn_post_nms_top_k_train: 50, rpn_pre_nms_top_k_test: 100, "
    "rpn_post_nms_top_k_test: 50, rpn_batch_size: 32, roi_batch_size: 16, "
    "max_detections: 10}",
    "backbone.kwargs.widths=[4, 8, 8, 8]",
    "backbone.kwargs.stem_width=4",
    "data.image_size=64",
    "data.crop_size=[64, 64]",
    "data.short_edge_range=null",
    "data.max_size=null",
    "data.num_train_images=8",
    "data.num_val_images=4",
    "data.max_instances=6",
    "train.batch_size=2",
    "train.epochs=1",
    "train.steps_per_epoch=2",
    "eval.batch_size=4",
]


def tiny_recipe(*overrides):
    return apply_overrides(load_recipe("panet_quickstart"), [*TINY, *overrides])


@pytest.mark.parametrize(
    "name, learning_rate, batch, fraction, crop, switches",
    [
        ("panet_r50-fpn_8xb2-ms-coco-1400", 0.02, 16, 0.75, (1408, 1408), True),
        ("maskrcnn_r50-fpn_8xb2-coco-1024", 0.02, 16, 0.75, (1024, 1024), False),
        ("panet_r50-fpn_8xb1-cityscapes-1024", 0.01, 8, 0.75, (1024, 2048), True),
    ],
)
def test_instance_recipes_carry_the_papers_settings(
    name, learning_rate, batch, fraction, crop, switches
):
    recipe = load_recipe(name)
    assert recipe.task == "instance" and recipe.model.name == "panet"
    assert recipe.optimizer.name == "sgd"
    assert recipe.optimizer.learning_rate == learning_rate
    assert recipe.optimizer.momentum == 0.9 and recipe.optimizer.weight_decay == 1e-4
    assert recipe.train.batch_size == batch
    assert recipe.schedule.name == "step" and recipe.schedule.gamma == 0.1
    assert tuple(recipe.schedule.step_fractions) == (fraction,)
    assert tuple(recipe.data.crop_size) == crop
    kwargs = recipe.model.kwargs
    for switch in ("bottom_up_path", "adaptive_pooling", "fully_connected_fusion"):
        assert kwargs.get(switch, True) is switches
    # 120k + 40k iterations on COCO, 18k + 6k on Cityscapes.
    total = recipe.train.epochs * recipe.train.steps_per_epoch
    assert total == (24_000 if "cityscapes" in name else 160_000)


def test_the_coco_recipe_trains_multi_scale():
    data = load_recipe("panet_r50-fpn_8xb2-ms-coco-1400").data
    assert tuple(data.short_edge_range) == (400, 1400) and data.max_size == 1400


def test_instance_datasets_and_models_must_fit_the_task():
    with pytest.raises(RecipeError, match="data.dataset"):
        apply_overrides(load_recipe("quickstart"), ["data.dataset=coco"])
    with pytest.raises(RecipeError, match="multiple of 64"):
        tiny_recipe("data.crop_size=[100, 128]")
    with pytest.raises(RecipeError, match="model.kwargs.image_size"):
        tiny_recipe("model.kwargs.image_size=[64, 64]")


def test_step_schedule_warms_up_then_drops_by_gamma():
    schedule = StepWarmup(0.02, boundaries=(60, 80), warmup_steps=10)
    rates = [float(schedule(t)) for t in (0, 5, 10, 59, 60, 79, 80, 1000)]
    expected = [0.002, 0.011, 0.02, 0.02, 0.002, 0.002, 0.0002, 0.0002]
    np.testing.assert_allclose(rates, expected, rtol=1e-5)
    restored = StepWarmup.from_config(schedule.get_config())
    assert float(restored(70)) == pytest.approx(0.002)


def test_a_recipe_step_schedule_drops_at_its_fractions():
    from kseg.training.optimizers import build_optimizer

    recipe = apply_overrides(
        load_recipe("quickstart"),
        ["schedule.name=step", "schedule.step_fractions=[0.5, 0.75]",
         "schedule.warmup_steps=0", "optimizer.learning_rate=0.1"],
    )  # fmt: skip
    schedule = build_optimizer(recipe, total_steps=100).learning_rate
    if not callable(schedule):
        schedule = build_optimizer(recipe, total_steps=100)._learning_rate
    rates = [float(schedule(t)) for t in (49, 50, 74, 75)]
    np.testing.assert_allclose(rates, [0.1, 0.01, 0.01, 0.001], rtol=1e-5)


@pytest.mark.skipif(not LABELME_COCO.is_dir(), reason="labelme-examples missing")
def test_data_inspect_counts_the_labelme_coco_photos(capsys):
    status = main(["data", "inspect", "--dataset", "coco", "--data", str(LABELME_COCO)])
    assert status == 0
    out = capsys.readouterr().out
    assert "3 images, 12 instances, every image decodes" in out
    rows = {line.split()[0]: line.split()[1] for line in out.splitlines() if line}
    assert rows["person"] == "6" and rows["bus"] == "2" and rows["bottle"] == "1"


def test_evaluation_of_an_untrained_panet_gives_the_coco_table():
    from kseg.training.trainer import task_for

    keras.utils.set_random_seed(0)
    task = task_for(tiny_recipe())
    assert "synthetic_instances" in task.prepare()
    model = task.build_model()
    result = task.evaluate(model, progress=False)
    table = result.table()
    assert table.splitlines()[1].startswith("box") and "mask" in table
    assert {"disc", "square", "triangle", "ring", "plus"} <= set(table.split())
    numbers = result.as_json()
    assert set(numbers["coco"]) == {"bbox", "segm"}
    assert 0.0 <= numbers["mask_ap"] <= 1.0
    assert result.summary().startswith("mask AP ")


def test_recipe_tunables_and_loss_weights_reach_the_model():
    from kseg.training.trainer import task_for

    task = task_for(
        tiny_recipe(
            "loss.weights={mask: 2.0}",
            "model.kwargs.anchor_sizes=[16, 32, 64, 128, 256]",
            "model.kwargs.aspect_ratios=[1.0]",
            "model.kwargs.mask_size=14",
            "model.kwargs.roi_foreground_iou=0.6",
        )
    )
    task.prepare()
    model = task.build_model()
    assert model.loss_weights["mask"] == 2.0 and model.loss_weights["rpn_box"] == 1.0
    assert model.rpn.anchor_generator.sizes == (16, 32, 64, 128, 256)
    assert model.rpn.head.num_anchors == 1
    assert model.roi_heads.foreground_iou == 0.6
    assert model.output["masks"].shape[-2:] == (14, 14)


@pytest.mark.slow
def test_kseg_train_and_evaluate_an_instance_recipe(tmp_path, capsys):
    options = [f"--set={override}" for override in TINY]
    run = tmp_path / "run"
    status = main(
        ["train", "--recipe", "panet_quickstart", *options, "--run-dir", str(run),
         "--quiet"]
    )  # fmt: skip
    assert status == 0
    out = capsys.readouterr().out
    assert "mask AP" in out and "box" in out
    result = json.loads((run / "result.json").read_text())
    assert result["task"] == "instance" and result["steps"] == 2
    assert set(result["coco"]) == {"bbox", "segm"}
    epochs = [json.loads(line) for line in (run / "epochs.jsonl").open()]
    for name in ("rpn_objectness", "rpn_box", "box_class", "box_regression",
                 "mask", "val_mask_ap"):  # fmt: skip
        assert name in epochs[0]
    assert (run / "checkpoints" / "best.keras").is_file()
    assert main(["evaluate", str(run)]) == 0
    assert "mask AP" in capsys.readouterr().out


@pytest.mark.slow
def test_panet_trains_on_two_replicas(tmp_path):
    # MirroredStrategy over two logical CPU devices, as on two GPUs.
    script = textwrap.dedent(
        f"""
        import tensorflow as tf
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * 2
        )
        from kseg.training.recipe import apply_overrides, load_recipe
        from kseg.training.trainer import train
        recipe = apply_overrides(
            load_recipe("panet_quickstart"),
            {TINY!r} + ["train.strategy=mirrored", "train.synchronized_bn=true"],
        )
        result = train(recipe, run_dir={str(tmp_path / "run")!r}, verbose=0)
        print("STEPS", result.steps)
        """
    )
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "KERAS_BACKEND": "tensorflow"}
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env,
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "STEPS 2" in done.stdout
    assert "2 replica(s)" in done.stdout


# === Bad COCO data: named before training, or skipped ===


def _coco_folder(root, bad=(), splits=("train", "val")):
    """`root/annotations/instances_<split>.json` and `root/<split>/<i>.jpg`:
    4 images of 64x64 with one square each; images `(split, i)` in `bad` are
    truncated JPEGs."""
    rng = np.random.default_rng(0)
    (root / "annotations").mkdir(parents=True)
    for split in splits:
        (root / split).mkdir()
        images, annotations = [], []
        for i in range(4):
            image = rng.integers(0, 256, (64, 64, 3), np.uint8)
            data = cv2.imencode(".jpg", image)[1].tobytes()
            if (split, i) in bad:
                data = data[: len(data) // 2]
            (root / split / f"{i}.jpg").write_bytes(data)
            images.append(
                {"id": i + 1, "file_name": f"{i}.jpg", "height": 64, "width": 64}
            )
            square = [10, 10, 40, 10, 40, 40, 10, 40]
            annotations.append(
                {"id": i + 1, "image_id": i + 1, "category_id": 1, "iscrowd": 0,
                 "segmentation": [square]}
            )  # fmt: skip
        (root / "annotations" / f"instances_{split}.json").write_text(
            json.dumps(
                {
                    "images": images,
                    "annotations": annotations,
                    "categories": [{"id": 1, "name": "square"}],
                }
            )  # fmt: skip
        )
    return root


def _coco_recipe(root, *overrides):
    return tiny_recipe(
        "data.dataset=coco", f"data.root={root}", "data.train_split=train",
        "data.val_split=val", *overrides,
    )  # fmt: skip


def test_data_commands_refuse_split_names_that_leave_the_folder(tmp_path, capsys):
    root = _coco_folder(tmp_path / "coco")
    (root / "annotations.json").write_text(
        (root / "annotations" / "instances_train.json").read_text()
    )
    for command in (
        ["inspect", "--dataset", "coco", "--data", str(root)],
        ["inspect", "--dataset", "folder", "--set", "data.num_classes=2",
         "--data", str(root)],
        ["convert", "--dataset", "folder", "--set", "data.num_classes=2",
         "--data", str(root), "--out", str(tmp_path / "records")],
    ):  # fmt: skip
        assert main(["data", *command, "--split", "../coco/train"]) == 1
        assert "'../coco/train' is not a split name" in capsys.readouterr().err


def test_a_bad_validation_image_is_named_before_training(tmp_path):
    from kseg.training.trainer import task_for

    root = _coco_folder(tmp_path / "coco", bad={("val", 2)})
    with pytest.raises(ValueError, match=r"1 of the 4 samples of the validation"):
        task_for(_coco_recipe(root)).prepare()
    with pytest.raises(ValueError, match=r"val/2.jpg: not a decodable image"):
        task_for(_coco_recipe(root)).prepare()
    task = task_for(_coco_recipe(root, "data.skip_corrupt=true"))
    with pytest.warns(UserWarning, match=r"skipping a bad validation .*val/2.jpg"):
        task.prepare()
    assert [image["id"] for image in task.val_set.images] == [1, 2, 4]


def test_a_bad_training_image_is_named_or_skipped(tmp_path):
    from kseg.data import data_error_message
    from kseg.training.trainer import task_for

    root = _coco_folder(tmp_path / "coco", bad={("train", 1)})
    task = task_for(_coco_recipe(root))
    task.prepare()
    with pytest.raises(tf.errors.InvalidArgumentError) as error:
        for _ in task.train_dataset(None).take(2):
            pass
    assert data_error_message(error.value).startswith(
        f"{root / 'train' / '1.jpg'}: not a decodable image"
    )
    task = task_for(_coco_recipe(root, "data.skip_corrupt=true"))
    task.prepare()
    with pytest.warns(UserWarning, match=r"skipping a bad sample .*train/1.jpg"):
        batches = list(task.train_dataset(None).take(3))
    assert len(batches) == 3


@pytest.mark.slow
def test_training_on_bad_coco_images_stops_with_their_name(tmp_path):
    from kseg.training.trainer import train

    root = _coco_folder(tmp_path / "coco", bad={("train", i) for i in range(4)})
    with pytest.raises(ValueError, match=r"train/\d.jpg: not a decodable image"):
        train(_coco_recipe(root), runs_dir=tmp_path / "runs", verbose=0)
    recipe = _coco_recipe(root, "data.skip_corrupt=true")
    with (
        pytest.warns(UserWarning),
        pytest.raises(
            ValueError, match=r"every one of the 4 samples of instances_train is bad"
        ),
    ):
        train(recipe, runs_dir=tmp_path / "runs", verbose=0)
