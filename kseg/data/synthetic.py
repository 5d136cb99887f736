"""An embedded, procedurally drawn segmentation dataset of shapes on textures.

Each image is a textured background (gradient, stripes or smooth blotches in
muted colours, plus pixel noise) with 2–4 filled objects of five shape classes
drawn over it. Every object takes a random colour from one palette shared by
all classes, so colour tells objects from background but never one class from
another: the class is the shape. Objects may overlap; a later object hides the
earlier one in the image and in the label alike.

Images are deterministic functions of `(seed, split, index)`, and the train and
val splits draw from different seed streams, so no image repeats between them.
"""

import dataclasses

import cv2
import numpy as np

from kseg.data.dataset import ArraySegmentationDataset
from kseg.data.palette import voc_colormap

SYNTHETIC_CLASSES = ("background", "disc", "square", "triangle", "ring", "plus")

# Display colours of the classes (the VOC colormap's first entries).
SYNTHETIC_PALETTE = voc_colormap(len(SYNTHETIC_CLASSES))

# Object fill colours, shared by every shape class.
OBJECT_COLORS = np.array(
    [
        [220, 40, 40],
        [40, 180, 60],
        [50, 80, 220],
        [235, 200, 30],
        [200, 50, 200],
        [30, 200, 210],
        [245, 130, 20],
        [245, 245, 245],
    ],
    dtype=np.uint8,
)

DEFAULT_NUM_IMAGES = {"train": 1000, "val": 200}
_SPLIT_STREAMS = {"train": 0, "val": 1}


@dataclasses.dataclass(eq=False)
class SyntheticDataset(ArraySegmentationDataset):
    """The synthetic shapes dataset, with what was drawn in each image.

    Attributes:
        instances: one tuple per image of `(class_id, (r, g, b))` per object,
            in drawing order (later objects occlude earlier ones).
    """

    instances: tuple = ()


def _background(rng, size):
    """A muted textured background, float32 `(size, size, 3)`."""
    base = rng.uniform(70.0, 185.0)
    colors = base + rng.uniform(-30.0, 30.0, size=(2, 3))
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / np.float32(size)
    angle = rng.uniform(0.0, np.pi)
    along = x * np.float32(np.cos(angle)) + y * np.float32(np.sin(angle))
    kind = rng.integers(3)
    if kind == 0:
        t = (along - along.min()) / max(float(np.ptp(along)), 1e-6)
    elif kind == 1:
        frequency = rng.uniform(2.0, 7.0)
        phase = rng.uniform(0, 2 * np.pi)
        t = 0.5 + 0.5 * np.sin(
            np.float32(2 * np.pi * frequency) * along + np.float32(phase)
        )
    else:
        cells = int(rng.integers(3, 8))
        coarse = rng.uniform(0.0, 1.0, size=(cells, cells)).astype(np.float32)
        t = cv2.resize(coarse, (size, size), interpolation=cv2.INTER_CUBIC)
        t = np.clip(t, 0.0, 1.0)
    t = t.astype(np.float32)[..., None]
    return colors[0].astype(np.float32) + t * (colors[1] - colors[0]).astype(np.float32)


