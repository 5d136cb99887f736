"""The COCO annotation format, checked without rasterising anything.

What a COCO JSON file may hold before `kseg.data.read_coco` uses it: ids are
JSON integers, image file names stay inside the image folder, polygons are
finite and near their image, RLE runs are well formed and cover the image,
boxes and areas are finite. The COCO mask API allocates in proportion to a
polygon's extent and reads malformed RLE strings with a bare `RuntimeError`,
so every check here comes before it is called; each error names the file
and the annotation or image.
"""

import json
import math
from pathlib import Path, PurePosixPath, PureWindowsPath

import numpy as np


def _is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_finite_number(value):
    try:
        return _is_number(value) and math.isfinite(value)
    except OverflowError:  # an int beyond the float range
        return False


def _check_polygon(polygon, height, width, where):
    """A polygon: at least 3 finite (x, y) pairs near the image.

    The COCO mask API allocates in proportion to a polygon's extent, so one
    coordinate of 1e9 (or NaN) would take all memory before any error; a
    vertex may lie outside the image (annotators' clicks do), by at most the
    image's own size.
    """
    if (
        not isinstance(polygon, list)
        or len(polygon) < 6
        or len(polygon) % 2
        or not all(_is_number(v) for v in polygon)
    ):
        raise ValueError(
            f"{where}: a polygon must be a list of at least 3 (x, y) "
            f"number pairs, got {str(polygon)[:80]}"
        )
    try:
        points = np.asarray(polygon, np.float64).reshape(-1, 2)
    except OverflowError:
        points = np.full((1, 2), np.inf)
    if not np.all(np.isfinite(points)):
        raise ValueError(
            f"{where}: a polygon coordinate is not a finite number "
            f"({str(polygon)[:80]}); fix or remove the annotation"
        )
    limits = np.asarray([width, height], np.float64)
    outside = np.any((points < -limits) | (points > 2 * limits), axis=1)
    if np.any(outside):
        x, y = points[np.argmax(outside)]
        raise ValueError(
            f"{where}: polygon point ({x:g}, {y:g}) lies far outside the "
            f"{width}x{height} image (x in [{-width}, {2 * width}], y in "
            f"[{-height}, {2 * height}] is accepted); fix or remove the annotation"
        )


def _compressed_rle_runs(counts):
    """The run lengths of a compressed COCO RLE string, decoded without
    rasterising it (a malformed string raises `ValueError` with the reason).

    Each run is a little-endian number of 5-bit groups, one character
    (`chr(48 + group)`) each; bit 0x20 continues the number, bit 0x10 of its
    last group is the sign; from the fourth run on, a run is stored as its
    difference to the run two before it (the COCO API's `rleFrString`).
    """
    if isinstance(counts, str):
        try:
            counts = counts.encode("ascii")
        except UnicodeEncodeError:
            raise ValueError("characters outside '0'..'o'") from None
    codes = np.frombuffer(counts, np.uint8).astype(np.int64) - 48
    if not codes.size:
        return codes
    if codes.min() < 0 or codes.max() > 63:
        raise ValueError("characters outside '0'..'o'")
    last = (codes & 0x20) == 0
    if not last[-1]:
        raise ValueError("the string ends inside a number")
    number = np.concatenate([[0], np.cumsum(last)[:-1]])
    starts = np.flatnonzero(np.concatenate([[True], last[:-1]]))
    position = np.arange(codes.size) - starts[number]
    # 7 groups are 35 bits, beyond any pixel count; longer ones would overflow.
    if position.max() > 6:
        raise ValueError("a run length of more than 7 characters")
    values = np.zeros(number[-1] + 1, np.int64)
    np.add.at(values, number, (codes & 0x1F) << (5 * position))
    ends = np.flatnonzero(last)
    negative = (codes[ends] & 0x10) != 0
    values[negative] -= np.left_shift(1, 5 * (position[ends][negative] + 1))
    runs = values.copy()
    runs[1::2] = np.cumsum(values[1::2])
    runs[2::2] = np.cumsum(values[2::2])
    return runs


