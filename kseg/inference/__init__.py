"""Inference: prediction with test-time augmentation and sliding windows,
label-map colouring and overlays, and the `kseg predict` command.

The names load on first use (PEP 562), so that the command line can build
its parser without importing TensorFlow.
"""

from kseg.lazy import lazy_exports

_EXPORTS = {
    "register": "kseg.inference.commands",
    "PAN_TTA_SCALES": "kseg.inference.defaults",
    "Prediction": "kseg.inference.predict",
    "predict": "kseg.inference.predict",
    "predict_tiled": "kseg.inference.predict",
    "sliding_windows": "kseg.inference.predict",
    "open_model": "kseg.inference.sources",
    "Instances": "kseg.inference.instance_predict",
    "predict_instances": "kseg.inference.instance_predict",
    "paste_masks": "kseg.data.instance_transform",
    "PALETTES": "kseg.inference.visualize",
    "colorize": "kseg.inference.visualize",
    "get_palette": "kseg.inference.visualize",
    "overlay": "kseg.inference.visualize",
    "overlay_with_legend": "kseg.inference.visualize",
    "draw_instances": "kseg.inference.instance_outputs",
    "class_names": "kseg.inference.names",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
