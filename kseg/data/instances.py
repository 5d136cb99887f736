"""Instance-segmentation datasets: COCO-format annotations, Cityscapes instance
PNGs and the common `InstanceDataset` they return.

An instance dataset keeps its annotations in COCO form (one dict per object
with the dataset's `category_id`, a polygon or RLE `segmentation`, `iscrowd`,
`bbox` and `area`). Two views are derived from them:

- training targets (`InstanceDataset.load`, `as_dataset`): the image, one binary
  mask per non-crowd object and its contiguous class in 1..C. Crowd regions
  are dropped from the targets, as Detectron2 does.
- the evaluation ground truth (`coco_ground_truth`): a COCO dict with every
  annotation, crowd regions included (the COCO evaluator ignores detections
  matched to them), annotation ids renumbered from 1 (the COCO API reads
  id 0 as "unmatched"), categories in the dataset's own ids.

Class k (1-based) is `class_names[k - 1]`, stored in the dataset as category
id `category_ids[k - 1]`; 0 is background. Polygons and RLE are decoded with
the COCO mask API of `faster-coco-eval`.
"""

import dataclasses
from pathlib import Path

import cv2
import numpy as np
import tensorflow as tf

from kseg.data.coco_format import (
    check_box_and_area,
    check_file_name,
    check_integer,
    check_segmentation,
    load_coco_json,
)
from kseg.data.dataset import bad_sample, load_image_file, validate_samples
from kseg.data.readers import check_split_name

# labelme's COCO export lists a background category (id 0); it is no object class.
NON_OBJECT_CATEGORIES = ("_background_", "__ignore__")

# Cityscapes' classes with instances: (label id, name), in label-id order.
CITYSCAPES_INSTANCE_CATEGORIES = (
    (24, "person"),
    (25, "rider"),
    (26, "car"),
    (27, "truck"),
    (28, "bus"),
    (31, "train"),
    (32, "motorcycle"),
    (33, "bicycle"),
)


def mask_api():
    """The COCO mask API (`faster_coco_eval.core.mask`), imported on first use."""
    try:
        from faster_coco_eval.core import mask
    except ImportError as error:
        raise ImportError(
            "instance segmentation needs the COCO tools of faster-coco-eval: "
            "pip install 'faster-coco-eval>=1.6,<2'"
        ) from error
    return mask


