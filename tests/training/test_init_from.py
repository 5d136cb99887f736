"""Fine-tuning recipe fields: `model.init_from` (weights copied by name from
a saved PANet, a run directory or torchvision's state dict, checked before a
run directory exists, never read again by a resumed run) and
`model.trainable_layers` (torchvision's trainable backbone layers, "heads",
"all")."""

import re

import keras
import numpy as np
import pytest

from kseg.cli import main
from kseg.models import PANet
from kseg.models.panet.transfer import weights_by_name
from kseg.training.instance import init_source
from kseg.training.recipe import (
    BACKBONE_BUILDERS,
    RecipeError,
    apply_overrides,
    load_recipe,
    save_recipe,
)
from kseg.training.task import with_input_normalization
from kseg.training.trainer import task_for, train

# A PANet small enough to build and train in seconds on a CPU (as in
# test_instance_task.py).
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
    "train.steps_per_epoch=1",
    "eval.batch_size=4",
]
# The weights that depend on the class count.
CLASS_LAYERS = re.compile(r"/(class_logits|box_deltas|mask_logits)/")


def tiny_recipe(*overrides):
    return apply_overrides(load_recipe("panet_quickstart"), [*TINY, *overrides])


def saved_panet(path, num_classes, seed=7):
    """The tiny recipe's PANet with `num_classes` classes and other random
    weights (another seed), saved to `path`."""
    recipe = tiny_recipe()
    keras.utils.set_random_seed(seed)
    kwargs = {**recipe.backbone.kwargs, "input_shape": (64, 64, 3)}
    backbone = BACKBONE_BUILDERS[recipe.backbone.name](**kwargs)
    model = PANet(
        with_input_normalization(backbone),
        num_classes,
        image_size=(64, 64),
        max_instances=6,
        seed=seed,
        **recipe.model.kwargs,
    )
    model.save(path)
    return {name: v.numpy() for name, v in weights_by_name(model).items()}


def built(recipe):
    task = task_for(recipe)
    task.prepare()
    return task.build_model()


def test_init_from_copies_by_name_and_skips_the_class_layers(tmp_path, capsys):
    # 3 classes in the source, the synthetic scenes' 5 in the recipe.
    source = saved_panet(tmp_path / "source.keras", num_classes=3)
    fresh = weights_by_name(built(tiny_recipe()))
    assert not np.array_equal(
        fresh["stem_conv/kernel"].numpy(), source["stem_conv/kernel"]
    )
    capsys.readouterr()

    model = built(tiny_recipe(f"model.init_from={tmp_path / 'source.keras'}"))
    out = capsys.readouterr().out
    weights = weights_by_name(model)
    skipped = sorted(name for name in weights if CLASS_LAYERS.search(name))
    assert len(skipped) == 6
    for name, variable in weights.items():
        value = variable.numpy()
        if name in skipped:
            assert value.shape != source[name].shape, name
        else:
            np.testing.assert_array_equal(value, source[name], err_msg=name)
    summary = out.splitlines()[0]
    assert summary.startswith(f"model.init_from {tmp_path / 'source.keras'}: ")
    assert f"loaded {len(weights) - 6} weights, skipped 6 (another shape)" in summary
    assert "left 0 fresh" in summary
    for name in skipped:
        assert f"  skipped {name}: shape " in out


def test_init_from_names_a_bad_path_before_any_run_directory(tmp_path, capsys):
    runs = tmp_path / "runs"
    missing = tmp_path / "coco.keras"
    args = ["train", "--recipe", "panet_quickstart", "--runs-dir", str(runs)]
    args += [f"--set={o}" for o in TINY]
    assert main([*args, f"--set=model.init_from={missing}"]) == 1
    error = capsys.readouterr().err
    assert f"model.init_from: {missing} does not exist" in error
    assert "kseg convert torchvision" in error
    assert not runs.exists()

    weights = tmp_path / "weights.h5"
    weights.write_bytes(b"")
    assert main([*args, f"--set=model.init_from={weights}"]) == 1
    assert "is not a file kseg initialises from" in capsys.readouterr().err
    assert not runs.exists()


