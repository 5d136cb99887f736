"""kseg: segmentation layers, models, training recipes and export for Keras 3."""

__version__ = "0.1.0"

from kseg.allocator import tune_cpu_allocator as tune_cpu_allocator
