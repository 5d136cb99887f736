"""The trainer: pipelines, compile, evaluation, run directories, distribution
(2 replicas on logical CPUs, two local workers) and crash / resume."""

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

from kseg.data import IGNORE_LABEL, make_synthetic
from kseg.training.recipe import RecipeError, apply_overrides, load_recipe
from kseg.training.semantic import (
    compile_model,
    dataset_info,
    eval_pipeline,
    evaluate_model,
    output_names,
    train_pipeline,
)
from kseg.training.task import build_model
from kseg.training.trainer import MODEL_FILE, RECIPE_FILE, new_run_dir

REPO = Path(__file__).resolve().parents[2]

# A recipe small enough to build, trace and train in seconds on a CPU.
TINY = [
    "model.kwargs.filters=8",
    "backbone.kwargs.widths=[4, 4, 4, 4]",
    "backbone.kwargs.stem_width=4",
    "data.image_size=32",
    "data.crop_size=[32, 32]",
    "data.num_train_images=16",
    "data.num_val_images=4",
    "train.batch_size=4",
    "train.log_images=2",
    "eval.batch_size=4",
]


def tiny_recipe(*overrides):
    return apply_overrides(load_recipe("quickstart"), [*TINY, *overrides])


def _env():
    return {
        **os.environ,
        "TF_CPP_MIN_LOG_LEVEL": "3",
        "KERAS_BACKEND": "tensorflow",
        "PYTHONPATH": str(REPO),
    }


def _run_python(code, cwd, timeout=600, env=None):
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=cwd,
        env=env or _env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


# === Pipelines, model and compile ===


def test_train_pipeline_batches_augmented_crops_for_every_output():
    recipe = tiny_recipe("data.crop_size=[24, 20]")
    pairs = make_synthetic("train", 6, 32).as_dataset()
    batches = train_pipeline(pairs, recipe.data, 4, ("logits", "aux"), seed=1)
    images, targets = next(iter(batches))
    assert images.shape == (4, 24, 20, 3) and images.dtype == tf.float32
    assert set(targets) == {"logits", "aux"}
    np.testing.assert_array_equal(targets["logits"], targets["aux"])
    labels = targets["logits"].numpy()
    assert labels.shape == (4, 24, 20)
    assert set(np.unique(labels)) <= set(range(6)) | {IGNORE_LABEL}
    # Infinite: more batches than 6 images make.
    assert len(list(batches.take(5))) == 5


def test_eval_pipeline_pads_to_the_eval_size_with_ignored_labels():
    recipe = tiny_recipe("eval.size=[40, 36]", "eval.batch_size=2")
    pairs = make_synthetic("val", 3, 32).as_dataset()
    batches = list(eval_pipeline(pairs, recipe.eval))
    assert [b[0].shape[0] for b in batches] == [2, 1]
    images, labels = batches[0]
    assert images.shape == (2, 40, 36, 3)
    assert np.all(labels.numpy()[:, 32:] == IGNORE_LABEL)
    assert np.all(labels.numpy()[:, :, 32:] == IGNORE_LABEL)


def test_built_model_takes_0_255_images_and_normalizes_inside():
    recipe = tiny_recipe()
    model = build_model(recipe, 6)
    assert output_names(model) == ["logits"]
    normalization = model.backbone.get_layer("imagenet_normalization")
    out = normalization(np.full((1, 2, 2, 3), [123.675, 116.28, 103.53], "float32"))
    np.testing.assert_allclose(out, 0.0, atol=1e-5)
    logits = model(np.zeros((2, 32, 32, 3), "float32"))["logits"]
    assert logits.shape == (2, 32, 32, 6)


