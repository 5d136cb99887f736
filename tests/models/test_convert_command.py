"""`kseg convert torchvision`: the fixture's torchvision-layout model (see
`tests/models/test_torchvision_weights.py`) widened to COCO's 91 classes,
converted through the command line, then `kseg predict` on it."""

import json
from pathlib import Path

import numpy as np
import pytest

from kseg.cli import main
from kseg.models import load_model

DATA = Path(__file__).parent / "data"
SIZE = 128


def coco_sized_state(path):
    """The fixture's state dict with 91 classes: the new classes' logits at
    -30 (their softmax share < 1e-12), zero box deltas and masks, so the
    detections are the fixture's, with classes 1..4 (COCO's person, bicycle,
    car, motorcycle)."""
    with np.load(DATA / "torchvision_tiny.npz") as data:
        state = {name: data[name] for name in data.files}

    def widen(name, rows, fill=0.0):
        value = state[name]
        extra = np.full((rows - value.shape[0], *value.shape[1:]), fill, "float32")
        state[name] = np.concatenate([value, extra])

    widen("roi_heads.box_predictor.cls_score.weight", 91)
    widen("roi_heads.box_predictor.cls_score.bias", 91, -30.0)
    widen("roi_heads.box_predictor.bbox_pred.weight", 364)
    widen("roi_heads.box_predictor.bbox_pred.bias", 364)
    widen("roi_heads.mask_predictor.mask_fcn_logits.weight", 91)
    widen("roi_heads.mask_predictor.mask_fcn_logits.bias", 91)
    np.savez(path, **state)
    return path


def convert(tmp_path, *extra):
    source = coco_sized_state(tmp_path / "maskrcnn.npz")
    out = tmp_path / "coco.keras"
    args = ["convert", "torchvision", str(source), "--out", str(out)]
    return main([*args, "--image-size", str(SIZE), str(SIZE), *extra]), out


def test_convert_writes_the_model_and_coco_categories(tmp_path, capsys):
    status, out = convert(tmp_path)
    assert status == 0, capsys.readouterr().err
    categories = json.loads((tmp_path / "coco.categories.json").read_text())
    assert len(categories) == 90
    assert categories[0] == {"id": 1, "name": "person"}
    assert categories[2] == {"id": 3, "name": "car"}
    model = load_model(out)
    assert model.num_classes == 90 and model.image_size == (SIZE, SIZE)
    assert model.rpn_per_level_nms and not model.aligned_roi_align
    reference = np.load(DATA / "torchvision_tiny_outputs.npz")
    output = model(reference["image"][None].astype("float32"), training=False)
    np.testing.assert_array_equal(np.asarray(output["classes"])[0], reference["labels"])
    np.testing.assert_allclose(
        np.asarray(output["scores"])[0], reference["scores"], atol=1e-4
    )

    # Never overwrites: the model or its categories file.
    status = main(["convert", "torchvision", str(tmp_path / "maskrcnn.npz"),
                   "--out", str(out), "--image-size", "128", "128"])  # fmt: skip
    assert status == 1
    assert "already exists" in capsys.readouterr().err


def test_convert_refuses_bad_arguments(tmp_path, capsys):
    source = tmp_path / "x.npz"
    np.savez(source, a=np.zeros(1))
    for args, message in (
        (["--out", str(tmp_path / "m.h5")], "must end in .keras"),
        (["--out", str(tmp_path / "m.keras"), "--image-size", "100", "128"],
         "multiples of 64"),
        (["--out", str(tmp_path / "m.keras")], "missing key"),
    ):  # fmt: skip
        assert main(["convert", "torchvision", str(source), *args]) == 1
        assert message in capsys.readouterr().err
    assert not (tmp_path / "m.keras").exists()


@pytest.mark.slow
def test_predict_on_the_converted_model_reports_coco_ids(tmp_path, capsys):
    import cv2

    status, out = convert(tmp_path)
    assert status == 0
    reference = np.load(DATA / "torchvision_tiny_outputs.npz")
    image = tmp_path / "photo.png"
    cv2.imwrite(str(image), reference["image"][..., ::-1])
    results = tmp_path / "predictions"
    assert main(["predict", str(out), str(image), "--out", str(results)]) == 0
    detections = json.loads((results / "detections.json").read_text())
    info = json.loads((results / "images.json").read_text())
    names = {c["id"]: c["name"] for c in info["categories"]}
    assert names[1] == "person" and names[4] == "motorcycle"
    ids = sorted({d["category_id"] for d in detections})
    assert set(ids) <= set(reference["labels"].tolist())
    assert ids


def test_help_names_the_formats(capsys):
    for command in (["convert"], ["convert", "torchvision"]):
        with pytest.raises(SystemExit) as exit_info:
            main([*command, "--help"])
        assert exit_info.value.code == 0
        out = capsys.readouterr().out
        assert out.startswith("usage: kseg " + " ".join(command))
        assert ".safetensors" in out and "never overwritten" in out
