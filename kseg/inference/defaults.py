"""Inference settings shared by the library and the command line (no
TensorFlow import, so `kseg --help` stays fast)."""

# Evaluation scales of PAN (Li et al., BMVC 2018, Sec. 4.2 / Table 5, "MS").
PAN_TTA_SCALES = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)

# The largest test scale `predict` and `kseg predict` take: each run's image
# (or window) is enlarged at most 16× in pixels (`--scales 60` on a 64² image
# was a 3840² run and a crash).
MAX_TEST_SCALE = 4.0

# The score below which `kseg predict` and `predict_instances` leave a
# detection out by default: a threshold for looking at results (COCO
# evaluation wants every detection: 0).
DEFAULT_SCORE_THRESHOLD = 0.5

# The weight of the label colours in a semantic overlay (`kseg predict
# --overlay`, `kseg.inference.overlay`).
DEFAULT_ALPHA = 0.7
