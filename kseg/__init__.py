"""kseg: segmentation layers, models, training recipes and export for Keras 3."""

__version__ = "0.1.0"

from kseg.allocator import tune_cpu_allocator as tune_cpu_allocator
from kseg.console import quiet_tensorflow_when_imported
from kseg.registration import register_when_keras_loads

# TensorFlow's C++ start-up lines (CUDA probing, cuInit, CPU banner) stay
# out of the output of programs that use kseg (see kseg.console).
quiet_tensorflow_when_imported()
# `keras.saving.load_model` finds kseg's classes (see kseg.registration).
register_when_keras_loads()
