"""The user's path through the `kseg` command, as README.md walks it: every
command runs in a subprocess (`python -m kseg.cli ...`), as a user runs it,
on tiny settings so the whole file runs in minutes on a 2-core CPU.

Each README command, and what runs it:

    pip install -e ".[test]" && ruff check . && pytest -q
        .ci/run, stage 1 (needs the network: not a test)
    sudo apt-get install libtcmalloc-minimal4
        .ci/run installs it; tests/test_allocator.py checks that every `kseg`
        command then runs with it loaded
    kseg train
        test_user_path: `trained` (KSEG_RECIPES holds a tiny quickstart.yaml, so
        the bare command trains it into runs/quickstart/<timestamp>/)
    kseg train --recipe panet_quickstart
        test_instance_path (tiny --set overrides)
    pytest -q -m slow
        .ci/run, stage 2 (this file is part of it)
    kseg train --recipe pan_r101-os16_4xb4-voc-512 --data /data/VOCdevkit/VOC2012
        test_voc_commands (three real VOC photos of Debian's labelme-examples
        in a VOC2012 layout; tiny --set overrides)
    kseg train --set train.epochs=2 --set model.kwargs.filters=32
        test_killed_run_always_completes (the runs it kills and resumes)
    kseg train --resume runs/quickstart/000
        test_killed_run_always_completes (20 kills, each followed by --resume),
        test_second_resume_of_a_run_is_refused
    kseg evaluate runs/quickstart/000/model.keras --recipe quickstart
        test_evaluate_reproduces_the_run_result (and `kseg evaluate RUN`)
    kseg data inspect --dataset voc --data /data/VOCdevkit/VOC2012
        test_voc_commands (and `--dataset synthetic` in test_command_line_basics)
    kseg data inspect --dataset coco --data /data/coco --split val2017
        test_instance_path (labelme-examples' COCO export in the COCO layout)
    kseg data convert --dataset voc --data /data/VOCdevkit/VOC2012 --out ...
        test_voc_commands
    TF_CONFIG='{...}' kseg train --recipe ... --set train.strategy=multi_worker
        tests/training/test_trainer.py::test_multi_worker_training_on_two_local_workers
    python benchmarks/models.py
        not run by a test (minutes of ResNet-50 forwards at 512x512)
    kseg predict runs/quickstart/000/model.keras photos/*.jpg --out masks/ \
        --tta --overlay
        test_predict_keras_models (also checkpoints/best.keras, last.keras and
        the run directory)
    kseg export runs/quickstart/000/model.keras --name quickstart --tflite int8
        test_user_path: `used` (int8 and float32), test_predict_exports
    kseg predict saved_models/quickstart photos/*.jpg --out masks-served/
        test_predict_exports (and the .tflite file),
        test_predict_reports_bad_images_and_runs_the_others
    kseg predict RUN photos/*.jpg --out found/ (a PANet run), then
    kseg export RUN --name NAME (PANet)
        test_instance_path (and kseg predict on that export)
    docker run ... tensorflow/serving; curl ... :predict (REST, both signatures)
        needs Docker and the tensorflow/serving image (not offline); the
        SavedModel is loaded in a process where kseg cannot be imported and both
        signatures run, the REST example's instances included:
        test_saved_model_runs_without_kseg, test_saved_model_rejects_bad_requests
    the gRPC snippet (tensorflow-serving-api)
        needs tensorflow-serving-api and a server (not offline); its request, a
        uint8 (1, 64, 64, 3) batch to serving_default, runs in the kseg-free
        process above
    saved_model_cli show --dir ... --all
        test_saved_model_cli_shows_both_signatures
    every other ```python block (the `kseg.layers` snippet)
        test_readme_python_snippets (read from README.md)
    kseg recipes (and `kseg --help`)
        test_command_line_basics
    .ci/run
        CI itself
"""

import concurrent.futures
import functools
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
LABELME_VOC = Path(
    "/usr/share/doc/labelme-examples/examples/semantic_segmentation/data_dataset_voc"
)

# The quickstart recipe shrunk to seconds: a 4-channel ResNet, 32x32 scenes.
TINY = [
    "model.kwargs.filters=8",
    "backbone.kwargs.widths=[4, 4, 4, 4]",
    "backbone.kwargs.stem_width=4",
    "data.image_size=32",
    "data.crop_size=[32, 32]",
    "data.num_train_images=16",
    "data.num_val_images=4",
    "train.batch_size=4",
    "train.log_images=0",
    "eval.batch_size=4",
]
NUM_CLASSES = 6  # the synthetic scenes' classes
EPOCHS, STEPS = 2, 3
PHOTO_SIZE = (40, 56)  # not the training size, not square
MAX_PIXELS = 5000  # the export's request cap: two photos fit, 80x80 does not


def _env(**extra):
    env = {
        **os.environ,
        "TF_CPP_MIN_LOG_LEVEL": "3",
        "KERAS_BACKEND": "tensorflow",
        "PYTHONPATH": str(REPO),
    }
    env.pop("TF_CONFIG", None)
    env.update(extra)
    return env


def _show(result):
    return (
        f"exit status {result.returncode}\n--- stdout (end)\n{result.stdout[-3000:]}"
        f"\n--- stderr (end)\n{result.stderr[-3000:]}"
    )


def kseg(*args, cwd, env=None, expect=0, timeout=600):
    """Runs `kseg ARGS` in a subprocess; checks its exit status (unless
    `expect` is None) and returns the `CompletedProcess`."""
    command = [sys.executable, "-m", "kseg.cli", *map(str, args)]
    result = subprocess.run(
        command,
        cwd=cwd,
        env=env or _env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if expect is not None:
        assert result.returncode == expect, (
            f"kseg {' '.join(map(str, args))}: " + _show(result)
        )
    return result


def tiny_recipe_dir(folder, *overrides):
    """A recipe folder for KSEG_RECIPES holding a tiny quickstart.yaml."""
    from kseg.training.recipe import apply_overrides, dump_recipe, load_recipe

    recipe = apply_overrides(
        load_recipe(REPO / "recipes" / "quickstart.yaml"), [*TINY, *overrides]
    )
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "quickstart.yaml").write_text(dump_recipe(recipe))
    return folder


