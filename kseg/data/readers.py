"""Readers for the on-disk layouts of PASCAL VOC 2012, SBD-augmented VOC,
Cityscapes, ADE20K and a generic folder of image/label pairs.

Each reader checks that every listed image and label exists and returns a
`SegmentationDataset`; call `.as_dataset()` for a `tf.data.Dataset` of
`(image uint8 (H, W, 3), label uint8 (H, W))` pairs.
"""

from pathlib import Path

from kseg.data.dataset import SegmentationDataset
from kseg.data.labels import (
    ADE20K_CLASSES,
    CITYSCAPES_CLASSES,
    VOC_CLASSES,
    ade20k_label_map,
    cityscapes_label_map,
)
from kseg.data.palette import (
    ADE20K_PALETTE,
    CITYSCAPES_PALETTE,
    VOC_PALETTE,
    voc_colormap,
)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp")


def check_split_name(split):
    """`split` if it is a split's name: one file or folder name inside the
    dataset folder (`train`, `val2017`), never a path (`..`, `/` and `\\`
    would read outside the dataset folder, as split-file lines may not)."""
    if (
        not isinstance(split, str)
        or split.strip() in ("", ".", "..")
        or any(c in split for c in "/\\\0")
    ):
        raise ValueError(
            f"split {split!r} is not a split name: a split is one name inside "
            "the dataset folder (e.g. train or val2017), not a path"
        )
    return split


def _require_dir(path, what):
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{what} directory not found: {path}")
    return path


def _require_files(pairs, source):
    """Raises `FileNotFoundError` naming the first missing file of `pairs`."""
    missing = [p for pair in pairs for p in pair if not Path(p).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} file(s) listed by {source} are missing, first: "
            f"{missing[0]}"
        )
    if not pairs:
        raise ValueError(f"{source} lists no samples")


