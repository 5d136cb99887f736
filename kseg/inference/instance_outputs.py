"""What `kseg predict` writes for an instance model (PANet).

Per image `DIR/name.ext`:

- `OUT/name_overlay.png`: RGB PNG, each instance's mask blended in its own
  colour, its box, and a label `class score` (drawn with OpenCV);
- `OUT/name_instances.png`: 16-bit grayscale PNG, 0 where no instance is,
  i where the i-th detection (1-based, best score first) is — the
  best-scoring one where masks overlap.

For the whole call:

- `OUT/detections.json`: COCO results (a list of `{"image_id",
  "category_id", "bbox" [x, y, w, h], "score", "segmentation"}` with
  compressed-RLE masks), loadable by the COCO API's `loadRes`;
- `OUT/images.json`: the COCO `images` (`id`, `file_name`, `height`,
  `width`: image i of the call has id i, from 1) and `categories` (`id`,
  `name`) the results refer to.

Category ids and class names come from the run's recipe (the model is a run
directory, or a `.keras` file in one), from an export's categories file
(`categories_file`: a SavedModel's `assets.extra/categories.json`, a `.tflite`
file's `NAME.categories.json`), else class k is id k named `class_<k>`.
"""

import sys
from pathlib import Path

import numpy as np

from kseg.data.instance_transform import as_pasted_masks
from kseg.data.instances import mask_api
from kseg.export.categories import categories_file, read_categories_file
from kseg.inference.visualize import draw_labels, text_height
from kseg.training.instance import recipe_categories

DETECTIONS_FILE = "detections.json"
IMAGES_FILE = "images.json"
# Rows of the overlay blended at a time.
_BAND_ROWS = 256


def instance_colors(count):
    """`count` distinct RGB colours (uint8), the i-th instance's at i."""
    if count == 0:
        return np.zeros((0, 3), np.uint8)
    hues = (np.arange(count) * 0.618033988749895) % 1.0
    hsv = np.stack(
        [hues * 180, np.full(count, 200), np.full(count, 255)], axis=-1
    ).astype(np.uint8)
    import cv2

    return cv2.cvtColor(hsv[None], cv2.COLOR_HSV2RGB)[0]


def draw_instances(image, instances, class_names, alpha=0.5):
    """The overlay: uint8 RGB `(H, W, 3)` with each instance's mask blended
    in its colour (`alpha` its weight), its box and its `name score` label
    (`kseg.inference.visualize.draw_labels`: on the instance's colour, never
    over another label)."""
    import cv2

    image = np.asarray(image)
    colors = instance_colors(len(instances.scores))
    canvas = blend_masks(image, instances.masks, colors, alpha)
    line = max(1, round(text_height(canvas.shape) / 12))
    for index in range(len(instances.scores) - 1, -1, -1):
        color = tuple(int(c) for c in colors[index])
        y1, x1, y2, x2 = instances.boxes[index]
        top_left = (int(np.floor(x1)), int(np.floor(y1)))
        bottom_right = (max(int(np.ceil(x2)) - 1, 0), max(int(np.ceil(y2)) - 1, 0))
        cv2.rectangle(canvas, top_left, bottom_right, color, line)
    # Best first: the best-scoring labels get the places next to their boxes.
    labels = [
        f"{class_names[k - 1]} {score:.2f}"
        for k, score in zip(instances.classes, instances.scores, strict=True)
    ]
    draw_labels(canvas, labels, instances.boxes, colors)
    return canvas


def blend_masks(image, masks, colors, alpha):
    """uint8 `image` `(H, W, 3)` with mask k (of `masks`, `(D, H, W)` bool or
    a `PastedMasks`) blended in `colors[k]`: `(1 − alpha) · pixel + alpha ·
    colour` in float32, worst (last) first so the best-scoring instance is
    on top where they overlap, rounded once at the end.

    One band of rows at a time, each mask pasted on the band's rows only: a
    float copy of the image would be 12 bytes a pixel, all D masks D bytes.
    """
    image = np.asarray(image)
    masks = as_pasted_masks(masks)
    canvas = np.empty(image.shape, np.uint8)
    for top in range(0, image.shape[0], _BAND_ROWS):
        bottom = min(top + _BAND_ROWS, image.shape[0])
        band = np.asarray(image[top:bottom], np.float32).copy()
        for index in range(len(masks) - 1, -1, -1):
            box_top, box_bottom, _, _ = masks.box(index)
            if box_bottom <= top or box_top >= bottom:
                continue
            first, left, mask = masks.crop_rows(index, top, bottom)
            window = band[first - top : first - top + len(mask)]
            window = window[:, left : left + mask.shape[1]]
            window[mask] = (1 - alpha) * window[mask] + alpha * colors[index]
        canvas[top:bottom] = np.round(band).astype(np.uint8)
    return canvas


