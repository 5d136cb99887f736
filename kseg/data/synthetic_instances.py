"""Synthetic instance scenes: kseg's procedural shapes, one instance per shape.

The shapes, textures and colours are those of the synthetic semantic dataset
(`kseg.data.synthetic`); here every shape is its own instance with its own
mask. A scene holds 2–5 shapes; after the first, each is placed freely (apart
from the others), touching an earlier shape (adjacent, no overlap: the case a
semantic label cannot split) or occluding part of an earlier shape. Masks are
the visible parts, as COCO annotates them, and every shape keeps at least 40%
of its drawn area visible. Shapes that touch or overlap get different colours.

Scenes are deterministic functions of `(seed, split, index)`; train and val
draw from different seed streams (and from other streams than the semantic
dataset), so no scene repeats between them. Everything is generated in memory.
"""

import dataclasses

import cv2
import numpy as np

from kseg.data.instances import InstanceDataset, encode_mask, mask_api
from kseg.data.synthetic import (
    OBJECT_COLORS,
    SYNTHETIC_CLASSES,
    _background,
    _shape_mask,
)

SYNTHETIC_INSTANCE_CLASSES = SYNTHETIC_CLASSES[1:]
DEFAULT_NUM_SCENES = {"train": 1000, "val": 200}
_SPLIT_STREAMS = {"train": 2, "val": 3}
_MIN_VISIBLE = 0.4


@dataclasses.dataclass(eq=False)
class SyntheticInstanceDataset(InstanceDataset):
    """The synthetic instance scenes, held in memory.

    Attributes:
        image_array: uint8 `(N, S, S, 3)` images.
        instance_masks: tuple of N uint8 `(n_i, S, S)` visible masks, in
            drawing order (later shapes occlude earlier ones).
        instance_classes: tuple of N int32 `(n_i,)` classes in 1..5.
        drawn_areas: tuple of N int64 `(n_i,)` areas of the shapes as drawn,
            before occlusion (a mask smaller than its drawn area is occluded).
    """

    image_array: np.ndarray = None
    instance_masks: tuple = ()
    instance_classes: tuple = ()
    drawn_areas: tuple = ()

    _per_image = (
        "images",
        "image_array",
        "instance_masks",
        "instance_classes",
        "drawn_areas",
    )

    def load_image(self, index):
        return self.image_array[index]

    def load_targets(self, index):
        return self.instance_masks[index], self.instance_classes[index]

    def annotations(self, index):
        api = mask_api()
        annotations = []
        for mask, k in zip(
            self.instance_masks[index], self.instance_classes[index], strict=True
        ):
            rle = encode_mask(mask)
            compressed = {"size": rle["size"], "counts": rle["counts"].encode()}
            annotations.append(
                {
                    "category_id": self.category_ids[int(k) - 1],
                    "segmentation": rle,
                    "iscrowd": 0,
                    "area": float(api.area(compressed)),
                    "bbox": [float(v) for v in api.toBbox(compressed)],
                }
            )
        return annotations


_MODES = ("free", "touch", "occlude")


def _grow(mask):
    return cv2.dilate(mask.astype(np.uint8), np.ones((3, 3), np.uint8)) > 0


def _place(rng, size, radius, draw, mode, masks, centers, radii):
    """One try at placing a shape: `(mask, center)`, or None when it failed.

    `draw(center)` rasterises the shape at `center`. "free" keeps a gap to
    every earlier shape; "touch" slides the shape outwards from a random
    earlier shape until it overlaps nothing, so it ends adjacent to it;
    "occlude" puts it partly over a random earlier shape.
    """
    taken = np.any(masks, axis=0) if masks else np.zeros((size, size), bool)
    if mode == "free":
        center = rng.uniform(radius, size - radius, size=2)
        mask = draw(center)
        return None if np.any(_grow(_grow(mask)) & taken) else (mask, center)
    j = int(rng.integers(len(masks)))
    angle = rng.uniform(0, 2 * np.pi)
    unit = np.array([np.cos(angle), np.sin(angle)])
    reach = radius + radii[j]
    if mode == "occlude":
        center = centers[j] + rng.uniform(0.5, 0.85) * reach * unit
        if np.any(center < radius) or np.any(center > size - radius):
            return None
        mask = draw(center)
        return (mask, center) if np.any(mask & masks[j]) else None

    def free_at(step):
        center = centers[j] + step * unit
        if np.any(center < radius) or np.any(center > size - radius):
            return None
        mask = draw(center)
        return mask, center, not np.any(mask & taken)

    # Coarse steps of 4 px to the first free position, then 1 px steps from
    # 3 px before it: the first free position at 1 px is adjacent.
    for coarse in np.arange(0.3 * reach, 2.0 * reach, 4.0):
        placed = free_at(coarse)
        if placed is None:
            return None
        if placed[2]:
            break
    else:
        return None
    for step in coarse + np.arange(-3.0, 1.0):
        placed = free_at(step)
        if placed is not None and placed[2]:
            mask, center, _ = placed
            return (mask, center) if np.any(_grow(mask) & masks[j]) else None
    return None


