"""Dataset descriptions: what a reader returns and what the converter consumes.

A kseg dataset knows its classes and palette, can load one sample as NumPy
arrays, and can stream all samples as a `tf.data.Dataset` of
`(image uint8 (H, W, 3), label uint8 (H, W))` pairs.
"""

import dataclasses
import re
import warnings
from pathlib import Path

import numpy as np
import tensorflow as tf

from kseg.data.labels import IGNORE_LABEL, check_labels
from kseg.data.png import decode_index_png, encode_rgb_png

_JPEG_MAGIC = b"\xff\xd8\xff"
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def decode_image(contents):
    """Decodes encoded image bytes (JPEG, PNG, BMP, GIF) to `uint8` `(H, W, 3)`.

    The one image decoder of kseg's input pipelines (files and TFRecords alike),
    so both give bit-identical pixels. Gray images are replicated to three
    channels, alpha is dropped.
    """
    image = tf.io.decode_image(contents, channels=3, expand_animations=False)
    image.set_shape([None, None, 3])
    return image


class DataError(ValueError):
    """A sample of a dataset that cannot be used; the message names the file.

    Raised inside `tf.data` pipelines it reaches the caller wrapped in a
    TensorFlow error; `data_error_message` gets the message back."""


_DATA_ERROR = re.compile(r"DataError: (.*?)(?:\n|$)")


def data_error_message(error):
    """The `DataError` message inside a TensorFlow error from a pipeline, or
    `None` when the error did not come from a bad sample."""
    match = _DATA_ERROR.search(str(error))
    return match.group(1).strip() if match else None


def load_image_file(path):
    """Reads and decodes one image file with `decode_image`, as uint8
    `(H, W, 3)` NumPy; a missing or undecodable file raises
    `FileNotFoundError` / `ValueError` naming it."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"image file not found: {path}") from None
    try:
        return decode_image(data).numpy()
    except tf.errors.InvalidArgumentError as error:
        # TensorFlow wraps the decoder's reason in op and device names.
        reason = re.sub(r"\{\{.*?\}\}|\[Op:\w+\]", "", error.message).strip()
        raise ValueError(
            f"{path}: not a decodable image ({reason}); replace or remove the "
            "file, or set data.skip_corrupt=true to skip bad samples"
        ) from None


def read_label(path, label_map=None):
    """Reads a label PNG as `uint8` `(H, W)` class indices.

    Args:
        path: str or Path of a grayscale or palette PNG (palette indices are the
            class ids, see `kseg.data.png`).
        label_map: optional 256-entry `uint8` lookup table applied to the raw
            values (e.g. Cityscapes labelId → trainId).
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"label file not found: {path}") from None
    label = decode_index_png(data, str(path))
    if label_map is not None:
        label = label_map[label]
    return label


def _check_metadata(name, num_classes, class_names, palette, label_map):
    if not 0 < num_classes <= IGNORE_LABEL:
        raise ValueError(
            f"{name}: num_classes must be in [1, {IGNORE_LABEL}], got {num_classes}"
        )
    if len(class_names) != num_classes:
        raise ValueError(
            f"{name}: {len(class_names)} class names for {num_classes} classes"
        )
    if palette.shape != (num_classes, 3):
        raise ValueError(
            f"{name}: palette must have shape ({num_classes}, 3), got {palette.shape}"
        )
    if label_map is not None and label_map.shape != (256,):
        raise ValueError(
            f"{name}: label_map must have 256 entries, got shape {label_map.shape}"
        )


def bad_sample(error, index, skipped, total, name, skip_corrupt):
    """What a pipeline does with sample `index` that failed to load (`error`).

    Without `skip_corrupt` it raises a `DataError` with the error's message
    (which names the file). With it, the sample is left out with a warning,
    unless every one of the `total` samples has failed (`skipped`, the set of
    bad indices met so far, is updated): then nothing would be left to read,
    and a `DataError` says so instead of the pipeline ending empty.
    """
    if not skip_corrupt:
        raise DataError(str(error)) from None
    skipped.add(index)
    if len(skipped) >= total:
        raise DataError(
            f"every one of the {total} samples of {name} is bad, so "
            f"data.skip_corrupt leaves nothing to read; the last one: {error}"
        ) from None
    warnings.warn(f"skipping a bad sample (data.skip_corrupt): {error}", stacklevel=2)


