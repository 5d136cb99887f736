"""Segmentation data: dataset readers, the synthetic shapes dataset, TFRecords,
paired augmentation, label checks and palettes.

Every pipeline yields `(image uint8 (H, W, 3), label uint8 (H, W))` pairs whose
labels are class indices with `IGNORE_LABEL` (255) for ignored pixels.
`preprocess_images` turns images into the model input (float32 RGB in 0–255),
the one preprocessing step shared by training, inference and export.
"""

from kseg.data.augment import (
    IMAGENET_MEAN,
    augment,
    augment_dataset,
    eval_transform,
)
from kseg.data.dataset import (
    ArraySegmentationDataset,
    SegmentationDataset,
    decode_image,
    read_label,
)
from kseg.data.labels import (
    ADE20K_CLASSES,
    CITYSCAPES_CLASSES,
    CITYSCAPES_LABEL_ID_TO_TRAIN_ID,
    IGNORE_LABEL,
    VOC_CLASSES,
    ade20k_label_map,
    check_labels,
    cityscapes_label_map,
    class_histogram,
    format_class_histogram,
    validate_dataset,
)
from kseg.data.palette import (
    ADE20K_PALETTE,
    CITYSCAPES_PALETTE,
    IGNORE_COLOR,
    VOC_PALETTE,
    colorize,
    voc_colormap,
)
from kseg.data.png import decode_index_png, encode_index_png
from kseg.data.preprocessing import preprocess_images
from kseg.data.readers import (
    read_ade20k,
    read_cityscapes,
    read_folder,
    read_voc,
    read_voc_aug,
)
from kseg.data.synthetic import (
    SYNTHETIC_CLASSES,
    SYNTHETIC_PALETTE,
    SyntheticDataset,
    make_synthetic,
    synthetic_dataset,
)
from kseg.data.tfrecord import convert_to_tfrecord, read_tfrecord, shard_paths

__all__ = [
    "ADE20K_CLASSES",
    "ADE20K_PALETTE",
    "CITYSCAPES_CLASSES",
    "CITYSCAPES_LABEL_ID_TO_TRAIN_ID",
    "CITYSCAPES_PALETTE",
    "IGNORE_COLOR",
    "IGNORE_LABEL",
    "IMAGENET_MEAN",
    "SYNTHETIC_CLASSES",
    "SYNTHETIC_PALETTE",
    "VOC_CLASSES",
    "VOC_PALETTE",
    "ArraySegmentationDataset",
    "SegmentationDataset",
    "SyntheticDataset",
    "ade20k_label_map",
    "augment",
    "augment_dataset",
    "check_labels",
    "cityscapes_label_map",
    "class_histogram",
    "colorize",
    "convert_to_tfrecord",
    "decode_image",
    "decode_index_png",
    "encode_index_png",
    "eval_transform",
    "format_class_histogram",
    "make_synthetic",
    "preprocess_images",
    "read_ade20k",
    "read_cityscapes",
    "read_folder",
    "read_label",
    "read_tfrecord",
    "read_voc",
    "read_voc_aug",
    "shard_paths",
    "synthetic_dataset",
    "validate_dataset",
    "voc_colormap",
]