def test_input_normalization_keeps_the_recipe_encoder_as_model_backbone(tmp_path):
    """The normalization is the first layer of the encoder, not a wrapper
    around it: `model.backbone` is the encoder `kseg.backbones` built, so a
    semantic supervision pretrainer of that encoder (pretrained on the same
    normalized images, saved and reloaded) loads into a recipe-built ExFuse,
    and so does an encoder weights file."""
    from kseg.backbones import (
        build_semantic_supervision_pretrainer,
        semantic_supervision_features,
    )
    from kseg.models import load_model
    from kseg.training.recipe import BACKBONE_BUILDERS
    from kseg.training.task import with_input_normalization

    recipe = tiny_recipe(
        "model.name=exfuse",
        "model.kwargs={semantic_supervision: true, kernel_size: 3}",
        "backbone.kwargs.output_stride=32",
    )
    model = build_model(recipe, 6)
    backbone = model.backbone
    assert backbone.name == "resnet"
    names = [layer.name for layer in backbone.layers[:3]]
    assert names[:2] == ["image", "imagenet_normalization"]
    assert names[2].startswith("stem")
    assert not any(isinstance(layer, keras.Model) for layer in backbone.layers)

    def recipe_encoder(seed):
        keras.utils.set_random_seed(seed)
        builder = BACKBONE_BUILDERS[recipe.backbone.name]
        return builder(**recipe.backbone.kwargs)

    pretrainer, _ = build_semantic_supervision_pretrainer(
        with_input_normalization(recipe_encoder(1)), 10
    )
    pretrainer.save(tmp_path / "pretrainer.keras")
    pretrainer = load_model(tmp_path / "pretrainer.keras")
    model.load_semantic_supervision_weights(pretrainer)
    images = np.random.default_rng(0).integers(0, 256, (1, 32, 32, 3))
    images = images.astype("float32")
    expected = semantic_supervision_features(pretrainer)(images, training=False)
    probe = keras.Model(
        model.input,
        {s: model.get_layer(f"ss_{s}_conv2").output for s in ("res2", "res5")},
    )
    got = probe(images, training=False)
    for stage in got:
        np.testing.assert_allclose(got[stage], expected[stage], atol=1e-5)

    encoder = recipe_encoder(2)
    encoder.save_weights(tmp_path / "encoder.weights.h5")
    backbone.load_weights(tmp_path / "encoder.weights.h5")
    for got, want in zip(backbone.get_weights(), encoder.get_weights(), strict=True):
        np.testing.assert_array_equal(got, want)


def test_compile_names_missing_and_unknown_auxiliary_outputs():
    recipe = tiny_recipe()
    model = build_model(recipe, 6)
    bad = apply_overrides(recipe, ["loss.aux_weights.ecre_logits=1.0"])
    with pytest.raises(RecipeError, match="has no output 'ecre_logits'"):
        compile_model(model, bad, 6, total_steps=10)

    exfuse = apply_overrides(
        recipe,
        [
            "model.name=exfuse",
            "model.kwargs={ecre: true, kernel_size: 3}",
            "backbone.kwargs.output_stride=32",
        ],
    )
    model = build_model(exfuse, 6)
    assert set(output_names(model)) == {"logits", "ecre_logits"}
    with pytest.raises(RecipeError, match=r"loss\.aux_weights.*ecre_logits"):
        compile_model(model, exfuse, 6, total_steps=10)
    weighted = apply_overrides(exfuse, ["loss.aux_weights.ecre_logits=0.5"])
    compile_model(model, weighted, 6, total_steps=10)


def test_sgd_recipe_compiles_the_l2_decay_sgd_with_poly_warmup():
    recipe = tiny_recipe(
        "optimizer.name=sgd",
        "optimizer.learning_rate=0.02",
        "schedule.warmup_steps=5",
    )
    model = compile_model(build_model(recipe, 6), recipe, 6, total_steps=100)
    optimizer = model.optimizer
    assert type(optimizer).__name__ == "L2DecaySGD"
    assert optimizer.momentum == 0.9
    assert optimizer.weight_decay == pytest.approx(1e-4)
    schedule = optimizer._learning_rate
    assert schedule.decay_steps == 100 and schedule.warmup_steps == 5
    # A warm-up longer than the run is capped so short trials stay valid.
    short = compile_model(build_model(recipe, 6), recipe, 6, total_steps=3)
    assert short.optimizer._learning_rate.warmup_steps == 2


def test_mixed_precision_recipe_gets_a_loss_scale_optimizer():
    recipe = tiny_recipe("train.dtype_policy=mixed_float16")
    keras.config.set_dtype_policy("mixed_float16")
    model = compile_model(build_model(recipe, 6), recipe, 6, total_steps=10)
    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    logits = model(np.zeros((1, 32, 32, 3), "float32"))["logits"]
    assert logits.dtype == "float32"


# === Evaluation ===


class Oracle(keras.Model):
    """Predicts a fixed class map (one-hot logits), whatever the image."""

    def __init__(self, class_map, num_classes):
        super().__init__()
        self.class_map = np.asarray(class_map)
        self.num_classes = num_classes

    def call(self, images, training=False):
        batch = tf.shape(images)[0]
        size = tf.shape(images)[1:3]
        one_hot = tf.one_hot(self.class_map, self.num_classes) * 10.0
        logits = tf.image.resize(one_hot[None], size, method="nearest")
        return {"logits": tf.tile(logits, [batch, 1, 1, 1])}