def _draw_instance_scene(rng, size):
    """One scene: `(image uint8 (S, S, 3), masks uint8 (n, S, S), classes
    int32 (n,), drawn areas int64 (n,))`, shapes in drawing order."""
    image = _background(rng, size)
    masks, classes, colors, areas, centers, radii = [], [], [], [], [], []
    for _ in range(int(rng.integers(2, 6))):
        radius = rng.uniform(0.1, 0.2) * size
        class_id = int(rng.integers(1, len(SYNTHETIC_CLASSES)))
        angle = rng.uniform(0, 2 * np.pi)
        # The shape's own random details (ring width, bar width) come from
        # one seed, so every try draws the same shape, only moved.
        shape_seed = int(rng.integers(2**31))
        mode = str(rng.choice(_MODES)) if masks else "free"

        def draw(
            center, class_id=class_id, radius=radius, angle=angle, seed=shape_seed
        ):
            return _shape_mask(
                class_id, size, center, radius, angle, np.random.default_rng(seed)
            )

        for _ in range(30):
            placed = _place(rng, size, radius, draw, mode, masks, centers, radii)
            if placed is None:
                continue
            mask, center = placed
            if all(
                np.sum(m & ~mask) >= _MIN_VISIBLE * a
                for m, a in zip(masks, areas, strict=True)
            ):
                break
        else:
            continue
        grown = _grow(mask)
        near = {colors[i] for i, m in enumerate(masks) if np.any(grown & m)}
        color = int(rng.choice([c for c in range(len(OBJECT_COLORS)) if c not in near]))
        jitter = rng.uniform(-15.0, 15.0, size=3).astype(np.float32)
        image[mask] = OBJECT_COLORS[color] + jitter
        masks = [m & ~mask for m in masks] + [mask]
        classes.append(class_id)
        colors.append(color)
        areas.append(int(mask.sum()))
        centers.append(center)
        radii.append(radius)
    image += 6.0 * rng.standard_normal(size=image.shape, dtype=np.float32)
    image = np.clip(np.round(image), 0, 255).astype(np.uint8)
    return (
        image,
        np.stack(masks).astype(np.uint8),
        np.asarray(classes, np.int32),
        np.asarray(areas, np.int64),
    )


def make_synthetic_instances(split="train", num_images=None, image_size=128, seed=0):
    """Draws the synthetic instance scenes.

    Example:

    >>> train = make_synthetic_instances("train", num_images=64)
    >>> sample = train.load(0)  # image, masks (n, 128, 128), classes, image_id
    >>> gt = train.coco_ground_truth()  # for the COCO evaluator

    Args:
        split: str. `"train"` or `"val"`; each has its own seed stream.
            Defaults to `"train"`.
        num_images: int. Number of scenes. Defaults to 1000 for train and 200
            for val. Scene i is the same whatever `num_images` is.
        image_size: int. Height and width, at least 32. Defaults to 128.
        seed: int. Seed of the dataset. Defaults to 0.

    Returns:
        `SyntheticInstanceDataset` with 5 classes (disc, square, triangle,
        ring, plus = category ids 1..5), image ids 1..N.
    """
    if split not in _SPLIT_STREAMS:
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    if num_images is None:
        num_images = DEFAULT_NUM_SCENES[split]
    if num_images < 1:
        raise ValueError(f"num_images must be positive, got {num_images}")
    if seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")
    if image_size < 32:
        raise ValueError(f"image_size must be at least 32, got {image_size}")
    images = np.empty((num_images, image_size, image_size, 3), np.uint8)
    masks, classes, areas = [], [], []
    for index in range(num_images):
        rng = np.random.default_rng([seed, _SPLIT_STREAMS[split], index])
        images[index], scene_masks, scene_classes, scene_areas = _draw_instance_scene(
            rng, image_size
        )
        masks.append(scene_masks)
        classes.append(scene_classes)
        areas.append(scene_areas)
    return SyntheticInstanceDataset(
        name=f"synthetic_instances_{split}",
        class_names=SYNTHETIC_INSTANCE_CLASSES,
        category_ids=tuple(range(1, len(SYNTHETIC_INSTANCE_CLASSES) + 1)),
        images=tuple(
            {
                "id": index + 1,
                "height": image_size,
                "width": image_size,
                "file_name": f"synthetic-{split}-{seed}-{index:05d}",
            }
            for index in range(num_images)
        ),
        image_array=images,
        instance_masks=tuple(masks),
        instance_classes=tuple(classes),
        drawn_areas=tuple(areas),
    )
