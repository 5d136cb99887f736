"""Training objectives and evaluation metrics for kseg's segmentation models."""

from kseg.training.losses import SegmentationCrossEntropy, segmentation_losses
from kseg.training.metrics import (
    SegmentationConfusionMatrix,
    SegmentationMeanIoU,
    SegmentationPixelAccuracy,
    format_iou_table,
)

__all__ = [
    "SegmentationConfusionMatrix",
    "SegmentationCrossEntropy",
    "SegmentationMeanIoU",
    "SegmentationPixelAccuracy",
    "format_iou_table",
    "segmentation_losses",
]
