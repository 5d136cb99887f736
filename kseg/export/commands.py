"""`kseg export`: a saved `.keras` model as a TF Serving SavedModel and,
optionally, TFLite files.

    kseg export MODEL --name NAME [--version N] [--out saved_models]
                [--tflite float32|float16|int8 ...] [--input-size H W] [--onnx]
                [--recipe NAME|FILE [--data DIR] | --calibration-dir DIR]

MODEL is a .keras file or a `kseg train` run directory. An instance model
(PANet) exports a SavedModel whose signatures return detections, masks and an
instance map (`kseg.export.instance_saved_model`), with the run's evaluation
resize and category ids; its TFLite and ONNX files return the detections and
masks at the model's own input size (`kseg.export.instance_graph`), each
TFLite and ONNX file with its categories beside it (NAME.categories.json).
The SavedModel goes
to OUT/NAME/VERSION/ (VERSION defaults to the next free integer; TF Serving's
--model_base_path is OUT/NAME), each TFLite file to
OUT/NAME/tflite/NAME_vVERSION_QUANTIZATION_HxW.tflite, the ONNX file (--onnx:
uint8 images of any batch and size for a semantic model, like the SavedModel;
any batch at its own input size for PANet, with NAME_vVERSION.categories.json
beside it) to OUT/NAME/onnx/NAME_vVERSION.onnx; `kseg predict` runs every
file. TFLite files have a
fixed input size: --input-size, else the model's own fixed size, else the
training crop (data.crop_size) of the run's recipe.yaml. int8 calibrates on
training images: the train split of --recipe (read from --data as for
`kseg train`; default: the run's recipe.yaml), or the images in
--calibration-dir. An existing version or file is never overwritten.
"""

import argparse
from pathlib import Path

from kseg.export.defaults import (
    DEFAULT_CALIBRATION_IMAGES,
    DEFAULT_MAX_PIXELS,
    QUANTIZATIONS,
)

# TensorFlow and Keras load only when the command runs (`kseg --help`
# answers at once).
from kseg.tasks import is_instance_model

_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")


def register(subparsers):
    """Adds the `export` subcommand to an `argparse` subparsers object.

    The handler is stored as the parser default `func`: call
    `args.func(args)`, which returns the exit status.
    """
    parser = subparsers.add_parser(
        "export",
        help="export a .keras model for TF Serving (SavedModel), TFLite and ONNX",
        description=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "model", type=Path, help="a .keras file, or a `kseg train` run directory"
    )
    parser.add_argument(
        "--name",
        required=True,
        type=_model_name,
        help="model name: the folder under --out, and TF Serving's model name",
    )
    parser.add_argument(
        "--version",
        type=_positive_int,
        help="version number (default: one more than the highest existing)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("saved_models"),
        help="folder of exported models (default: saved_models)",
    )
    parser.add_argument(
        "--tflite",
        nargs="+",
        choices=QUANTIZATIONS,
        default=(),
        metavar="QUANTIZATION",
        help="also write TFLite files: any of float32, float16, int8",
    )
    parser.add_argument(
        "--onnx",
        action="store_true",
        help="also write an ONNX file, OUT/NAME/onnx/NAME_vVERSION.onnx: uint8 "
        "images of any batch and size (PANet: at its own input size), run by "
        "`kseg predict` and ONNX Runtime (needs the onnx extra: pip install "
        "'kseg[onnx]')",
    )
    parser.add_argument(
        "--input-size",
        type=_positive_int,
        nargs=2,
        metavar=("H", "W"),
        help="fixed input size of the TFLite files (default: the model's own, "
        "when it has one)",
    )
    calibration = parser.add_mutually_exclusive_group()
    calibration.add_argument(
        "--recipe",
        metavar="NAME|FILE",
        help="int8: calibrate on the train split of this recipe's dataset "
        "(default: the run's recipe.yaml when MODEL is in a run directory)",
    )
    calibration.add_argument(
        "--calibration-dir",
        type=Path,
        metavar="DIR",
        help="int8: calibrate on the images (.jpg, .jpeg, .png, .bmp) in DIR",
    )
    parser.add_argument("--data", metavar="DIR", help="dataset directory for --recipe")
    parser.add_argument(
        "--max-pixels",
        type=_positive_int,
        default=DEFAULT_MAX_PIXELS,
        metavar="N",
        help="the most pixels (batch × height × width) one request to the "
        "SavedModel may hold; larger ones get an InvalidArgument error naming "
        f"the cap (default: {DEFAULT_MAX_PIXELS}, 16 megapixels)",
    )
    parser.add_argument(
        "--calibration-images",
        type=_positive_int,
        default=DEFAULT_CALIBRATION_IMAGES,
        metavar="N",
        help="int8: number of calibration images, spread over the split "
        f"(default: {DEFAULT_CALIBRATION_IMAGES})",
    )
    parser.set_defaults(func=run_export)
    return parser