def _scene(height, width, seed):
    """A photo-like uint8 RGB image: a gradient with a disc and a square."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[:height, :width]
    image = np.stack(
        [255 * x / width, 255 * y / height, np.full((height, width), 90.0)], -1
    )
    cy, cx, r = height * 0.4, width * 0.35, min(height, width) * 0.25
    image[(y - cy) ** 2 + (x - cx) ** 2 < r**2] = rng.integers(0, 256, 3)
    image[height // 2 :, width * 2 // 3 :] = rng.integers(0, 256, 3)
    image += rng.normal(0, 6, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def _write_image(path, image):
    import tensorflow as tf

    encode = tf.io.encode_png if path.suffix == ".png" else tf.io.encode_jpeg
    path.write_bytes(encode(image).numpy())


def _read_rgb(path):
    import tensorflow as tf

    return tf.io.decode_image(path.read_bytes(), expand_animations=False).numpy()


def _check_masks(out, photos, overlay=False):
    """`kseg predict`'s outputs for `photos`: index PNGs of the photo's size
    with valid classes (and RGB overlays); returns the class maps."""
    from kseg.data import read_label

    maps = []
    for photo in photos:
        mask = out / f"{photo.stem}.png"
        assert mask.is_file(), f"{mask} missing; {out} holds {os.listdir(out)}"
        label = read_label(mask)
        assert label.shape == PHOTO_SIZE
        assert label.max() < NUM_CLASSES
        maps.append(label)
        blended = out / f"{photo.stem}_overlay.png"
        if overlay:
            rgb = _read_rgb(blended)
            # The overlay, with the legend of its classes to its right.
            assert rgb.shape[0] >= PHOTO_SIZE[0] and rgb.shape[1] > PHOTO_SIZE[1]
            assert rgb.shape[2] == 3 and rgb.dtype == np.uint8
        else:
            assert not blended.exists()
    return np.stack(maps)


# === The path: train, evaluate, predict, export ===


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """The user's working folder: a tiny quickstart recipe, two photos."""
    home = tmp_path_factory.mktemp("user")
    tiny_recipe_dir(
        home / "recipes",
        f"train.epochs={EPOCHS}",
        f"train.steps_per_epoch={STEPS}",
    )
    photos = home / "photos"
    photos.mkdir()
    for index in range(2):
        _write_image(photos / f"photo{index}.jpg", _scene(*PHOTO_SIZE, seed=index))
    return home


def _home_env(home):
    return _env(KSEG_RECIPES=str(home / "recipes"))


def _photos(home):
    return sorted((home / "photos").glob("*.jpg"))


def run_parallel(jobs, limit=2):
    """Runs the callables `jobs` (`{name: callable}`, each waiting on a
    subprocess) `limit` at a time; returns `{name: result}`."""
    with concurrent.futures.ThreadPoolExecutor(limit) as pool:
        futures = {name: pool.submit(job) for name, job in jobs.items()}
        return {name: future.result() for name, future in futures.items()}


@pytest.fixture(scope="module")
def trained(home):
    """`kseg train` with no argument, as the README's second command."""
    started = time.perf_counter()
    result = kseg("train", cwd=home, env=_home_env(home))
    seconds = time.perf_counter() - started
    match = re.search(
        r"mean IoU ([\d.]+)% after (\d+) steps in \d+ s \(wall\); model saved to "
        r"(\S+/model\.keras)",
        result.stdout,
    )
    assert match, "no closing line: " + _show(result)
    model = home / match.group(3)
    return {
        "result": result,
        "seconds": seconds,
        "mean_iou": float(match.group(1)),
        "steps": int(match.group(2)),
        "run": model.parent,
    }


# The model files of a run `kseg predict` is given, and its options.
KERAS_MODELS = {
    "model": ("model.keras", ["--tta", "--overlay"]),  # the README's command
    "best": ("checkpoints/best.keras", ["--overlay"]),
    "last": ("checkpoints/last.keras", []),
    "run": (".", []),  # the run directory
}


@pytest.fixture(scope="module")
def used(home, trained):
    """What a user does with a finished run, two commands at a time: export
    it (SavedModel, TFLite float32 and int8 calibrated on the run's training
    images), evaluate it, predict with each of its model files."""
    run, photos, env = trained["run"], _photos(home), _home_env(home)
    jobs = {
        "export": functools.partial(
            kseg,
            "export",
            run / "model.keras",
            "--name",
            "quickstart",
            "--tflite",
            "float32",
            "int8",
            "--max-pixels",
            MAX_PIXELS,
            cwd=home,
            expect=None,
        ),
        # The run directory: its model.keras and recipe.yaml.
        "evaluate run": functools.partial(
            kseg, "evaluate", run, cwd=home, env=env, expect=None
        ),
        # The README's form.
        "evaluate model": functools.partial(
            kseg,
            "evaluate",
            run / "model.keras",
            "--recipe",
            "quickstart",
            cwd=home,
            env=env,
            expect=None,
        ),
    }
    for name, (model, options) in KERAS_MODELS.items():
        jobs[f"predict {name}"] = functools.partial(
            kseg,
            "predict",
            run / model,
            *photos,
            "--out",
            home / f"masks-{name}",
            *options,
            cwd=home,
            expect=None,
        )
    return run_parallel(jobs)