def validate_samples(self, progress=None):
    """Loads and checks every sample (`load`); returns the list of
    `(index, message)` of the bad ones. `progress(done, total)` is called
    after each sample."""
    problems = []
    for index in range(len(self)):
        try:
            self.load(index)
        except (OSError, ValueError) as error:
            problems.append((index, str(error)))
        if progress is not None:
            progress(index + 1, len(self))
    return problems


@dataclasses.dataclass(eq=False)
class SegmentationDataset:
    """A segmentation dataset on disk: image/label file pairs and class metadata.

    Attributes:
        name: str. Dataset name, e.g. `"voc"`.
        num_classes: int. Number of classes (labels are in `[0, num_classes)`
            or `IGNORE_LABEL`).
        class_names: tuple of `num_classes` str.
        palette: `uint8` array `(num_classes, 3)`, RGB colour per class.
        pairs: tuple of `(image_path, label_path)` str pairs.
        label_map: optional 256-entry `uint8` lookup table from the raw values
            stored in the label files to class indices.
    """

    name: str
    num_classes: int
    class_names: tuple
    palette: np.ndarray
    pairs: tuple
    label_map: np.ndarray | None = None

    def __post_init__(self):
        self.class_names = tuple(self.class_names)
        self.palette = np.asarray(self.palette, dtype=np.uint8)
        self.pairs = tuple((str(image), str(label)) for image, label in self.pairs)
        if self.label_map is not None:
            self.label_map = np.asarray(self.label_map, dtype=np.uint8)
        _check_metadata(
            self.name, self.num_classes, self.class_names, self.palette, self.label_map
        )

    def __len__(self):
        return len(self.pairs)

    @property
    def image_paths(self):
        return tuple(image for image, _ in self.pairs)

    @property
    def label_paths(self):
        return tuple(label for _, label in self.pairs)

    def describe(self, index):
        """The label file of sample `index`, as named in error messages."""
        return self.pairs[index][1]

    def sample_name(self, index):
        """The file stem of sample `index`'s image."""
        return Path(self.pairs[index][0]).stem

    def load_label(self, index):
        """Sample `index`'s label, `uint8` `(H, W)` class indices."""
        return read_label(self.pairs[index][1], self.label_map)

    def load(self, index):
        """Sample `index` as NumPy `(image uint8 (H, W, 3), label uint8 (H, W))`,
        checked: a file that is missing or does not decode, an image and label
        of different sizes, or label values outside `[0, num_classes)` other
        than the ignore label raise `ValueError` / `FileNotFoundError` naming
        the file and the fix."""
        image_path, label_path = self.pairs[index]
        image = load_image_file(image_path)
        label = self.load_label(index)
        _check_same_size(image, label, image_path, label_path)
        check_labels(label, self.num_classes, label_path)
        return image, label

    validate = validate_samples

    def encoded_image(self, index):
        """Sample `index`'s image as `(encoded bytes, "jpeg" | "png")`.

        JPEG and PNG files are passed through untouched (no re-encoding loss);
        other formats are re-encoded as PNG.
        """
        data = Path(self.pairs[index][0]).read_bytes()
        if data.startswith(_JPEG_MAGIC):
            return data, "jpeg"
        if data.startswith(_PNG_MAGIC):
            return data, "png"
        image = decode_image(data).numpy()
        return encode_rgb_png(image), "png"

    def as_dataset(
        self,
        shuffle=False,
        seed=None,
        num_parallel_calls=tf.data.AUTOTUNE,
        skip_corrupt=False,
    ):
        """Streams the samples as a `tf.data.Dataset` of `(image, label)` pairs.

        Each sample goes through `load` (decoded by `decode_image`, checked),
        so a bad file stops the pipeline with an error naming it, or, with
        `skip_corrupt=True`, is left out with a warning naming it.

        Args:
            shuffle: bool. Shuffle the file list (all of it, reshuffled each
                epoch) before decoding. Defaults to False.
            seed: optional int seed for the shuffle.
            num_parallel_calls: parallelism of decoding. Defaults to AUTOTUNE.
            skip_corrupt: bool. Skip bad samples with a warning instead of
                failing. Defaults to False.

        Returns:
            `tf.data.Dataset` of `(uint8 (H, W, 3), uint8 (H, W))`.
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
                image, label = self.load(index)
            except (OSError, ValueError) as error:
                bad_sample(error, index, skipped, len(self), self.name, skip_corrupt)
                return np.zeros((0, 0, 3), np.uint8), np.zeros((0, 0), np.uint8), False
            return image, label, True

        def load(index):
            image, label, ok = tf.py_function(
                load_checked, [index], (tf.uint8, tf.uint8, tf.bool)
            )
            image.set_shape([None, None, 3])
            label.set_shape([None, None])
            return image, label, ok

        samples = indices.map(load, num_parallel_calls=num_parallel_calls)
        if skip_corrupt:
            samples = samples.filter(lambda image, label, ok: ok)
        return samples.map(lambda image, label, ok: (image, label))


@dataclasses.dataclass(eq=False)
class ArraySegmentationDataset:
    """A segmentation dataset held in memory (e.g. the synthetic one).

    Attributes:
        name: str. Dataset name.
        num_classes: int. Number of classes.
        class_names: tuple of `num_classes` str.
        palette: `uint8` array `(num_classes, 3)`.
        images: `uint8` array `(N, H, W, 3)`.
        labels: `uint8` array `(N, H, W)`.
        names: tuple of N sample names.
    """

    name: str
    num_classes: int
    class_names: tuple
    palette: np.ndarray
    images: np.ndarray
    labels: np.ndarray
    names: tuple

    def __post_init__(self):
        self.class_names = tuple(self.class_names)
        self.palette = np.asarray(self.palette, dtype=np.uint8)
        self.names = tuple(str(n) for n in self.names)
        _check_metadata(
            self.name, self.num_classes, self.class_names, self.palette, None
        )
        if self.images.dtype != np.uint8 or self.images.ndim != 4:
            raise ValueError(
                f"{self.name}: images must be uint8 (N, H, W, 3), got "
                f"{self.images.dtype} {self.images.shape}"
            )
        if self.labels.dtype != np.uint8 or self.labels.shape != self.images.shape[:3]:
            raise ValueError(
                f"{self.name}: labels must be uint8 {self.images.shape[:3]}, got "
                f"{self.labels.dtype} {self.labels.shape}"
            )
        if len(self.names) != len(self.images):
            raise ValueError(
                f"{self.name}: {len(self.names)} names for {len(self.images)} images"
            )

    def __len__(self):
        return len(self.images)

    def describe(self, index):
        return f"{self.name}[{index}] ({self.names[index]})"

    def sample_name(self, index):
        return self.names[index]

    def load_label(self, index):
        return self.labels[index]

    def load(self, index):
        return self.images[index], self.labels[index]

    def encoded_image(self, index):
        return encode_rgb_png(self.images[index]), "png"

    validate = validate_samples

    def as_dataset(self, shuffle=False, seed=None):
        """Streams the arrays as a `tf.data.Dataset` of `(image, label)` pairs."""
        dataset = tf.data.Dataset.from_tensor_slices((self.images, self.labels))
        if shuffle:
            dataset = dataset.shuffle(
                len(self), seed=seed, reshuffle_each_iteration=True
            )
        return dataset


def _check_same_size(image, label, image_path, label_path):
    if image.shape[:2] != label.shape:
        raise ValueError(
            f"image {image_path} is {image.shape[0]}x{image.shape[1]} but label "
            f"{label_path} is {label.shape[0]}x{label.shape[1]}"
        )
