import cv2
import numpy as np
import pytest

from kseg.data import (
    ADE20K_PALETTE,
    CITYSCAPES_PALETTE,
    IGNORE_COLOR,
    VOC_PALETTE,
)
from kseg.data.synthetic import SYNTHETIC_CLASSES, SYNTHETIC_PALETTE
from kseg.inference import PALETTES, colorize, get_palette, overlay
from kseg.inference.defaults import DEFAULT_ALPHA
from kseg.inference.visualize import (
    IMAGE_CONTRAST,
    LEGEND_BACKGROUND,
    contrast_ratio,
    draw_labels,
    legend,
    overlay_with_legend,
    text_color,
    text_height,
)


def _labels(num_classes, shape=(7, 9), seed=0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, num_classes, shape)
    labels[0, 0] = 255
    return labels


def _colorize_loops(labels, palette):
    out = np.zeros((*labels.shape, 3), np.uint8)
    for i in range(labels.shape[0]):
        for j in range(labels.shape[1]):
            value = labels[i, j]
            out[i, j] = IGNORE_COLOR if value == 255 else palette[value]
    return out


@pytest.mark.parametrize(
    "name, palette, num_classes",
    [
        ("voc", VOC_PALETTE, 21),
        ("cityscapes", CITYSCAPES_PALETTE, 19),
        ("ade20k", ADE20K_PALETTE, 150),
    ],
)
def test_colorize_with_named_palettes(name, palette, num_classes):
    assert len(palette) == num_classes
    labels = _labels(num_classes)
    colors = colorize(labels, name)
    assert colors.dtype == np.uint8
    np.testing.assert_array_equal(colors, _colorize_loops(labels, palette))
    np.testing.assert_array_equal(colorize(labels, palette), colors)


def test_voc_palette_values():
    colors = colorize(np.array([[0, 1, 2, 15, 255]]), "voc")[0]
    np.testing.assert_array_equal(
        colors,
        [[0, 0, 0], [128, 0, 0], [0, 128, 0], [192, 128, 128], [224, 224, 192]],
    )


def test_colorize_with_an_array_palette():
    palette = [[10, 20, 30], [40, 50, 60], [70, 80, 90]]
    labels = np.array([[0, 2], [1, 255]], np.uint8)
    np.testing.assert_array_equal(
        colorize(labels, palette),
        [[[10, 20, 30], [70, 80, 90]], [[40, 50, 60], list(IGNORE_COLOR)]],
    )


def test_colorize_rejects_labels_outside_the_palette():
    with pytest.raises(ValueError, match=r"\[19\]"):
        colorize(np.array([[0, 19]]), "cityscapes")
    with pytest.raises(ValueError, match="no colour"):
        colorize(np.array([[-1, 0]]), "voc")


@pytest.mark.parametrize(
    "palette, match",
    [
        ("pascal", "Unknown palette 'pascal'"),
        (np.zeros((4, 4), np.uint8), "shape"),
        (np.zeros((0, 3), np.uint8), "shape"),
        (np.zeros((256, 3), np.uint8), "shape"),
        (np.full((2, 3), 300), "0..255"),
        (np.full((2, 3), 0.5), "integer"),
    ],
)
def test_bad_palettes_raise(palette, match):
    with pytest.raises(ValueError, match=match):
        get_palette(palette)


def test_colorize_rejects_float_label_maps():
    with pytest.raises(ValueError, match="integers"):
        colorize(np.zeros((2, 2), np.float32), "voc")
    with pytest.raises(ValueError, match="label_map must have shape"):
        colorize(np.zeros(4, np.int32), "voc")


def test_get_palette_returns_a_copy():
    palette = get_palette("voc")
    palette[:] = 0
    assert PALETTES["voc"].any()
    assert VOC_PALETTE[1].tolist() == [128, 0, 0]


