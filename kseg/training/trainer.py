"""Training and evaluation of a recipe: data → model → compile → fit → evaluate.

`train(recipe)` runs one recipe end to end through `model.fit` and leaves
everything in a new run directory `runs/<recipe name>/<timestamp>/`:

    recipe.yaml          the full recipe, every field written out
    epochs.jsonl         one line per epoch: step, learning rate, losses, metrics
    logs/                TensorBoard: losses, metrics, learning rate, images
    backup/              the last two completed epochs while training runs
    checkpoints/         last.keras (every epoch), best.keras (best validation)
    model.keras          the trained model
    evaluation.txt       the final evaluation's table
    result.json          the final evaluation's numbers, steps, times

The run is the same for every task; what depends on the task (data, model,
losses, metrics, evaluation) comes from `task_for`.

A kill at any instant loses at most the current epoch: every file is
written under a temporary name and renamed into place (`kseg.files`), the
backup of the previous epoch is kept until the next one is complete, and a
run is finished only once `result.json` exists (written last). `train(
resume=run_dir)` continues from the newest complete backup, falling back to
the one before when it is damaged, and never silently from scratch. A run
directory is locked while a process trains in it (`kseg.files.RunLock`), and
what a run writes in place is never reached through a symbolic link. A loss
that becomes NaN or infinite stops the run in that batch with an error
(`StopOnNonFiniteLoss`), before the epoch's checkpoints and backup are
written, so they stay those of the last complete epoch.
Everything that can be checked (recipe, data, model) is checked before the
run directory is created.
"""

import dataclasses
import datetime
import gc
import os
import re
import shutil
import sys
import time
from pathlib import Path

import keras
import tensorflow as tf

from kseg.data import data_error_message
from kseg.files import (
    RunLock,
    atomic_path,
    refuse_link,
    remove_temporaries,
    temporary_path,
    write_json,
    write_text,
)
from kseg.models import load_model
from kseg.tasks import INSTANCE, SEMANTIC, is_instance_model
from kseg.training.callbacks import (
    Checkpoint,
    EpochSummary,
    NonFiniteLossError,
    RunBackup,
    StopOnNonFiniteLoss,
)
from kseg.training.instance import InstanceTask
from kseg.training.recipe import RecipeError, load_recipe, save_recipe
from kseg.training.semantic import SemanticTask
from kseg.training.strategy import (
    build_strategy,
    is_chief,
    multi_worker_fit,
    set_synchronized_batch_norm,
    worker_index,
)

RECIPE_FILE = "recipe.yaml"
MODEL_FILE = "model.keras"
RESULT_FILE = "result.json"
EVALUATION_FILE = "evaluation.txt"
BACKUP_DIR = "backup"
EPOCHS_FILE = "epochs.jsonl"
CHECKPOINTS_DIR = "checkpoints"
LOGS_DIR = "logs"


def task_for(recipe, data_dir=None):
    """The `Task` of a recipe (`recipe.task`): `InstanceTask` or
    `SemanticTask`."""
    if recipe.task == INSTANCE:
        return InstanceTask(recipe, data_dir)
    return SemanticTask(recipe, data_dir)


@dataclasses.dataclass
class TrainResult:
    """What `train` leaves behind."""

    run_dir: Path
    model_path: Path
    evaluation: object
    steps: int
    history: dict


# === Runs ===


def new_run_dir(runs_dir, name):
    """Claims a fresh `runs_dir/name/<YYYYmmdd-HHMMSS>[-k]/` directory.

    `mkdir` without `exist_ok` is the claim, so two runs started in the same
    second get different directories and no run ever reuses another's.
    """
    parent = Path(runs_dir) / name
    parent.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    for index in range(1, 1000):
        candidate = parent / (stamp if index == 1 else f"{stamp}-{index}")
        try:
            candidate.mkdir()
        except FileExistsError:
            continue
        _point_latest(parent, candidate.name)
        return candidate
    raise RuntimeError(f"could not claim a run directory under {parent}")


LATEST = "latest"


def _point_latest(parent, name):
    """Points the link `parent/latest` at the run `name` (relative, so the
    runs folder can move): a new link under a temporary name renamed over
    the old one, so `latest` always names a whole run directory. Where links
    cannot be made, or `latest` is not kseg's link, nothing changes."""
    link = parent / LATEST
    if link.exists() and not link.is_symlink():
        _print(f"kseg: {link} is not a link kseg made; it is left as it is")
        return
    tmp = temporary_path(link)
    try:
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(name, target_is_directory=True)
        os.replace(tmp, link)
    except OSError:
        tmp.unlink(missing_ok=True)


