"""Crash recovery and bad input of training runs: backups that survive a
kill, resume that never silently restarts, errors that name the file, and
nothing written before everything is checked."""

import json
import shutil

import keras
import numpy as np
import pytest

from kseg.data import IGNORE_LABEL
from kseg.data.png import encode_index_png, encode_rgb_png
from kseg.files import RunLock, SymbolicLinkError
from kseg.models import load_model
from kseg.training.callbacks import (
    Checkpoint,
    EpochSummary,
    NonFiniteLossError,
    RunBackup,
    StopOnNonFiniteLoss,
)
from kseg.training.recipe import RecipeError, apply_overrides, load_recipe
from kseg.training.trainer import (
    RECIPE_FILE,
    RESULT_FILE,
    _restore,
    _resumed_run_dir,
    train,
)

TINY = [
    "model.kwargs.filters=8",
    "backbone.kwargs.widths=[4, 4, 4, 4]",
    "backbone.kwargs.stem_width=4",
    "data.image_size=32",
    "data.crop_size=[32, 32]",
    "data.num_train_images=8",
    "data.num_val_images=4",
    "train.batch_size=4",
    "train.epochs=1",
    "train.steps_per_epoch=1",
    "train.log_images=0",
    "eval.batch_size=4",
]


def tiny_recipe(*overrides):
    return apply_overrides(load_recipe("quickstart"), [*TINY, *overrides])


def _tiny_model():
    import keras

    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.Dense(2)(inputs))
    model.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9), loss="mse")
    return model


class _Weights:
    """Records the weights after each epoch."""

    def __init__(self):
        import keras

        self.by_epoch = {}
        recorder = self

        class Callback(keras.callbacks.Callback):
            def on_epoch_end(self, epoch, logs=None):
                recorder.by_epoch[epoch + 1] = [
                    np.array(w) for w in self.model.get_weights()
                ]

        self.callback = Callback()


def _fit_with_backup(directory, epochs):
    model = _tiny_model()
    weights = _Weights()
    x = np.random.default_rng(0).normal(size=(8, 4)).astype("float32")
    model.fit(
        x,
        x[:, :2],
        epochs=epochs,
        batch_size=4,
        verbose=0,
        callbacks=[RunBackup(directory), weights.callback],
    )
    return weights.by_epoch


def test_backup_keeps_the_previous_epoch_until_the_next_is_complete(tmp_path):
    _fit_with_backup(tmp_path, epochs=3)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "epoch-0002.json",
        "epoch-0002.weights.h5",
        "epoch-0003.json",
        "epoch-0003.weights.h5",
    ]


def test_a_damaged_backup_falls_back_to_the_previous_one(tmp_path):
    by_epoch = _fit_with_backup(tmp_path, epochs=3)
    # A kill while the newest weights were written (before kseg wrote files
    # atomically this left a 0-byte file and --resume failed in h5py).
    (tmp_path / "epoch-0003.weights.h5").write_bytes(b"")
    model = _tiny_model()
    state = RunBackup(tmp_path).restore(model)
    assert state.epoch == 2 and state.step == 4
    assert "epoch-0003.json is damaged" in state.messages[0]
    for restored, saved in zip(model.get_weights(), by_epoch[2], strict=True):
        np.testing.assert_array_equal(restored, saved)
    # The optimizer's momentum came back too (not a fresh optimizer).
    assert int(model.optimizer.iterations.numpy()) == 4


def test_resume_without_a_loadable_backup_is_an_error_not_a_fresh_start(tmp_path):
    _fit_with_backup(tmp_path / "backup", epochs=2)
    for path in (tmp_path / "backup").glob("*.weights.h5"):
        path.write_bytes(b"\0" * 10)
    model = _tiny_model()
    backup = RunBackup(tmp_path / "backup")
    with pytest.raises(ValueError, match="start a new run"):
        _restore(model, backup, Checkpoint(tmp_path / "best.keras"), tmp_path)
    # Without any backup (killed in epoch 1) training starts at epoch 1.
    empty = RunBackup(tmp_path / "none")
    assert _restore(model, empty, Checkpoint(tmp_path / "b.keras"), tmp_path) == 0


