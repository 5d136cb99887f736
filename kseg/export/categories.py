"""The categories file of an exported instance model: the dataset's category
ids and class names, so `kseg predict` reports them for any export. A
SavedModel keeps it in `assets.extra/categories.json` (TF Serving ignores
`assets.extra`), a `.tflite` or `.onnx` file in `NAME.categories.json`
beside it, and so does a `.keras` model that no run's recipe describes
(`kseg convert` writes one for torchvision's COCO model)."""

import json
from pathlib import Path

from kseg.tasks import is_instance_model

CATEGORIES_FILE = "categories.json"


def categories_file(export_path):
    """Where an exported instance model keeps its categories: a SavedModel's
    `assets.extra/categories.json`, a `.tflite`, `.onnx` (or `.keras`)
    file's `NAME.categories.json` beside it."""
    export_path = Path(export_path)
    if export_path.suffix in (".tflite", ".onnx", ".keras"):
        return export_path.with_name(f"{export_path.stem}.{CATEGORIES_FILE}")
    return export_path / "assets.extra" / CATEGORIES_FILE


def categories_json(model, categories):
    """The categories file of an instance model's export (a SavedModel's
    `assets.extra/categories.json`, a `.tflite` or `.onnx` file's
    `.categories.json` beside it): `[{"id", "name"}, ...]` of classes 1..C
    as JSON text, or `None` (not an instance model, or no categories and no
    class count).

    Args:
        model: the exported model.
        categories: `(category_ids, class_names)`, or `None` for ids 1..C
            named `class_<k>`.
    """
    if not is_instance_model(model):
        return None
    if categories is None:
        count = getattr(model, "num_classes", None)
        if count is None:
            return None  # `kseg predict` numbers the classes it sees
        categories = (range(1, count + 1), [f"class_{k}" for k in range(1, count + 1)])
    ids, names = (list(values) for values in categories)
    if len(ids) != len(names):
        raise ValueError(f"categories: {len(ids)} ids for {len(names)} names")
    entries = [{"id": int(c), "name": str(n)} for c, n in zip(ids, names, strict=True)]
    return json.dumps(entries, indent=1) + "\n"


def read_categories_file(path):
    """`(category_ids, class_names)` of a categories file (`categories_file`).

    Raises:
        ValueError: the file is not a list of `{"id": int, "name": str}`
            (named, with what is wrong).
        OSError: it cannot be read.
    """
    try:
        value = json.loads(Path(path).read_text())
        ids = tuple(int(entry["id"]) for entry in value)
        names = tuple(str(entry["name"]) for entry in value)
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(
            f'{path}: not a categories file (a JSON list of {{"id", "name"}}): {error}'
        ) from None
    return ids, names