def run_export(args):
    """Runs `kseg export` for parsed `args`; returns the exit status.

    Raises:
        FileExistsError: the version directory or a TFLite file exists.
        FileNotFoundError: the model file or calibration folder is missing.
        ValueError: options that do not fit the model or each other.
    """
    from kseg.export.categories import categories_file
    from kseg.export.saved_model import (
        check_segmentation_model,
        export_saved_model,
        next_version,
        refuse_existing,
    )
    from kseg.export.tflite import export_tflite
    from kseg.models import load_model
    from kseg.training.recipe import load_recipe
    from kseg.training.trainer import MODEL_FILE, RECIPE_FILE

    model_path = args.model / MODEL_FILE if args.model.is_dir() else args.model
    if not model_path.is_file():
        raise FileNotFoundError(f"model file not found: {model_path}")
    # A model trained by `kseg train` sits beside the recipe it was trained on.
    run_recipe = model_path.parent / RECIPE_FILE
    run_recipe = run_recipe if run_recipe.is_file() else None
    recipe = args.recipe
    if "int8" in args.tflite and recipe is None and args.calibration_dir is None:
        if run_recipe is None:
            raise ValueError(
                "--tflite int8 calibrates on training images: pass --recipe "
                "NAME|FILE (its train split) or --calibration-dir DIR (a model "
                f"in a `kseg train` run directory uses the run's {RECIPE_FILE})"
            )
        recipe = run_recipe
    model_dir = args.out / args.name
    version = next_version(model_dir) if args.version is None else args.version
    refuse_existing(model_dir / str(version), "SavedModel version")
    model = load_model(model_path)
    check_segmentation_model(model, instances=True)
    instance = is_instance_model(model)

    tflite_paths = {}
    if args.tflite:
        size = _tflite_size(args, model, run_recipe, load_recipe)
        for quantization in dict.fromkeys(args.tflite):
            name = f"{args.name}_v{version}_{quantization}_{size[0]}x{size[1]}.tflite"
            refuse_existing(model_dir / "tflite" / name, "TFLite file")
            tflite_paths[quantization] = model_dir / "tflite" / name
    onnx_path = model_dir / "onnx" / f"{args.name}_v{version}.onnx"
    if args.onnx:
        refuse_existing(onnx_path, "ONNX file")
        if instance:
            refuse_existing(categories_file(onnx_path), "categories file")
    calibration = None
    if "int8" in tflite_paths:
        if args.calibration_dir is not None:
            calibration = _folder_images(args.calibration_dir, args.calibration_images)
        else:
            recipe = load_recipe(recipe)
            calibration = _recipe_images(recipe, args.data, args.calibration_images)
            print(f"int8 calibration: the train split of recipe {recipe.name!r}")

    settings = _instance_settings(run_recipe, model_path) if instance else {}
    path = export_saved_model(
        model, model_dir, version, max_pixels=args.max_pixels, **settings
    )
    kind = "instance model; " if instance else ""
    print(f"SavedModel: {path} ({kind}signatures serving_default, serving_bytes)")
    for quantization, tflite_path in tflite_paths.items():
        export_tflite(
            model,
            tflite_path,
            size,
            quantization,
            calibration,
            args.calibration_images,
            categories=settings.get("categories"),
        )
        kib = tflite_path.stat().st_size / 1024
        print(f"TFLite {quantization}: {tflite_path} ({kib:.0f} KiB)")
    if args.onnx:
        from kseg.export.onnx import export_onnx

        categories = settings.get("categories")
        print(f"ONNX: {export_onnx(model, onnx_path, categories=categories)}")
    return 0