def test_the_best_value_survives_a_resume(tmp_path):
    model = _tiny_model()
    best = Checkpoint(tmp_path / "best.keras", monitor="val_loss", mode="min")
    backup = RunBackup(tmp_path / "backup", best)
    x = np.ones((4, 4), "float32")
    model.fit(
        x, x[:, :2], validation_data=(x, x[:, :2]), epochs=2, verbose=0,
        callbacks=[best, backup],
    )  # fmt: skip
    restored = Checkpoint(tmp_path / "best.keras", monitor="val_loss", mode="min")
    assert _restore(_tiny_model(), backup, restored, tmp_path) == 2
    assert restored.best == pytest.approx(best.best)


@pytest.mark.slow
def test_a_run_whose_evaluation_was_cut_off_is_only_evaluated(tmp_path):
    run = train(tiny_recipe(), run_dir=tmp_path / "run", verbose=0).run_dir
    (run / RESULT_FILE).unlink()
    model_bytes = (run / "model.keras").read_bytes()
    result = train(None, resume=run, verbose=0)
    assert result.steps == 1
    assert (run / RESULT_FILE).is_file()
    assert (run / "model.keras").read_bytes() == model_bytes


# === Bad input: named errors, and no run directory before the checks ===


def _folder_dataset(root, corrupt=None, label_value=None, size_mismatch=None):
    rng = np.random.default_rng(0)
    for split, count in (("train", 8), ("val", 4)):
        (root / split / "images").mkdir(parents=True)
        (root / split / "labels").mkdir(parents=True)
        for i in range(count):
            image = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
            label = rng.integers(0, 6, (32, 32)).astype(np.uint8)
            label[:2] = IGNORE_LABEL
            name = f"{split}{i}"
            if (split, i) == label_value:
                label[5, 5] = 7
            if (split, i) == size_mismatch:
                label = label[:30]
            image_bytes = encode_rgb_png(image)
            if (split, i) == corrupt:
                image_bytes = image_bytes[: len(image_bytes) // 2]
            (root / split / "images" / f"{name}.png").write_bytes(image_bytes)
            (root / split / "labels" / f"{name}.png").write_bytes(
                encode_index_png(label)
            )


def _folder_recipe(root, *overrides):
    return tiny_recipe(
        "data.dataset=folder",
        "data.num_classes=6",
        f"data.root={root}",
        "data.scale_range=[1.0, 1.0]",
        *overrides,
    )


def test_a_corrupt_validation_image_fails_before_training_and_writes_nothing(
    tmp_path,
):
    _folder_dataset(tmp_path / "data", corrupt=("val", 2))
    with pytest.raises(ValueError, match=r"val/images/val2.png: not a decodable"):
        train(_folder_recipe(tmp_path / "data"), runs_dir=tmp_path / "runs")
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_a_corrupt_training_image_is_named_or_skipped(tmp_path):
    _folder_dataset(tmp_path / "data", corrupt=("train", 1))
    recipe = _folder_recipe(tmp_path / "data", "train.steps_per_epoch=2")
    with pytest.raises(ValueError, match=r"train/images/train1.png: not a decodable"):
        train(recipe, runs_dir=tmp_path / "runs", verbose=0)
    skipping = apply_overrides(recipe, ["data.skip_corrupt=true"])
    with pytest.warns(UserWarning, match=r"skipping a bad sample .*train1.png"):
        result = train(skipping, runs_dir=tmp_path / "runs", verbose=0)
    assert result.steps == 2


def test_label_values_outside_the_classes_are_an_error_naming_the_file(tmp_path):
    _folder_dataset(tmp_path / "data", label_value=("train", 0))
    recipe = _folder_recipe(tmp_path / "data", "train.steps_per_epoch=2")
    with pytest.raises(ValueError, match=r"train/labels/train0.png: label values 7"):
        train(recipe, runs_dir=tmp_path / "runs", verbose=0)


def test_image_and_label_of_different_sizes_is_an_error_naming_both(tmp_path):
    _folder_dataset(tmp_path / "data", size_mismatch=("val", 0))
    with pytest.raises(ValueError, match=r"val0.png is 32x32 but label .*val0.png"):
        train(_folder_recipe(tmp_path / "data"), runs_dir=tmp_path / "runs")
    assert not (tmp_path / "runs").exists()


def test_a_failed_start_leaves_no_run_directory(tmp_path):
    missing = _folder_recipe(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError):
        train(missing, runs_dir=tmp_path / "runs")
    unfit = tiny_recipe("train.batch_size=64", "train.steps_per_epoch=null")
    with pytest.raises(RecipeError, match="make no batch"):
        train(unfit, runs_dir=tmp_path / "runs")
    assert not (tmp_path / "runs").exists()


def test_run_dir_must_be_new_or_empty(tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "model.keras").write_text("a user's own file")
    with pytest.raises(FileExistsError, match="did not create and is not empty"):
        train(tiny_recipe(), run_dir=folder)
    assert (folder / "model.keras").read_text() == "a user's own file"
    assert sorted(p.name for p in folder.iterdir()) == ["model.keras"]


@pytest.mark.parametrize("name", ["../escape", "/tmp/abs", "a/b", ".."])
def test_a_recipe_name_cannot_leave_the_runs_folder(name):
    with pytest.raises(RecipeError, match="one folder name"):
        apply_overrides(load_recipe("quickstart"), [f"name={name}"])


def test_a_first_epoch_killed_after_its_summary_line_drops_the_line(tmp_path):
    # The backup is an epoch's last write: killed between the summary line
    # and the backup, the epoch is trained again and its old line dropped.
    (tmp_path / "epochs.jsonl").write_text('{"epoch": 1, "step": 2}\n')
    backup = RunBackup(tmp_path / "backup")
    backup.directory.mkdir()  # made when training starts
    assert (
        _restore(_tiny_model(), backup, Checkpoint(tmp_path / "b.keras"), tmp_path) == 0
    )
    assert (tmp_path / "epochs.jsonl").read_text() == ""


def _epochs_file(path, epochs):
    path.write_text("".join(f'{{"epoch": {e}, "step": {2 * e}}}\n' for e in epochs))
    return path.read_text()


def test_resume_with_the_backups_deleted_is_an_error_not_a_fresh_start(tmp_path):
    # Starting again would truncate epochs.jsonl and overwrite best.keras.
    lines = _epochs_file(tmp_path / "epochs.jsonl", [1, 2, 3])
    backup = RunBackup(tmp_path / "backup")
    for emptied in (True, False):
        if emptied:
            backup.directory.mkdir()
        with pytest.raises(ValueError, match=r"records 3 completed epoch\(s\), but"):
            _restore(_tiny_model(), backup, Checkpoint(tmp_path / "b.keras"), tmp_path)
        assert (tmp_path / "epochs.jsonl").read_text() == lines
        shutil.rmtree(backup.directory, ignore_errors=True)
    # One recorded epoch and no backup folder at all: it was deleted (the
    # folder exists from the start of training).
    lines = _epochs_file(tmp_path / "epochs.jsonl", [1])
    with pytest.raises(ValueError, match="start a new run"):
        _restore(_tiny_model(), backup, Checkpoint(tmp_path / "b.keras"), tmp_path)
    assert (tmp_path / "epochs.jsonl").read_text() == lines


def test_the_backup_folder_exists_from_the_start_of_training(tmp_path):
    class Stop(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            assert (tmp_path / "backup").is_dir()
            raise KeyboardInterrupt  # killed in the first epoch

    model = _tiny_model()
    x = np.ones((4, 4), "float32")
    with pytest.raises(KeyboardInterrupt):
        model.fit(
            x, x[:, :2], epochs=1, verbose=0,
            callbacks=[RunBackup(tmp_path / "backup"), Stop()],
        )  # fmt: skip
    assert list((tmp_path / "backup").iterdir()) == []


def test_run_files_are_never_written_through_a_symbolic_link(tmp_path):
    precious = tmp_path / "notes.txt"
    precious.write_text("mine\n")
    (tmp_path / "epochs.jsonl").symlink_to(precious)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "checkpoints").symlink_to(elsewhere, target_is_directory=True)
    x = np.ones((4, 4), "float32")
    for callback in (
        EpochSummary(tmp_path / "epochs.jsonl"),
        Checkpoint(tmp_path / "checkpoints" / "last.keras"),
        RunBackup(tmp_path / "checkpoints"),
    ):
        with pytest.raises(SymbolicLinkError, match="is a symbolic link"):
            _tiny_model().fit(x, x[:, :2], epochs=1, verbose=0, callbacks=[callback])
    assert precious.read_text() == "mine\n"
    assert list(elsewhere.iterdir()) == []
    with pytest.raises(SymbolicLinkError):
        EpochSummary.truncate(tmp_path / "epochs.jsonl", 0)
    assert precious.read_text() == "mine\n"


@pytest.mark.parametrize("name", ["epochs.jsonl", "checkpoints", "backup", "logs"])
def test_resume_refuses_a_run_directory_holding_links(tmp_path, name):
    run = tmp_path / "run"
    run.mkdir()
    (run / RECIPE_FILE).write_text("name: x\n")
    (run / name).symlink_to(tmp_path, target_is_directory=True)
    with pytest.raises(SymbolicLinkError, match=f"run/{name} is a symbolic link"):
        _resumed_run_dir(run)
    RunLock(run).acquire().release()  # the lock was released


class _Diverge(keras.callbacks.Callback):
    """Turns the weights into NaN when epoch `epoch` (0-based) begins, as a
    diverged training does."""

    def __init__(self, epoch):
        super().__init__()
        self.epoch = epoch

    def on_epoch_begin(self, epoch, logs=None):
        if epoch == self.epoch:
            for variable in self.model.trainable_variables:
                variable.assign(np.full(variable.shape, np.nan, variable.dtype))


def test_a_nan_loss_stops_training_before_the_epoch_saves_anything(tmp_path):
    # Keras' TerminateOnNaN lets the epoch end: its checkpoint and backup
    # would hold the NaN weights.
    model = _tiny_model()
    x = np.ones((8, 4), "float32")
    callbacks = [
        StopOnNonFiniteLoss(),
        _Diverge(epoch=1),
        Checkpoint(tmp_path / "last.keras"),
        RunBackup(tmp_path / "backup"),
    ]
    with pytest.raises(NonFiniteLossError, match=r"became nan in epoch 2 \(step 3\)"):
        model.fit(x, x[:, :2], epochs=3, batch_size=4, verbose=0, callbacks=callbacks)
    assert sorted(p.name for p in (tmp_path / "backup").iterdir()) == [
        "epoch-0001.json",
        "epoch-0001.weights.h5",
    ]
    last = keras.saving.load_model(tmp_path / "last.keras", compile=False)
    assert all(np.isfinite(w).all() for w in last.get_weights())


@pytest.mark.slow
def test_a_nan_loss_stops_the_run_keeping_the_last_complete_epoch(tmp_path):
    run = tmp_path / "run"
    with pytest.raises(NonFiniteLossError) as error:
        train(
            tiny_recipe("train.epochs=3"),
            run_dir=run,
            callbacks=[_Diverge(epoch=1)],
            verbose=0,
        )
    message = str(error.value)
    assert "the training loss became nan in epoch 2 (step 2)" in message
    assert "checkpoints/ and backup/ hold epoch 1, the last complete one" in message
    assert "no model.keras" in message and "start a new run" in message
    # No model, no result: the run did not finish, and epoch 2 left nothing.
    assert not (run / "model.keras").exists() and not (run / RESULT_FILE).exists()
    lines = (run / "epochs.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1]
    assert sorted(p.name for p in (run / "backup").iterdir()) == [
        "epoch-0001.json",
        "epoch-0001.weights.h5",
    ]
    last = load_model(run / "checkpoints" / "last.keras")
    assert all(np.isfinite(w).all() for w in last.get_weights())
    RunLock(run).acquire().release()  # unlocked again


def test_evaluate_refuses_a_model_of_the_other_task_naming_both(tmp_path):
    # It failed with a raw KeyError: 'boxes' after reading the data.
    from kseg import testing
    from kseg.training.trainer import evaluate

    detector = testing.fixed_detector(
        [[0, 0, 8, 8]], [0.9], [1], np.zeros((1, 4, 4)), 1, (64, 64)
    )
    detector.save(tmp_path / "detector.keras")
    semantic = tiny_recipe()
    with pytest.raises(
        ValueError,
        match=r"detector\.keras is an instance segmentation model, but recipe "
        r"'quickstart' is a semantic one",
    ):
        evaluate(str(tmp_path / "detector.keras"), semantic)
    instance = load_recipe("panet_quickstart")
    with pytest.raises(
        ValueError,
        match=r"model '\w+' is a semantic segmentation model, but recipe "
        r"'panet_quickstart' is an instance one \(task: instance\)",
    ):
        evaluate(_tiny_model(), instance)
