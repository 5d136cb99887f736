"""The `kseg` command line: train, evaluate, list recipes, prepare data,
predict and export.

    kseg train                           # quickstart.yaml on the synthetic data
    kseg train --recipe pan_r101-os16_4xb4-voc-512 --data ~/VOCdevkit/VOC2012
    kseg train --recipe quickstart --set train.epochs=2 --set model.kwargs.filters=16
    kseg train --resume runs/quickstart/latest
    kseg evaluate runs/quickstart/latest
    kseg recipes
    kseg data convert --dataset voc --data DIR --split train --out DIR/records/train
    kseg data inspect --dataset voc --data DIR --split val
    kseg data images --recipe quickstart --out photos/
    kseg predict runs/quickstart/latest photos/*.jpg --out masks/
    kseg export runs/quickstart/latest --name shapes --tflite float16 --onnx

Every command and option is described by `kseg COMMAND --help`.
"""

import argparse
import logging
import os
import sys
import traceback

from kseg.console import progress_bar, quiet_tensorflow

DEFAULT_RECIPE = "quickstart"


def add_set_option(parser):
    """`--set KEY=VALUE` (repeatable), collected in `args.overrides`."""
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one recipe value, as a dotted key and a YAML value, e.g. "
        "--set train.epochs=2 --set model.kwargs.filters=32 "
        "--set data.crop_size=[256,256]; checked against the recipe's field "
        "types (repeatable)",
    )


def _add_recipe_options(parser, recipe_default=DEFAULT_RECIPE, recipe_help=None):
    parser.add_argument(
        "--recipe",
        default=recipe_default,
        metavar="NAME|FILE",
        help=recipe_help
        or (
            "recipe name (see `kseg recipes`) or path of a recipe YAML file "
            f"(default: {recipe_default})"
        ),
    )
    add_set_option(parser)
    parser.add_argument(
        "--data",
        metavar="DIR",
        help="dataset directory, overriding the recipe's data.root (VOC: the "
        "VOC2012 folder; Cityscapes: the folder holding leftImg8bit and gtFine; "
        "TFRecords: the folder holding <split>-*-of-* shards)",
    )