def run_directory(path):
    """`path` as a run directory argument names it: a `latest` link (or any
    link) is followed to the run it points at, so messages and locks name
    the run itself; a missing folder raises `FileNotFoundError` that says so
    and lists the runs beside it."""
    path = Path(path)
    if path.is_symlink():
        path = Path(os.path.normpath(path.parent / os.readlink(path)))
    if not path.exists():
        raise FileNotFoundError(missing_run_message(path))
    return path


def missing_run_message(path):
    """Says that the run folder (or file) `path` does not exist, listing the
    runs of its nearest existing folder above, newest first."""
    path = Path(path)
    message = f"{path} does not exist"
    parent = path.parent
    while parent != parent.parent and not parent.is_dir():
        parent = parent.parent
    if parent.is_dir():
        runs = sorted(
            (
                child.name
                for child in parent.iterdir()
                if not child.is_symlink() and (child / RECIPE_FILE).is_file()
            ),
            reverse=True,
        )
        if runs:
            shown = ", ".join(runs[:5]) + (", ..." if len(runs) > 5 else "")
            message += f"; the runs in {parent}: {shown}"
            if (parent / LATEST).is_symlink():
                message += f" ({parent / LATEST} names the newest)"
    return message


def _claim_run_dir(recipe, runs_dir, run_dir):
    """The directory this process writes, locked: a new run, claimed by
    writing the recipe file exclusively (never overwriting an earlier
    run's). An explicit `run_dir` must be missing or empty."""
    if run_dir is None:
        path = new_run_dir(runs_dir, recipe.name)
    else:
        path = Path(run_dir)
        # Other workers of a cluster may have made their worker-<i> folders.
        foreign = [
            child
            for child in (path.iterdir() if path.is_dir() else ())
            if not re.fullmatch(r"worker-\d+", child.name)
        ]
        if foreign and not worker_index():
            if (path / RECIPE_FILE).exists():
                raise FileExistsError(
                    f"{path} already holds a run ({RECIPE_FILE} exists); runs are "
                    f"never overwritten: continue it with --resume {path}, or "
                    "start a new one"
                )
            shown = ", ".join(sorted(child.name for child in foreign)[:5])
            raise FileExistsError(
                f"--run-dir {path} is a folder that kseg did not create and is "
                f"not empty (it holds {shown}); kseg writes model.keras, "
                "result.json and more there, so give a new or empty folder"
            )
        path.mkdir(parents=True, exist_ok=True)
    index = worker_index()
    if index:
        # Non-chief workers of a cluster keep their own files apart.
        path = path / f"worker-{index}"
        path.mkdir(parents=True, exist_ok=True)
    lock = RunLock(path).acquire()
    try:
        save_recipe(recipe, path / RECIPE_FILE)
    except FileExistsError:
        lock.release()
        raise FileExistsError(
            f"{path} already holds a run ({RECIPE_FILE} exists); runs are never "
            f"overwritten: continue it with --resume {path}, or start a new one"
        ) from None
    return path, lock


def _resumed_recipe_path(resume):
    """This worker's directory of the run to continue and its recipe file."""
    path = run_directory(resume)
    index = worker_index()
    if index:
        path = path / f"worker-{index}"
    if not (path / RECIPE_FILE).is_file():
        raise FileNotFoundError(
            f"cannot resume {path}: it holds no {RECIPE_FILE}, so it is not a "
            "kseg run directory"
        )
    return path, path / RECIPE_FILE


def _holds_weights(path):
    """Whether the run `path` restores its weights: a backup or `model.keras`."""
    return (path / MODEL_FILE).exists() or RunBackup(path / BACKUP_DIR).exists()


def _resumed_run_dir(resume):
    """The run directory to continue, checked and locked."""
    path, _ = _resumed_recipe_path(resume)
    lock = RunLock(path).acquire()
    if (path / RESULT_FILE).exists():
        lock.release()
        raise FileExistsError(
            f"cannot resume {path}: the run already finished ({RESULT_FILE} exists)"
        )
    try:
        # What a run writes in place is never reached through a link (a
        # run directory from elsewhere may hold one to a user's file).
        for name in (EPOCHS_FILE, CHECKPOINTS_DIR, BACKUP_DIR, LOGS_DIR):
            refuse_link(path / name)
    except ValueError:
        lock.release()
        raise
    # The run is ours now: temporary files in it are a killed process's.
    remove_temporaries(path)
    return path, lock


