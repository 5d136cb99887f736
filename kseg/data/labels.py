"""Label conventions: the one ignore label, class names, raw-id → train-id tables,
and label validation / class statistics.

Every label map in kseg is a `uint8` image of class indices in
`[0, num_classes)`, with `IGNORE_LABEL` (255) marking pixels that take no part in
the loss or the metric (VOC object boundaries, Cityscapes void classes, ADE20K
"other").
"""

import numpy as np

IGNORE_LABEL = 255

VOC_CLASSES = (
    "background",
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "diningtable",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
)

# The 19 evaluation classes of Cityscapes, in train-id order.
CITYSCAPES_CLASSES = (
    "road",
    "sidewalk",
    "building",
    "wall",
    "fence",
    "pole",
    "traffic light",
    "traffic sign",
    "vegetation",
    "terrain",
    "sky",
    "person",
    "rider",
    "car",
    "truck",
    "bus",
    "train",
    "motorcycle",
    "bicycle",
)

# Official cityscapesScripts table (helpers/labels.py): labelId → trainId for the
# 19 evaluated classes. Every other labelId (void, parking, rail track, guard rail,
# bridge, tunnel, polegroup, caravan, trailer, license plate) is ignored.
CITYSCAPES_LABEL_ID_TO_TRAIN_ID = {
    7: 0,
    8: 1,
    11: 2,
    12: 3,
    13: 4,
    17: 5,
    19: 6,
    20: 7,
    21: 8,
    22: 9,
    23: 10,
    24: 11,
    25: 12,
    26: 13,
    27: 14,
    28: 15,
    31: 16,
    32: 17,
    33: 18,
}

# ADE20K SceneParsing (ADEChallengeData2016) classes, annotation value k + 1.
ADE20K_CLASSES = (
    "wall",
    "building",
    "sky",
    "floor",
    "tree",
    "ceiling",
    "road",
    "bed",
    "windowpane",
    "grass",
    "cabinet",
    "sidewalk",
    "person",
    "earth",
    "door",
    "table",
    "mountain",
    "plant",
    "curtain",
    "chair",
    "car",
    "water",
    "painting",
    "sofa",
    "shelf",
    "house",
    "sea",
    "mirror",
    "rug",
    "field",
    "armchair",
    "seat",
    "fence",
    "desk",
    "rock",
    "wardrobe",
    "lamp",
    "bathtub",
    "railing",
    "cushion",
    "base",
    "box",
    "column",
    "signboard",
    "chest of drawers",
    "counter",
    "sand",
    "sink",
    "skyscraper",
    "fireplace",
    "refrigerator",
    "grandstand",
    "path",
    "stairs",
    "runway",
    "case",
    "pool table",
    "pillow",
    "screen door",
    "stairway",
    "river",
    "bridge",
    "bookcase",
    "blind",
    "coffee table",
    "toilet",
    "flower",
    "book",
    "hill",
    "bench",
    "countertop",
    "stove",
    "palm",
    "kitchen island",
    "computer",
    "swivel chair",
    "boat",
    "bar",
    "arcade machine",
    "hovel",
    "bus",
    "towel",
    "light",
    "truck",
    "tower",
    "chandelier",
    "awning",
    "streetlight",
    "booth",
    "television receiver",
    "airplane",
    "dirt track",
    "apparel",
    "pole",
    "land",
    "bannister",
    "escalator",
    "ottoman",
    "bottle",
    "buffet",
    "poster",
    "stage",
    "van",
    "ship",
    "fountain",
    "conveyer belt",
    "canopy",
    "washer",
    "plaything",
    "swimming pool",
    "stool",
    "barrel",
    "basket",
    "waterfall",
    "tent",
    "bag",
    "minibike",
    "cradle",
    "oven",
    "ball",
    "food",
    "step",
    "tank",
    "trade name",
    "microwave",
    "pot",
    "animal",
    "bicycle",
    "lake",
    "dishwasher",
    "screen",
    "blanket",
    "sculpture",
    "hood",
    "sconce",
    "vase",
    "traffic light",
    "tray",
    "ashcan",
    "fan",
    "pier",
    "crt screen",
    "plate",
    "monitor",
    "bulletin board",
    "shower",
    "radiator",
    "glass",
    "clock",
    "flag",
)


def cityscapes_label_map():
    """Returns the 256-entry `uint8` lookup table Cityscapes labelId → trainId.

    Ids outside the 19 evaluated classes map to `IGNORE_LABEL`.
    """
    table = np.full(256, IGNORE_LABEL, dtype=np.uint8)
    for label_id, train_id in CITYSCAPES_LABEL_ID_TO_TRAIN_ID.items():
        table[label_id] = train_id
    return table