def _build_parser():
    parser = argparse.ArgumentParser(
        prog="kseg",
        description="kseg: train, evaluate, run and export Keras segmentation "
        "models from recipes: semantic (PAN, ExFuse, GCN, SegModel, FCN) and "
        "instance segmentation (PANet, Mask R-CNN); exports to SavedModel (TF "
        "Serving), TFLite and ONNX. A run's folder is runs/<recipe>/<timestamp>/"
        "; runs/<recipe>/latest names the newest.",
    )
    commands = parser.add_subparsers(
        dest="command",
        metavar="COMMAND",
        required=True,
        help="the command to run; `kseg COMMAND --help` describes its options",
    )

    train = commands.add_parser(
        "train",
        help="train a recipe with model.fit (default: quickstart)",
        description="Train a recipe and evaluate it. Each run gets a new "
        "directory runs/<recipe>/<timestamp>/ holding the recipe, TensorBoard "
        "logs (loss, mIoU, predicted masks), per-epoch checkpoints, the "
        "trained model.keras and the per-class IoU table; an earlier run is "
        "never overwritten. Without options it trains quickstart.yaml on the "
        "synthetic shapes data (a few minutes on a CPU).",
    )
    _add_recipe_options(train)
    train.add_argument(
        "--resume",
        metavar="RUN_DIR",
        help="continue an interrupted run from its last backup (end of its last "
        "completed epoch), with the recipe saved in RUN_DIR (e.g. "
        "runs/quickstart/latest); --recipe and --set are not allowed then",
    )
    train.add_argument(
        "--runs-dir",
        default="runs",
        metavar="DIR",
        help="parent folder of new run directories (default: runs)",
    )
    train.add_argument(
        "--run-dir",
        metavar="DIR",
        help="explicit directory of a new run instead of <runs-dir>/<recipe>/"
        "<timestamp>; give every worker of a multi-worker run the same one "
        "(workers other than the chief write to DIR/worker-<i>)",
    )
    train.add_argument(
        "--quiet",
        action="store_true",
        help="one line per epoch instead of progress bars (the default when "
        "the output is not a terminal)",
    )
    train.set_defaults(func=_train)

    evaluate = commands.add_parser(
        "evaluate",
        help="evaluate a saved model on a recipe's validation split",
        description="Evaluate a trained model on the recipe's validation split "
        "with the recipe's eval settings. A semantic model (scales, flip, "
        "window) prints the per-class IoU table, mean IoU and pixel accuracy; "
        "an instance model (PANet) the COCO box and mask AP table (AP, AP50, "
        "AP75, small/medium/large, per class).",
    )
    evaluate.add_argument(
        "model",
        metavar="MODEL",
        help="a .keras file, or a run directory such as runs/quickstart/latest "
        "(its model.keras and, unless --recipe is given, its recipe.yaml)",
    )
    _add_recipe_options(
        evaluate,
        recipe_default=None,
        recipe_help="recipe name or YAML file giving the dataset and eval "
        "settings (default: the run directory's recipe.yaml)",
    )
    evaluate.add_argument(
        "--split",
        help="split to evaluate (default: the recipe's data.val_split)",
    )
    evaluate.set_defaults(func=_evaluate)

    recipes = commands.add_parser(
        "recipes",
        help="list the available recipes",
        description="List the recipes found in $KSEG_RECIPES, the recipes/ "
        "folder of a kseg checkout and the recipes installed with kseg, with "
        "their descriptions; or print one recipe in full.",
    )
    recipes.add_argument(
        "name",
        nargs="?",
        metavar="NAME|FILE",
        help="print this recipe with every field (defaults included)",
    )
    # Listing recipes needs no TensorFlow (`_recipes` loads it for one recipe).
    recipes.set_defaults(func=_recipes, imports_tensorflow=False)

    data = commands.add_parser(
        "data",
        help="convert a dataset to TFRecords, inspect its labels, or write "
        "some of its images as files",
        description="Dataset tools. The dataset is the one of a recipe "
        "(--recipe) or a named one (--dataset), read from --data DIR.",
    )
    data_commands = data.add_subparsers(
        dest="data_command",
        metavar="ACTION",
        required=True,
        help="convert, inspect or images",
    )
    convert = data_commands.add_parser(
        "convert",
        help="write one split as sharded TFRecord files",
        description="Write one split of a dataset as TFRecord shards "
        "OUT-00000-of-0000N (images as stored, labels as class-index PNGs). "
        "Train from them with --set data.format=tfrecord --data <folder of "
        "OUT>, naming OUT after the split (e.g. records/train).",
    )
    inspect = data_commands.add_parser(
        "inspect",
        help="check every label and print the class histogram",
        description="Check that every label of a split holds only valid class "
        "indices or the ignore label 255 (an error names the first bad file), "
        "and print the pixel count and share of each class.",
    )
    for sub in (convert, inspect):
        source = sub.add_mutually_exclusive_group()
        source.add_argument(
            "--recipe",
            metavar="NAME|FILE",
            help="take the dataset from this recipe's data section",
        )
        source.add_argument(
            "--dataset",
            choices=(
                "synthetic",
                "voc",
                "voc_aug",
                "cityscapes",
                "ade20k",
                "folder",
                "coco",
            ),
            help="a dataset by name (folder: DIR/<split>/images and "
            "DIR/<split>/labels, with --set data.num_classes=N; coco: "
            "DIR/annotations/instances_<split>.json and DIR/<split>/)",
        )
        add_set_option(sub)
        sub.add_argument("--data", metavar="DIR", help="dataset directory")
        sub.add_argument(
            "--split", default="train", help="split to read (default: train)"
        )
    convert.add_argument(
        "--out",
        required=True,
        metavar="PREFIX",
        help="path prefix of the shards (folders are created; existing files "
        "are never overwritten)",
    )
    convert.add_argument(
        "--shards",
        type=int,
        default=1,
        metavar="N",
        help="number of shards (default: 1)",
    )
    convert.set_defaults(func=_convert)
    inspect.set_defaults(func=_inspect)

    images = data_commands.add_parser(
        "images",
        help="write a few images of a split as image files (to predict on)",
        description="Write the first N images of one split of a recipe's "
        "dataset as image files in OUT, named after each sample. By default "
        "the recipe's validation split: held-out scenes of the kind the model "
        "was trained on, e.g. `kseg data images --recipe quickstart --out "
        "photos/` after `kseg train`, then `kseg predict ... photos/*.jpg`. "
        "Works for semantic and instance recipes; existing files are never "
        "overwritten.",
    )
    images.add_argument(
        "--recipe",
        default=DEFAULT_RECIPE,
        metavar="NAME|FILE",
        help=f"recipe whose dataset to read (default: {DEFAULT_RECIPE})",
    )
    add_set_option(images)
    images.add_argument("--data", metavar="DIR", help="dataset directory")
    images.add_argument(
        "--split", help="split to read (default: the recipe's data.val_split)"
    )
    images.add_argument(
        "--out", required=True, metavar="DIR", help="folder to write the images to"
    )
    images.add_argument(
        "--count",
        type=int,
        default=4,
        metavar="N",
        help="number of images (default: 4)",
    )
    images.add_argument(
        "--format",
        dest="image_format",
        choices=("jpg", "png"),
        default="jpg",
        help="file format (default: jpg)",
    )
    images.set_defaults(func=_images)

    from kseg.convert_commands import register as register_convert
    from kseg.export.commands import register as register_export
    from kseg.inference.commands import register as register_predict

    register_predict(commands)
    register_export(commands)
    register_convert(commands)
    return parser


