"""Training objectives and evaluation metrics for kseg's segmentation models.

The names load on first use, so that `kseg.training.recipe_files` (used by
`kseg recipes`) imports without Keras.
"""

from kseg.lazy import lazy_exports

__getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "SegmentationConfusionMatrix": "kseg.training.metrics",
        "SegmentationCrossEntropy": "kseg.training.losses",
        "SegmentationMeanIoU": "kseg.training.metrics",
        "SegmentationPixelAccuracy": "kseg.training.metrics",
        "format_iou_table": "kseg.training.metrics",
        "segmentation_losses": "kseg.training.losses",
    },
)

__all__ = [
    "SegmentationConfusionMatrix",
    "SegmentationCrossEntropy",
    "SegmentationMeanIoU",
    "SegmentationPixelAccuracy",
    "format_iou_table",
    "segmentation_losses",
]
