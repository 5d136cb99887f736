"""Segmentation data: dataset readers, the synthetic shapes dataset, TFRecords,
paired augmentation, label checks and palettes; instance datasets (COCO,
Cityscapes instances, synthetic instance scenes) and their `tf.data` pipelines.

Every semantic pipeline yields `(image uint8 (H, W, 3), label uint8 (H, W))`
pairs whose labels are class indices with `IGNORE_LABEL` (255) for ignored
pixels; the instance pipelines are described in `kseg.data.instance_pipeline`.
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
    DataError,
    SegmentationDataset,
    data_error_message,
    decode_image,
    load_image_file,
    read_label,
)
from kseg.data.instance_pipeline import (
    augment_instances,
    crop_instance_mask,
    crop_masks_to_boxes,
    instance_eval_pipeline,
    instance_eval_transform,
    instance_targets,
    instance_train_pipeline,
)
from kseg.data.instance_transform import paste_masks
from kseg.data.instances import (
    CITYSCAPES_INSTANCE_CATEGORIES,
    CityscapesInstanceDataset,
    CocoInstanceDataset,
    InstanceDataset,
    boxes_from_masks,
    decode_segmentation,
    encode_mask,
    format_instance_statistics,
    instance_statistics,
    read_cityscapes_instances,
    read_coco,
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
from kseg.data.png import decode_index_png, encode_index_png, encode_rgb_png
from kseg.data.preprocessing import preprocess_images
from kseg.data.readers import (
    check_split_name,
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
from kseg.data.synthetic_instances import (
    SYNTHETIC_INSTANCE_CLASSES,
    SyntheticInstanceDataset,
    make_synthetic_instances,
)
from kseg.data.tfrecord import (
    convert_to_tfrecord,
    count_records,
    read_tfrecord,
    shard_paths,
)

__all__ = [
    "ADE20K_CLASSES",
    "ADE20K_PALETTE",
    "CITYSCAPES_CLASSES",
    "CITYSCAPES_INSTANCE_CATEGORIES",
    "CITYSCAPES_LABEL_ID_TO_TRAIN_ID",
    "CITYSCAPES_PALETTE",
    "IGNORE_COLOR",
    "IGNORE_LABEL",
    "IMAGENET_MEAN",
    "SYNTHETIC_CLASSES",
    "SYNTHETIC_INSTANCE_CLASSES",
    "SYNTHETIC_PALETTE",
    "VOC_CLASSES",
    "VOC_PALETTE",
    "ArraySegmentationDataset",
    "CityscapesInstanceDataset",
    "CocoInstanceDataset",
    "InstanceDataset",
    "SegmentationDataset",
    "SyntheticDataset",
    "SyntheticInstanceDataset",
    "ade20k_label_map",
    "augment",
    "augment_dataset",
    "augment_instances",
    "boxes_from_masks",
    "check_labels",
    "check_split_name",
    "cityscapes_label_map",
    "class_histogram",
    "colorize",
    "convert_to_tfrecord",
    "count_records",
    "crop_instance_mask",
    "paste_masks",
    "crop_masks_to_boxes",
    "decode_image",
    "decode_index_png",
    "decode_segmentation",
    "encode_index_png",
    "encode_mask",
    "encode_rgb_png",
    "eval_transform",
    "format_class_histogram",
    "format_instance_statistics",
    "instance_eval_pipeline",
    "instance_eval_transform",
    "instance_statistics",
    "instance_targets",
    "instance_train_pipeline",
    "make_synthetic",
    "make_synthetic_instances",
    "preprocess_images",
    "read_ade20k",
    "read_cityscapes",
    "read_cityscapes_instances",
    "read_coco",
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