def _print(*args):
    print(*args, flush=True)


def train(
    recipe,
    data_dir=None,
    runs_dir="runs",
    run_dir=None,
    resume=None,
    callbacks=(),
    verbose="auto",
):
    """Trains a recipe with `model.fit`, evaluates it and saves the model.

    Args:
        recipe: `Recipe`, or a recipe name or path. Ignored with `resume`,
            which uses the run's saved recipe.
        data_dir: optional dataset directory overriding `data.root`.
        runs_dir: str. Parent of the new run directory. Defaults to `"runs"`.
        run_dir: optional explicit directory of a new run (every worker of a
            multi-worker run must get the same one); it must be missing or
            empty.
        resume: optional run directory of an interrupted run to continue
            from its last complete backup (the end of its last completed
            epoch); a run whose training ended but whose evaluation did not
            is only evaluated.
        callbacks: extra Keras callbacks.
        verbose: `model.fit` verbosity. Defaults to `"auto"`.

    Returns:
        `TrainResult`.
    """
    clock = (time.perf_counter(), time.process_time())
    if resume is not None:
        recipe = load_recipe(_resumed_recipe_path(resume)[1])
    elif not hasattr(recipe, "train"):
        recipe = load_recipe(recipe)
    # A multi-worker strategy must exist before any other TensorFlow op.
    strategy = build_strategy(recipe.train.strategy)
    policy = keras.config.dtype_policy()
    keras.config.set_dtype_policy(recipe.train.dtype_policy)
    lock = None
    try:
        task = task_for(recipe, data_dir)
        if resume is not None:
            # A resumed run's own weights win: model.init_from is not read.
            task.initialise = not _holds_weights(_resumed_recipe_path(resume)[0])
        # Everything that can fail on bad data or settings fails here, before
        # a run directory exists.
        description = task.prepare()
        setup = _build(recipe, task, strategy)
        if resume is None:
            path, lock = _claim_run_dir(recipe, runs_dir, run_dir)
        else:
            path, lock = _resumed_run_dir(resume)
        return _run(
            recipe, task, strategy, setup, path, description, callbacks, verbose, clock
        )
    finally:
        if lock is not None:
            lock.release()
        keras.config.set_dtype_policy(policy)


@dataclasses.dataclass
class _Setup:
    model: keras.Model
    steps: int
    total_steps: int


def _build(recipe, task, strategy):
    """The compiled model and the step counts, under the strategy's scope."""
    train_config = recipe.train
    keras.utils.set_random_seed(train_config.seed)
    replicas = strategy.num_replicas_in_sync
    if train_config.batch_size % replicas:
        raise RecipeError(
            f"train.batch_size: the global batch {train_config.batch_size} does "
            f"not split evenly over {replicas} replicas"
        )
    steps = train_config.steps_per_epoch or task.num_train // train_config.batch_size
    if steps < 1:
        raise RecipeError(
            f"train.batch_size: {task.num_train} training images make no batch "
            f"of {train_config.batch_size}; lower it or set train.steps_per_epoch"
        )
    total_steps = steps * train_config.epochs
    with strategy.scope():
        model = task.build_model()
        if train_config.synchronized_bn:
            set_synchronized_batch_norm(model, True)
        task.compile(model, total_steps)
    return _Setup(model, steps, total_steps)