def _instance_settings(run_recipe, model_path):
    """The export settings of an instance model (PANet): the run's
    evaluation resize and category ids when its recipe is known, else the
    categories file beside the model (`kseg convert`'s `NAME.categories.json`)."""
    from kseg.export.categories import categories_file, read_categories_file

    if run_recipe is None:
        sidecar = categories_file(model_path)
        if not sidecar.is_file():
            return {}
        print(f"categories: {sidecar}")
        return {"categories": read_categories_file(sidecar)}
    from kseg.training.instance import recipe_categories
    from kseg.training.recipe import load_recipe

    recipe = load_recipe(run_recipe)
    if recipe.task != "instance":
        return {}
    settings = {"short_edge": recipe.eval.short_edge, "max_size": recipe.data.max_size}
    try:
        settings["categories"] = recipe_categories(recipe)
        print(f"categories: the dataset of {run_recipe}")
    except (OSError, ValueError) as error:
        print(f"categories: ids 1..C ({run_recipe}: {error})")
    return settings


def _tflite_size(args, model, run_recipe, load_recipe):
    """--input-size, else the model's fixed input size, else the training
    crop of the run's recipe; an instance model's own size only."""
    if is_instance_model(model):
        from kseg.export.instance_graph import instance_input_size

        return instance_input_size(model, args.input_size)
    if args.input_size is not None:
        return tuple(args.input_size)
    if None not in model.input_shape[1:3]:
        from kseg.export.tflite import tflite_input_size

        return tflite_input_size(model)
    if run_recipe is None:
        from kseg.training.trainer import RECIPE_FILE

        raise ValueError(
            f"TFLite files have a fixed input size, and {args.model} takes any "
            f"size (input shape {model.input_shape}): pass --input-size H W "
            "(e.g. the training crop), or export the `kseg train` run directory "
            f"instead, whose {RECIPE_FILE} gives data.crop_size"
        )
    size = tuple(load_recipe(run_recipe).data.crop_size)
    print(f"TFLite input size {size[0]}x{size[1]}: data.crop_size of {run_recipe}")
    return size


def _folder_images(folder, count):
    """A callable yielding `count` images spread over the files in `folder`."""
    if not folder.is_dir():
        raise FileNotFoundError(f"calibration folder not found: {folder}")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES)
    if not files:
        raise ValueError(
            f"no {', '.join(_IMAGE_SUFFIXES)} image in the calibration folder {folder}"
        )
    from kseg.data import decode_image

    picked = _spread(len(files), count)
    return lambda: (decode_image(files[i].read_bytes()).numpy() for i in picked)


def _recipe_images(recipe, data_dir, count):
    """A callable yielding `count` images spread over the recipe's train split."""
    if recipe.task == "instance":
        from kseg.training.instance import read_instances

        dataset = read_instances(recipe.data, "train", data_dir, recipe.train.seed)
        picked = _spread(len(dataset), count)
        return lambda: (dataset.load_image(i) for i in picked)
    from kseg.training.semantic import read_split

    pairs, length = read_split(recipe.data, "train", data_dir, recipe.train.seed)
    picked = set(_spread(length, count))
    return lambda: (
        image.numpy()
        for index, (image, _) in enumerate(pairs.take(max(picked) + 1))
        if index in picked
    )


def _spread(length, count):
    """`count` indices spread evenly over `range(length)` (all if fewer)."""
    import numpy as np

    if length <= count:
        return list(range(length))
    return sorted(set(np.linspace(0, length - 1, count).round().astype(int).tolist()))


def _model_name(value):
    if not value or value in (".", "..") or "/" in value or "\\" in value:
        raise argparse.ArgumentTypeError(
            f"the model name must be one folder name (no '/'), got {value!r}"
        )
    return value


def _positive_int(value):
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}")
    return number
