"""Paired augmentation: image and label stay aligned, labels stay labels."""

import numpy as np
import pytest
import tensorflow as tf

from kseg.data import IGNORE_LABEL, augment, augment_dataset, eval_transform

STEP = 20  # image red channel = STEP * class, so the label can be read back


def _blocks(seed, height=48, width=40, block=8, num_classes=6):
    """A label of random constant blocks, and an image encoding it in red."""
    rng = np.random.default_rng(seed)
    grid = rng.integers(0, num_classes, size=(height // block, width // block))
    label = np.kron(grid, np.ones((block, block), np.int64)).astype(np.uint8)
    image = np.stack(
        [STEP * label, rng.integers(0, 256, label.shape), np.full(label.shape, 7)],
        axis=-1,
    ).astype(np.uint8)
    return image, label


def _homogeneous(label):
    """Pixels whose 3×3 neighbourhood has one label (bilinear sees one class);
    on the crop border the unseen neighbours count as different."""
    padded = np.pad(label, 1, constant_values=-1)
    same = np.ones(label.shape, bool)
    for dy in range(3):
        for dx in range(3):
            same &= padded[dy : dy + label.shape[0], dx : dx + label.shape[1]] == label
    return same


MEAN = (11.0, 22.0, 33.0)


@pytest.mark.parametrize("seed", range(6))
def test_image_and_label_stay_aligned(seed):
    image, label = _blocks(seed)
    out_image, out_label = augment(
        image, label, crop_size=(56, 36), mean=MEAN, seed=tf.constant([seed, 1])
    )
    out_image, out_label = out_image.numpy(), out_label.numpy()
    assert out_image.dtype == np.float32 and out_image.shape == (56, 36, 3)
    assert out_label.dtype == np.int32 and out_label.shape == (56, 36)
    # Nearest-neighbour labels: only original values, plus 255 from padding.
    assert set(np.unique(out_label)) <= set(np.unique(label)) | {IGNORE_LABEL}
    padded = out_label == IGNORE_LABEL
    np.testing.assert_array_equal(
        out_image[padded], np.broadcast_to(MEAN, (padded.sum(), 3))
    )
    assert not np.any(np.all(out_image[~padded] == MEAN, axis=-1))
    inside = _homogeneous(out_label) & ~padded
    assert inside.mean() > 0.3
    np.testing.assert_allclose(
        out_image[..., 0][inside], STEP * out_label[inside], atol=1e-3
    )
    np.testing.assert_allclose(out_image[..., 2][~padded], 7.0, atol=1e-3)


def test_unit_scale_is_an_exact_crop_or_flip():
    image, label = _blocks(0, height=16, width=12, block=2)
    seen = set()
    for seed in range(12):
        out_image, out_label = augment(
            image,
            label,
            crop_size=(10, 8),
            scale_range=(1.0, 1.0),
            aspect_range=(1.0, 1.0),
            seed=tf.constant([seed, 0]),
        )
        out_image, out_label = out_image.numpy(), out_label.numpy()
        matches = []
        for flipped, (img, lbl) in enumerate(
            [(image, label), (image[:, ::-1], label[:, ::-1])]
        ):
            for top in range(7):
                for left in range(5):
                    window = (slice(top, top + 10), slice(left, left + 8))
                    if np.array_equal(out_image, img[window]) and np.array_equal(
                        out_label, lbl[window]
                    ):
                        matches.append((flipped, top, left))
        assert matches, f"seed {seed}: output is no crop of the input"
        seen.update(m[0] for m in matches)
    assert seen == {0, 1}  # both flipped and unflipped crops occur


def test_scale_and_aspect_ranges_are_respected():
    image, label = _blocks(0, height=40, width=40)
    sizes = []
    for seed in range(20):
        # With a crop larger than any scaled image, the extent of the
        # non-padded label is the scaled size.
        _, out = augment(
            image, label, crop_size=120, flip=False, seed=tf.constant([seed, 5])
        )
        valid = out.numpy() != IGNORE_LABEL
        sizes.append((valid.any(axis=1).sum(), valid.any(axis=0).sum()))
    sizes = np.array(sizes, float)
    assert sizes.min() >= 40 * 0.5 * 0.89 - 1 and sizes.max() <= 40 * 2.0 * 1.12 + 1
    ratios = sizes[:, 1] / sizes[:, 0]
    assert ratios.min() >= 0.8 - 0.03 and ratios.max() <= 1.25 + 0.03
    assert np.ptp(sizes[:, 0]) > 20  # the scale does vary


def test_seeded_dataset_is_reproducible_and_varies_per_element():
    image, label = _blocks(1)
    pairs = tf.data.Dataset.from_tensors((image, label)).repeat(3)
    first = [x.numpy() for _, x in augment_dataset(pairs, 24, seed=7)]
    second = [x.numpy() for _, x in augment_dataset(pairs, 24, seed=7)]
    for a, b in zip(first, second, strict=True):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(first[0], first[1])
    unseeded = list(augment_dataset(pairs, 24, flip=False).as_numpy_iterator())
    assert unseeded[0][0].shape == (24, 24, 3)


def test_color_jitter_changes_only_the_image():
    image, label = _blocks(2)
    kwargs = dict(crop_size=32, seed=tf.constant([3, 3]))
    plain_image, plain_label = augment(image, label, **kwargs)
    jitter_image, jitter_label = augment(
        image, label, color_jitter=(0.4, 0.4, 0.4), **kwargs
    )
    np.testing.assert_array_equal(plain_label.numpy(), jitter_label.numpy())
    assert not np.allclose(plain_image.numpy(), jitter_image.numpy())
    assert jitter_image.numpy().min() >= 0 and jitter_image.numpy().max() <= 255


def test_eval_transform():
    image, label = _blocks(3, height=16, width=8, block=4)
    out_image, out_label = eval_transform(image, label[..., None])
    np.testing.assert_array_equal(out_image.numpy(), image.astype(np.float32))
    np.testing.assert_array_equal(out_label.numpy(), label)
    out_image, out_label = eval_transform(image, label, size=(20, 10), mean=MEAN)
    np.testing.assert_array_equal(out_label.numpy()[:16, :8], label)
    assert np.all(out_label.numpy()[16:] == IGNORE_LABEL)
    assert np.all(out_label.numpy()[:, 8:] == IGNORE_LABEL)
    np.testing.assert_array_equal(out_image.numpy()[16:, 3], np.tile(MEAN, (4, 1)))
    _, out_label = eval_transform(image, label, size=(32, 16), mode="resize")
    np.testing.assert_array_equal(out_label.numpy(), np.kron(label, np.ones((2, 2))))
    with pytest.raises(tf.errors.InvalidArgumentError, match="image exceeds 8x8"):
        eval_transform(image, label, size=8)


def test_bad_options():
    image, label = _blocks(0)
    with pytest.raises(ValueError, match="crop_size must be a positive int"):
        augment(image, label, crop_size=(0, 4))
    with pytest.raises(ValueError, match="scale_range must be"):
        augment(image, label, crop_size=8, scale_range=(2.0, 0.5))
    with pytest.raises(ValueError, match="mean must have 3 entries"):
        augment(image, label, crop_size=8, mean=(1.0,))
    with pytest.raises(ValueError, match="color_jitter must be"):
        augment(image, label, crop_size=8, color_jitter=(0.1, 0.1))
    with pytest.raises(ValueError, match=r"image must have shape \(H, W, 3\)"):
        augment(image[..., :2], label, crop_size=8)
    with pytest.raises(ValueError, match=r"label must have shape \(H, W\)"):
        augment(image, label[None], crop_size=8)
    with pytest.raises(ValueError, match="mode must be 'pad' or 'resize'"):
        eval_transform(image, label, size=8, mode="crop")