def _run(recipe, task, strategy, setup, path, description, extra, verbose, clock):
    """`train` once the run directory is claimed and locked."""
    started, cpu_started = clock
    chief = is_chief()
    train_config = recipe.train
    model, steps = setup.model, setup.steps
    replicas = strategy.num_replicas_in_sync
    _print(
        f"run {path}\n"
        f"{recipe.name}: {recipe.model.name} on {recipe.backbone.name}, "
        f"{description}; {train_config.epochs} epochs × {steps} steps, global "
        f"batch {train_config.batch_size} = {replicas} replica(s) × "
        f"{train_config.batch_size // replicas}"
    )

    model_path = path / MODEL_FILE
    history = {}
    if model_path.exists():
        # The previous process finished training and saved the model, then
        # stopped before the evaluation was written.
        _print(f"{model_path} is complete: evaluating it")
        model = load_model(model_path)
        steps_done = setup.total_steps
    else:
        best = Checkpoint(
            path / CHECKPOINTS_DIR / "best.keras", monitor=task.monitor, mode="max"
        )
        backup = RunBackup(path / BACKUP_DIR, best)
        with strategy.scope():
            initial_epoch = _restore(model, backup, best, path)
        callbacks = [
            # Stops in the batch whose loss is NaN or infinite, before the
            # epoch's checkpoints and backup could save diverged weights.
            StopOnNonFiniteLoss(),
            # A task's validation adds its metrics to the epoch's logs
            # before the checkpoints and summaries read them.
            *task.callbacks(path, chief),
            Checkpoint(path / CHECKPOINTS_DIR / "last.keras"),
            best,
            keras.callbacks.TensorBoard(
                str(path / LOGS_DIR), write_graph=False, profile_batch=0
            ),
            EpochSummary(path / EPOCHS_FILE),
            *extra,
            # Last: an epoch's backup marks it complete, so everything else
            # the epoch writes (its epochs.jsonl line, the best value) is in
            # before; a kill in between trains the epoch again.
            backup,
        ]
        if initial_epoch < train_config.epochs:
            try:
                history = _fit(
                    model, task, strategy, steps, initial_epoch, callbacks, verbose
                )
            except NonFiniteLossError as error:
                kept = (
                    f"its {CHECKPOINTS_DIR}/ and {BACKUP_DIR}/ hold epoch "
                    f"{error.epoch - 1}, the last complete one"
                    if error.epoch > 1
                    else "no epoch completed, so nothing was saved"
                )
                raise NonFiniteLossError(
                    f"{path}: {error}; {kept}, and there is no {MODEL_FILE}. "
                    "Lower optimizer.learning_rate (or set "
                    "optimizer.global_clipnorm) and start a new run",
                    error.epoch,
                ) from None
        steps_done = int(model.optimizer.iterations.numpy())
        # The saved model must load on any backend; synchronized BN is TF-only.
        set_synchronized_batch_norm(model, False)
        with atomic_path(model_path) as tmp:
            model.save(tmp)
    train_seconds = time.perf_counter() - started

    _print("evaluating on", recipe.data.val_split)
    evaluation = task.evaluate(model, progress=verbose != 0)
    table = evaluation.table()
    write_text(path / EVALUATION_FILE, table + "\n")
    seconds = time.perf_counter() - started
    result = {
        "recipe": recipe.name,
        "task": recipe.task,
        **evaluation.as_json(),
        "steps": steps_done,
        "train_seconds": round(train_seconds, 2),
        "wall_seconds": round(seconds, 2),
        "cpu_seconds": round(time.process_time() - cpu_started, 2),
        "chief": chief,
    }
    # Written last: its presence marks the run finished.
    write_json(path / RESULT_FILE, result)
    shutil.rmtree(path / BACKUP_DIR, ignore_errors=True)
    _print(
        f"\n{table}\n\n{evaluation.summary()} after {steps_done} steps in "
        f"{seconds:.0f} s (wall); model saved to {model_path}"
    )
    return TrainResult(
        run_dir=path,
        model_path=model_path,
        evaluation=evaluation,
        steps=steps_done,
        history=history,
    )


def _restore(model, backup, best, path):
    """Restores the newest complete backup into `model` (weights, optimizer
    state, best validation value); returns the epoch to start from."""
    state = backup.restore(model)
    if state is None:
        if backup.exists():
            raise ValueError(
                f"cannot resume {path}: no backup in {backup.directory} loads "
                "(each is damaged or incomplete); start a new run instead of "
                "training this one again from scratch"
            )
        # Killed in the first epoch (perhaps after its summary line: the
        # backup is an epoch's last write, and its folder exists from the
        # start of training). More recorded epochs, or one without the
        # folder, mean the backups were deleted: starting again would
        # overwrite the run's checkpoints and epochs file.
        completed = EpochSummary.completed_epochs(path / EPOCHS_FILE)
        if completed > 1 or (completed and not backup.directory.is_dir()):
            raise ValueError(
                f"cannot resume {path}: {EPOCHS_FILE} records {completed} "
                f"completed epoch(s), but {backup.directory} holds no backup of "
                "them (deleted?); start a new run instead of training this one "
                "again from scratch"
            )
        EpochSummary.truncate(path / EPOCHS_FILE, 0)
        return 0
    for message in state.messages:
        _print(message)
    best.best = state.best
    EpochSummary.truncate(path / EPOCHS_FILE, state.epoch)
    _print(f"resuming after epoch {state.epoch} (step {state.step}) from {state.path}")
    return state.epoch


