"""`kseg convert`: another library's weights as a kseg `.keras` model.

    kseg convert torchvision FILE --out MODEL.keras [--image-size H W]
                 [--score-threshold T] [--max-detections D]

FILE is torchvision's `maskrcnn_resnet50_fpn` state dict: a `.pth` file
(read with torch, which kseg does not install: pip install torch), or a
`.npz` / `.safetensors` file of the same names (no torch needed). The model
is kseg's Mask R-CNN baseline with torchvision's conventions
(`kseg.models.from_torchvision`), so it detects what torchvision detects.
COCO's weights give COCO's 91-id classes: MODEL.categories.json beside the
model names them, and `kseg predict MODEL.keras` reports COCO's ids and
names ("person" is 1). An existing MODEL is never overwritten.
"""

import argparse
import json
from pathlib import Path

from kseg.files import atomic_path, write_text


def register(subparsers):
    """Adds the `convert` subcommand to an `argparse` subparsers object; the
    handler is the parser default `func` (`args.func(args)` returns the exit
    status)."""
    parser = subparsers.add_parser(
        "convert",
        help="convert torchvision's Mask R-CNN weights into a kseg .keras model",
        description=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sources = parser.add_subparsers(
        dest="source",
        metavar="SOURCE",
        required=True,
        help="where the weights come from: torchvision",
    )
    torchvision = sources.add_parser(
        "torchvision",
        help="maskrcnn_resnet50_fpn state dict (.pth, .npz, .safetensors)",
        description=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    torchvision.add_argument("file", type=Path, help="the state dict file")
    torchvision.add_argument(
        "--out", type=Path, required=True, help="the .keras file to write (new)"
    )
    torchvision.add_argument(
        "--image-size",
        type=int,
        nargs=2,
        metavar=("H", "W"),
        default=(1024, 1024),
        help="the model's input size, multiples of 64 (default: 1024 1024)",
    )
    torchvision.add_argument(
        "--score-threshold",
        type=float,
        default=0.05,
        help="detection score threshold (default: 0.05, torchvision's)",
    )
    torchvision.add_argument(
        "--max-detections",
        type=int,
        default=100,
        help="detections per image (default: 100, torchvision's)",
    )
    torchvision.set_defaults(func=run_convert_torchvision)


def run_convert_torchvision(args):
    from kseg.export.categories import categories_file

    out = Path(args.out)
    if out.suffix != ".keras":
        raise ValueError(f"--out {out}: the model file must end in .keras")
    if out.exists():
        raise FileExistsError(f"--out {out} already exists; kseg never overwrites it")
    sidecar = categories_file(out)
    if sidecar.exists():
        raise FileExistsError(f"{sidecar} already exists; kseg never overwrites it")
    height, width = args.image_size
    if height <= 0 or width <= 0 or height % 64 or width % 64:
        raise ValueError(
            f"--image-size {height} {width}: both must be positive multiples of 64"
        )

    from kseg.models.coco import coco_categories
    from kseg.models.torchvision_weights import from_torchvision

    model = from_torchvision(
        args.file,
        image_size=(height, width),
        score_threshold=args.score_threshold,
        max_detections=args.max_detections,
    )
    if model.num_classes == 90:
        ids, names = coco_categories()
    else:
        ids = range(1, model.num_classes + 1)
        names = [f"class_{k}" for k in ids]
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out, overwrite=False) as tmp:
        model.save(tmp)
    entries = [{"id": int(i), "name": n} for i, n in zip(ids, names, strict=True)]
    write_text(sidecar, json.dumps(entries, indent=1) + "\n", overwrite=False)
    print(
        f"kseg convert: wrote {out} ({model.num_classes} classes, "
        f"{height}×{width} input; categories in {sidecar})"
    )
    return 0
