"""`kseg convert torchvision`: the fixture's torchvision-layout model (see
`tests/models/test_torchvision_weights.py`) widened to COCO's 91 classes,
converted through the command line, then `kseg predict` on it and `kseg
train` fine-tuning it on labelme's COCO example."""

import json
import re
import shutil
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

    # Its export carries COCO's categories (the file beside the model).
    exports = tmp_path / "saved_models"
    assert main(["export", str(out), "--name", "coco", "--out", str(exports)]) == 0
    assert "coco.categories.json" in capsys.readouterr().out
    saved = json.loads(
        (exports / "coco" / "1" / "assets.extra" / "categories.json").read_text()
    )
    assert saved == json.loads((tmp_path / "coco.categories.json").read_text())
    results = tmp_path / "served"
    status = main(["predict", str(exports / "coco" / "1"), str(image), "--out",
                   str(results)])  # fmt: skip
    assert status == 0
    served = json.loads((results / "images.json").read_text())
    assert served["categories"] == info["categories"]


def test_help_names_the_formats(capsys):
    for command in (["convert"], ["convert", "torchvision"]):
        with pytest.raises(SystemExit) as exit_info:
            main([*command, "--help"])
        assert exit_info.value.code == 0
        out = capsys.readouterr().out
        assert out.startswith("usage: kseg " + " ".join(command))
        assert ".safetensors" in out and "never overwritten" in out


LABELME_COCO = Path(
    "/usr/share/doc/labelme-examples/examples/instance_segmentation/data_dataset_coco"
)
FINETUNE = "maskrcnn_r50-fpn_1xb2-coco-finetune-1024"
# The fine-tuning recipe at the fixture's architecture and a CPU's size.
FIXTURE_SIZED = [
    "backbone.name=resnet",
    "backbone.kwargs={block_counts: [1, 1, 1, 1], expansion: 1, group_width: 16, "
    "stem_width: 64}",
    "model.kwargs.filters=32",
    "model.kwargs.fc_units=64",
    "model.kwargs.rpn_pre_nms_top_k_train=100",
    "model.kwargs.rpn_post_nms_top_k_train=50",
    "model.kwargs.rpn_pre_nms_top_k_test=100",
    "model.kwargs.rpn_post_nms_top_k_test=50",
    "model.kwargs.rpn_batch_size=32",
    "model.kwargs.roi_batch_size=16",
    "model.kwargs.max_detections=10",
    f"data.crop_size=[{SIZE}, {SIZE}]",
    "data.short_edge_range=null",
    "data.max_size=null",
    "data.max_instances=10",
    "data.mask_size=28",
    "train.epochs=1",
    "train.steps_per_epoch=1",
    "eval.batch_size=3",
    "eval.short_edge=null",
]


def labelme_coco(folder):
    """Debian labelme-examples' COCO export (3 photos, 20 VOC classes) in
    COCO's layout, as both the train and the val split."""
    if not LABELME_COCO.is_dir():
        pytest.skip("Debian package labelme-examples is not installed")
    annotations = json.loads((LABELME_COCO / "annotations.json").read_text())
    for image in annotations["images"]:
        image["file_name"] = Path(image["file_name"]).name
    (folder / "annotations").mkdir(parents=True)
    for split in ("train", "val"):
        shutil.copytree(LABELME_COCO / "JPEGImages", folder / split)
        (folder / "annotations" / f"instances_{split}.json").write_text(
            json.dumps(annotations)
        )
    return folder


@pytest.mark.slow
def test_fine_tune_the_converted_model_on_a_coco_folder(tmp_path, capsys):
    """kseg convert torchvision, then kseg train with the fine-tuning recipe
    starting from the converted file: COCO's 90 classes against the
    folder's 20, so the class-specific layers are skipped and said so."""
    data = labelme_coco(tmp_path / "coco")
    status, converted = convert(tmp_path)
    assert status == 0, capsys.readouterr().err
    capsys.readouterr()
    run = tmp_path / "run"
    args = ["train", "--recipe", FINETUNE, "--data", str(data), "--run-dir", str(run)]
    args += [f"--set={o}" for o in FIXTURE_SIZED]
    status = main([*args, f"--set=model.init_from={converted}", "--quiet"])
    out, err = capsys.readouterr()
    assert status == 0, err[-3000:]
    lines = out.splitlines()
    summary = next(line for line in lines if line.startswith("model.init_from"))
    assert re.fullmatch(
        rf"model.init_from {re.escape(str(converted))}: loaded \d+ weights, "
        r"skipped 6 \(another shape\), left 0 fresh",
        summary,
    ), summary
    skipped = [line.split()[1][:-1] for line in lines if line.startswith("  skipped ")]
    assert sorted(skipped) == [
        "roi_heads/box_head/box_deltas/bias",
        "roi_heads/box_head/box_deltas/kernel",
        "roi_heads/box_head/class_logits/bias",
        "roi_heads/box_head/class_logits/kernel",
        "roi_heads/mask_head/mask_logits/bias",
        "roi_heads/mask_head/mask_logits/kernel",
    ]
    assert "backbone stages training: res5, res4, res3 (batch norm frozen)" in out
    result = json.loads((run / "result.json").read_text())
    assert result["steps"] == 1
    # The fine-tuned model: the folder's classes, the converted backbone's
    # frozen stem unchanged.
    model, source = load_model(run / "model.keras"), load_model(converted)
    assert model.num_classes == 20
    np.testing.assert_array_equal(
        model.backbone.get_layer("stem_conv").kernel.numpy(),
        source.backbone.get_layer("stem_conv").kernel.numpy(),
    )

    # The recipe's default file, absent here: named before any run exists.
    args[args.index(str(run))] = str(tmp_path / "other-run")
    assert main(args) == 1
    assert "model.init_from: maskrcnn_resnet50_fpn_coco.keras does not exist" in (
        capsys.readouterr().err
    )
    assert not (tmp_path / "other-run").exists()