def test_init_source_takes_a_run_directory(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    with pytest.raises(FileNotFoundError, match="checkpoints/last.keras"):
        init_source(run)
    (run / "model.keras").write_bytes(b"")
    assert init_source(run) == run / "model.keras"
    for name in ("coco.pth", "coco.npz", "coco.safetensors", "m.keras"):
        (tmp_path / name).write_bytes(b"")
        assert init_source(tmp_path / name) == tmp_path / name


def test_trainable_layers_freeze_the_backbone(capsys):
    model = built(tiny_recipe("model.trainable_layers=2"))
    assert "backbone stages training: res5, res4 (batch norm frozen)" in (
        capsys.readouterr().out
    )
    trainable = {
        layer.name.split("_")[0]
        for layer in model.backbone.layers
        if layer.trainable and layer.weights
    }
    assert trainable == {"res5", "res4"}
    for stage in (model.fpn, model.rpn, model.roi_heads):
        assert stage.trainable_weights

    model = built(tiny_recipe("model.trainable_layers=heads"))
    assert not model.backbone.trainable_weights
    assert model.roi_heads.trainable_weights


def test_recipe_checks_the_fine_tuning_fields():
    recipe = load_recipe("panet_quickstart")
    # The default: nothing loaded, everything trains.
    assert recipe.model.init_from is None and recipe.model.trainable_layers is None
    for value, message in (
        ("7", "from 0 \\(backbone frozen\\) to 5"),
        ("-1", "from 0"),
        ("head", "expected an int 0..5, 'all' or 'heads'"),
        ("true", "expected an int"),
        ("2.0", "expected an int"),
    ):
        with pytest.raises(RecipeError, match=f"model.trainable_layers: .*{message}"):
            apply_overrides(recipe, [f"model.trainable_layers={value}"])
    with pytest.raises(RecipeError, match="model.init_from: empty"):
        apply_overrides(recipe, ["model.init_from=' '"])
    for key in ("init_from=m.keras", "trainable_layers=3"):
        with pytest.raises(RecipeError, match="an instance segmentation setting"):
            apply_overrides(load_recipe("quickstart"), [f"model.{key}"])


class _Interrupt(Exception):
    pass


class _StopAtSecondEpoch(keras.callbacks.Callback):
    """Ends the process's training after epoch 1's backup, like a kill."""

    def on_epoch_begin(self, epoch, logs=None):
        if epoch == 1:
            raise _Interrupt()


def test_resume_reads_init_from_only_without_the_runs_weights(tmp_path, monkeypatch):
    from kseg.training import trainer

    run = tmp_path / "run"
    (run / "backup").mkdir(parents=True)
    missing = tmp_path / "gone.keras"
    save_recipe(tiny_recipe(f"model.init_from={missing}"), run / "recipe.yaml")
    tasks = []

    def stop(recipe, task, strategy):
        tasks.append(task)
        raise _Interrupt()

    monkeypatch.setattr(trainer, "_build", stop)
    # Killed before its first backup: the run starts over from init_from.
    with pytest.raises(FileNotFoundError, match=f"model.init_from: {missing}"):
        train(None, resume=run, verbose=0)
    # With a backup (or model.keras) the run's own weights win.
    for name in ("backup/epoch-0001.json", "model.keras"):
        (run / name).write_text("{}")
        with pytest.raises(_Interrupt):
            train(None, resume=run, verbose=0)
        assert not tasks[-1].initialise and tasks[-1].init_source is None
        (run / name).unlink()


@pytest.mark.slow
def test_a_resumed_run_restores_its_backup_not_init_from(tmp_path, capsys):
    source = tmp_path / "source.keras"
    saved_panet(source, num_classes=5)
    recipe = tiny_recipe(f"model.init_from={source}", "train.epochs=2")
    run = tmp_path / "run"
    with pytest.raises(_Interrupt):
        train(recipe, run_dir=run, callbacks=[_StopAtSecondEpoch()], verbose=0)
    assert "model.init_from" in capsys.readouterr().out
    # The file may be gone by now: the run's backup holds its weights.
    source.unlink()
    result = train(None, resume=run, verbose=0)
    out = capsys.readouterr().out
    assert "model.init_from" not in out
    assert "resuming after epoch 1" in out
    assert result.steps == 2


def test_the_fine_tuning_recipe_builds_what_kseg_convert_writes():
    from kseg.models.panet.panet import TORCHVISION_CONVENTIONS
    from kseg.models.torchvision_weights import BASELINE

    recipe = load_recipe("maskrcnn_r50-fpn_1xb2-coco-finetune-1024")
    # The converted model's arguments (build_torchvision_model), so every
    # weight but the class-specific ones loads and detection is torchvision's.
    assert recipe.model.kwargs == {**BASELINE, **TORCHVISION_CONVENTIONS}
    assert recipe.backbone.name == "resnet50" and not recipe.backbone.kwargs
    assert recipe.model.init_from == "maskrcnn_resnet50_fpn_coco.keras"
    assert recipe.model.trainable_layers == 3  # torchvision's default
    assert recipe.data.dataset == "coco" and recipe.train.batch_size == 2