def _confusion(labels, predictions, num_classes):
    matrix = np.zeros((num_classes, num_classes))
    for label, prediction in zip(labels.ravel(), predictions.ravel(), strict=True):
        if label != IGNORE_LABEL:
            matrix[label, prediction] += 1
    return matrix


@pytest.mark.parametrize("augmented", [False, True])
def test_evaluate_model_counts_the_confusion_matrix(augmented):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, (4, 8, 8)).astype("uint8")
    labels[:, 0] = IGNORE_LABEL
    class_map = rng.integers(0, 3, (8, 8))
    pairs = tf.data.Dataset.from_tensor_slices(
        (np.zeros((4, 8, 8, 3), "uint8"), labels)
    )
    recipe = tiny_recipe("eval.batch_size=3")
    if augmented:
        # Flipped passes of a constant map average to ties only where the map
        # is not symmetric; a symmetric map keeps the argmax exact.
        class_map = np.concatenate([class_map[:, :4], class_map[:, :4][:, ::-1]], 1)
        recipe = apply_overrides(recipe, ["eval.flip=true"])
    info = dataset_info(recipe.data)
    info = type(info)(info.name, 3, ("a", "b", "c"), info.palette[:3])
    result = evaluate_model(
        Oracle(class_map, 3), pairs, info, recipe.eval, progress=False
    )
    expected = _confusion(labels, np.broadcast_to(class_map, labels.shape), 3)
    np.testing.assert_array_equal(result.confusion_matrix, expected)
    iou = np.diag(expected) / (expected.sum(0) + expected.sum(1) - np.diag(expected))
    np.testing.assert_allclose(result.per_class_iou, iou)
    assert result.mean_iou == pytest.approx(iou.mean())
    assert "pixel accuracy" in result.table() and "mean" in result.table()


# === Run directories ===


def test_new_run_dirs_never_collide(tmp_path):
    claimed = [new_run_dir(tmp_path, "recipe") for _ in range(3)]
    assert len(set(claimed)) == 3
    assert all(path.parent == tmp_path / "recipe" for path in claimed)
    assert all(path.is_dir() and not any(path.iterdir()) for path in claimed)


def test_latest_names_the_newest_run(tmp_path, capsys):
    import os

    from kseg.training.trainer import run_directory

    latest = tmp_path / "recipe" / "latest"
    for _ in range(3):
        run = new_run_dir(tmp_path, "recipe")
        # A relative link to the run just claimed, so the folder can move.
        assert latest.is_symlink() and os.readlink(latest) == run.name
        assert run_directory(latest) == run
    assert (
        sorted(p.name for p in latest.parent.iterdir() if p.name.startswith(".")) == []
    )
    # A `latest` that is not kseg's link is left alone, and runs still start.
    latest.unlink()
    latest.mkdir()
    (latest / "mine.txt").write_text("a user's file")
    run = new_run_dir(tmp_path, "recipe")
    assert run.is_dir() and (latest / "mine.txt").read_text() == "a user's file"
    assert "not a link kseg made" in capsys.readouterr().out


def test_a_run_directory_is_never_reused(tmp_path):
    from kseg.files import RunLockedError
    from kseg.training.trainer import RESULT_FILE, _claim_run_dir, _resumed_run_dir

    recipe = tiny_recipe()
    run, lock = _claim_run_dir(recipe, tmp_path, tmp_path / "explicit")
    assert (run / RECIPE_FILE).is_file()
    before = (run / RECIPE_FILE).read_text()
    with pytest.raises(FileExistsError, match="--resume"):
        _claim_run_dir(recipe, tmp_path, run)
    assert (run / RECIPE_FILE).read_text() == before
    # Locked while the claiming process trains in it.
    with pytest.raises(RunLockedError, match=f"process {os.getpid()}"):
        _resumed_run_dir(run)
    lock.release()
    resumed, lock = _resumed_run_dir(run)
    assert resumed == run
    lock.release()
    # A complete model alone is not the end of a run: its evaluation is.
    (run / MODEL_FILE).write_text("")
    _resumed_run_dir(run)[1].release()
    (run / RESULT_FILE).write_text("{}")
    with pytest.raises(FileExistsError, match="already finished"):
        _resumed_run_dir(run)
    with pytest.raises(FileNotFoundError, match="not a kseg run directory"):
        _resumed_run_dir(tmp_path)


# === Distribution ===