def _read_split_file(path, root, image_dir, label_dir, image_ext, label_ext):
    """Parses a split file into `(image, label)` pairs.

    A line is either a sample stem (`2007_000032`) or an image path and a label
    path relative to the dataset root (`/JPEGImages/x.jpg /SegmentationClassAug/
    x.png`, the DeepLab `train_aug.txt` form).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"split file not found: {path}; pass names=[...] to list samples "
            f"explicitly, or split=None to use every label in {label_dir}"
        )
    pairs = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        fields = line.split()
        if not fields or fields[0].startswith("#"):
            continue
        for field in fields:
            # Paths stay inside the dataset folder: DeepLab's leading "/" means
            # the dataset root, but ".." or a path into another folder does not.
            if ".." in Path(field).parts or (len(fields) == 1 and "/" in field):
                raise ValueError(
                    f"{path}:{number}: {field!r} points outside the dataset "
                    f"folder {root}; split files name samples inside it"
                )
        if len(fields) == 1:
            stem = fields[0]
            pairs.append(
                (image_dir / f"{stem}{image_ext}", label_dir / f"{stem}{label_ext}")
            )
        elif len(fields) == 2:
            pairs.append(tuple(root / field.lstrip("/") for field in fields))
        else:
            raise ValueError(
                f"{path}:{number}: expected a sample name or an image and a label "
                f"path, got {line!r}"
            )
    return pairs


def read_voc(
    root,
    split="train",
    *,
    names=None,
    split_file=None,
    image_dir="JPEGImages",
    label_dir="SegmentationClass",
    name="voc",
):
    """Reads PASCAL VOC 2012 segmentation (`VOCdevkit/VOC2012`).

    Labels are palette PNGs whose palette indices are the class ids (21
    classes, 255 = object boundary, ignored); they are decoded by index, never
    by colour.

    Args:
        root: the VOC2012 directory (holding `JPEGImages`, `SegmentationClass`,
            `ImageSets/Segmentation`).
        split: str or None. Reads `ImageSets/Segmentation/{split}.txt` (e.g.
            `"train"`, `"val"`, `"trainval"`). None takes every label PNG in
            `label_dir`. Defaults to `"train"`.
        names: optional list of sample stems; when given, no split file is read.
        split_file: optional path of the split file, replacing the default one.
        image_dir: str. Image folder under `root`. Defaults to `"JPEGImages"`.
        label_dir: str. Label folder under `root`. Defaults to
            `"SegmentationClass"`.
        name: str. Dataset name. Defaults to `"voc"`.

    Returns:
        `SegmentationDataset` with 21 classes.
    """
    root = _require_dir(root, "VOC root")
    images = _require_dir(root / image_dir, "VOC image")
    labels = _require_dir(root / label_dir, "VOC label")
    if names is not None:
        pairs = [(images / f"{n}.jpg", labels / f"{n}.png") for n in names]
        source = "names"
    elif split_file is not None:
        pairs = _read_split_file(split_file, root, images, labels, ".jpg", ".png")
        source = str(split_file)
    elif split is not None:
        path = root / "ImageSets" / "Segmentation" / f"{check_split_name(split)}.txt"
        pairs = _read_split_file(path, root, images, labels, ".jpg", ".png")
        source = str(path)
    else:
        stems = sorted(p.stem for p in labels.glob("*.png"))
        pairs = [(images / f"{s}.jpg", labels / f"{s}.png") for s in stems]
        source = f"the label folder {labels}"
    _require_files(pairs, source)
    return SegmentationDataset(
        name=name,
        num_classes=len(VOC_CLASSES),
        class_names=VOC_CLASSES,
        palette=VOC_PALETTE,
        pairs=pairs,
    )


def read_voc_aug(root, split="train_aug", *, names=None, split_file=None):
    """Reads VOC 2012 augmented with SBD ("SegmentationClassAug", 10,582 train).

    Same layout as `read_voc` but labels are grayscale index PNGs in
    `SegmentationClassAug` and the default split file is
    `ImageSets/Segmentation/train_aug.txt` (a list of stems, or of image/label
    path pairs as in DeepLab's list files).
    """
    return read_voc(
        root,
        split,
        names=names,
        split_file=split_file,
        label_dir="SegmentationClassAug",
        name="voc_aug",
    )


def read_cityscapes(root, split="train"):
    """Reads Cityscapes fine annotations mapped to the 19 train ids.

    Images are `leftImg8bit/{split}/{city}/*_leftImg8bit.png`, labels
    `gtFine/{split}/{city}/*_gtFine_labelIds.png`; label ids map to train ids by
    the official table, every other id to 255 (see
    `kseg.data.labels.CITYSCAPES_LABEL_ID_TO_TRAIN_ID`).

    Args:
        root: the Cityscapes directory holding `leftImg8bit` and `gtFine`.
        split: str. `"train"`, `"val"` or `"test"`. Defaults to `"train"`.

    Returns:
        `SegmentationDataset` with 19 classes.
    """
    root = _require_dir(root, "Cityscapes root")
    image_root = _require_dir(root / "leftImg8bit", "Cityscapes image")
    label_root = _require_dir(root / "gtFine", "Cityscapes label")
    split_dir = image_root / check_split_name(split)
    if not split_dir.is_dir():
        available = sorted(p.name for p in image_root.iterdir() if p.is_dir())
        raise FileNotFoundError(
            f"Cityscapes split directory not found: {split_dir} (available: "
            f"{', '.join(available) or 'none'})"
        )
    suffix = "_leftImg8bit.png"
    pairs = []
    for image in sorted(split_dir.glob(f"*/*{suffix}")):
        prefix = image.name[: -len(suffix)]
        label = label_root / split / image.parent.name / f"{prefix}_gtFine_labelIds.png"
        pairs.append((image, label))
    _require_files(pairs, f"the Cityscapes split folder {split_dir}")
    return SegmentationDataset(
        name="cityscapes",
        num_classes=len(CITYSCAPES_CLASSES),
        class_names=CITYSCAPES_CLASSES,
        palette=CITYSCAPES_PALETTE,
        pairs=pairs,
        label_map=cityscapes_label_map(),
    )


_ADE20K_SPLITS = {
    "training": "training",
    "train": "training",
    "validation": "validation",
    "val": "validation",
}


def read_ade20k(root, split="training"):
    """Reads ADE20K SceneParsing (`ADEChallengeData2016`), 150 classes.

    Images are `images/{split}/*.jpg`, labels `annotations/{split}/*.png`;
    annotation 0 ("other") becomes 255 and k becomes k − 1.

    Args:
        root: the `ADEChallengeData2016` directory, or a directory holding it.
        split: str. `"training"` or `"validation"` (`"train"` and `"val"` are
            accepted too). Defaults to `"training"`.

    Returns:
        `SegmentationDataset` with 150 classes.
    """
    if split not in _ADE20K_SPLITS:
        raise ValueError(
            f"ADE20K split must be one of {sorted(_ADE20K_SPLITS)}, got {split!r}"
        )
    split = _ADE20K_SPLITS[split]
    root = _require_dir(root, "ADE20K root")
    if (root / "ADEChallengeData2016").is_dir():
        root = root / "ADEChallengeData2016"
    images = _require_dir(root / "images" / split, "ADE20K image")
    labels = _require_dir(root / "annotations" / split, "ADE20K annotation")
    pairs = [(p, labels / f"{p.stem}.png") for p in sorted(images.glob("*.jpg"))]
    _require_files(pairs, f"the ADE20K image folder {images}")
    return SegmentationDataset(
        name="ade20k",
        num_classes=len(ADE20K_CLASSES),
        class_names=ADE20K_CLASSES,
        palette=ADE20K_PALETTE,
        pairs=pairs,
        label_map=ade20k_label_map(),
    )


def read_folder(
    image_dir,
    label_dir,
    num_classes,
    *,
    class_names=None,
    palette=None,
    label_suffix="",
    label_map=None,
    name="folder",
):
    """Reads a folder of images and a folder of label PNGs matched by file stem.

    Image `a.jpg` pairs with label `a{label_suffix}.png`. Every image needs a
    label and every label an image.

    Args:
        image_dir: folder of `.jpg`, `.jpeg`, `.png` or `.bmp` images.
        label_dir: folder of grayscale or palette index PNGs.
        num_classes: int. Number of classes.
        class_names: optional sequence of `num_classes` names. Defaults to
            `"class_0"`, `"class_1"`, ….
        palette: optional `(num_classes, 3)` colours. Defaults to the VOC
            colormap.
        label_suffix: str. Suffix of a label's stem after the image's stem, e.g.
            `"_mask"`. Defaults to `""`.
        label_map: optional 256-entry lookup table from stored values to classes.
        name: str. Dataset name. Defaults to `"folder"`.

    Returns:
        `SegmentationDataset`.
    """
    images = _require_dir(image_dir, "image")
    labels = _require_dir(label_dir, "label")
    by_stem = {}
    for path in sorted(images.iterdir()):
        if path.suffix.lower() not in IMAGE_EXTENSIONS:
            continue
        if path.stem in by_stem:
            raise ValueError(
                f"two images share the stem {path.stem!r}: {by_stem[path.stem]} "
                f"and {path}"
            )
        by_stem[path.stem] = path
    label_files = {p.name for p in labels.glob("*.png")}
    pairs = [
        (path, labels / f"{stem}{label_suffix}.png") for stem, path in by_stem.items()
    ]
    orphans = sorted(label_files - {label.name for _, label in pairs})
    if orphans:
        raise ValueError(
            f"{len(orphans)} label(s) in {labels} have no image in {images}, first: "
            f"{labels / orphans[0]}"
        )
    _require_files(pairs, f"the image folder {images}")
    return SegmentationDataset(
        name=name,
        num_classes=num_classes,
        class_names=class_names or tuple(f"class_{i}" for i in range(num_classes)),
        palette=voc_colormap(num_classes) if palette is None else palette,
        pairs=pairs,
        label_map=label_map,
    )