def test_train_writes_a_finished_run(home, trained):
    run = trained["run"]
    # A new run directory under runs/quickstart/ (README, "Two commands").
    assert run.parent == home / "runs" / "quickstart", run
    assert trained["steps"] == EPOCHS * STEPS
    for name in ("recipe.yaml", "model.keras", "evaluation.txt", "result.json"):
        assert (run / name).is_file(), f"{run} lacks {name}: {os.listdir(run)}"
    for name in ("logs", "checkpoints"):
        assert (run / name).is_dir()
    assert (run / "checkpoints" / "best.keras").is_file()
    assert (run / "checkpoints" / "last.keras").is_file()
    assert not (run / "backup").exists(), "a finished run keeps no backup"
    result = json.loads((run / "result.json").read_text())
    assert result["steps"] == EPOCHS * STEPS
    assert round(100 * result["mean_iou"], 2) == trained["mean_iou"]
    epochs = [json.loads(line) for line in (run / "epochs.jsonl").open()]
    assert [e["epoch"] for e in epochs] == list(range(1, EPOCHS + 1))
    assert [e["step"] for e in epochs] == [STEPS * (i + 1) for i in range(EPOCHS)]
    leftovers = list(run.rglob(".tmp-*"))
    assert not leftovers, f"temporary files left behind: {leftovers}"
    # The per-class table is printed and saved.
    table = (run / "evaluation.txt").read_text()
    assert "disc" in table and "pixel accuracy" in table
    assert "disc" in trained["result"].stdout


def test_evaluate_reproduces_the_run_result(trained, used):
    run = trained["run"]
    expected = json.loads((run / "result.json").read_text())["mean_iou"]
    for name in ("evaluate run", "evaluate model"):
        result = used[name]
        assert result.returncode == 0, f"{name}: " + _show(result)
        match = re.search(r"mean IoU ([\d.]+)%", result.stdout)
        assert match, _show(result)
        assert float(match.group(1)) == pytest.approx(100 * expected, abs=0.011)
        assert "pixel accuracy" in result.stdout


def test_predict_keras_models(home, used):
    photos = _photos(home)
    masks = {}
    for name, (_, options) in KERAS_MODELS.items():
        result = used[f"predict {name}"]
        assert result.returncode == 0, f"predict {name}: " + _show(result)
        for photo in photos:
            assert str(photo) in result.stdout, _show(result)
        masks[name] = _check_masks(
            home / f"masks-{name}", photos, overlay="--overlay" in options
        )
    # The last checkpoint is the final model: the same classes, to the pixel.
    np.testing.assert_array_equal(masks["run"], masks["last"])


# A fresh process in which `import kseg` fails: the SavedModel must load
# and answer with TensorFlow alone (TF Serving has no kseg).
_WITHOUT_KSEG = """
import json, sys

sys.modules["kseg"] = None  # every `import kseg...` now raises ImportError
try:
    import kseg  # noqa: F401
except ImportError:
    pass
else:
    raise SystemExit("kseg is importable")

import numpy as np
import tensorflow as tf

path, out, photos = sys.argv[1], sys.argv[2], sys.argv[3:]
loaded = tf.saved_model.load(path)
assert "kseg" not in {name.split(".")[0] for name in sys.modules if sys.modules[name]}
default = loaded.signatures["serving_default"]
from_bytes = loaded.signatures["serving_bytes"]


def describe(outputs):
    return {k: [list(v.shape), v.dtype.name] for k, v in outputs.items()}


files = [open(p, "rb").read() for p in photos]
images = np.stack(
    [tf.io.decode_image(f, channels=3, expand_animations=False).numpy() for f in files]
)
report = {"signatures": sorted(loaded.signatures)}
outputs = default(images=tf.constant(images))
report["default"] = describe(outputs)
png = [tf.io.encode_png(image).numpy() for image in images]
png_outputs = from_bytes(image_bytes=tf.constant(png))
report["bytes"] = describe(png_outputs)
jpeg_outputs = from_bytes(image_bytes=tf.constant(files))
# The README's REST instances, and the gRPC example's request.
rest = [[[[0, 0, 0], [255, 255, 255]], [[10, 20, 30], [40, 50, 60]]]]
report["rest"] = describe(default(images=tf.constant(np.array(rest, np.uint8))))
report["grpc"] = describe(default(images=tf.zeros((1, 64, 64, 3), tf.uint8)))
np.savez(
    out + ".npz",
    images=images,
    class_map=outputs["class_map"].numpy(),
    probabilities=outputs["probabilities"].numpy(),
    png_class_map=png_outputs["class_map"].numpy(),
    jpeg_class_map=jpeg_outputs["class_map"].numpy(),
)


def error(call):
    try:
        outputs = call()
    except tf.errors.InvalidArgumentError as e:
        return {"type": type(e).__name__, "message": e.message}
    except Exception as e:
        return {"type": type(e).__name__, "message": str(e)}
    return {"type": None, "message": "no error: " + json.dumps(describe(outputs))}


big = tf.zeros((1, 80, 80, 3), tf.uint8)
report["errors"] = {
    "oversized": error(lambda: default(images=big)),
    "oversized_bytes": error(
        lambda: from_bytes(image_bytes=tf.stack([tf.io.encode_png(big[0])]))
    ),
    "rank3": error(lambda: default(images=tf.constant(images[0]))),
    "empty_bytes": error(lambda: from_bytes(image_bytes=tf.constant([], tf.string))),
}
with open(out + ".json", "w") as file:
    json.dump(report, file)
"""