_MIRRORED_SCRIPT = """
import json
import numpy as np
import tensorflow as tf

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(
    cpu, [tf.config.LogicalDeviceConfiguration()] * 2
)
import keras
from kseg.training.recipe import apply_overrides, load_recipe
from kseg.training.strategy import build_strategy, set_synchronized_batch_norm
from kseg.training.semantic import compile_model, output_names
from kseg.training.task import build_model

keras.utils.set_random_seed(0)
recipe = apply_overrides(load_recipe("quickstart"), {overrides!r})
rng = np.random.default_rng(0)
images = rng.uniform(0, 255, (4, 32, 32, 3)).astype("float32")
labels = rng.integers(0, 6, (4, 32, 32)).astype("int32")
labels[:, :5] = 255
initial = None
out = {{}}
for name in ("one_device", "mirrored"):
    strategy = build_strategy(name)
    with strategy.scope():
        model = build_model(recipe, 6)
        set_synchronized_batch_norm(model, True)
        compile_model(model, recipe, 6, total_steps=10)
    if initial is None:
        initial = model.get_weights()
    model.set_weights(initial)
    data = tf.data.Dataset.from_tensors(
        (images, {{o: labels for o in output_names(model)}})
    )
    history = model.fit(data, epochs=3, verbose=0, shuffle=False)
    out[name] = {{
        "replicas": strategy.num_replicas_in_sync,
        "loss": history.history["loss"],
        "mean_iou": history.history["mean_iou"],
        "steps": int(model.optimizer.iterations.numpy()),
    }}
    np.savez("weights_" + name + ".npz", *model.get_weights())
print(json.dumps(out))
"""