def encode_mask(mask):
    """Compressed COCO RLE of a binary `(H, W)` mask, `counts` as a str (JSON-ready)."""
    rle = mask_api().encode(np.asfortranarray(np.asarray(mask, dtype=np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def segmentation_to_rle(segmentation, height, width, where="<annotation>"):
    """One compressed RLE for a COCO `segmentation` (polygons, RLE or compressed RLE).

    Args:
        segmentation: a list of polygons `[x1, y1, x2, y2, ...]` (merged into
            one mask), an uncompressed RLE `{"size", "counts": [...]}` or a
            compressed one `{"size", "counts": "..."}`.
        height, width: int. Image size.
        where: str. Named in errors (file and annotation id).

    Returns:
        Compressed RLE dict.
    """
    check_segmentation(segmentation, height, width, where)
    api = mask_api()
    if isinstance(segmentation, list):
        return api.merge(api.frPyObjects(segmentation, height, width))
    counts = segmentation["counts"]
    if isinstance(counts, list):
        return api.frPyObjects(segmentation, height, width)
    if isinstance(counts, bytes):
        counts = counts.decode("ascii")
    return {"size": [height, width], "counts": counts}


def decode_segmentation(segmentation, height, width, where="<annotation>"):
    """The binary `uint8` `(H, W)` mask of a COCO `segmentation`."""
    rle = segmentation_to_rle(segmentation, height, width, where)
    if isinstance(rle["counts"], str):
        rle = {"size": rle["size"], "counts": rle["counts"].encode("ascii")}
    return mask_api().decode(rle)


def boxes_from_masks(masks):
    """Tight boxes `[y1, x1, y2, x2]` of binary masks, float32 `(N, 4)`.

    Pixel (i, j) covers `[i, i + 1) × [j, j + 1)`, so a one-pixel mask at (i, j)
    has the box `[i, j, i + 1, j + 1]`; empty masks get zeros.
    """
    masks = np.asarray(masks, dtype=bool)
    boxes = np.zeros((len(masks), 4), np.float32)
    for k, mask in enumerate(masks):
        rows = np.flatnonzero(mask.any(axis=1))
        cols = np.flatnonzero(mask.any(axis=0))
        if rows.size:
            boxes[k] = rows[0], cols[0], rows[-1] + 1, cols[-1] + 1
    return boxes


@dataclasses.dataclass(eq=False)
class InstanceDataset:
    """An instance-segmentation dataset: images, COCO-form annotations, classes.

    Subclasses say where images and annotations come from (`load_image`,
    `annotations`); everything else (masks, targets, the evaluation ground
    truth, the `tf.data` source) is shared.

    Attributes:
        name: str. Dataset name.
        class_names: tuple of C str; class k (1..C) is `class_names[k - 1]`.
        category_ids: tuple of C int; the dataset's category id of class k is
            `category_ids[k - 1]` (the reverse map writes results).
        images: tuple of dicts `{"id", "height", "width", "file_name"}`, one
            per image, in sample order.
    """

    name: str
    class_names: tuple
    category_ids: tuple
    images: tuple

    def __post_init__(self):
        self.class_names = tuple(str(n) for n in self.class_names)
        self.category_ids = tuple(int(c) for c in self.category_ids)
        self.images = tuple(self.images)
        if len(self.class_names) != len(self.category_ids) or not self.class_names:
            raise ValueError(
                f"{self.name}: {len(self.class_names)} class names for "
                f"{len(self.category_ids)} category ids"
            )
        if len(set(self.category_ids)) != len(self.category_ids):
            raise ValueError(f"{self.name}: duplicate category ids {self.category_ids}")
        ids = [image["id"] for image in self.images]
        if len(set(ids)) != len(ids):
            raise ValueError(f"{self.name}: duplicate image ids")
        self._class_of = {c: k + 1 for k, c in enumerate(self.category_ids)}

    def __len__(self):
        return len(self.images)

    @property
    def num_classes(self):
        """C, the number of object classes (background not counted)."""
        return len(self.class_names)

    def class_of(self, category_id, where="<annotation>"):
        """The contiguous class (1..C) of a dataset category id."""
        try:
            return self._class_of[int(category_id)]
        except KeyError:
            raise ValueError(
                f"{where}: unknown category id {category_id} (known: "
                f"{sorted(self._class_of)})"
            ) from None

    def describe(self, index):
        """Where sample `index` comes from, as named in error messages."""
        return f"{self.name}[{index}] ({self.images[index]['file_name']})"

    def load_image(self, index):
        """Sample `index`'s image, `uint8` `(H, W, 3)` RGB."""
        raise NotImplementedError

    def annotations(self, index):
        """Sample `index`'s COCO annotations (crowd regions included): dicts with
        `category_id`, `segmentation`, `iscrowd`, `bbox` `[x, y, w, h]`, `area`."""
        raise NotImplementedError

    def load_targets(self, index):
        """Sample `index`'s training targets, crowd regions dropped.

        Returns:
            `(masks uint8 (N, H, W) in {0, 1}, classes int32 (N,) in 1..C)`.
        """
        info = self.images[index]
        height, width = info["height"], info["width"]
        masks, classes = [], []
        for number, annotation in enumerate(self.annotations(index)):
            if annotation.get("iscrowd", 0):
                continue
            where = f"{self.describe(index)}, annotation {annotation.get('id', number)}"
            classes.append(self.class_of(annotation["category_id"], where))
            masks.append(
                decode_segmentation(annotation["segmentation"], height, width, where)
            )
        if not masks:
            return np.zeros((0, height, width), np.uint8), np.zeros((0,), np.int32)
        return np.stack(masks).astype(np.uint8), np.asarray(classes, np.int32)

    def load(self, index, targets=True):
        """Sample `index` as NumPy arrays, checked: an image file that is
        missing or does not decode, an image of another size than its
        annotations say, or a bad annotation raise `FileNotFoundError` /
        `ValueError` naming the file.

        Args:
            index: int. The sample.
            targets: bool. Decode the masks and classes too. Defaults to True.

        Returns:
            dict with `image` uint8 `(H, W, 3)`, `image_id` int and, with
            `targets`, `masks` uint8 `(N, H, W)` and `classes` int32 `(N,)`
            (1..C).
        """
        image = self.load_image(index)
        info = self.images[index]
        # Checked before the masks are drawn at the annotations' size.
        if image.shape[:2] != (info["height"], info["width"]):
            raise ValueError(
                f"{self.describe(index)}: image is {image.shape[0]}x{image.shape[1]} "
                f"but the annotations say {info['height']}x{info['width']}"
            )
        sample = {"image": image, "image_id": int(info["id"])}
        if targets:
            sample["masks"], sample["classes"] = self.load_targets(index)
        return sample

    validate = validate_samples

    # The attributes holding one entry per image, in sample order (`subset`).
    _per_image = ("images",)

    def subset(self, indices):
        """The dataset of the samples `indices` only (e.g. the good ones)."""
        indices = list(indices)
        return dataclasses.replace(
            self,
            **{
                field: tuple(getattr(self, field)[i] for i in indices)
                for field in self._per_image
            },
        )

    def as_dataset(
        self,
        shuffle=False,
        seed=None,
        targets=True,
        num_parallel_calls=tf.data.AUTOTUNE,
        skip_corrupt=False,
    ):
        """Streams the samples as a `tf.data.Dataset` of dicts.

        The sample order is shuffled before anything is loaded, so the shuffle
        buffer holds indices, not images. Each sample goes through `load`
        (checked), so a bad file stops the pipeline with an error naming it
        (`kseg.data.data_error_message` gets it back), or, with
        `skip_corrupt`, is left out with a warning naming it.

        Args:
            shuffle: bool. Shuffle the samples (reshuffled each epoch). Defaults
                to False.
            seed: optional int seed of the shuffle.
            targets: bool. Load the masks and classes; False gives images and
                ids only (evaluation). Defaults to True.
            num_parallel_calls: parallelism of loading. Defaults to AUTOTUNE.
            skip_corrupt: bool. Skip bad samples with a warning instead of
                failing. Defaults to False.

        Returns:
            `tf.data.Dataset` of `{"image": uint8 (H, W, 3), "image_id": int64
            ()}` plus, with `targets`, `"masks": uint8 (N, H, W)` and
            `"classes": int32 (N,)` (crowd regions dropped).
        """
        indices = tf.data.Dataset.range(len(self))
        if shuffle:
            indices = indices.shuffle(
                len(self), seed=seed, reshuffle_each_iteration=True
            )
        skipped = set()

        def load_checked(index):
            index = int(index)
            try:
                sample = self.load(index, targets=targets)
            except (OSError, ValueError) as error:
                bad_sample(error, index, skipped, len(self), self.name, skip_corrupt)
                sample = {
                    "image": np.zeros((0, 0, 3), np.uint8),
                    "image_id": 0,
                    "masks": np.zeros((0, 0, 0), np.uint8),
                    "classes": np.zeros((0,), np.int32),
                }
                ok = False
            else:
                ok = True
            masks = sample.get("masks", np.zeros((0, 0, 0), np.uint8))
            classes = sample.get("classes", np.zeros((0,), np.int32))
            return sample["image"], sample["image_id"], masks, classes, ok

        def load(index):
            image, image_id, masks, classes, ok = tf.py_function(
                load_checked,
                [index],
                (tf.uint8, tf.int64, tf.uint8, tf.int32, tf.bool),
            )
            sample = {
                "image": tf.ensure_shape(image, [None, None, 3]),
                "image_id": tf.ensure_shape(image_id, []),
            }
            if targets:
                sample["masks"] = tf.ensure_shape(masks, [None, None, None])
                sample["classes"] = tf.ensure_shape(classes, [None])
            return sample, tf.ensure_shape(ok, [])

        samples = indices.map(load, num_parallel_calls=num_parallel_calls)
        if skip_corrupt:
            samples = samples.filter(lambda sample, ok: ok)
        return samples.map(lambda sample, ok: sample)

    def coco_ground_truth(self, indices=None):
        """The COCO ground-truth dict of the evaluation (crowd regions kept).

        Args:
            indices: optional sample indices; defaults to all samples.

        Returns:
            dict with `images`, `annotations` (ids renumbered from 1,
            `segmentation`, `bbox`, `area`, `iscrowd`, `category_id` in the
            dataset's ids) and `categories` (`{"id", "name"}` of the C classes).
        """
        indices = range(len(self)) if indices is None else indices
        images, annotations = [], []
        for index in indices:
            info = self.images[index]
            images.append(
                {key: info[key] for key in ("id", "height", "width", "file_name")}
            )
            for number, annotation in enumerate(self.annotations(index)):
                where = f"{self.describe(index)}, annotation {number}"
                self.class_of(annotation["category_id"], where)
                annotations.append(
                    {
                        "id": len(annotations) + 1,
                        "image_id": info["id"],
                        "category_id": int(annotation["category_id"]),
                        "segmentation": annotation["segmentation"],
                        "area": float(annotation["area"]),
                        "bbox": [float(v) for v in annotation["bbox"]],
                        "iscrowd": int(annotation.get("iscrowd", 0)),
                    }
                )
        categories = [
            {"id": c, "name": n}
            for c, n in zip(self.category_ids, self.class_names, strict=True)
        ]
        return {"images": images, "annotations": annotations, "categories": categories}


def _complete(annotation, height, width, where):
    """Fills a missing `bbox` or `area` from the annotation's mask."""
    if "bbox" in annotation and "area" in annotation:
        return annotation
    api = mask_api()
    rle = segmentation_to_rle(annotation["segmentation"], height, width, where)
    if isinstance(rle["counts"], str):
        rle = {"size": rle["size"], "counts": rle["counts"].encode("ascii")}
    completed = dict(annotation)
    completed.setdefault("area", float(api.area(rle)))
    completed.setdefault("bbox", [float(v) for v in api.toBbox(rle)])
    return completed


@dataclasses.dataclass(eq=False)
class CocoInstanceDataset(InstanceDataset):
    """A COCO-format instance dataset on disk (`read_coco`).

    Attributes:
        image_paths: tuple of str, one per image.
        image_annotations: tuple of annotation lists, one per image.
    """

    image_paths: tuple = ()
    image_annotations: tuple = ()

    _per_image = ("images", "image_paths", "image_annotations")

    def describe(self, index):
        return self.image_paths[index]

    def load_image(self, index):
        return load_image_file(self.image_paths[index])

    def annotations(self, index):
        return self.image_annotations[index]


def read_coco(annotation_json, image_dir, *, name=None):
    """Reads COCO instance annotations (or a labelme COCO export).

    Category ids, in increasing order, become the contiguous classes 1..C
    (categories named `_background_` or `__ignore__`, labelme's, are left out);
    every annotation is checked up front (known category, valid polygon or RLE,
    known image) and every image file must exist. Crowd regions stay in the
    annotations: `load`/`as_dataset` drop them from the training targets and
    `coco_ground_truth` keeps them for the evaluator. Images without
    annotations are kept (they count for the evaluation and work in training).

    Example:

    >>> data = read_coco("annotations/instances_val2017.json", "val2017")
    >>> sample = data.load(0)  # image, masks, classes, image_id

    Args:
        annotation_json: path of the COCO JSON file.
        image_dir: folder the images' `file_name`s are relative to.
        name: optional dataset name. Defaults to the JSON file's stem.

    Returns:
        `CocoInstanceDataset`.
    """
    path = Path(annotation_json)
    data = load_coco_json(path)
    image_dir = Path(image_dir)
    if not image_dir.is_dir():
        raise FileNotFoundError(f"image directory not found: {image_dir}")

    categories = {}
    for category in data["categories"]:
        if (
            not isinstance(category, dict)
            or "id" not in category
            or "name" not in category
        ):
            raise ValueError(
                f"{path}: a category needs 'id' and 'name', got {category}"
            )
        if category["name"] in NON_OBJECT_CATEGORIES:
            continue
        category_id = check_integer(category["id"], f"{path}: a category's id")
        if category_id in categories:
            raise ValueError(f"{path}: category id {category_id} appears twice")
        categories[category_id] = str(category["name"])
    if not categories:
        raise ValueError(f"{path}: no object categories")
    category_ids = tuple(sorted(categories))

    images, paths, by_image = [], [], {}
    for image in data["images"]:
        if not isinstance(image, dict) or not {
            "id", "height", "width", "file_name"
        } <= set(image):  # fmt: skip
            raise ValueError(
                f"{path}: an image needs 'id', 'height', 'width' and 'file_name', "
                f"got {str(image)[:200]}"
            )
        where = f"{path}: image {image['id']!r}"
        info = {
            "id": check_integer(image["id"], f"{path}: an image's id"),
            "height": check_integer(image["height"], f"{where}: height", positive=True),
            "width": check_integer(image["width"], f"{where}: width", positive=True),
            "file_name": check_file_name(image["file_name"], image_dir, where),
        }
        if info["id"] in by_image:
            raise ValueError(f"{path}: image id {info['id']} appears twice")
        by_image[info["id"]] = len(images)
        images.append(info)
        paths.append(str(image_dir / info["file_name"]))
    missing = [p for p in paths if not Path(p).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} image(s) listed by {path} are missing, first: {missing[0]}"
        )
    if not data["annotations"]:
        # Nothing to learn, and the COCO AP of an evaluation is undefined
        # (it would be reported as 0).
        raise ValueError(
            f"{path}: the file lists no annotations, so there is nothing to "
            "train on and no AP to measure; give the annotation file of an "
            "annotated split"
        )

    per_image = [[] for _ in images]
    for annotation in data["annotations"]:
        if not isinstance(annotation, dict):
            raise ValueError(
                f"{path}: an annotation must be an object, got {str(annotation)[:80]}"
            )
        where = f"{path}: annotation {annotation.get('id', '?')}"
        for key in ("image_id", "category_id", "segmentation"):
            if key not in annotation:
                raise ValueError(f"{where}: missing {key!r}")
        image_id = check_integer(annotation["image_id"], f"{where}: image_id")
        if image_id not in by_image:
            raise ValueError(f"{where}: unknown image id {image_id}")
        category_id = check_integer(annotation["category_id"], f"{where}: category_id")
        if category_id not in categories:
            raise ValueError(
                f"{where}: unknown category id {category_id} (object "
                f"categories: {list(category_ids)})"
            )
        check_box_and_area(annotation, where)
        index = by_image[image_id]
        info = images[index]
        check_segmentation(
            annotation["segmentation"], info["height"], info["width"], where
        )
        per_image[index].append(
            _complete(annotation, info["height"], info["width"], where)
        )

    return CocoInstanceDataset(
        name=name or path.stem,
        class_names=tuple(categories[c] for c in category_ids),
        category_ids=category_ids,
        images=tuple(images),
        image_paths=tuple(paths),
        image_annotations=tuple(per_image),
    )


@dataclasses.dataclass(eq=False)
class CityscapesInstanceDataset(InstanceDataset):
    """Cityscapes fine instances on disk (`read_cityscapes_instances`).

    Attributes:
        image_paths: tuple of `*_leftImg8bit.png` paths.
        instance_paths: tuple of `*_gtFine_instanceIds.png` paths.
    """

    image_paths: tuple = ()
    instance_paths: tuple = ()

    _per_image = ("images", "image_paths", "instance_paths")

    def describe(self, index):
        return self.instance_paths[index]

    def load_image(self, index):
        return load_image_file(self.image_paths[index])

    def read_instance_ids(self, index):
        """Sample `index`'s instance-id map, int32 `(H, W)`."""
        path = self.instance_paths[index]
        ids = cv2.imread(path, cv2.IMREAD_UNCHANGED)
        if ids is None:
            raise ValueError(f"{path}: missing or not a readable PNG")
        if ids.ndim != 2:
            raise ValueError(f"{path}: expected a one-channel instance-id PNG")
        return ids.astype(np.int32)

    def annotations(self, index):
        """Instances (id ≥ 1000, class id // 1000) and crowd regions (an
        instance class's own id below 1000: a group Cityscapes did not split),
        in increasing id order."""
        ids = self.read_instance_ids(index)
        api = mask_api()
        annotations = []
        for value in np.unique(ids):
            label = value // 1000 if value >= 1000 else value
            if label not in self._class_of:
                continue
            rle = api.encode(np.asfortranarray((ids == value).astype(np.uint8)))
            annotations.append(
                {
                    "category_id": int(label),
                    "segmentation": {
                        "size": rle["size"],
                        "counts": rle["counts"].decode("ascii"),
                    },
                    "iscrowd": int(value < 1000),
                    "area": float(api.area(rle)),
                    "bbox": [float(v) for v in api.toBbox(rle)],
                }
            )
        return annotations

    def load_targets(self, index):
        ids = self.read_instance_ids(index)
        values = np.unique(ids[ids >= 1000])
        values = values[np.isin(values // 1000, self.category_ids)]
        masks = (ids[None] == values[:, None, None]).astype(np.uint8)
        classes = np.asarray([self._class_of[v // 1000] for v in values], np.int32)
        return masks, classes


def _png_size(path):
    """`(height, width)` from a PNG's header, without decoding it."""
    with open(path, "rb") as file:
        head = file.read(24)
    if (
        len(head) < 24
        or not head.startswith(b"\x89PNG\r\n\x1a\n")
        or head[12:16] != b"IHDR"
    ):
        raise ValueError(f"{path}: not a PNG file")
    return int.from_bytes(head[20:24], "big"), int.from_bytes(head[16:20], "big")


def read_cityscapes_instances(root, split="train"):
    """Reads Cityscapes fine instance annotations (the 8 instance classes).

    Images are `leftImg8bit/{split}/{city}/*_leftImg8bit.png`, instances
    `gtFine/{split}/{city}/*_gtFine_instanceIds.png` (16-bit): a value v ≥ 1000
    is one instance of label id v // 1000; an instance class's label id itself
    (v < 1000) marks a crowd group, kept for evaluation only. Classes 1..8 are
    person, rider, car, truck, bus, train, motorcycle, bicycle (category ids =
    the label ids 24–28, 31–33).

    Args:
        root: the Cityscapes directory holding `leftImg8bit` and `gtFine`.
        split: str. `"train"`, `"val"` or `"test"`. Defaults to `"train"`.

    Returns:
        `CityscapesInstanceDataset`.
    """
    root = Path(root)
    split_dir = root / "leftImg8bit" / check_split_name(split)
    if not split_dir.is_dir():
        raise FileNotFoundError(f"Cityscapes split directory not found: {split_dir}")
    suffix = "_leftImg8bit.png"
    images, image_paths, instance_paths = [], [], []
    for image in sorted(split_dir.glob(f"*/*{suffix}")):
        prefix = image.name[: -len(suffix)]
        instances = (
            root
            / "gtFine"
            / split
            / image.parent.name
            / f"{prefix}_gtFine_instanceIds.png"
        )
        if not instances.is_file():
            raise FileNotFoundError(f"instance PNG not found for {image}: {instances}")
        height, width = _png_size(instances)
        images.append(
            {
                "id": len(images) + 1,
                "height": height,
                "width": width,
                "file_name": f"{image.parent.name}/{image.name}",
            }
        )
        image_paths.append(str(image))
        instance_paths.append(str(instances))
    if not images:
        raise ValueError(f"no {suffix} images in {split_dir}")
    return CityscapesInstanceDataset(
        name=f"cityscapes_instances_{split}",
        class_names=tuple(n for _, n in CITYSCAPES_INSTANCE_CATEGORIES),
        category_ids=tuple(c for c, _ in CITYSCAPES_INSTANCE_CATEGORIES),
        images=tuple(images),
        image_paths=tuple(image_paths),
        instance_paths=tuple(instance_paths),
    )


def instance_statistics(dataset):
    """Counts the instances of an `InstanceDataset` per class and per image.

    Args:
        dataset: `InstanceDataset`.

    Returns:
        dict with `per_class` (int64 `(C,)` non-crowd instances of class k at
        k − 1), `crowd_per_class` (int64 `(C,)` crowd regions), `per_image`
        (int64 `(N,)` non-crowd instances of each image), `images` (N) and
        `images_without_instances`.
    """
    per_class = np.zeros(dataset.num_classes, np.int64)
    crowd = np.zeros(dataset.num_classes, np.int64)
    per_image = np.zeros(len(dataset), np.int64)
    for index in range(len(dataset)):
        for annotation in dataset.annotations(index):
            k = dataset.class_of(annotation["category_id"], dataset.describe(index)) - 1
            if annotation.get("iscrowd", 0):
                crowd[k] += 1
            else:
                per_class[k] += 1
                per_image[index] += 1
    return {
        "per_class": per_class,
        "crowd_per_class": crowd,
        "per_image": per_image,
        "images": len(dataset),
        "images_without_instances": int(np.sum(per_image == 0)),
    }


def format_instance_statistics(statistics, class_names):
    """Text table of `instance_statistics`: instances per class, then per image.

    Args:
        statistics: dict returned by `instance_statistics`.
        class_names: the C class names.

    Returns:
        str.
    """
    per_class, crowd = statistics["per_class"], statistics["crowd_per_class"]
    per_image = statistics["per_image"]
    width = max([len("class")] + [len(n) for n in class_names])
    total = max(int(per_class.sum()), 1)
    lines = [f"{'class':<{width}}  {'instances':>9}  {'share':>6}  {'crowd':>5}"]
    for name, count, crowds in zip(class_names, per_class, crowd, strict=True):
        lines.append(
            f"{name:<{width}}  {count:>9d}  {100 * count / total:>5.1f}%  {crowds:>5d}"
        )
    totals = f"{int(per_class.sum()):>9d}  {'':>6}  {int(crowd.sum()):>5d}"
    lines.append(f"{'total':<{width}}  {totals}")
    lines.append("")
    if per_image.size:
        lines.append(
            f"instances per image: mean {per_image.mean():.2f}, median "
            f"{np.median(per_image):g}, min {per_image.min()}, max {per_image.max()}; "
            f"{statistics['images_without_instances']} of {statistics['images']} "
            "images without instances"
        )
        counts = np.bincount(per_image)
        lines.append("instances  images")
        for count, images in enumerate(counts):
            if images:
                lines.append(f"{count:>9d}  {images:>6d}")
    return "\n".join(lines)