def check_segmentation(segmentation, height, width, where="<annotation>"):
    """Checks a COCO `segmentation` without rasterising it.

    Raises:
        ValueError: naming `where`, for an empty polygon list; a polygon of
            fewer than 3 points, with an odd, non-numeric or non-finite
            coordinate list, or a point farther outside the image than its
            own size; an RLE without `size` and `counts`, of another size
            than the image, with negative or non-integer runs, a malformed
            compressed string, or runs that do not sum to the pixel count.
    """
    if isinstance(segmentation, list):
        if not segmentation:
            raise ValueError(f"{where}: empty polygon list")
        for polygon in segmentation:
            _check_polygon(polygon, height, width, where)
        return
    if not isinstance(segmentation, dict) or not {"size", "counts"} <= set(
        segmentation
    ):
        raise ValueError(
            f"{where}: segmentation must be polygons or an RLE dict with 'size' "
            f"and 'counts', got {str(segmentation)[:80]}"
        )
    size = segmentation["size"]
    if not isinstance(size, (list, tuple)) or list(size) != [height, width]:
        raise ValueError(
            f"{where}: RLE size {size} differs from the image size [{height}, {width}]"
        )
    counts = segmentation["counts"]
    if isinstance(counts, list):
        if not all(isinstance(c, int) and not isinstance(c, bool) for c in counts):
            raise ValueError(
                f"{where}: RLE counts must be integers, got {str(counts)[:80]}"
            )
        runs = counts
    elif isinstance(counts, (str, bytes)):
        try:
            runs = _compressed_rle_runs(counts).tolist()
        except ValueError as error:
            raise ValueError(
                f"{where}: malformed compressed RLE counts ({error}): "
                f"{str(counts)[:80]}"
            ) from None
    else:
        raise ValueError(
            f"{where}: RLE counts must be a list of run lengths or a compressed "
            f"string, got {type(counts).__name__}"
        )
    if any(run < 0 for run in runs):
        raise ValueError(f"{where}: RLE counts hold a negative run length")
    if sum(runs) != height * width:
        raise ValueError(
            f"{where}: RLE counts sum to {sum(runs)}, expected {height * width}"
        )


def load_coco_json(path):
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"annotation file not found: {path}")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(data, dict):
        raise ValueError(
            f"{path}: expected a COCO JSON object, got {type(data).__name__}"
        )
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise ValueError(f"{path}: missing or invalid {key!r} list")
    return data


def check_integer(value, what, positive=False):
    """`value` if it is a JSON integer (not a bool, float or string: ids `1`
    and `"1"` would otherwise name one category twice)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(
            f"{what} must be an integer, got {value!r} ({type(value).__name__}); "
            "write it as a JSON number without quotes or decimals, e.g. 3"
        )
    if positive and value < 1:
        raise ValueError(f"{what} must be positive, got {value}")
    return value


def check_file_name(file_name, image_dir, where):
    """An image's `file_name`, which must stay inside the image folder."""
    if not isinstance(file_name, str) or not file_name.strip():
        raise ValueError(f"{where}: file_name must be a non-empty string")
    parts = PureWindowsPath(file_name).parts
    if (
        PurePosixPath(file_name).is_absolute()
        or PureWindowsPath(file_name).anchor
        or ".." in parts
    ):
        raise ValueError(
            f"{where}: file_name {file_name!r} points outside the image folder "
            f"{image_dir}; file names are paths relative to it, without '..'"
        )
    return file_name


def check_box_and_area(annotation, where):
    """A given `bbox` is 4 finite numbers `[x, y, w, h]` with `w, h >= 0`, a
    given `area` a finite number >= 0 (the evaluator reads both)."""
    box = annotation.get("bbox")
    if box is not None and (
        not isinstance(box, list)
        or len(box) != 4
        or not all(_is_finite_number(v) for v in box)
        or box[2] < 0
        or box[3] < 0
    ):
        raise ValueError(
            f"{where}: bbox must be [x, y, width, height], 4 finite numbers with "
            f"width, height >= 0, got {str(box)[:80]}"
        )
    area = annotation.get("area")
    if area is not None and not (_is_finite_number(area) and area >= 0):
        raise ValueError(f"{where}: area must be a finite number >= 0, got {area!r}")
    if annotation.get("iscrowd", 0) not in (0, 1):
        raise ValueError(
            f"{where}: iscrowd must be 0 or 1, got {annotation['iscrowd']!r}"
        )