@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.5, 1.0])
def test_overlay_matches_numpy(alpha):
    rng = np.random.default_rng(3)
    image = rng.integers(0, 256, (7, 9, 3)).astype(np.uint8)
    labels = _labels(19)
    result = overlay(image, labels, palette="cityscapes", alpha=alpha)
    assert result.dtype == np.uint8
    expected = np.empty((7, 9, 3), np.uint8)
    for i in range(7):
        for j in range(9):
            if labels[i, j] == 255:
                expected[i, j] = image[i, j]
            else:
                r, g, b = image[i, j].astype(float)
                luma = 0.299 * r + 0.587 * g + 0.114 * b
                shade = 128 + IMAGE_CONTRAST * (luma - 128)
                color = CITYSCAPES_PALETTE[labels[i, j]].astype(float)
                expected[i, j] = np.rint((1 - alpha) * shade + alpha * color)
    np.testing.assert_array_equal(result, expected)


def test_overlay_of_a_float_image():
    image = np.full((2, 2, 3), 100.4)
    labels = np.array([[1, 0], [0, 0]])
    result = overlay(image, labels, palette="voc", alpha=0.25)
    shade = 0.75 * (128 + IMAGE_CONTRAST * (100.4 - 128))
    np.testing.assert_array_equal(
        result[0, 0], np.rint([shade + 0.25 * 128, shade, shade])
    )
    np.testing.assert_array_equal(result[1, 1], np.rint([shade] * 3))


def test_the_image_adds_no_hue_to_a_class_colour():
    # The case: a yellow ring under its navy class colour came out
    # grey. Whatever the image, a class's colour minus its grey level is
    # alpha times its palette colour's (up to rounding: 0.5 per channel, so
    # 1 after subtracting the mean).
    rng = np.random.default_rng(4)
    image = rng.integers(0, 256, (40, 30, 3)).astype(np.uint8)
    image[:10] = (235, 200, 30)  # the synthetic dataset's yellow
    labels = rng.integers(0, len(SYNTHETIC_PALETTE), (40, 30))
    labels[:10] = SYNTHETIC_CLASSES.index("ring")
    result = overlay(image, labels, SYNTHETIC_PALETTE).astype(float)
    colors = SYNTHETIC_PALETTE[labels].astype(float)
    np.testing.assert_allclose(
        result - result.mean(-1, keepdims=True),
        DEFAULT_ALPHA * (colors - colors.mean(-1, keepdims=True)),
        atol=1.0,
    )
    ring = result[:10].reshape(-1, 3)
    assert (ring[:, 2] - ring[:, :2].max(-1) >= DEFAULT_ALPHA * 128 - 1).all()


def _lab(rgb):
    rgb = np.asarray(rgb, np.float32).reshape(1, -1, 3) / 255
    return cv2.cvtColor(rgb, cv2.COLOR_RGB2Lab).reshape(-1, 3)


@pytest.mark.parametrize(
    "palette", [VOC_PALETTE, CITYSCAPES_PALETTE, SYNTHETIC_PALETTE]
)
def test_classes_stay_distinguishable_whatever_the_image_brightness(palette):
    # The overlay sees only the image's luma, so grey images of every level
    # are the worst case. Over any two levels, two classes keep a quarter of
    # their palette colours' CIE76 difference (the image's brightness moves a
    # colour by (1 - alpha) * IMAGE_CONTRAST * 255 grey levels at most).
    levels = np.arange(256, dtype=np.uint8)
    image = np.repeat(np.broadcast_to(levels, (len(palette), 256))[..., None], 3, -1)
    labels = np.repeat(np.arange(len(palette))[:, None], 256, 1)
    blended = _lab(overlay(image, labels, palette)).reshape(len(palette), 256, 3)
    swatches = _lab(palette)
    for i in range(len(palette)):
        for j in range(i + 1, len(palette)):
            closest = np.linalg.norm(
                blended[i][:, None] - blended[j][None], axis=-1
            ).min()
            apart = np.linalg.norm(swatches[i] - swatches[j])
            assert closest >= 0.25 * apart, (i, j, closest, apart)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(image=np.zeros((7, 9))), "image must have shape"),
        (dict(image=np.zeros((7, 9, 4))), "image must have shape"),
        (dict(image=np.zeros((7, 8, 3))), "does not match"),
        (dict(alpha=1.5), "alpha"),
        (dict(alpha=-0.1), "alpha"),
        (dict(alpha="half"), "alpha"),
        (dict(palette="nope"), "Unknown palette"),
    ],
)
def test_overlay_rejects_bad_input(kwargs, match):
    kwargs = {"image": np.zeros((7, 9, 3), np.uint8), **kwargs}
    with pytest.raises(ValueError, match=match):
        overlay(label_map=_labels(19), **kwargs)


