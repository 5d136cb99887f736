"""`kseg predict`: segment image files with a saved model.

MODEL is any model `kseg train` or `kseg export` writes: a `.keras` file
(`model.keras`, `checkpoints/best.keras`), a run directory, a SavedModel
(version folder or TF Serving model folder: its highest version), a
`.tflite` file (run by windows of its fixed input size; a PANet file gets
each image fitted into it, as the Keras PANet does) or a `.onnx` file (run
with ONNX Runtime, as the SavedModel runs).

For each input `DIR/name.ext` it writes `OUT/name.png`, an indexed (palette,
colour type 3) PNG whose pixel values are the class indices — the format of
VOC's `SegmentationClass`, read back exactly by `kseg.data.read_label` — and,
with `--overlay`, `OUT/name_overlay.png`, the label colours blended over the
image in grey, with a legend of the classes present to its right (names from
the run's recipe, else `class <k>`; RGB PNG). An image that cannot be read
or segmented is reported on stderr (naming the file and the reason) and
skipped; the exit status is 1 if any image failed. Existing outputs are
never replaced without `--overwrite`.

Images larger than `--max-pixels` (default 1 megapixel), or whose largest
test scale would be, run by windows (`--window`, default 512×512, smaller
where a test scale would enlarge a window beyond `--max-pixels`) one row of
windows at a time, so memory does not grow with the image beyond the image
and its class map; test-time augmentation then applies to each window.
"""

import argparse
import re
import sys
from pathlib import Path

from kseg.inference.defaults import (
    DEFAULT_ALPHA,
    DEFAULT_SCORE_THRESHOLD,
    MAX_TEST_SCALE,
    PAN_TTA_SCALES,
)

# TensorFlow and Keras load only when the command runs: `kseg --help` and
# argument errors answer at once.
from kseg.tasks import is_instance_model

# The names of `kseg.inference.visualize.PALETTES` (a test keeps them equal).
PALETTE_NAMES = ("ade20k", "cityscapes", "voc")
DEFAULT_MAX_PIXELS = 1 << 20
DEFAULT_TILE = 512
# The smallest default window (`--max-pixels` with large test scales).
MIN_TILE = 64


def register(subparsers):
    """Adds the `predict` subcommand to an `argparse` subparsers object.

    The handler is stored as the parser default `func`: call
    `args.func(args)`, which returns the exit status.
    """
    parser = subparsers.add_parser(
        "predict",
        help="segment images with a saved .keras model",
        description=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "model",
        type=Path,
        metavar="MODEL",
        help="a .keras file, a run directory, a SavedModel folder, a .tflite "
        "or a .onnx file",
    )
    parser.add_argument(
        "images",
        type=Path,
        nargs="+",
        metavar="IMAGE",
        help="image files (JPEG, PNG, BMP, GIF, WebP)",
    )
    parser.add_argument(
        "--out", type=Path, required=True, help="output folder (created if missing)"
    )
    augmentation = parser.add_mutually_exclusive_group()
    augmentation.add_argument(
        "--tta",
        action="store_true",
        help="PAN's multi-scale + flip evaluation: scales "
        f"{', '.join(map(str, PAN_TTA_SCALES))} and horizontal flip",
    )
    augmentation.add_argument(
        "--scales",
        type=_scale,
        nargs="+",
        default=(1.0,),
        help="test scales whose probabilities are averaged, each in (0, "
        f"{MAX_TEST_SCALE:g}] (default: 1.0)",
    )
    parser.add_argument(
        "--flip", action="store_true", help="also average the mirrored image"
    )
    parser.add_argument(
        "--window",
        type=_positive_int,
        nargs=2,
        metavar=("H", "W"),
        help="sliding-window size, typically the training crop (default: whole "
        f"images up to --max-pixels, larger ones by {DEFAULT_TILE}×{DEFAULT_TILE} "
        "windows; a .tflite file's input size)",
    )
    parser.add_argument(
        "--max-pixels",
        type=_positive_int,
        default=DEFAULT_MAX_PIXELS,
        help="images with more pixels (at their largest test scale) run by "
        "windows, one row at a time, so memory stays bounded (default: "
        f"{DEFAULT_MAX_PIXELS})",
    )
    parser.add_argument(
        "--overlap",
        type=_overlap,
        default=1 / 3,
        help="overlap of neighbouring windows in [0, 1) (default: 1/3)",
    )
    parser.add_argument(
        "--batch-size",
        type=_positive_int,
        default=4,
        help="windows per model call (default: 4)",
    )
    parser.add_argument(
        "--palette",
        choices=PALETTE_NAMES,
        help="label colours (default: from the class count — 21 voc, "
        "19 cityscapes, 150 ade20k — else the VOC colormap)",
    )
    parser.add_argument(
        "--overlay", action="store_true", help="also write NAME_overlay.png"
    )
    parser.add_argument(
        "--alpha",
        type=_alpha,
        default=DEFAULT_ALPHA,
        help=f"weight of the label colours in the overlay (default: {DEFAULT_ALPHA})",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace existing output files"
    )
    instance = parser.add_argument_group(
        "instance models (PANet)",
        "An instance model writes per image NAME_overlay.png (masks, boxes, "
        "class names and scores) and NAME_instances.png (16-bit: 0 = none, "
        "i = the i-th detection), and for the call detections.json (COCO "
        "results, RLE masks, the dataset's category ids) and images.json "
        "(their COCO images and categories). --tta, --scales, --flip, "
        "--window, --palette and --overlay are for semantic models.",
    )
    instance.add_argument(
        "--score-threshold",
        type=_unit_float,
        default=DEFAULT_SCORE_THRESHOLD,
        help="leave out detections scoring less (default: "
        f"{DEFAULT_SCORE_THRESHOLD}; 0 for COCO evaluation)",
    )
    instance.add_argument(
        "--max-detections",
        type=_positive_int,
        help="keep at most this many detections per image, best first "
        "(default: all the model returns)",
    )
    parser.set_defaults(func=run_predict)
    return parser


