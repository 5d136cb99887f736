"""The `kseg` command line: help texts, recipes listing, a tiny end-to-end
train + evaluate run, data convert / inspect and the error paths."""

import argparse
import json

import numpy as np
import pytest

from kseg.cli import _build_parser, main

SUBCOMMANDS = [
    ["train"],
    ["evaluate"],
    ["recipes"],
    ["data"],
    ["data", "convert"],
    ["data", "inspect"],
    ["data", "images"],
    ["predict"],
    ["export"],
]

TINY_TRAIN = [
    "--set=model.kwargs.filters=8",
    "--set=backbone.kwargs.widths=[4, 4, 4, 4]",
    "--set=backbone.kwargs.stem_width=4",
    "--set=data.image_size=32",
    "--set=data.crop_size=[32, 32]",
    "--set=data.num_train_images=8",
    "--set=data.num_val_images=4",
    "--set=train.batch_size=4",
    "--set=train.epochs=1",
    "--set=train.steps_per_epoch=2",
    "--set=train.log_images=2",
    "--set=eval.batch_size=4",
]


def test_top_level_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for command in ("train", "evaluate", "recipes", "data", "predict", "export"):
        assert command in out


@pytest.mark.parametrize("command", SUBCOMMANDS, ids=" ".join)
def test_every_subcommand_help_explains_its_options(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: kseg " + " ".join(command))
    if command == ["train"]:
        for option in ("--recipe", "--set", "--data", "--resume", "--runs-dir"):
            assert option in out


def _parsers(parser):
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _parsers(sub)


def test_every_argument_has_a_help_string():
    for parser in _parsers(_build_parser()):
        # `kseg predict` and `kseg export` belong to kseg.inference and
        # kseg.export, which test their own parsers.
        if parser.prog in ("kseg predict", "kseg export"):
            continue
        for action in parser._actions:
            assert action.help, f"{parser.prog}: {action.dest} has no help"


def test_recipes_lists_every_recipe_with_its_description(capsys):
    assert main(["recipes"]) == 0
    out = capsys.readouterr().out
    assert "quickstart" in out and "pan_r101-os16_4xb4-voc-512" in out
    assert "79.38" in out
    assert main(["recipes", "quickstart"]) == 0
    out = capsys.readouterr().out
    assert "name: quickstart" in out and "crop_size: [64, 64]" in out


def test_train_and_evaluate_end_to_end(tmp_path, capsys):
    runs = tmp_path / "runs"
    assert main(["train", *TINY_TRAIN, "--runs-dir", str(runs), "--quiet"]) == 0
    out = capsys.readouterr().out
    # One run directory, and the `latest` link naming it.
    latest = runs / "quickstart" / "latest"
    (run,) = (p for p in (runs / "quickstart").iterdir() if p != latest)
    assert latest.is_symlink() and latest.resolve() == run.resolve()
    for name in ("recipe.yaml", "model.keras", "evaluation.txt", "result.json"):
        assert (run / name).is_file(), name
    assert (run / "checkpoints" / "last.keras").is_file()
    assert any((run / "logs" / "masks").iterdir())
    assert any((run / "logs" / "train").iterdir())
    result = json.loads((run / "result.json").read_text())
    assert result["steps"] == 2
    table = (run / "evaluation.txt").read_text()
    assert "IoU (%)" in table and "triangle" in table
    assert table.strip() in out
    assert "model saved to" in out

    # Through the link, as the README writes it.
    assert main(["evaluate", str(latest)]) == 0
    out = capsys.readouterr().out
    assert "IoU (%)" in out
    # The saved model gives back the run's own evaluation.
    assert table.strip() in out


def test_recipe_errors_name_the_key(tmp_path, capsys):
    assert main(["train", "--set", "train.epoch=1"]) == 2
    err = capsys.readouterr().err
    assert "'train.epoch'" in err and "did you mean 'train.epochs'" in err
    # Model keyword values are checked by the model constructor, by name.
    bad = ["train", "--set", "model.kwargs.filters=many", "--runs-dir", str(tmp_path)]
    assert main(bad) == 1
    assert "filters must be a positive int, got 'many'" in capsys.readouterr().err
    assert main(["train", "--recipe", "quikstart"]) == 1
    assert "did you mean 'quickstart'" in capsys.readouterr().err


def test_resume_refuses_recipe_changes_and_non_runs(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["train", "--resume", str(tmp_path), "--set", "train.epochs=1"])
    assert "--resume" in capsys.readouterr().err
    assert main(["train", "--resume", str(tmp_path)]) == 1
    assert "not a kseg run directory" in capsys.readouterr().err


def test_evaluate_needs_a_recipe_for_a_bare_model_file(tmp_path, capsys):
    (tmp_path / "model.keras").write_bytes(b"")
    with pytest.raises(SystemExit):
        main(["evaluate", str(tmp_path / "model.keras")])
    assert "--recipe" in capsys.readouterr().err


def test_a_missing_run_is_said_not_to_exist(tmp_path, capsys):
    runs = tmp_path / "runs" / "quickstart"
    (runs / "20260101-120000").mkdir(parents=True)
    (runs / "20260101-120000" / "recipe.yaml").write_text("name: quickstart\n")
    missing = runs / "000"
    assert main(["evaluate", str(missing / "model.keras"), "--recipe", "x"]) == 1
    err = capsys.readouterr().err
    assert f"{missing / 'model.keras'} does not exist" in err
    assert f"the runs in {runs}: 20260101-120000" in err
    assert main(["train", "--resume", str(missing)]) == 1
    err = capsys.readouterr().err
    assert f"{missing} does not exist" in err and "holds no" not in err


def test_data_images_writes_held_out_scenes_of_both_tasks(tmp_path, capsys):
    from kseg.data import make_synthetic, make_synthetic_instances
    from kseg.data.samples import encode_image
    from kseg.training.recipe import load_recipe

    out = tmp_path / "photos"
    small = ["--set=data.num_val_images=3", "--set=data.image_size=32"]
    args = ["data", "images", *small, "--out", str(out), "--format", "png"]
    assert main(args) == 0
    written = sorted(out.iterdir())
    assert len(written) == 3 and "3 image(s)" in capsys.readouterr().out
    # The recipe's own validation scenes (seed and split), pixel for pixel.
    seed = load_recipe("quickstart").train.seed
    val = make_synthetic("val", 3, 32, seed)
    for index, path in enumerate(written):
        assert path.name == f"{val.sample_name(index)}.png"
        np.testing.assert_array_equal(_read_rgb(path), val.load(index)[0])
    # Never overwritten: the same call again names the file and writes nothing.
    before = {path: path.stat().st_mtime_ns for path in written}
    assert main(args) == 1
    assert "already exists" in capsys.readouterr().err
    assert {path: path.stat().st_mtime_ns for path in written} == before

    # An instance recipe's validation scenes, as JPEG.
    out = tmp_path / "instances"
    instance = ["--recipe", "panet_quickstart", "--set=data.num_val_images=2"]
    assert main(["data", "images", *instance, "--out", str(out), "--count", "5"]) == 0
    recipe = load_recipe("panet_quickstart")
    scenes = make_synthetic_instances(
        "val", 2, recipe.data.image_size, recipe.train.seed
    )
    written = sorted(out.iterdir())
    assert [p.suffix for p in written] == [".jpg", ".jpg"]
    for index, path in enumerate(written):
        # The scene's own JPEG (lossy: compared as encoded).
        assert path.read_bytes() == encode_image(scenes.load_image(index), "jpg")
    assert main(["data", "images", "--out", str(out / "x"), "--count", "0"]) == 1
    assert "integer >= 1" in capsys.readouterr().err


def _read_rgb(path):
    import tensorflow as tf

    return tf.io.decode_image(path.read_bytes(), expand_animations=False).numpy()


def test_data_inspect_and_convert_the_synthetic_split(tmp_path, capsys):
    options = [
        "--dataset",
        "synthetic",
        "--set=data.num_val_images=5",
        "--set=data.image_size=32",
        "--split",
        "val",
    ]
    assert main(["data", "inspect", *options]) == 0
    out = capsys.readouterr().out
    assert "5 samples, every image decodes and every label is valid" in out
    assert "background" in out and "total" in out

    prefix = tmp_path / "records" / "val"
    assert (
        main(["data", "convert", *options, "--out", str(prefix), "--shards", "2"]) == 0
    )
    assert sorted(p.name for p in prefix.parent.iterdir()) == [
        "val-00000-of-00002",
        "val-00001-of-00002",
    ]
    # Existing shards are never overwritten.
    assert (
        main(["data", "convert", *options, "--out", str(prefix), "--shards", "2"]) == 1
    )
    assert "refusing to overwrite" in capsys.readouterr().err


def _kseg_subprocess(*args, env=None):
    import os
    import subprocess
    import sys

    environment = {
        key: value for key, value in os.environ.items() if key != "TF_CPP_MIN_LOG_LEVEL"
    }
    environment.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "kseg.cli", *args],
        capture_output=True,
        text=True,
        env=environment,
        timeout=300,
    )


