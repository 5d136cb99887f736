"""Test-time augmentation within `--max-pixels`: the largest scaled run, not
only the image, decides whole-image or windowed prediction, and test scales
are bounded."""

import argparse
import sys

import cv2
import keras
import numpy as np
import pytest

from kseg.inference import PAN_TTA_SCALES, predict, register

# `kseg.inference.predict` names the function once it is read through the
# package (importing the submodule by name first would leave the module
# there for other tests).
predict_module = sys.modules[predict.__module__]


def _parse(argv):
    parser = argparse.ArgumentParser(prog="kseg")
    register(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    inputs = keras.Input((None, None, 3))
    logits = keras.layers.Conv2D(3, 3, padding="same")(inputs / 255.0)
    path = tmp_path_factory.mktemp("model") / "tiny.keras"
    keras.Model(inputs, {"logits": logits}).save(path)
    return path


@pytest.fixture
def model_runs(monkeypatch):
    """The sizes of the model runs of `kseg predict`: `predict`'s
    `_forward`, through which every run (whole or by windows) goes."""
    sizes = []
    forward = predict_module._forward

    def recording(model, batch):
        sizes.append(batch.shape[1:3])
        return forward(model, batch)

    monkeypatch.setattr(predict_module, "_forward", recording)
    return sizes


def test_tta_runs_stay_within_max_pixels(model_path, tmp_path, model_runs):
    # 300² fits --max-pixels 100000, but --tta's 1.75 made a 525² run
    # (275625 pixels) of the whole image; at 1 MP (the default cap) that
    # was a 3.2 MP run, 5.9 GB. Now it runs by windows of 180² (315² at
    # 1.75).
    image = np.random.default_rng(0).integers(0, 256, (300, 300, 3), np.uint8)
    cv2.imwrite(str(tmp_path / "image.png"), image)
    args = _parse(
        ["predict", str(model_path), str(tmp_path / "image.png"),
         "--out", str(tmp_path / "out"), "--tta", "--max-pixels", "100000"]
    )  # fmt: skip
    assert args.func(args) == 0
    assert max(h * w for h, w in model_runs) <= 100_000
    assert (315, 315) in model_runs
    # An image whose largest run fits still runs whole: the same class map
    # as `predict`.
    model_runs.clear()
    args = _parse(
        ["predict", str(model_path), str(tmp_path / "image.png"), "--out",
         str(tmp_path / "whole"), "--tta", "--max-pixels", str(525 * 525)]
    )  # fmt: skip
    assert args.func(args) == 0
    assert max(h * w for h, w in model_runs) == 525 * 525


def test_default_window_shrinks_with_the_largest_scale():
    from kseg.inference.commands import DEFAULT_TILE, MIN_TILE, _default_tile

    assert _default_tile(1 << 20, max(PAN_TTA_SCALES)) == (DEFAULT_TILE,) * 2
    side = _default_tile(1 << 20, 4.0)[0]
    assert (4 * side) ** 2 <= 1 << 20 < (4 * (side + 1)) ** 2
    assert _default_tile(100, 4.0) == (MIN_TILE, MIN_TILE)


@pytest.mark.parametrize("scales", [(60.0,), (1.0, 4.5), (float("nan"),), (0.0,)])
def test_scales_beyond_the_limit_are_refused(model_path, scales):
    # Before: --scales 60 on a 64² image ran a 3840² image (9.4 GB, SIGSEGV).
    model = keras.saving.load_model(model_path)
    with pytest.raises(ValueError, match=r"scales must be .* \(0, 4\]"):
        predict(model, np.zeros((64, 64, 3), np.uint8), scales=scales)
    with pytest.raises(SystemExit) as error:
        _parse(["predict", "m.keras", "a.png", "--out", "o", "--scales",
                *map(str, scales)])  # fmt: skip
    assert error.value.code == 2
    assert predict(model, np.zeros((8, 8, 3), np.uint8), scales=(4.0,))