def run_predict(args):
    """Runs `kseg predict` for parsed `args`; returns the exit status."""
    from kseg.data import encode_index_png
    from kseg.data.png import encode_rgb_png
    from kseg.files import describe_os_error
    from kseg.inference.names import semantic_class_names
    from kseg.inference.predict import predict, predict_tiled
    from kseg.inference.sources import open_model
    from kseg.inference.visualize import overlay_with_legend

    try:
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        _error(describe_os_error(error, f"create the output folder {args.out}"))
        return 1
    try:
        source = open_model(args.model)
    except (OSError, ValueError, TypeError, ImportError) as error:
        _error(str(error))
        return 1

    if is_instance_model(source.model):
        return _run_instances(args, source)
    window = tuple(args.window) if args.window else source.input_size
    options = {
        "scales": PAN_TTA_SCALES if args.tta else tuple(args.scales),
        "flip": args.tta or args.flip,
        "overlap": args.overlap,
        "batch_size": args.batch_size,
    }
    palette = None
    class_names = (
        semantic_class_names(args.model, source.path) if args.overlay else None
    )
    claimed = {}
    failures = 0
    for image_path in args.images:
        outputs = [args.out / f"{image_path.stem}.png"]
        if args.overlay:
            outputs.append(args.out / f"{image_path.stem}_overlay.png")
        try:
            _claim(outputs[0], image_path, claimed)
            if not args.overwrite:
                for path in outputs:
                    if path.exists():
                        raise ValueError(
                            f"{path} already exists (pass --overwrite to replace it)"
                        )
            image = _read_image(image_path)
            height, width = image.shape[:2]
            # The largest model run, not only the image, must fit the cap.
            largest = max(options["scales"])
            pixels = max(height * width, _scaled_pixels(height, width, largest))
            if pixels > args.max_pixels or source.input_size is not None:
                tile = window or _default_tile(args.max_pixels, largest)
                label_map = predict_tiled(source.model, image, tile, **options)
            else:
                label_map = predict(
                    source.model, image, window=window, **options
                ).class_map
            if palette is None:
                palette = _palette(args.palette, _num_classes(source.model, image))
            label_map = label_map.astype("uint8")
            _write(outputs[0], encode_index_png(label_map, palette), args.overwrite)
            if args.overlay:
                blended = overlay_with_legend(
                    image, label_map, palette, args.alpha, class_names
                )
                _write(outputs[1], encode_rgb_png(blended), args.overwrite)
        except (OSError, ValueError) as error:
            failures += 1
            _error(f"{image_path}: {error}")
            continue
        print(f"{image_path} -> {', '.join(map(str, outputs))}")
    if failures:
        _error(f"{failures} of {len(args.images)} images failed")
        return 1
    return 0