def test_help_and_recipe_list_answer_without_importing_tensorflow():
    # Before: every --help took 7-13 s importing TensorFlow, `kseg recipes`
    # 10-20 s.
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from kseg.cli import main\n"
        "for argv in (['--help'], ['predict', '--help'], ['export', '--help'],"
        " ['train', '--help'], ['data', 'inspect', '--help'], ['recipes']):\n"
        "    try:\n"
        "        main(argv)\n"
        "    except SystemExit:\n"
        "        pass\n"
        "heavy = [m for m in ('tensorflow', 'keras', 'jax') if m in sys.modules]\n"
        "print('HEAVY', heavy, file=sys.stderr)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
    )
    assert "HEAVY []" in result.stderr, result.stderr[-2000:]


def test_commands_do_not_print_tensorflow_start_up_lines():
    # Before: every command began with cudart_stub / cuInit lines on a CPU.
    # (`kseg recipes NAME` loads the recipe: Keras and TensorFlow.)
    result = _kseg_subprocess("recipes", "quickstart")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    # A level the user sets is respected: TensorFlow then prints what it
    # allows (on a machine without a GPU, at least its CUDA probing lines).
    loud = _kseg_subprocess("recipes", "quickstart", env={"TF_CPP_MIN_LOG_LEVEL": "0"})
    assert loud.returncode == 0 and loud.stderr.strip() != ""


def test_a_permission_error_is_one_clear_line(monkeypatch, capsys):
    import errno

    import kseg.training.trainer as trainer

    def refuse(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", "/runs/q")

    monkeypatch.setattr(trainer, "train", refuse)
    assert main(["train"]) == 1
    err = capsys.readouterr().err
    assert err == (
        "kseg train: error: cannot write or read /runs/q: permission denied (/runs/q)\n"
    )


def test_a_damaged_model_file_is_named_as_damaged(tmp_path, capsys):
    # Before: a corrupt .keras was reported as "File not found".
    damaged = tmp_path / "model.keras"
    damaged.write_bytes(b"")
    assert main(["evaluate", str(damaged), "--recipe", "quickstart"]) == 1
    err = capsys.readouterr().err
    assert "model.keras is not a complete .keras model file (0 bytes" in err