def _load(name_or_path, overrides):
    from kseg.training.recipe import apply_overrides, load_recipe

    recipe = load_recipe(name_or_path)
    return apply_overrides(recipe, overrides) if overrides else recipe


def _train(args):
    from kseg.training.trainer import train

    if args.resume is not None:
        if args.overrides or args.recipe != DEFAULT_RECIPE:
            raise _UsageError(
                "--resume continues a run with the recipe saved in its "
                "directory; --recipe and --set cannot change it"
            )
        recipe = None
    else:
        recipe = _load(args.recipe, args.overrides)
    train(
        recipe,
        data_dir=args.data,
        runs_dir=args.runs_dir,
        run_dir=args.run_dir,
        resume=args.resume,
        # Progress bars only on a terminal: piped to a file, their redraws
        # would fill it.
        verbose=2 if args.quiet or not sys.stdout.isatty() else 1,
    )
    return 0


def _evaluate(args):
    from pathlib import Path

    from kseg.training.trainer import (
        MODEL_FILE,
        RECIPE_FILE,
        evaluate,
        missing_run_message,
    )

    model = Path(args.model)
    if not model.exists():
        raise FileNotFoundError(missing_run_message(model))
    recipe = args.recipe
    if model.is_dir():
        if recipe is None:
            recipe = model / RECIPE_FILE
        model = model / MODEL_FILE
    if recipe is None:
        raise _UsageError(
            "evaluate needs --recipe (the dataset and eval settings) unless "
            "MODEL is a run directory"
        )
    result = evaluate(str(model), _load(recipe, args.overrides), args.data, args.split)
    print(result.table())
    print(result.summary())
    return 0


def _recipes(args):
    if args.name is not None:
        quiet_tensorflow()
        from kseg.training.recipe import dump_recipe, load_recipe

        print(dump_recipe(load_recipe(args.name)), end="")
        return 0
    # Listing reads only each file's description (no Keras import: fast);
    # `kseg recipes NAME` loads and checks one recipe in full.
    from kseg.training.recipe_files import list_recipes, recipe_description

    recipes = list_recipes()
    if not recipes:
        print("no recipes found; set KSEG_RECIPES to a folder of recipe files")
        return 1
    width = max(len(name) for name in recipes)
    for name, path in recipes.items():
        print(f"{name:<{width}}  {recipe_description(path)}")
    return 0