@pytest.mark.slow
def test_two_replicas_match_one_replica(tmp_path):
    overrides = [
        *TINY,
        "optimizer.name=sgd",
        # Small enough that round-off is not amplified chaotically by the
        # updates of this tiny width-4 network (at 0.05 it reached 1e-2).
        "optimizer.learning_rate=0.01",
        "schedule.warmup_steps=0",
    ]
    done = _run_python(_MIRRORED_SCRIPT.format(overrides=overrides), tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    one, two = out["one_device"], out["mirrored"]
    assert one["replicas"] == 1 and two["replicas"] == 2
    assert one["steps"] == two["steps"] == 3
    # Same loss at every step: the loss is scaled for the replica count and
    # the replicas' gradients are summed, so the updates agree too. The first
    # step sees identical weights; later steps carry the round-off of the
    # split reductions through the updates (seen: 1.2e-5 relative).
    np.testing.assert_allclose(two["loss"][0], one["loss"][0], rtol=1e-5)
    np.testing.assert_allclose(two["loss"], one["loss"], rtol=5e-4)
    # The confusion matrix is summed across replicas: before any update the
    # mIoU is identical; afterwards the weights differ by round-off, which
    # flips the argmax of a few near-tie pixels (seen: 4e-4 in CI).
    np.testing.assert_allclose(two["mean_iou"][0], one["mean_iou"][0], rtol=1e-6)
    np.testing.assert_allclose(two["mean_iou"], one["mean_iou"], atol=3e-3)
    assert one["loss"][2] != one["loss"][0]
    weights_one = np.load(tmp_path / "weights_one_device.npz")
    weights_two = np.load(tmp_path / "weights_mirrored.npz")
    # Round-off of the split batch statistics grows through BN over 3 steps.
    for key in weights_one.files:
        np.testing.assert_allclose(
            weights_two[key], weights_one[key], rtol=1e-3, atol=3e-4
        )


def _free_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def _kseg(*args):
    return [sys.executable, "-m", "kseg.cli", *args]


@pytest.mark.slow
def test_multi_worker_training_on_two_local_workers(tmp_path):
    ports = _free_ports(2)
    cluster = {"worker": [f"127.0.0.1:{port}" for port in ports]}
    run = tmp_path / "run"
    overrides = [
        *TINY,
        "train.strategy=multi_worker",
        "train.epochs=2",
        "train.steps_per_epoch=2",
        # Unsynchronized BN lets each worker's moving statistics follow its
        # own half of the batch, so the workers' final models would differ.
        "train.synchronized_bn=true",
    ]
    command = _kseg(
        "train",
        *(f"--set={o}" for o in overrides),
        "--run-dir",
        str(run),
        "--quiet",
    )
    workers = []
    for index in range(2):
        config = {"cluster": cluster, "task": {"type": "worker", "index": index}}
        workers.append(
            subprocess.Popen(
                command,
                cwd=tmp_path,
                env={**_env(), "TF_CONFIG": json.dumps(config)},
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    try:
        outputs = [worker.communicate(timeout=600)[0] for worker in workers]
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
    for worker, output in zip(workers, outputs, strict=True):
        assert worker.returncode == 0, output[-3000:]
    assert "2 replica(s) × 2" in outputs[0]
    # The chief writes the run directory, worker 1 a subdirectory of it.
    directories = (run, run / "worker-1")
    results, records = [], []
    for directory in directories:
        assert (directory / RECIPE_FILE).is_file()
        assert (directory / MODEL_FILE).is_file()
        assert (directory / "checkpoints" / "last.keras").is_file()
        # BackupAndRestore deletes its backup when training completes.
        assert not (directory / "backup").exists()
        results.append(json.loads((directory / "result.json").read_text()))
        records.append(
            [json.loads(line) for line in (directory / "epochs.jsonl").open()]
        )
    assert [r["chief"] for r in results] == [True, False]
    assert [r["steps"] for r in results] == [4, 4]
    # The chief alone logs the predicted masks, without a cross-worker step.
    assert any((run / "logs" / "masks").rglob("events.out.tfevents.*"))
    assert not (run / "worker-1" / "logs" / "masks").exists()
    for worker_records in records:
        assert [r["epoch"] for r in worker_records] == [1, 2]
        assert [r["step"] for r in worker_records] == [2, 4]
    # Each worker trains and validates on its own half of every batch, yet
    # both log the same loss and mIoU: the values reduced across workers.
    keys = ("loss", "mean_iou", "val_loss", "val_mean_iou")
    for chief_record, worker_record in zip(*records, strict=True):
        for key in keys:
            assert worker_record[key] == pytest.approx(chief_record[key], rel=1e-6)
    # The last validation ran each worker on half of the 4 images; its mIoU
    # is that of all 4 (the evaluation after training, same weights) because
    # the confusion matrices are summed across workers.
    assert records[0][-1]["val_mean_iou"] == pytest.approx(
        results[0]["mean_iou"], rel=1e-5
    )
    # Synchronized weights: both workers' models evaluate alike.
    assert results[1]["mean_iou"] == pytest.approx(results[0]["mean_iou"], rel=1e-6)


_HANGING_SCRIPT = """
import time
import keras
from kseg.training.recipe import apply_overrides, load_recipe
from kseg.training.trainer import train


class HangMidEpoch(keras.callbacks.Callback):
    # Stands for a crash: after epoch 1's backup, it signals the test in the
    # middle of epoch 2 and waits to be killed.
    def on_train_batch_end(self, batch, logs=None):
        if int(self.model.optimizer.iterations.numpy()) == {hang_step}:
            open({marker!r}, "w").close()
            time.sleep(600)


recipe = apply_overrides(load_recipe("quickstart"), {overrides!r})
train(recipe, run_dir={run!r}, callbacks=[HangMidEpoch()], verbose=2)
"""


@pytest.mark.slow
def test_killed_run_resumes_from_its_backup(tmp_path):
    steps, epochs = 3, 3
    run, marker = tmp_path / "run", tmp_path / "hanging"
    overrides = [
        *TINY,
        f"train.steps_per_epoch={steps}",
        f"train.epochs={epochs}",
        "train.log_images=0",
    ]
    script = _HANGING_SCRIPT.format(
        hang_step=steps + 2, marker=str(marker), overrides=overrides, run=str(run)
    )
    process = subprocess.Popen(
        [sys.executable, "-c", script],
        cwd=tmp_path,
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 600
        while not marker.exists():
            assert process.poll() is None, process.stderr.read()[-3000:]
            assert time.monotonic() < deadline, "training never reached the hang"
            time.sleep(0.5)
        metadata = json.loads((run / "backup" / "epoch-0001.json").read_text())
        assert metadata["epoch"] == 1
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == -signal.SIGKILL
    assert not (run / MODEL_FILE).exists()

    resumed = subprocess.run(
        _kseg("train", "--resume", str(run), "--quiet"),
        cwd=tmp_path,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    result = json.loads((run / "result.json").read_text())
    assert result["steps"] == steps * epochs
    records = [json.loads(line) for line in (run / "epochs.jsonl").open()]
    # Epoch 1 from the killed process, then epochs 2 and 3 after the resume,
    # continuing the step counter from the backup.
    assert [r["epoch"] for r in records] == [1, 2, 3]
    assert [r["step"] for r in records] == [steps, 2 * steps, 3 * steps]
    assert (run / MODEL_FILE).is_file()
    assert not (run / "backup").exists()
