"""Fixtures of tests/data: a writable copy of the real VOC photos that Debian's
labelme-examples package ships."""

import gzip
import shutil
from pathlib import Path

import pytest

LABELME_SEMANTIC = Path(
    "/usr/share/doc/labelme-examples/examples/semantic_segmentation"
)


def _copy_tree(source, target):
    """Copies `source` to `target`, unpacking files Debian compressed to `*.gz`."""
    for path in source.rglob("*"):
        if path.is_dir():
            continue
        relative = path.relative_to(source)
        if path.suffix == ".gz":
            destination = target / relative.with_suffix("")
            destination.parent.mkdir(parents=True, exist_ok=True)
            with gzip.open(path, "rb") as src, open(destination, "wb") as dst:
                shutil.copyfileobj(src, dst)
        else:
            destination = target / relative
            destination.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, destination)


@pytest.fixture
def labelme_voc(tmp_path):
    """Path of a copy of labelme's semantic-segmentation example: `data_dataset_voc`
    (VOC layout, palette PNGs in SegmentationClassPNG, int32 `.npy` ground truth
    with −1 = ignore in SegmentationClass) and `data_annotated` (the polygons)."""
    if not LABELME_SEMANTIC.is_dir():
        pytest.skip("Debian package labelme-examples is not installed")
    target = tmp_path / "labelme"
    _copy_tree(LABELME_SEMANTIC, target)
    return target
