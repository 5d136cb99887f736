"""Inference: prediction with test-time augmentation and sliding windows,
label-map colouring and overlays, and the `kseg predict` command.

One re-export per line (`name as name` marks it public for linters).
"""

from kseg.inference.commands import register as register
from kseg.inference.predict import PAN_TTA_SCALES as PAN_TTA_SCALES
from kseg.inference.predict import Prediction as Prediction
from kseg.inference.predict import predict as predict
from kseg.inference.predict import sliding_windows as sliding_windows
from kseg.inference.visualize import PALETTES as PALETTES
from kseg.inference.visualize import colorize as colorize
from kseg.inference.visualize import get_palette as get_palette
from kseg.inference.visualize import overlay as overlay