def _scaled_pixels(height, width, scale):
    """The pixels of an image resized by `scale` (as `predict` resizes)."""
    return max(1, round(height * scale)) * max(1, round(width * scale))


def _default_tile(max_pixels, largest_scale):
    """The window of an image run by windows: `DEFAULT_TILE`, smaller where
    its largest test scale would make a run of more than `max_pixels`
    pixels (at least `MIN_TILE`)."""
    side = DEFAULT_TILE
    while side > MIN_TILE and _scaled_pixels(side, side, largest_scale) > max_pixels:
        side -= 1
    return side, side


def _claim(output, image_path, claimed):
    """Refuses a second input that would write the same output file."""
    if output in claimed:
        raise ValueError(
            f"its output {output} would replace the output of {claimed[output]}"
        )
    claimed[output] = image_path


def _run_instances(args, source):
    """`kseg predict` on an instance model (see `kseg.inference.instance_outputs`)."""
    import json

    from kseg.inference import instance_outputs as outputs
    from kseg.inference.instance_predict import predict_instances
    from kseg.inference.sources import InstanceSavedModel

    model = source.model
    exported = isinstance(model, InstanceSavedModel)
    num_classes = None if exported else getattr(model, "num_classes", None)
    category_ids, class_names, where = outputs.find_categories(
        args.model, source.path, num_classes
    )
    category_ids, class_names = list(category_ids), list(class_names)
    if where is not None:
        print(f"classes: {where}")
    resize = {}
    recipe_path = outputs.find_recipe_path(args.model) or outputs.find_recipe_path(
        source.path
    )
    if recipe_path is not None and not exported:
        resize = _recipe_resize(recipe_path)
    call_outputs = [args.out / outputs.DETECTIONS_FILE, args.out / outputs.IMAGES_FILE]
    if not args.overwrite:
        for path in call_outputs:
            if path.exists():
                _error(f"{path} already exists (pass --overwrite to replace it)")
                return 1
    claimed = {}
    results, images_info = [], []
    failures = 0
    for image_id, image_path in enumerate(args.images, start=1):
        paths = [
            args.out / f"{image_path.stem}_overlay.png",
            args.out / f"{image_path.stem}_instances.png",
        ]
        try:
            _claim(paths[0], image_path, claimed)
            if not args.overwrite:
                for path in paths:
                    if path.exists():
                        raise ValueError(
                            f"{path} already exists (pass --overwrite to replace it)"
                        )
            image = _read_image(image_path)
            (instances,) = predict_instances(
                model,
                [image],
                score_threshold=args.score_threshold,
                max_detections=args.max_detections,
                **resize,
            )
            if where is None and len(instances.classes):
                # Unknown categories: class k is id k, named class_<k>.
                for k in range(len(category_ids) + 1, int(instances.classes.max()) + 1):
                    category_ids.append(k)
                    class_names.append(f"class_{k}")
            overlay = outputs.draw_instances(image, instances, class_names)
            _write(paths[0], outputs.encode_rgb(overlay), args.overwrite)
            instance_png = outputs.encode_instance_png(instances.instance_map())
            _write(paths[1], instance_png, args.overwrite)
        except (OSError, ValueError) as error:
            failures += 1
            _error(f"{image_path}: {error}")
            continue
        results.extend(outputs.coco_results(instances, image_id, category_ids))
        height, width = image.shape[:2]
        images_info.append(
            {
                "id": image_id,
                "file_name": str(image_path),
                "height": int(height),
                "width": int(width),
            }
        )
        print(
            f"{image_path} -> {len(instances.scores)} instances: "
            f"{', '.join(map(str, paths))}"
        )
    categories = [
        {"id": int(c), "name": name}
        for c, name in zip(category_ids, class_names, strict=True)
    ]
    try:
        _write(
            call_outputs[1],
            (
                json.dumps({"images": images_info, "categories": categories}, indent=1)
                + "\n"
            ).encode(),
            args.overwrite,
        )
        _write(call_outputs[0], (json.dumps(results) + "\n").encode(), args.overwrite)
    except ValueError as error:
        _error(str(error))
        return 1
    print(f"COCO results: {call_outputs[0]} ({len(results)} detections)")
    if failures:
        _error(f"{failures} of {len(args.images)} images failed")
        return 1
    return 0