def _fit(model, task, strategy, steps, initial_epoch, callbacks, verbose):
    """`model.fit` of the task's pipelines; a bad sample met on the way is
    reported as a `ValueError` naming its file."""
    train_config = task.recipe.train
    try:
        with multi_worker_fit(strategy):
            history = model.fit(
                task.train_dataset(model),
                epochs=train_config.epochs,
                initial_epoch=initial_epoch,
                steps_per_epoch=steps,
                validation_data=task.val_dataset(model),
                validation_freq=train_config.validation_freq,
                callbacks=callbacks,
                # The pipeline shuffles; Keras cannot shuffle a tf.data.Dataset.
                shuffle=False,
                verbose=verbose,
            )
    except BaseException as error:
        message = None
        if isinstance(error, tf.errors.OpError):
            message = data_error_message(error)
        _release_iterators(error)
        if message is None:
            raise
    else:
        return history.history
    # Raised here, the error holds neither the failed fit's frames nor the
    # OpError (its context).
    raise ValueError(message)


def _release_iterators(error):
    """Destroys the tf.data iterators of a `model.fit` that `error` stopped,
    now rather than at the interpreter's shutdown.

    Keras' `fit` frame holds its epoch iterator (and the distributed,
    multi-device and per-device iterators under it), and the epoch
    iterator and its suspended epoch generator hold each other. That frame
    is not in `error`'s traceback (Keras filters its own frames out) but
    stays reachable from the frames that are, through `f_back`; once the
    error is gone, only the garbage collector frees them. Left to the
    collection at `Py_FinalizeEx`, the multi-device iterator's destructor
    waits for its in-flight `py_function` decodes, which cannot run any
    more: a program that caught the error hung at exit (about half of the
    runs), or aborted. Clearing the frames below `_fit` (their locals: a
    traceback still shows every line) and collecting destroys the
    iterators while the decodes can still finish.
    """
    stop = sys._getframe(1)  # `_fit`'s own frame, still running
    pending, seen = [error], set()
    tb = frame = caller = None
    while pending:
        error = pending.pop()
        if error is None or id(error) in seen:
            continue
        seen.add(id(error))
        pending += [error.__cause__, error.__context__]
        tb = error.__traceback__
        while tb is not None:
            frame = tb.tb_frame
            while frame is not None and frame is not stop and id(frame) not in seen:
                seen.add(id(frame))
                caller = frame.f_back
                try:
                    frame.clear()
                except RuntimeError:  # running: `_fit` or above
                    break
                frame = caller
            tb = tb.tb_next
    del error, pending, tb, frame, caller
    gc.collect()


def evaluate(model, recipe, data_dir=None, split=None, progress=True):
    """Evaluates a model (object or `.keras` path) on a recipe's validation
    split (or `split`), with the recipe's `eval` settings.

    Returns:
        The task's evaluation result (`table()`, `summary()`, `as_json()`).

    Raises:
        ValueError: an instance model with a semantic recipe, or the reverse.
    """
    if not hasattr(recipe, "train"):
        recipe = load_recipe(recipe)
    name = f"model {model.name!r}" if isinstance(model, keras.Model) else str(model)
    if not isinstance(model, keras.Model):
        model = load_model(model)
    model_task = INSTANCE if is_instance_model(model) else SEMANTIC
    if model_task != recipe.task:
        a = {INSTANCE: "an", SEMANTIC: "a"}
        raise ValueError(
            f"{name} is {a[model_task]} {model_task} segmentation model, but "
            f"recipe {recipe.name!r} is {a[recipe.task]} {recipe.task} one (task: "
            f"{recipe.task}); evaluate it with {a[model_task]} {model_task} "
            "recipe, such as the recipe.yaml of the run that trained it"
        )
    return task_for(recipe, data_dir).evaluate(model, split=split, progress=progress)
