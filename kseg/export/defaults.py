"""Export settings shared by the library and the command line (no
TensorFlow import, so `kseg --help` stays fast)."""

QUANTIZATIONS = ("float32", "float16", "int8")
DEFAULT_CALIBRATION_IMAGES = 100
# The most pixels (N·H·W) one request to an exported SavedModel may hold:
# 16 megapixels. Larger requests get an InvalidArgument error naming the cap
# instead of exhausting the server's memory.
DEFAULT_MAX_PIXELS = 16 * 1024 * 1024