# === Legends ===


def _has_block(panel, color, side):
    """Whether `panel` holds a `side` x `side` square of `color` only."""
    inside = np.all(panel == color, axis=-1).astype(np.int64)
    sums = np.pad(inside.cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    blocks = sums[side:, side:] - sums[:-side, side:] - sums[side:, :-side]
    return bool((blocks + sums[:-side, :-side] == side * side).any())


def test_legend_lists_exactly_the_classes_present_with_names_and_colours():
    from kseg.data import VOC_CLASSES

    labels = np.zeros((120, 160), np.int64)
    labels[10:40, 10:40] = 3
    labels[50:90, 60:100] = 7
    labels[100:, :] = 255
    panel, entries = legend(labels, "voc", VOC_CLASSES, height=12)
    assert [e.class_id for e in entries] == [0, 3, 7]
    assert [e.name for e in entries] == ["background", "bird", "car"]
    side = entries[0].swatch[2]
    for k, color in enumerate(VOC_PALETTE):
        found = _has_block(panel, color, side)
        assert found == (k in (0, 3, 7)), (k, color)
    for entry in entries:
        x, y, w, h = entry.swatch
        assert (panel[y : y + h, x : x + w] == entry.color).all()
        x, y, w, h = entry.label
        text = panel[y : y + h, x : x + w].reshape(-1, 3)
        ink = text_color(LEGEND_BACKGROUND)
        assert (np.abs(text.astype(int) - ink).max(-1) < 50).sum() >= 10  # letters
    assert contrast_ratio(LEGEND_BACKGROUND, ink) >= 4.5
    # Without names, classes are numbered; a short names list is refused.
    _, entries = legend(labels, "voc")
    assert [e.name for e in entries] == ["class 0", "class 3", "class 7"]
    with pytest.raises(ValueError, match="class_names names only 4 classes"):
        legend(labels, "voc", VOC_CLASSES[:4])


def test_legend_wraps_into_columns_without_overlap():
    labels = np.arange(21).repeat(2)[None].repeat(30, 0)  # 30 rows: 1 per column
    panel, entries = legend(labels, "voc", height=12)
    assert len(entries) == 21
    rectangles = [e.swatch for e in entries] + [e.label for e in entries]
    _assert_disjoint_inside(rectangles, panel.shape)
    assert len({e.swatch[0] for e in entries}) > 1


def test_overlay_with_legend_puts_the_legend_right_of_the_overlay():
    rng = np.random.default_rng(5)
    image = rng.integers(0, 256, (64, 48, 3)).astype(np.uint8)
    labels = _labels(19, (64, 48))
    result = overlay_with_legend(image, labels, "cityscapes")
    blended = overlay(image, labels, "cityscapes")
    panel, _ = legend(labels, "cityscapes", height=text_height(image.shape))
    assert result.shape[0] == max(64, len(panel))
    np.testing.assert_array_equal(result[:64, :48], blended)
    np.testing.assert_array_equal(result[: len(panel), 48:], panel)
    assert (result[64:, :48] == LEGEND_BACKGROUND).all()


# === Labels ===


def test_contrast_ratio_is_wcags():
    assert contrast_ratio((255, 255, 255), (0, 0, 0)) == pytest.approx(21)
    # WCAG's examples: #777 on white is 4.48:1, just short of AA's 4.5.
    assert contrast_ratio((119, 119, 119), (255, 255, 255)) == pytest.approx(
        4.48, abs=0.005
    )
    assert text_color((0, 0, 255)) == (255, 255, 255)
    assert text_color((255, 255, 0)) == (0, 0, 0)


def _assert_disjoint_inside(rectangles, shape):
    for index, (x, y, w, h) in enumerate(rectangles):
        assert 0 <= x and x + w <= shape[1] and 0 <= y and y + h <= shape[0]
        for ox, oy, ow, oh in rectangles[index + 1 :]:
            apart = x + w <= ox or ox + ow <= x or y + h <= oy or oy + oh <= y
            assert apart, ((x, y, w, h), (ox, oy, ow, oh))


# Label backgrounds: the blue, yellow, the greys where black and white
# text contrast alike, and PANet's instance colours.
LABEL_COLORS = [(0, 0, 255), (255, 255, 0), (118, 118, 118), (119, 119, 119)]


def test_labels_have_contrasting_text_on_their_own_background():
    from kseg.inference.instance_outputs import instance_colors

    colors = np.concatenate([LABEL_COLORS, instance_colors(6)]).astype(np.uint8)
    canvas = np.full((256, 256, 3), 90, np.uint8)
    boxes = [(20 + 22 * i, 10, 40 + 22 * i, 200) for i in range(len(colors))]
    texts = [f"disc 0.{90 + i}" for i in range(len(colors))]
    rectangles = draw_labels(canvas, texts, boxes, colors)
    assert None not in rectangles
    for (x, y, w, h), color in zip(rectangles, colors, strict=True):
        label = canvas[y : y + h, x : x + w].reshape(-1, 3).astype(float)
        background = np.all(label == color, axis=-1)
        # The label is filled with its colour, edge to edge.
        assert background.mean() > 0.5
        for corner in (label[0], label[w - 1], label[-w], label[-1]):
            np.testing.assert_array_equal(corner, color)
        # Its text: the pixels farthest from the background, at least 4.5:1.
        distance = np.abs(label - color.astype(float)).sum(-1)
        ink = label[distance == distance.max()]
        assert (distance > 0).sum() >= 20
        for pixel in np.unique(ink, axis=0):
            assert contrast_ratio(pixel, color) >= 4.5, (pixel, color)


def test_colliding_labels_are_placed_apart():
    # Twelve detections on one spot of a 128 x 128 image: the labels must not
    # print over each other ("triangle 0.98" over "square 0.59").
    canvas = np.full((128, 128, 3), 90, np.uint8)
    boxes = np.tile([[40.0, 30.0, 90.0, 100.0]], (12, 1))
    texts = [f"{name} 0.{98 - k}" for k, name in enumerate(["triangle"] * 12)]
    colors = np.tile([[255, 60, 60], [60, 60, 255]], (6, 1)).astype(np.uint8)
    rectangles = draw_labels(canvas, texts, boxes, colors)
    placed = [r for r in rectangles if r is not None]
    # The best one sits right above its box; the image holds at least 5.
    x, y, w, h = rectangles[0]
    assert (x, y + h) == (30, 40)
    assert len(placed) >= 5
    _assert_disjoint_inside(placed, canvas.shape)
    # On the pixels: no label drew over another's corners.
    for rectangle, color in zip(rectangles, colors, strict=True):
        if rectangle is not None:
            x, y, w, h = rectangle
            for row, column in ((y, x), (y, x + w - 1), (y + h - 1, x)):
                np.testing.assert_array_equal(canvas[row, column], color)


def _ink_height(canvas, rectangle, color):
    x, y, w, h = rectangle
    label = canvas[y : y + h, x : x + w]
    rows = np.flatnonzero((np.abs(label.astype(int) - color).sum(-1) > 200).any(1))
    return rows[-1] - rows[0] + 1


@pytest.mark.parametrize("size", [128, 1000, 3000])
def test_label_height_grows_with_the_image_within_bounds(size):
    expected = min(max(round(0.02 * size), 10), 40)
    assert text_height((size, size // 2)) == text_height((size // 2, size)) == expected
    canvas = np.full((size, size, 3), 90, np.uint8)
    color = np.array([255, 255, 0])
    (rectangle,) = draw_labels(canvas, ["H 0.98"], [(size / 2, 5, size, 60)], [color])
    # Capitals and digits are the text height tall, give or take the strokes.
    assert abs(_ink_height(canvas, rectangle, color) - expected) <= expected / 6 + 1
    # The label box: the text with its descenders and padding.
    assert rectangle[3] <= 2.5 * expected