def _polygon(center, radius, angle, unit_points):
    rotation = np.array(
        [[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]
    )
    points = unit_points @ rotation.T * radius + center
    return np.round(points).astype(np.int32)


def _shape_mask(class_id, size, center, radius, angle, rng):
    """Boolean mask of one object of class `class_id`."""
    mask = np.zeros((size, size), dtype=np.uint8)
    c = tuple(int(round(v)) for v in center)
    r = int(round(radius))
    if class_id == 1:  # disc, slightly elliptic
        axes = (r, int(round(radius * rng.uniform(0.8, 1.0))))
        cv2.ellipse(mask, c, axes, np.degrees(angle), 0, 360, 1, -1)
    elif class_id == 2:  # square
        corners = np.array([[1, 1], [-1, 1], [-1, -1], [1, -1]]) * 0.8
        cv2.fillPoly(mask, [_polygon(center, radius, angle, corners)], 1)
    elif class_id == 3:  # equilateral triangle, enlarged to the others' area
        theta = np.array([0.0, 2 * np.pi / 3, 4 * np.pi / 3]) - np.pi / 2
        corners = np.stack([np.cos(theta), np.sin(theta)], axis=1) * 1.25
        cv2.fillPoly(mask, [_polygon(center, radius, angle, corners)], 1)
    elif class_id == 4:  # ring
        cv2.circle(mask, c, r, 1, -1)
        cv2.circle(mask, c, int(round(radius * rng.uniform(0.45, 0.6))), 0, -1)
    else:  # plus: two crossed bars
        half = rng.uniform(0.28, 0.38)
        bar = np.array([[1, half], [-1, half], [-1, -half], [1, -half]])
        cv2.fillPoly(mask, [_polygon(center, radius, angle, bar)], 1)
        cv2.fillPoly(mask, [_polygon(center, radius, angle, bar[:, ::-1])], 1)
    return mask.astype(bool)


def _draw_scene(rng, size):
    """One `(image uint8 (S, S, 3), label uint8 (S, S), instances)` scene."""
    image = _background(rng, size)
    label = np.zeros((size, size), dtype=np.uint8)
    instances = []
    placed = []
    for _ in range(int(rng.integers(2, 5))):
        radius = rng.uniform(0.1, 0.22) * size
        # Retry until the object overlaps earlier ones at most partly, so
        # occlusion happens without hiding whole shapes.
        for _ in range(20):
            center = rng.uniform(radius, size - radius, size=2)
            if all(np.hypot(*(center - c)) >= 0.7 * (radius + r) for c, r in placed):
                break
        placed.append((center, radius))
        class_id = int(rng.integers(1, len(SYNTHETIC_CLASSES)))
        mask = _shape_mask(
            class_id, size, center, radius, rng.uniform(0, 2 * np.pi), rng
        )
        color = OBJECT_COLORS[rng.integers(len(OBJECT_COLORS))]
        image[mask] = color + rng.uniform(-15.0, 15.0, size=3).astype(np.float32)
        label[mask] = class_id
        instances.append((class_id, tuple(int(v) for v in color)))
    image += 6.0 * rng.standard_normal(size=image.shape, dtype=np.float32)
    return np.clip(np.round(image), 0, 255).astype(np.uint8), label, tuple(instances)


def make_synthetic(split="train", num_images=None, image_size=128, seed=0):
    """Draws the synthetic shapes dataset.

    Args:
        split: str. `"train"` or `"val"`; each has its own seed stream.
            Defaults to `"train"`.
        num_images: int. Number of images. Defaults to 1000 for train and 200
            for val. Image i is the same whatever `num_images` is.
        image_size: int. Height and width, at least 32. Defaults to 128.
        seed: int. Seed of the dataset. Defaults to 0.

    Returns:
        `SyntheticDataset` with 6 classes (background, disc, square, triangle,
        ring, plus); `.as_dataset()` gives `(image, label)` pairs.
    """
    if split not in _SPLIT_STREAMS:
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    if num_images is None:
        num_images = DEFAULT_NUM_IMAGES[split]
    if num_images < 1:
        raise ValueError(f"num_images must be positive, got {num_images}")
    if seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")
    if image_size < 32:
        raise ValueError(f"image_size must be at least 32, got {image_size}")
    images = np.empty((num_images, image_size, image_size, 3), dtype=np.uint8)
    labels = np.empty((num_images, image_size, image_size), dtype=np.uint8)
    instances = []
    for index in range(num_images):
        rng = np.random.default_rng([seed, _SPLIT_STREAMS[split], index])
        images[index], labels[index], drawn = _draw_scene(rng, image_size)
        instances.append(drawn)
    return SyntheticDataset(
        name=f"synthetic_{split}",
        num_classes=len(SYNTHETIC_CLASSES),
        class_names=SYNTHETIC_CLASSES,
        palette=SYNTHETIC_PALETTE,
        images=images,
        labels=labels,
        names=tuple(f"synthetic-{split}-{seed}-{i:05d}" for i in range(num_images)),
        instances=tuple(instances),
    )


def synthetic_dataset(split="train", num_images=None, image_size=128, seed=0):
    """`make_synthetic(...).as_dataset()`: a `tf.data.Dataset` of `(image, label)`."""
    return make_synthetic(split, num_images, image_size, seed).as_dataset()