def ade20k_label_map():
    """Returns the 256-entry `uint8` lookup table ADE20K annotation → class index.

    0 ("other") becomes `IGNORE_LABEL` and k becomes k − 1. Values above 150 are
    not valid annotations; they map to k − 1 ≥ 150 so that `check_labels`
    reports them instead of hiding them under the ignore label.
    """
    table = np.arange(-1, 255, dtype=np.int64)
    table[0] = IGNORE_LABEL
    return table.astype(np.uint8)


def check_labels(label, num_classes, path="<array>"):
    """Raises `ValueError` if `label` holds values outside the valid set.

    Valid values are `[0, num_classes)` and `IGNORE_LABEL`.

    Args:
        label: integer array of any shape.
        num_classes: int. Number of classes.
        path: str. File (or sample) the label came from, named in the error.
    """
    label = np.asarray(label)
    if not np.issubdtype(label.dtype, np.integer):
        raise ValueError(f"{path}: labels must be integers, got dtype {label.dtype}")
    values = np.unique(label)
    bad = values[((values < 0) | (values >= num_classes)) & (values != IGNORE_LABEL)]
    if bad.size:
        shown = ", ".join(str(v) for v in bad[:20].tolist())
        more = f" (and {bad.size - 20} more)" if bad.size > 20 else ""
        raise ValueError(
            f"{path}: label values {shown}{more} are outside [0, {num_classes}) "
            f"and are not the ignore label {IGNORE_LABEL}"
        )


def _iter_labels(dataset, num_classes):
    """Yields `(label, source name)` from a kseg dataset or a tf.data pairs dataset."""
    if hasattr(dataset, "load_label"):
        for index in range(len(dataset)):
            yield dataset.load_label(index), dataset.describe(index)
        return
    if num_classes is None:
        raise ValueError(
            "num_classes is required when the dataset is a tf.data.Dataset of pairs"
        )
    for index, (_, label) in enumerate(dataset.as_numpy_iterator()):
        yield label, f"element {index}"


def validate_dataset(dataset, progress=None):
    """Checks every label of a kseg dataset; raises `ValueError` on the first bad one.

    Args:
        dataset: a `SegmentationDataset` or `ArraySegmentationDataset`.
        progress: optional callable `progress(done, total)` called after each file.

    Returns:
        The number of labels checked.
    """
    total = len(dataset)
    for done, (label, source) in enumerate(_iter_labels(dataset, None), start=1):
        check_labels(label, dataset.num_classes, source)
        if progress is not None:
            progress(done, total)
    return total


def class_histogram(dataset, num_classes=None):
    """Counts pixels per class over a dataset, validating every label on the way.

    Args:
        dataset: a kseg dataset (`SegmentationDataset`, `ArraySegmentationDataset`)
            or a `tf.data.Dataset` of `(image, label)` pairs.
        num_classes: int. Required for a `tf.data.Dataset`; defaults to the kseg
            dataset's `num_classes`.

    Returns:
        `int64` array of shape `(num_classes + 1,)`: pixel counts of classes
        `0 … num_classes − 1`, then the count of `IGNORE_LABEL` pixels.
    """
    if num_classes is None:
        num_classes = getattr(dataset, "num_classes", None)
    counts = np.zeros(256, dtype=np.int64)
    for label, source in _iter_labels(dataset, num_classes):
        check_labels(label, num_classes, source)
        counts += np.bincount(np.asarray(label, np.uint8).ravel(), minlength=256)
    return np.concatenate([counts[:num_classes], counts[IGNORE_LABEL:]])


def format_class_histogram(histogram, class_names):
    """Formats a `class_histogram` result as a fixed-width text table.

    Args:
        histogram: array of shape `(num_classes + 1,)` from `class_histogram`.
        class_names: sequence of `num_classes` names.

    Returns:
        str: one line per class plus the ignore label and a total, each with its
        pixel count and share of all pixels.
    """
    histogram = np.asarray(histogram, dtype=np.int64)
    if histogram.shape != (len(class_names) + 1,):
        raise ValueError(
            f"histogram must have {len(class_names) + 1} entries (one per class "
            f"plus ignore), got shape {histogram.shape}"
        )
    total = int(histogram.sum())
    rows = [(str(i), name) for i, name in enumerate(class_names)]
    rows.append((str(IGNORE_LABEL), "(ignore)"))
    width = max(len("class"), *(len(name) for _, name in rows))
    lines = [f"{'id':>3}  {'class':<{width}}  {'pixels':>15}  {'share':>7}"]
    for (index, name), count in zip(rows, histogram.tolist(), strict=True):
        share = 100.0 * count / total if total else 0.0
        lines.append(f"{index:>3}  {name:<{width}}  {count:>15,}  {share:>6.2f}%")
    lines.append(f"{'':>3}  {'total':<{width}}  {total:>15,}  {100.0:>6.2f}%")
    return "\n".join(lines)