@pytest.fixture(scope="module")
def exported(home, used):
    """The export's files, then two at a time: `kseg predict` on the TF
    Serving model folder (with an image over the export's pixel cap and a
    file that is no image among the photos) and on the float32 .tflite file,
    the SavedModel in a process without kseg, and `saved_model_cli`."""
    export = used["export"]
    model_dir = home / "saved_models" / "quickstart"
    version = model_dir / "1"
    tflite = {
        q: model_dir / "tflite" / f"quickstart_v1_{q}_32x32.tflite"
        for q in ("float32", "int8")
    }
    for path in (version / "saved_model.pb", *tflite.values()):
        assert path.is_file(), f"{path} missing: " + _show(export)

    photos = _photos(home)
    big = home / "big.png"
    _write_image(big, _scene(80, 80, seed=7))
    notes = home / "notes.jpg"
    notes.write_text("not an image\n")
    script = home / "without_kseg.py"
    script.write_text(_WITHOUT_KSEG)
    # No kseg on the path, and sys.modules blocks the installed one.
    bare = _env()
    bare.pop("PYTHONPATH")

    def command(*args):
        return functools.partial(
            subprocess.run,
            list(map(str, args)),
            cwd=home,
            env=bare,
            capture_output=True,
            text=True,
            timeout=600,
        )

    jobs = {
        "predict saved model": functools.partial(
            kseg,
            "predict",
            model_dir,
            *photos,
            big,
            notes,
            "--out",
            home / "masks-saved-model",
            cwd=home,
            expect=None,
        ),
        "predict tflite": functools.partial(
            kseg,
            "predict",
            tflite["float32"],
            *photos,
            "--out",
            home / "masks-tflite",
            cwd=home,
            expect=None,
        ),
        "without kseg": command(
            sys.executable, script, version, home / "without-kseg", *photos
        ),
    }
    saved_model_cli = shutil.which("saved_model_cli")
    if saved_model_cli is not None:
        jobs["saved_model_cli"] = command(
            saved_model_cli, "show", "--dir", version, "--all"
        )
    results = run_parallel(jobs)
    return {
        **results,
        "photos": photos,
        "big": big,
        "notes": notes,
        "report": home / "without-kseg.json",
        "arrays": home / "without-kseg.npz",
    }


def test_predict_exports(home, exported):
    photos = exported["photos"]
    saved = _check_masks(home / "masks-saved-model", photos)
    # The exported graph computes the Keras model's classes.
    agree = np.mean(saved == _check_masks(home / "masks-run", photos))
    assert agree > 0.99, agree

    result = exported["predict tflite"]
    assert result.returncode == 0, _show(result)
    # By 32x32 windows (the file's fixed size): other context, same shapes.
    _check_masks(home / "masks-tflite", photos)


def test_predict_reports_bad_images_and_runs_the_others(home, exported):
    result = exported["predict saved model"]
    assert "Traceback" not in result.stderr, _show(result)
    assert result.returncode == 1, _show(result)
    lines = result.stderr.splitlines()
    # The image over the SavedModel's cap: named, with the cap.
    big = [line for line in lines if str(exported["big"]) in line]
    assert big and str(MAX_PIXELS) in big[0], _show(result)
    assert any(str(exported["notes"]) in line for line in lines), _show(result)
    assert "2 of 4 images failed" in result.stderr
    assert not (home / "masks-saved-model" / "big.png").exists()


def _without_kseg(exported):
    result = exported["without kseg"]
    assert result.returncode == 0, _show(result)
    report = json.loads(exported["report"].read_text())
    return report, dict(np.load(exported["arrays"]))