def encode_instance_png(instance_map):
    """16-bit grayscale PNG bytes of a uint16 instance map (read back
    exactly by `cv2.imread(path, cv2.IMREAD_UNCHANGED)`)."""
    import cv2

    instance_map = np.asarray(instance_map)
    if instance_map.dtype != np.uint16 or instance_map.ndim != 2:
        raise ValueError(
            f"an instance map is uint16 (H, W), got {instance_map.dtype} "
            f"{instance_map.shape}"
        )
    ok, data = cv2.imencode(".png", instance_map)
    if not ok:
        raise ValueError("OpenCV could not encode the instance map")
    decoded = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
    if decoded is None or not np.array_equal(decoded, instance_map):
        raise ValueError("the 16-bit instance PNG does not read back exactly")
    return data.tobytes()


def encode_rgb(image):
    import cv2

    ok, data = cv2.imencode(".png", np.ascontiguousarray(image[..., ::-1]))
    if not ok:
        raise ValueError("OpenCV could not encode the overlay")
    return data.tobytes()


def coco_results(instances, image_id, category_ids):
    """COCO result dicts of one image's `Instances` (compressed RLE)."""
    if not len(instances.scores):
        return []
    height, width = instances.masks.shape[1:]
    results = []
    masks = as_pasted_masks(instances.masks)
    for index in range(len(masks)):
        # One full-size plane at a time (the RLE runs over the whole image).
        top, left, crop = masks.crop(index)
        mask = np.zeros((height, width, 1), np.uint8, order="F")
        mask[top : top + crop.shape[0], left : left + crop.shape[1], 0] = crop
        (rle,) = mask_api().encode(mask)
        y1, x1, y2, x2 = (float(v) for v in instances.boxes[index])
        results.append(
            {
                "image_id": int(image_id),
                "category_id": int(category_ids[instances.classes[index] - 1]),
                "bbox": [x1, y1, x2 - x1, y2 - y1],
                "score": float(instances.scores[index]),
                "segmentation": {
                    "size": [int(height), int(width)],
                    "counts": rle["counts"].decode("ascii"),
                },
            }
        )
    return results


def default_categories(num_classes):
    """Ids 1..C named `class_<k>`."""
    return tuple(range(1, num_classes + 1)), tuple(
        f"class_{k}" for k in range(1, num_classes + 1)
    )


def find_recipe_path(model_path):
    """The `recipe.yaml` of the run `model_path` is (or lies in), or None."""
    model_path = Path(model_path)
    candidates = [model_path / "recipe.yaml"] if model_path.is_dir() else []
    if model_path.is_file():
        candidates.append(model_path.parent / "recipe.yaml")
        if model_path.parent.name == "checkpoints":
            candidates.append(model_path.parent.parent / "recipe.yaml")
    return next((path for path in candidates if path.is_file()), None)


def find_categories(model_path, source_path, num_classes):
    """`(category_ids, class_names, where)` for the model at `model_path`
    (what the user passed; `source_path` what was loaded). `num_classes`
    None: unknown (an export), any count is taken."""
    found, where = None, None
    recipe_path = find_recipe_path(model_path) or find_recipe_path(source_path)
    export_file = categories_file(source_path)
    if recipe_path is not None:
        from kseg.training.recipe import load_recipe

        try:
            recipe = load_recipe(recipe_path)
            if recipe.task == "instance":
                found, where = recipe_categories(recipe), f"the run's {recipe_path}"
        except (OSError, ValueError, KeyError) as error:
            _warn(f"class names: cannot read them from {recipe_path} ({error})")
    elif export_file.is_file():
        try:
            found, where = read_categories_file(export_file), str(export_file)
        except (OSError, ValueError) as error:
            _warn(f"class names: cannot read {export_file} ({error})")
    if found is not None and num_classes is not None and len(found[0]) != num_classes:
        _warn(
            f"class names: {where} names {len(found[0])} classes, the model "
            f"predicts {num_classes}; using ids 1..{num_classes}"
        )
        found = None
    if found is None:
        return (*default_categories(num_classes or 0), None)
    return (*found, where)


def _warn(message):
    print(f"kseg predict: warning: {message}", file=sys.stderr)
