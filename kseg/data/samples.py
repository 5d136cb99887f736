"""A few samples of a dataset written as ordinary image files, to run
`kseg predict` on (`kseg data images`): after training on kseg's synthetic
scenes a user has no photos of the kind the model knows; the held-out split's
first scenes are exactly that."""

import re
from pathlib import Path

import numpy as np
import tensorflow as tf

from kseg.files import write_bytes

FORMATS = ("jpg", "png")


def _image(dataset, index):
    """Sample `index`'s RGB image (`uint8 (H, W, 3)`) of a semantic or an
    instance dataset."""
    if hasattr(dataset, "load_image"):  # instance datasets
        return dataset.load_image(index)
    return dataset.load(index)[0]


def _file_stem(dataset, index):
    """A file name for sample `index`: its own name, reduced to characters
    that are safe in any file system (never a path)."""
    if hasattr(dataset, "sample_name"):
        name = dataset.sample_name(index)
    else:
        name = Path(str(dataset.images[index]["file_name"])).stem
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._")
    return name or f"sample-{index:05d}"


def encode_image(image, image_format):
    """`uint8 (H, W, 3)` RGB as JPEG (quality 95, full-resolution colour) or PNG
    bytes."""
    if image_format == "jpg":
        return tf.io.encode_jpeg(image, quality=95, chroma_downsampling=False).numpy()
    if image_format == "png":
        return tf.io.encode_png(image).numpy()
    raise ValueError(f"image format must be one of {FORMATS}, got {image_format!r}")


def write_sample_images(dataset, out, count=4, image_format="jpg"):
    """Writes the first `count` images of `dataset` to the folder `out` as
    `<sample name>.<jpg|png>`.

    Args:
        dataset: a semantic (`SegmentationDataset`, the synthetic scenes) or an
            instance dataset (`InstanceDataset`).
        out: folder; created if missing. An existing file is never
            overwritten: a name already present raises `FileExistsError`
            before anything is written.
        count: int >= 1; at most the dataset's size is written.
        image_format: `"jpg"` or `"png"`.

    Returns:
        The paths written, in sample order.
    """
    if image_format not in FORMATS:
        raise ValueError(f"image format must be one of {FORMATS}, got {image_format!r}")
    if isinstance(count, bool) or not isinstance(count, int | np.integer) or count < 1:
        raise ValueError(f"the number of images must be an integer >= 1, got {count!r}")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a folder; give a folder")
    indices = range(min(int(count), len(dataset)))
    paths = [out / f"{_file_stem(dataset, i)}.{image_format}" for i in indices]
    if len(set(paths)) != len(paths):
        # Samples of the same name: number them instead.
        paths = [out / f"sample-{i:05d}.{image_format}" for i in indices]
    existing = [str(path) for path in paths if path.exists()]
    if existing:
        raise FileExistsError(
            f"{existing[0]} already exists ({len(existing)} of the {len(paths)} "
            "files to write do); kseg never overwrites a file: give a new or "
            "empty --out folder"
        )
    out.mkdir(parents=True, exist_ok=True)
    for index, path in zip(indices, paths, strict=True):
        image = np.asarray(_image(dataset, index), np.uint8)
        write_bytes(path, encode_image(image, image_format), overwrite=False)
    return paths