def _recipe_resize(recipe_path):
    """The evaluation resize of a run's recipe (`eval.short_edge`,
    `data.max_size`), as `predict_instances` keywords."""
    from kseg.training.recipe import load_recipe

    try:
        recipe = load_recipe(recipe_path)
    except (OSError, ValueError):
        return {}
    if recipe.task != "instance":
        return {}
    return {"short_edge": recipe.eval.short_edge, "max_size": recipe.data.max_size}


def _num_classes(model, image):
    """The class count of a model's output, from one tiny call."""
    import numpy as np

    size = (min(image.shape[0], 64), min(image.shape[1], 64))
    if getattr(model, "input_size", None) is not None:
        size = model.input_size
    logits = model(np.zeros((1, *size, 3), np.float32), training=False)["logits"]
    return int(logits.shape[-1])


def _read_image(path):
    """The image as uint8 RGB `(H, W, 3)`, decoded as kseg's input pipelines
    decode it; unreadable files raise `OSError` / `ValueError` with the
    reason."""
    try:
        data = path.read_bytes()
    except OSError as error:
        raise OSError(f"cannot read the image file: {error.strerror}") from None
    import tensorflow as tf

    from kseg.data import decode_image

    try:
        return decode_image(data).numpy()
    except tf.errors.InvalidArgumentError as error:
        # TensorFlow wraps the decoder's reason in op and device names.
        reason = re.sub(r"\{\{.*?\}\}|\[Op:\w+\]", "", error.message).strip()
        raise ValueError(f"not a decodable image ({reason})") from None


def _palette(name, num_classes):
    from kseg.data import voc_colormap
    from kseg.inference.visualize import PALETTES, get_palette

    if num_classes > 255:
        raise ValueError(
            f"the model predicts {num_classes} classes; a label PNG holds at most 255"
        )
    if name is None:
        # The dataset palette a model's class count implies; other counts use
        # the VOC colormap, whose colours are all distinct.
        by_classes = {len(palette): name for name, palette in PALETTES.items()}
        name = by_classes.get(num_classes)
        if name is None:
            return voc_colormap(num_classes)
    palette = get_palette(name)
    if len(palette) < num_classes:
        raise ValueError(
            f"palette {name!r} has {len(palette)} colours, the model predicts "
            f"{num_classes} classes"
        )
    return palette


def _write(path, data, overwrite):
    from kseg.files import describe_os_error, write_bytes

    try:
        write_bytes(path, data, overwrite=overwrite)
    except FileExistsError:
        raise ValueError(
            f"{path} already exists (pass --overwrite to replace it)"
        ) from None
    except OSError as error:
        raise ValueError(describe_os_error(error, f"write {path}")) from None


def _error(message):
    print(f"kseg predict: {message}", file=sys.stderr)


def _number(convert, accept, expected):
    """An argparse `type` converting with `convert` and checking `accept`."""

    def parse(text):
        try:
            value = convert(text)
        except ValueError:
            value = None
        if value is None or not accept(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value

    return parse


_positive_int = _number(int, lambda v: v >= 1, "a positive int")
_scale = _number(
    float, lambda v: 0 < v <= MAX_TEST_SCALE, f"a number in (0, {MAX_TEST_SCALE:g}]"
)
_overlap = _number(float, lambda v: 0 <= v < 1, "a number in [0, 1)")
_alpha = _number(float, lambda v: 0 <= v <= 1, "a number in [0, 1]")
_unit_float = _alpha
