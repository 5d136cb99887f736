"""A tiny model overfits three real PASCAL VOC photos read by kseg's VOC reader:
the reader, the label decoding (palette indices, 255 boundaries), the loss,
the optimizer and the evaluation agree end to end."""

from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from kseg.data import VOC_CLASSES, eval_transform, read_voc
from kseg.training.recipe import apply_overrides, load_recipe
from kseg.training.semantic import (
    compile_model,
    dataset_info,
    evaluate_model,
    output_names,
)
from kseg.training.task import build_model

# Debian's labelme-examples ships three VOC 2011 photos with palette labels.
LABELME_VOC = Path(
    "/usr/share/doc/labelme-examples/examples/semantic_segmentation/data_dataset_voc"
)
SIZE = (96, 128)
STEPS = 300


@pytest.mark.slow
@pytest.mark.skipif(
    not LABELME_VOC.is_dir(), reason="Debian package labelme-examples is not installed"
)
def test_tiny_pan_overfits_three_voc_photos():
    dataset = read_voc(LABELME_VOC, split=None, label_dir="SegmentationClassPNG")
    assert len(dataset) == 3 and dataset.class_names == VOC_CLASSES
    pairs = dataset.as_dataset().map(
        lambda image, label: eval_transform(image, label, size=SIZE, mode="resize")
    )
    images, labels = next(iter(pairs.batch(3)))
    present = set(np.unique(labels.numpy())) - {255}
    # background, bottle, bus, car, chair, person, sofa
    assert present == {0, 5, 6, 7, 9, 15, 18}

    recipe = apply_overrides(
        load_recipe("quickstart"),
        [
            "data.dataset=voc",
            "model.kwargs.filters=32",
            "backbone.kwargs.widths=[16, 32, 64, 128]",
            "backbone.kwargs.stem_width=16",
            "backbone.kwargs.output_stride=8",
            "optimizer.learning_rate=1.0e-2",
            "schedule.warmup_steps=10",
        ],
    )
    num_classes = dataset.num_classes
    model = build_model(recipe, num_classes)
    compile_model(model, recipe, num_classes, total_steps=STEPS)
    batch = (images, {name: labels for name in output_names(model)})
    history = model.fit(
        tf.data.Dataset.from_tensors(batch).repeat(),
        steps_per_epoch=STEPS,
        epochs=1,
        verbose=0,
        shuffle=False,
    )
    assert history.history["loss"][0] < 1.0

    info = dataset_info(recipe.data)
    result = evaluate_model(model, pairs, info, recipe.eval, progress=False)
    iou = result.per_class_iou
    # Only the seven classes in the photos are scored (the others: NaN).
    assert set(np.flatnonzero(np.isfinite(iou))) == present
    assert result.mean_iou > 0.75, result.table()
    assert result.pixel_accuracy > 0.95, result.table()