def test_saved_model_runs_without_kseg(home, exported):
    report, arrays = _without_kseg(exported)
    assert report["signatures"] == ["serving_bytes", "serving_default"]
    n, (h, w) = 2, PHOTO_SIZE
    expected = {
        "class_map": [[n, h, w], "int32"],
        "probabilities": [[n, h, w, NUM_CLASSES], "float32"],
    }
    assert report["default"] == expected
    assert report["bytes"] == expected
    assert report["rest"]["class_map"] == [[1, 2, 2], "int32"]
    assert report["grpc"]["probabilities"] == [[1, 64, 64, NUM_CLASSES], "float32"]
    probabilities = arrays["probabilities"]
    np.testing.assert_allclose(probabilities.sum(-1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(arrays["class_map"], probabilities.argmax(-1))
    # PNG bytes of the pixels, and the JPEG files themselves, give the classes
    # of the pixels.
    np.testing.assert_array_equal(arrays["png_class_map"], arrays["class_map"])
    np.testing.assert_array_equal(arrays["jpeg_class_map"], arrays["class_map"])
    # `kseg predict` on the same SavedModel writes the same classes.
    saved = _check_masks(home / "masks-saved-model", exported["photos"])
    np.testing.assert_array_equal(saved, arrays["class_map"])


def test_saved_model_rejects_bad_requests(exported):
    errors = _without_kseg(exported)[0]["errors"]
    for name in ("oversized", "oversized_bytes"):
        assert errors[name]["type"] == "InvalidArgumentError", errors[name]
        assert f"cap of {MAX_PIXELS} pixels" in errors[name]["message"], errors[name]
    rank3 = errors["rank3"]
    assert rank3["type"] is not None, rank3
    # Says what a request must be, not where the graph broke.
    assert "(N, H, W, 3)" in rank3["message"], rank3
    empty = errors["empty_bytes"]
    assert empty["type"] == "InvalidArgumentError", empty
    assert "no image" in empty["message"], empty


def test_saved_model_cli_shows_both_signatures(exported):
    if "saved_model_cli" not in exported:
        pytest.skip("saved_model_cli is not on PATH")
    result = exported["saved_model_cli"]
    assert result.returncode == 0, _show(result)
    for name in ("serving_default", "serving_bytes", "images", "image_bytes"):
        assert name in result.stdout, _show(result)
    for name in ("class_map", "probabilities"):
        assert name in result.stdout


# === The rest of the command line ===


def test_command_line_basics(tmp_path):
    started = time.perf_counter()
    result = kseg("--help", cwd=tmp_path)
    seconds = time.perf_counter() - started
    for command in ("train", "evaluate", "recipes", "data", "predict", "export"):
        assert command in result.stdout
    # No TensorFlow import for help (7-13 s when it was imported at start).
    assert seconds < 5, f"kseg --help took {seconds:.1f} s"

    inspect = [
        "data",
        "inspect",
        "--dataset",
        "synthetic",
        "--split",
        "val",
        "--set",
        "data.num_val_images=8",
        "--set",
        "data.image_size=32",
    ]
    results = run_parallel(
        {
            "recipes": functools.partial(kseg, "recipes", cwd=tmp_path),
            "recipe": functools.partial(
                kseg, "recipes", "pan_r101-os16_4xb4-voc-512", cwd=tmp_path
            ),
            "inspect": functools.partial(kseg, *inspect, cwd=tmp_path),
        }
    )
    lines = results["recipes"].stdout.splitlines()
    names = {line.split()[0] for line in lines if line.strip()}
    assert names == {path.stem for path in (REPO / "recipes").glob("*.yaml")}
    assert "pan_resnet101" in results["recipe"].stdout
    result = results["inspect"]
    assert "8 samples" in result.stdout, _show(result)
    assert "background" in result.stdout


# Python blocks that read what the README's commands write (a run, exports,
# images): test_readme_commands_run_as_written runs them after the commands.
USER_FILES = ("runs/", "saved_models/", "photos/", "scenes/")


def _readme_python_blocks(on_user_files=False):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    # The gRPC example needs tensorflow-serving-api and a running server.
    blocks = [block for block in blocks if "tensorflow_serving" not in block]
    return [
        block
        for block in blocks
        if any(path in block for path in USER_FILES) == on_user_files
    ]


def test_readme_python_snippets(tmp_path):
    blocks = _readme_python_blocks()
    assert blocks, "README.md has no runnable python block"
    for block in blocks:
        result = subprocess.run(
            [sys.executable, "-c", textwrap.dedent(block)],
            cwd=tmp_path,
            env=_env(),
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert result.returncode == 0, block + "\n" + _show(result)


# === VOC: the README's data commands and recipe on real photos ===


def _voc2012(folder):
    """Debian labelme-examples' three VOC photos in a VOC2012 layout: palette
    labels in SegmentationClass (and SegmentationClassAug for voc_aug)."""
    if not LABELME_VOC.is_dir():
        pytest.skip("Debian package labelme-examples is not installed")
    root = folder / "VOCdevkit" / "VOC2012"
    splits = root / "ImageSets" / "Segmentation"
    splits.mkdir(parents=True)
    shutil.copytree(LABELME_VOC / "JPEGImages", root / "JPEGImages")
    for labels in ("SegmentationClass", "SegmentationClassAug"):
        shutil.copytree(LABELME_VOC / "SegmentationClassPNG", root / labels)
    stems = sorted(p.stem for p in (root / "JPEGImages").glob("*.jpg"))
    assert len(stems) == 3
    (splits / "train.txt").write_text("\n".join(stems[:2]) + "\n")
    (splits / "val.txt").write_text(stems[2] + "\n")
    (splits / "train_aug.txt").write_text("\n".join(stems) + "\n")
    return root


def test_voc_commands(tmp_path):
    voc = _voc2012(tmp_path)
    out = tmp_path / "voc-train"
    data = ["--dataset", "voc", "--data", voc]
    results = run_parallel(
        {
            "inspect": functools.partial(kseg, "data", "inspect", *data, cwd=tmp_path),
            "convert": functools.partial(
                kseg, "data", "convert", *data, "--out", out, cwd=tmp_path
            ),
        }
    )
    assert "2 samples" in results["inspect"].stdout, _show(results["inspect"])
    assert "person" in results["inspect"].stdout
    shard = tmp_path / "voc-train-00000-of-00001"
    assert shard.is_file(), _show(results["convert"])

    # The README's VOC recipe (mirrored strategy, synchronized BN, voc_aug),
    # with a tiny encoder and one step.
    tiny = [
        "backbone.name=resnet",
        "backbone.kwargs.block_counts=[1, 1, 1, 1]",
        "backbone.kwargs.widths=[4, 4, 4, 4]",
        "backbone.kwargs.stem_width=4",
        "backbone.kwargs.deep_stem=true",
        "model.kwargs.filters=8",
        "data.crop_size=[64, 64]",
        "train.batch_size=2",
        "train.epochs=1",
        "train.steps_per_epoch=1",
        "train.log_images=0",
        "eval.batch_size=1",
    ]
    result = kseg(
        "train",
        "--recipe",
        "pan_r101-os16_4xb4-voc-512",
        "--data",
        voc,
        *(f"--set={o}" for o in tiny),
        cwd=tmp_path,
    )
    runs = (tmp_path / "runs" / "pan_r101-os16_4xb4-voc-512").iterdir()
    runs = [run for run in runs if not run.is_symlink()]
    assert len(runs) == 1, _show(result)
    result_json = json.loads((runs[0] / "result.json").read_text())
    assert result_json["steps"] == 1
    assert "person" in result.stdout


# === Kills: a run survives SIGKILL at any instant ===

KILL_EPOCHS, KILL_STEPS, KILLS = 6, 2, 20
KILL_SEED = 20250101
# Temporary files kseg writes before renaming them into place
# (`kseg.files.temporary_path`): `.tmp-<pid>-<name>`.
WRITES = ["weights.h5", "weights.h5", "last.keras", "best.keras", "model.keras"]


def _kill_plan(rng):
    """The 20 kill instants: a few while the process starts, a third while a
    file is written (the moment its temporary file appears, plus up to 50 ms),
    the rest at a random time after the run directory is locked."""
    plan = [{"mode": "startup", "after": rng.uniform(0, 8)} for _ in range(2)]
    for target in [*WRITES, "model.keras", ""]:  # "": any file
        plan.append({"mode": "write", "file": target, "after": rng.uniform(0, 0.05)})
    while len(plan) < KILLS:
        plan.append({"mode": "training", "after": rng.uniform(0, 12)})
    rng.shuffle(plan)
    return plan


def _epoch_numbers(path):
    numbers = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                numbers.append(json.loads(line)["epoch"])
            except (ValueError, KeyError, TypeError):
                continue  # cut off by the kill: dropped on resume
    return numbers


def _run_state(run):
    """What a killed process left, every file checked whole: the newest
    complete backup, the epochs logged, whether model.keras and result.json
    exist."""
    import h5py

    backups = []
    for path in (run / "backup").glob("epoch-*.json"):
        match = re.fullmatch(r"epoch-(\d+)\.json", path.name)
        if match:
            state = json.loads(path.read_text())  # complete: renamed into place
            with h5py.File(run / "backup" / state["weights"], "r"):
                pass
            backups.append(int(match.group(1)))
    checkpoints = [p for p in (run / "checkpoints").glob("*.keras")]
    for path in [run / "model.keras", *checkpoints]:
        # pathlib's glob also yields the hidden temporary files of killed
        # processes (`.tmp-<pid>-last.keras`): never taken for a model.
        if path.exists() and not path.name.startswith("."):
            with zipfile.ZipFile(path) as archive:
                assert archive.testzip() is None, f"{path} is damaged"
    finished = (run / "result.json").exists()
    if finished:
        json.loads((run / "result.json").read_text())
    return {
        "backup": max(backups, default=0),
        "logged": max(_epoch_numbers(run / "epochs.jsonl"), default=0),
        "model": (run / "model.keras").exists(),
        "finished": finished,
        "started": (run / "recipe.yaml").exists(),
    }


def _check_finished(run):
    """Problems of a finished run: its step count, its model, its epoch log."""
    from kseg.models import load_model

    problems = []
    result = json.loads((run / "result.json").read_text())
    if result["steps"] != KILL_EPOCHS * KILL_STEPS:
        problems.append(f"{run}: result.json steps {result['steps']}")
    if (run / "backup").exists():
        problems.append(f"{run}: finished, but backup/ is left")
    model = load_model(run / "model.keras")
    logits = model(np.zeros((1, 32, 32, 3), "float32"), training=False)["logits"]
    if tuple(logits.shape) != (1, 32, 32, NUM_CLASSES):
        problems.append(f"{run}: model.keras gives logits {logits.shape}")
    records = [json.loads(line) for line in (run / "epochs.jsonl").open()]
    epochs = [r["epoch"] for r in records]
    if epochs != list(range(1, KILL_EPOCHS + 1)):
        problems.append(
            f"{run}: epochs.jsonl holds epochs {epochs}, not 1-{KILL_EPOCHS} "
            "(a kill after an epoch's backup and before its epochs.jsonl line "
            "loses the line: the resume continues after that epoch)"
        )
    elif [r["step"] for r in records] != [KILL_STEPS * e for e in epochs]:
        problems.append(f"{run}: epochs.jsonl steps {[r['step'] for r in records]}")
    return problems


def _check_resumed(log, before):
    """Problems of a resumed process: it must continue from the newest
    complete backup (or evaluate the complete model) and never silently
    start over."""
    problems = []
    if "damaged" in log:
        problems.append(f"a backup was damaged: {log[-2000:]}")
    resumed = re.search(r"resuming after epoch (\d+) \(step (\d+)\)", log)
    epochs = [int(e) for e in re.findall(r"^Epoch (\d+)/", log, flags=re.M)]
    if before["model"]:
        if resumed or epochs:
            problems.append(f"trained again after model.keras was complete: {log}")
        return problems
    if resumed and (
        int(resumed.group(1)) != before["backup"]
        or int(resumed.group(2)) != KILL_STEPS * before["backup"]
    ):
        problems.append(f"resumed from {resumed.group(0)!r}, the backup: {before}")
    elif not resumed and epochs and before["backup"]:
        problems.append(f"restarted from scratch with a backup: {before}\n{log}")
    if epochs and epochs[0] != before["backup"] + 1:
        problems.append(f"trained epoch {epochs[0]} first after {before}")
    return problems


def _watch(process, run, log_path, item, on_lock=None):
    """Waits for `process` and kills it at `item`'s instant; `on_lock` is
    called with the process, stopped, once it holds the run's lock. Returns
    whether it was killed."""
    prefix = f".tmp-{process.pid}-"
    folders = [run, run / "backup", run / "checkpoints"]
    start = time.monotonic()
    locked_at = fire_at = None
    last_read = 0.0
    while process.poll() is None:
        now = time.monotonic()
        if locked_at is None and now - last_read > 0.1:
            last_read = now
            if re.search(r"^run ", log_path.read_text(), flags=re.M):
                locked_at = now
                if on_lock is not None:
                    process.send_signal(signal.SIGSTOP)
                    try:
                        on_lock(process)
                    finally:
                        process.send_signal(signal.SIGCONT)
                    stopped = time.monotonic() - now
                    start += stopped
                    locked_at += stopped
                    now = time.monotonic()
        if item is not None and fire_at is None:
            mode = item["mode"]
            if mode == "startup":
                fire_at = start + item["after"]
            elif mode == "training" and locked_at is not None:
                fire_at = locked_at + item["after"]
            elif mode == "write":
                for folder in folders:
                    try:
                        names = os.listdir(folder)
                    except FileNotFoundError:
                        continue
                    if any(
                        n.startswith(prefix) and n.endswith(item["file"]) for n in names
                    ):
                        fire_at = now + item["after"]
                        break
        if fire_at is not None and now >= fire_at:
            process.send_signal(signal.SIGKILL)
            process.wait()
            return True
        time.sleep(0.005)
    return False


def _kill_chain(folder, plan, lock_check=None):
    """Kills a tiny `kseg train` run at each instant of `plan`, resuming it
    after each kill; a run that finishes is checked and a new one started,
    until every instant was used and the last run finished. With
    `lock_check` (a dict), a second `--resume` is started once while a
    resumed process holds the run. Returns `(finished runs, problems,
    events)`."""
    folder.mkdir()
    plan = list(plan)
    new_run = [
        f"--set={o}"
        for o in (
            *TINY,
            f"train.epochs={KILL_EPOCHS}",
            f"train.steps_per_epoch={KILL_STEPS}",
        )
    ]
    finished, problems, events = [], [], []
    runs = 0
    run = before = None
    deadline = time.monotonic() + 20 * 60
    while plan or run is not None:
        assert time.monotonic() < deadline, f"out of time; events: {events}"
        if run is None:
            runs += 1
            run = folder / f"run-{runs}"
            args = [*new_run, "--run-dir", run]
        else:
            args = ["--resume", run]
        item = plan[0] if plan else None
        log_path = folder / f"cycle-{len(events)}.log"
        on_lock = None
        if lock_check is not None and not lock_check and args[0] == "--resume":

            def on_lock(holder, run=run):
                lock_check["holder"] = holder.pid
                listing = sorted((p, p.stat().st_mtime_ns) for p in run.rglob("*"))
                lock_check["second"] = kseg(
                    "train", "--resume", run, cwd=folder, expect=None
                )
                after = sorted((p, p.stat().st_mtime_ns) for p in run.rglob("*"))
                lock_check["untouched"] = listing == after

        with log_path.open("w") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "kseg.cli", "train", *map(str, args), "--quiet"],
                cwd=folder,
                env=_env(),
                stdout=log,
                stderr=subprocess.STDOUT,
            )
            try:
                killed = _watch(process, run, log_path, item, on_lock)
            finally:
                if process.poll() is None:
                    process.kill()
                    process.wait()
        text = log_path.read_text()
        if not killed and process.returncode != 0:
            problems.append(f"{log_path}: exit status {process.returncode}\n{text}")
            return finished, problems, events
        if before is not None:
            problems += [f"{log_path}: {p}" for p in _check_resumed(text, before)]
        if killed:
            plan.pop(0)
        state = _run_state(run)
        events.append((log_path.name, args[0], item if killed else None, state))
        # A kill loses at most the current epoch: the backup is the epoch's last
        # write, so its summary line may be in while its backup is not (the
        # resume trains that epoch again and drops the line).
        if killed and not state["finished"] and state["backup"] < state["logged"] - 1:
            problems.append(f"{log_path}: epochs logged past the backup: {state}")
        if state["finished"]:
            finished.append(run)
            run = before = None
        elif not state["started"]:
            run = before = None  # killed before the run existed: start anew
        else:
            before = state
    return finished, problems, events


@pytest.fixture(scope="module")
def kill_chains(tmp_path_factory):
    """Two chains of kills side by side (each process mostly waits on its
    imports), the 20 instants shared between them; the first also starts a
    second `--resume` while a resumed process holds its run."""
    folder = tmp_path_factory.mktemp("kills")
    plan = _kill_plan(random.Random(KILL_SEED))
    lock_check = {}
    started = time.perf_counter()
    chains = run_parallel(
        {
            "a": functools.partial(_kill_chain, folder / "a", plan[::2], lock_check),
            "b": functools.partial(_kill_chain, folder / "b", plan[1::2]),
        }
    )
    return {
        "chains": chains,
        "lock_check": lock_check,
        "seconds": time.perf_counter() - started,
    }


def test_killed_run_always_completes(kill_chains):
    """SIGKILL at 20 seeded random instants (a third of them while a file is
    written), `kseg train --resume` after each: every run ends with the full
    step count, a loadable model and its whole epoch log."""
    problems, kills = [], 0
    for finished, chain_problems, events in kill_chains["chains"].values():
        problems += chain_problems
        kills += sum(1 for event in events if event[2] is not None)
        assert finished, events
        for run in finished:
            problems += _check_finished(run)
    assert not problems, "\n\n".join(problems)
    assert kills == KILLS


def test_second_resume_of_a_run_is_refused(kill_chains):
    """Two `--resume` of one run at once: the second is refused with a
    message naming the process that holds the run, and changes nothing."""
    lock_check = kill_chains["lock_check"]
    assert lock_check, "no resumed process held a run long enough to check"
    second = lock_check["second"]
    assert second.returncode != 0, _show(second)
    assert "Traceback" not in second.stderr, _show(second)
    assert f"process {lock_check['holder']}" in second.stderr, _show(second)
    assert lock_check["untouched"], "the refused --resume changed the run"


# === PANet: the instance segmentation twin ===

LABELME_COCO = Path(
    "/usr/share/doc/labelme-examples/examples/instance_segmentation/data_dataset_coco"
)
# panet_quickstart shrunk to seconds (as tests/training/test_instance_task.py).
TINY_PANET = [
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


def _coco(folder):
    """Debian labelme-examples' COCO export in the COCO layout the README's
    `--data /data/coco --split val2017` reads."""
    if not LABELME_COCO.is_dir():
        pytest.skip("Debian package labelme-examples is not installed")
    coco = folder / "coco"
    (coco / "annotations").mkdir(parents=True)
    shutil.copytree(LABELME_COCO / "JPEGImages", coco / "val2017")
    annotations = json.loads((LABELME_COCO / "annotations.json").read_text())
    for image in annotations["images"]:
        image["file_name"] = Path(image["file_name"]).name
    (coco / "annotations" / "instances_val2017.json").write_text(
        json.dumps(annotations)
    )
    return coco


def _check_instances(out, photos, size):
    import tensorflow as tf

    for photo in photos:
        instances = tf.io.decode_png(
            (out / f"{photo.stem}_instances.png").read_bytes(), dtype=tf.uint16
        )
        assert tuple(instances.shape) == (*size, 1)
        overlay = _read_rgb(out / f"{photo.stem}_overlay.png")
        assert overlay.shape == (*size, 3)
    detections = json.loads((out / "detections.json").read_text())
    assert isinstance(detections, list)


def test_instance_path(tmp_path):
    """`kseg train --recipe panet_quickstart` (tiny), predict with the run,
    export it, predict with the export; `kseg data inspect --dataset coco`."""
    coco = _coco(tmp_path)
    size = (48, 72)
    photos = [tmp_path / f"photo{i}.jpg" for i in range(2)]
    for index, photo in enumerate(photos):
        _write_image(photo, _scene(*size, seed=index))
    run = tmp_path / "run"
    results = run_parallel(
        {
            "train": functools.partial(
                kseg,
                "train",
                "--recipe",
                "panet_quickstart",
                *(f"--set={o}" for o in TINY_PANET),
                "--run-dir",
                run,
                cwd=tmp_path,
            ),
            "inspect": functools.partial(
                kseg,
                "data",
                "inspect",
                "--dataset",
                "coco",
                "--data",
                coco,
                "--split",
                "val2017",
                cwd=tmp_path,
            ),
        }
    )
    assert "mask AP" in results["train"].stdout, _show(results["train"])
    assert json.loads((run / "result.json").read_text())["steps"] == 2
    inspect = results["inspect"]
    assert "3 images, 12 instances" in inspect.stdout, _show(inspect)

    results = run_parallel(
        {
            "predict": functools.partial(
                kseg, "predict", run, *photos, "--out", tmp_path / "found", cwd=tmp_path
            ),
            "export": functools.partial(
                kseg, "export", run, "--name", "panet", cwd=tmp_path
            ),
        }
    )
    _check_instances(tmp_path / "found", photos, size)
    kseg(
        "predict",
        tmp_path / "saved_models" / "panet",
        *photos,
        "--out",
        tmp_path / "found-served",
        cwd=tmp_path,
    )
    _check_instances(tmp_path / "found-served", photos, size)


# === The README's commands, exactly as written ===

# README lines that need what a test cannot make here: a dataset under /data,
# a second machine, a crashed run to resume, the network, Docker. Each is run
# elsewhere in this file with its paths replaced (see the table above).
ELSEWHERE = ("/data/", "--resume", "TF_CONFIG", "docker", "curl")


def readme_commands():
    """Every `kseg ...` line of README.md's bash blocks, in order (comments
    and line continuations resolved), but those `ELSEWHERE` names."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            if line.startswith("kseg ") and not any(m in line for m in ELSEWHERE):
                commands.append(line)
    return commands


def test_readme_commands_run_as_written(tmp_path):
    """A new user's folder, the README's commands pasted into a shell one
    after the other, through the installed `kseg` command (tiny recipes of
    the same names in KSEG_RECIPES keep it to minutes)."""
    if shutil.which("kseg") is None:
        pytest.skip("the kseg command is not installed (pip install -e .)")
    commands = readme_commands()
    # The README's path: train, held-out images, predict, evaluate, export,
    # run the exports; both tasks.
    for expected in (
        "kseg train",
        "kseg data images --recipe quickstart --out photos/",
        "kseg train --recipe panet_quickstart",
        "kseg evaluate runs/quickstart/latest/model.keras --recipe quickstart",
    ):
        assert expected in commands, f"README.md no longer runs {expected!r}"
    assert any(c.startswith("kseg export") for c in commands)
    recipes = tiny_recipe_dir(
        tmp_path / "recipes", f"train.epochs={EPOCHS}", f"train.steps_per_epoch={STEPS}"
    )
    from kseg.training.recipe import apply_overrides, dump_recipe, load_recipe

    panet = apply_overrides(
        load_recipe(REPO / "recipes" / "panet_quickstart.yaml"), TINY_PANET
    )
    (recipes / "panet_quickstart.yaml").write_text(dump_recipe(panet))
    home = tmp_path / "home"
    home.mkdir()
    env = _env(KSEG_RECIPES=str(recipes))
    env.pop("PYTHONPATH")  # the installed command, as a user has it
    for command in commands:
        result = subprocess.run(
            ["bash", "-c", command],
            cwd=home,
            env=env,
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert result.returncode == 0, f"README: {command}\n" + _show(result)
    # The Python blocks on what the commands wrote (load, predict, draw).
    blocks = _readme_python_blocks(on_user_files=True)
    assert len(blocks) >= 3, "README.md lost its Python path on a run"
    for block in blocks:
        result = subprocess.run(
            [sys.executable, "-c", textwrap.dedent(block)],
            cwd=home,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert result.returncode == 0, block + "\n" + _show(result)
    overlay = _read_rgb(home / "photo_overlay.png")
    assert overlay.shape[0] == 32 and overlay.shape[1] > 32  # the legend beside
    # What the commands promise is there.
    photos = sorted((home / "photos").glob("*.jpg"))
    assert len(photos) == 4
    for name in ("quickstart", "panet_quickstart"):
        latest = home / "runs" / name / "latest"
        assert (latest / "result.json").is_file(), name
    assert len(list((home / "predicted").glob("*_overlay.png"))) == len(photos)
    scenes = sorted((home / "scenes").glob("*.jpg"))
    assert scenes and (home / "found" / "detections.json").is_file()
    assert (home / "saved_models" / "quickstart" / "1" / "saved_model.pb").is_file()
    assert len(list((home / "masks-onnx").glob("*.png"))) == len(photos)
    assert (home / "found-onnx" / "detections.json").is_file()
    categories = home / "saved_models" / "panet" / "onnx" / "panet_v1.categories.json"
    assert [c["name"] for c in json.loads(categories.read_text())][:2] == [
        "disc",
        "square",
    ]