def _data_source(args):
    from kseg.training.recipe import (
        DataConfig,
        ModelConfig,
        apply_overrides,
        load_recipe,
    )

    if args.recipe is not None:
        recipe = load_recipe(args.recipe)
    else:
        from kseg.training.recipe import Recipe

        # COCO is an instance dataset; the others are read as semantic ones
        # (an instance recipe, e.g. --recipe panet_quickstart, reads the
        # synthetic instance scenes or Cityscapes instances).
        recipe = Recipe(
            name="data",
            task="instance" if args.dataset == "coco" else "semantic",
            model=ModelConfig(name="panet" if args.dataset == "coco" else "pan"),
            data=DataConfig(dataset=args.dataset or "synthetic"),
        )
        if args.dataset == "folder" and not any(
            o.startswith("data.num_classes=") for o in args.overrides
        ):
            raise _UsageError("--dataset folder needs --set data.num_classes=N")
    if args.overrides:
        recipe = apply_overrides(recipe, args.overrides)
    return recipe


def _convert(args):
    from kseg.data import convert_to_tfrecord, count_records
    from kseg.training.semantic import read_kseg_dataset

    recipe = _data_source(args)
    if recipe.task == "instance":
        raise _UsageError(
            "data convert writes semantic datasets; instance datasets train "
            "from their own files (COCO JSON, Cityscapes PNGs)"
        )
    dataset = read_kseg_dataset(recipe.data, args.split, args.data, recipe.train.seed)
    paths = convert_to_tfrecord(
        dataset,
        args.out,
        args.shards,
        progress=True,
        skip_corrupt=recipe.data.skip_corrupt,
    )
    print(
        f"wrote {count_records(paths)} examples to {len(paths)} shard(s): "
        f"{paths[0]} ..."
    )
    return 0


def _inspect(args):
    from kseg.data import class_histogram, format_class_histogram
    from kseg.training.semantic import read_kseg_dataset

    recipe = _data_source(args)
    if recipe.task == "instance":
        return _inspect_instances(recipe, args)
    dataset = read_kseg_dataset(recipe.data, args.split, args.data, recipe.train.seed)
    # Every image is decoded and every label checked (size, values).
    bar = progress_bar(len(dataset), unit_name="sample")
    problems = dataset.validate(progress=lambda done, total: bar.update(done))
    if problems:
        for _, message in problems:
            print(message, file=sys.stderr)
        raise ValueError(
            f"{len(problems)} of {len(dataset)} samples of {dataset.name} "
            f"{args.split} are bad (listed above)"
        )
    histogram = class_histogram(dataset)
    print(
        f"{dataset.name} {args.split}: {len(dataset)} samples, every image "
        "decodes and every label is valid"
    )
    print(format_class_histogram(histogram, dataset.class_names))
    return 0


def _inspect_instances(recipe, args):
    """`kseg data inspect` of an instance dataset: every annotation read
    (and every image decoded), then instances per class and per image."""
    from kseg.data import format_instance_statistics, instance_statistics
    from kseg.training.instance import read_instances

    dataset = read_instances(recipe.data, args.split, args.data, recipe.train.seed)
    bar = progress_bar(len(dataset), unit_name="image")
    problems = []
    for index in range(len(dataset)):
        try:
            dataset.load(index)
        except (OSError, ValueError) as error:
            problems.append(str(error))
        bar.update(index + 1)
    if problems:
        for message in problems:
            print(message, file=sys.stderr)
        raise ValueError(
            f"{len(problems)} of {len(dataset)} images of {dataset.name} "
            f"{args.split} are bad (listed above)"
        )
    statistics = instance_statistics(dataset)
    print(
        f"{dataset.name} {args.split}: {len(dataset)} images, "
        f"{int(statistics['per_class'].sum())} instances, every image decodes"
    )
    print(format_instance_statistics(statistics, dataset.class_names))
    return 0


def _images(args):
    from kseg.data.samples import write_sample_images

    recipe = _load(args.recipe, args.overrides)
    split = args.split or recipe.data.val_split
    seed = recipe.train.seed
    if recipe.task == "instance":
        from kseg.training.instance import read_instances

        dataset = read_instances(recipe.data, split, args.data, seed)
    else:
        from kseg.training.semantic import read_kseg_dataset

        dataset = read_kseg_dataset(recipe.data, split, args.data, seed)
    paths = write_sample_images(dataset, args.out, args.count, args.image_format)
    print(
        f"wrote {len(paths)} image(s) of {recipe.name}'s {split} split to "
        f"{args.out}: {', '.join(path.name for path in paths)}"
    )
    return 0


