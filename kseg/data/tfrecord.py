"""TFRecord conversion of a kseg dataset, and the matching reader.

Each example stores the encoded image as found on disk (JPEG or PNG bytes,
passed through without re-encoding), the label as an 8-bit grayscale PNG of
class indices (already mapped to train ids), the image size and the sample
name. Shards are named `{out_path}-00000-of-00004` and hold consecutive samples,
so reading them in order gives back the dataset's order.
"""

import os
import sys
from pathlib import Path

import tensorflow as tf

from kseg.data.dataset import bad_sample, decode_image
from kseg.data.png import encode_index_png

_FEATURES = {
    "image/encoded": tf.io.FixedLenFeature([], tf.string),
    "image/format": tf.io.FixedLenFeature([], tf.string),
    "image/height": tf.io.FixedLenFeature([], tf.int64),
    "image/width": tf.io.FixedLenFeature([], tf.int64),
    "image/name": tf.io.FixedLenFeature([], tf.string),
    "label/encoded": tf.io.FixedLenFeature([], tf.string),
}


def shard_paths(out_path, num_shards):
    """The file names `convert_to_tfrecord` writes for `num_shards` shards."""
    return [f"{out_path}-{i:05d}-of-{num_shards:05d}" for i in range(num_shards)]


def _bytes(value):
    return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))


def _int(value):
    return tf.train.Feature(int64_list=tf.train.Int64List(value=[value]))


def _example(dataset, index):
    # `load` decodes the image and checks the label (values, size), so a
    # corrupt file stops the conversion with its name instead of being
    # copied into the records.
    image, label = dataset.load(index)
    height, width = image.shape[:2]
    data, image_format = dataset.encoded_image(index)
    features = {
        "image/encoded": _bytes(data),
        "image/format": _bytes(image_format.encode()),
        "image/height": _int(height),
        "image/width": _int(width),
        "image/name": _bytes(dataset.sample_name(index).encode()),
        "label/encoded": _bytes(encode_index_png(label)),
    }
    return tf.train.Example(features=tf.train.Features(feature=features))


def _text_progress(done, total):
    width = 30
    filled = width * done // total
    bar = f"[{'=' * filled}{'.' * (width - filled)}] {done}/{total}"
    if sys.stderr.isatty():
        sys.stderr.write(f"\r{bar}" + ("\n" if done == total else ""))
    elif done == total:
        # Redrawn with carriage returns, the bar would fill a log file.
        sys.stderr.write(f"{bar}\n")
    sys.stderr.flush()


def convert_to_tfrecord(
    dataset, out_path, num_shards=1, progress=None, skip_corrupt=False
):
    """Writes a kseg dataset to sharded TFRecord files.

    Existing files are never overwritten. Every shard is written under a
    temporary name and renamed when complete, so an interrupted run leaves no
    half-written shard behind under the final name.

    Args:
        dataset: a `SegmentationDataset` or `ArraySegmentationDataset`.
        out_path: path prefix of the shards (parent folders are created).
        num_shards: int. Number of shards, between 1 and `len(dataset)`.
            Defaults to 1.
        progress: None, True (a text progress bar on stderr) or a callable
            `progress(done, total)` called after each sample.
        skip_corrupt: bool. Leave out samples that fail to load (a file that
            does not decode, a bad label), with a warning naming each,
            instead of stopping at the first. Defaults to False.

    Returns:
        The list of written shard paths.

    Raises:
        FileExistsError: naming the first shard that already exists.
    """
    total = len(dataset)
    if total == 0:
        raise ValueError(f"{dataset.name}: the dataset is empty")
    if not isinstance(num_shards, int) or not 1 <= num_shards <= total:
        raise ValueError(
            f"num_shards must be an int in [1, {total}] (the number of samples), "
            f"got {num_shards}"
        )
    if progress is True:
        progress = _text_progress
    paths = shard_paths(out_path, num_shards)
    for path in paths:
        if os.path.exists(path):
            raise FileExistsError(f"refusing to overwrite existing file: {path}")
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    done, skipped = 0, set()
    for shard, path in enumerate(paths):
        begin, end = shard * total // num_shards, (shard + 1) * total // num_shards
        partial = f"{path}.partial"
        try:
            with tf.io.TFRecordWriter(partial) as writer:
                for index in range(begin, end):
                    try:
                        example = _example(dataset, index)
                    except (OSError, ValueError) as error:
                        if not skip_corrupt:
                            raise
                        # Warns, or raises once every sample has failed.
                        bad_sample(
                            error, index, skipped, total, dataset.name, skip_corrupt
                        )
                    else:
                        writer.write(example.SerializeToString())
                    done += 1
                    if progress is not None:
                        progress(done, total)
        except BaseException:
            Path(partial).unlink(missing_ok=True)
            raise
        os.replace(partial, path)
    return paths


def _parse(record):
    example = tf.io.parse_single_example(record, _FEATURES)
    image = decode_image(example["image/encoded"])
    label = tf.io.decode_png(example["label/encoded"], channels=1)[..., 0]
    size = tf.cast(
        tf.stack([example["image/height"], example["image/width"]]), tf.int32
    )
    check = tf.debugging.Assert(
        tf.reduce_all((tf.shape(image)[:2] == size) & (tf.shape(label) == size)),
        ["TFRecord example with inconsistent sizes:", example["image/name"], size],
    )
    with tf.control_dependencies([check]):
        return tf.identity(image), tf.identity(label)


def count_records(files):
    """The number of records in TFRecord `files`, reading each in full.

    Raises:
        ValueError: naming the file, for a truncated or damaged one (which
            TensorFlow reports as a `DataLossError` naming no file).
    """
    total = 0
    for path in files:
        try:
            total += sum(1 for _ in tf.data.TFRecordDataset(str(path)))
        except tf.errors.DataLossError as error:
            raise ValueError(
                f"{path}: damaged TFRecord file ({error.message.splitlines()[0]}); "
                "it was cut short or changed after writing: write it again with "
                "kseg data convert"
            ) from None
    return total


def read_tfrecord(pattern, num_parallel_calls=tf.data.AUTOTUNE):
    """Reads TFRecords written by `convert_to_tfrecord`.

    Args:
        pattern: a glob pattern, a list of files, or the `out_path` given to
            `convert_to_tfrecord` (then all of its shards are read).
        num_parallel_calls: decoding parallelism. Defaults to AUTOTUNE.

    Returns:
        `tf.data.Dataset` of `(image uint8 (H, W, 3), label uint8 (H, W))`,
        in the order written when the files sort in shard order.
    """
    if isinstance(pattern, (list, tuple)):
        files = [str(p) for p in pattern]
        missing = [f for f in files if not os.path.exists(f)]
        if missing:
            raise FileNotFoundError(f"TFRecord file not found: {missing[0]}")
    else:
        pattern = str(pattern)
        files = sorted(tf.io.gfile.glob(pattern)) or sorted(
            tf.io.gfile.glob(f"{pattern}-?????-of-?????")
        )
    if not files:
        raise FileNotFoundError(f"no TFRecord files match {pattern}")
    records = tf.data.TFRecordDataset(files)
    return records.map(_parse, num_parallel_calls=num_parallel_calls)