class _UsageError(Exception):
    """A command line whose options do not fit together."""


def _reexec_with_allocator_settings():
    """Starts this command again with kseg's allocator (`kseg.allocator`:
    tcmalloc preloaded when installed, else glibc's `MALLOC_*` settings),
    which acts only from a process's first allocation; once applied (or with
    `KSEG_MALLOC=off`) it returns at once."""
    from kseg.allocator import AllocatorError, restart_with_allocator

    try:
        restart_with_allocator()
    except AllocatorError as error:
        print(f"kseg: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None


def main(argv=None):
    """Runs the `kseg` command line; returns the exit status.

    With `argv=None` (the `kseg` command itself) the process first
    re-executes itself once with kseg's allocator (`kseg.allocator`;
    `KSEG_MALLOC=off` skips it); output to a closed pipe is dropped
    (`_drop_output_to_closed_pipes`), and the process ends with the
    command's status as soon as it is done (`_exit_with`)."""
    if argv is None:
        _reexec_with_allocator_settings()
        _drop_output_to_closed_pipes()
        _exit_with(lambda: _run(None))
    return _run(argv)


def _run(argv):
    parser = _build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "imports_tensorflow", True):
        quiet_tensorflow()
    from kseg.files import RunLockedError, describe_os_error
    from kseg.training.recipe_files import RecipeError

    try:
        return args.func(args)
    except _UsageError as error:
        parser.error(str(error))
    except RecipeError as error:
        print(f"kseg {args.command}: recipe error: {error}", file=sys.stderr)
        return 2
    except (FileNotFoundError, FileExistsError, ValueError, RunLockedError) as error:
        print(f"kseg {args.command}: error: {error}", file=sys.stderr)
        return 1
    except OSError as error:
        action = "write or read " + (error.filename or "a file")
        message = describe_os_error(error, action)
        print(f"kseg {args.command}: error: {message}", file=sys.stderr)
        return 1


def _exit_with(command):
    """Runs `command()` and ends the process with its status through
    `os._exit`, after flushing the output: Python's shutdown never runs.

    A bad sample stops `model.fit` with its tf.data iterator still alive,
    held by a Keras generator in the error's traceback. Python's shutdown
    collects that generator and destroys the iterator from the main thread,
    holding the GIL; the iterator's destructor waits for its in-flight map
    calls, which wait for `py_function` decodes that never complete: the
    process printed its error and then hung (5 of 20 runs here, 7 of 15 in
    the report), or aborted with "terminate called without an active
    exception". Every file kseg writes is complete when a command returns
    (written atomically; the kernel releases the run's lock), so nothing
    is lost by not tearing the objects down. An exception no command
    handles is printed with its traceback (status 1), as Python would."""
    try:
        code = command()
    except SystemExit as exit:  # argparse's --help and usage errors
        code = exit.code
    except KeyboardInterrupt:
        print("kseg: interrupted", file=sys.stderr)
        code = 130
    except BaseException:
        traceback.print_exc()
        code = 1
    if code is None:
        code = 0
    elif not isinstance(code, int):
        print(code, file=sys.stderr)
        code = 1
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass  # closed by the reader, or by the command itself
    os._exit(code)


class _ClosedPipeTolerant:
    """A text stream whose writes are dropped once its reader has gone
    (`kseg train | head -1`): the first `BrokenPipeError` points its file
    descriptor at os.devnull instead of stopping the command."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, text):
        try:
            return self._stream.write(text)
        except BrokenPipeError:
            self._to_devnull()
            return len(text)

    def flush(self):
        try:
            self._stream.flush()
        except BrokenPipeError:
            self._to_devnull()

    def _to_devnull(self):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, self._stream.fileno())
        os.close(devnull)
        # What is still buffered now goes to os.devnull.
        self._stream.flush()

    def __getattr__(self, name):
        return getattr(self._stream, name)


def _drop_output_to_closed_pipes():
    """Training must not stop because the program reading its output did
    (`| head`): stdout and stderr drop what a closed pipe cannot take."""
    sys.stdout = _ClosedPipeTolerant(sys.stdout)
    sys.stderr = _ClosedPipeTolerant(sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
