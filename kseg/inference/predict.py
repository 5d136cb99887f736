"""Single-image prediction with test-time augmentation and sliding windows.

The model sees exactly what the training pipeline gives it: the image goes
through `kseg.data.preprocess_images` (float32 RGB with values in 0–255, the
step `augment` / `eval_transform` and the exported graphs share), and
padding is filled with the training pad colour (`mean`).

Every forward pass is turned into softmax probabilities at the size it ran
at; test-time augmentation and overlapping windows average those
**probabilities** (not logits), each resized back to the original image size
with kseg's one resize convention (`kseg.layers.common.resize`: bilinear,
half-pixel centres). Bilinear weights are convex, so every averaged
probability vector still sums to 1.
"""

from typing import NamedTuple

import keras
import numpy as np

from kseg.data.augment import IMAGENET_MEAN
from kseg.data.preprocessing import preprocess_images
from kseg.inference.defaults import MAX_TEST_SCALE
from kseg.inference.sources import as_model
from kseg.layers.common import resize
from kseg.models.segmenter import check_positive_int, check_rate


class Prediction(NamedTuple):
    """The result of `predict`.

    Attributes:
        class_map: `int32` array `(H, W)`, the arg-max class of each pixel.
        probabilities: `float32` array `(H, W, num_classes)`, the averaged
            softmax probabilities; each pixel's vector sums to 1.
    """

    class_map: np.ndarray
    probabilities: np.ndarray


def predict(
    model,
    image,
    scales=(1.0,),
    flip=False,
    window=None,
    overlap=1 / 3,
    batch_size=4,
    mean=IMAGENET_MEAN,
):
    """Segments one image, optionally with multi-scale / flip test-time
    augmentation and sliding-window inference.

    For each scale s the image is resized (bilinear, half-pixel) to
    `round(s·H) × round(s·W)` and run through the model; with `flip=True` its
    horizontal mirror is run too and the result mirrored back. Each run's
    softmax probabilities are resized to `H × W` and all runs are averaged
    with equal weight: `len(scales) · (2 if flip else 1)` runs in all.
    `predict(model, image, scales=PAN_TTA_SCALES, flip=True)` is PAN's
    "MS + Flip" evaluation.

    With a `window` (typically the training crop), every (scaled, possibly
    mirrored) image is processed in windows of that size: an image smaller
    than the window along a side is first padded at the bottom / right with
    `mean` (as the training `augment` pads) to the window size; windows start
    every `stride = max(1, round(window · (1 − overlap)))` pixels with the last
    one aligned to the bottom / right border, so they cover every pixel; the
    probabilities of overlapping windows are averaged per pixel (sum divided
    by the number of windows covering it) and the padding is cropped off.
    Without a window the model runs on the whole image at each scale.

    Example:
    >>> inputs = keras.Input((None, None, 3))
    >>> model = keras.Model(inputs, {"logits": keras.layers.Conv2D(4, 1)(inputs)})
    >>> result = predict(model, np.zeros((40, 50, 3), "uint8"), window=(32, 32))
    >>> result.class_map.shape, result.probabilities.shape
    ((40, 50), (40, 50, 4))

    Args:
        model: a `keras.Model` mapping float32 images
            `(N, h, w, 3)` in 0–255 to a dict with `"logits"`
            `(N, h, w, num_classes)` at the input size (kseg's segmenters), or
            to that logits tensor directly; or what
            `kseg.inference.open_model` returns (any saved or exported
            model), or its `model`.
        image: array `(H, W, 3)`, any integer (typically uint8) or floating
            dtype, RGB values in 0–255.
        scales: sequence of floats in (0, 4] (`MAX_TEST_SCALE`). Resize
            factors of the runs. Defaults to `(1.0,)`.
        flip: bool. Also run each scale horizontally mirrored. Defaults to
            `False`.
        window: `None`, int or `(height, width)`. Sliding-window size; `None`
            runs whole images. Defaults to `None`.
        overlap: float in [0, 1). Fraction of the window shared by
            neighbouring windows. Defaults to `1/3`.
        batch_size: int. Windows (and mirrored copies) per model call.
            Defaults to `4`.
        mean: 3 floats. RGB pad colour in 0–255; use the `mean` the training
            pipeline padded crops with. Defaults to `IMAGENET_MEAN`.

    Returns:
        `Prediction(class_map, probabilities)` at the original `H × W`.
    """
    model = as_model(model)
    image = _check_image(image)
    scales = _check_scales(scales)
    if not isinstance(flip, (bool, np.bool_)):
        raise ValueError(f"flip must be a bool, got {flip!r}")
    if window is not None:
        window = _size_pair(window, "window")
    overlap = check_rate(overlap, "overlap")
    batch_size = check_positive_int(batch_size, "batch_size")
    mean = _check_mean(mean, image.shape[-1])

    total = _tta_probabilities(
        model, image, scales, flip, window, overlap, batch_size, mean
    )
    return Prediction(
        class_map=np.argmax(total, axis=-1).astype(np.int32),
        probabilities=total.astype(np.float32, copy=False),
    )


def _tta_probabilities(model, image, scales, flip, window, overlap, batch_size, mean):
    """The averaged softmax probabilities `(H, W, C)` of one preprocessed
    float32 image over `scales` × (mirrored if `flip`)."""
    height, width = image.shape[:2]
    total = None
    for scale in scales:
        size = (max(1, round(height * scale)), max(1, round(width * scale)))
        scaled = image if size == (height, width) else _resize(image, size)
        variants = [scaled, scaled[:, ::-1]] if flip else [scaled]
        probabilities = _probabilities(
            model, np.stack(variants), window, overlap, batch_size, mean
        )
        if flip:
            probabilities[1] = np.flip(probabilities[1], axis=1)
        probabilities = probabilities.sum(axis=0)
        if size != (height, width):
            probabilities = _resize(probabilities, (height, width))
        total = probabilities if total is None else total + probabilities
    total /= len(scales) * (2 if flip else 1)
    return total


def predict_tiled(
    model,
    image,
    window,
    scales=(1.0,),
    flip=False,
    overlap=1 / 3,
    batch_size=4,
    mean=IMAGENET_MEAN,
):
    """The class map of a large image, by windows, in memory that does not
    grow with the image beyond the image and its class map.

    The windows are `sliding_windows(image size, window, overlap)`; each
    window's crop gets `scales` × `flip` test-time augmentation (as
    `predict` gives a whole image) and the probabilities of overlapping
    windows are averaged per pixel, as `predict(..., window=window)`
    averages them. Windows run one row at a time: only the probabilities
    of the rows that a later window may still cover are held (at most
    `window height × W × classes` floats), and finished rows become class
    indices at once. With `scales=(1.0,)` and `flip=False` the class map
    equals `predict(model, image, window=window).class_map`.

    Args:
        model: as for `predict`.
        image: array `(H, W, 3)`, RGB in 0–255 (typically uint8: it is
            converted to float32 one window at a time).
        window: int or `(height, width)`. The window size.
        scales, flip, overlap, batch_size, mean: as for `predict`.

    Returns:
        int32 array `(H, W)`: the arg-max class of each pixel.
    """
    model = as_model(model)
    image = np.asarray(image)
    if image.ndim != 3:
        raise ValueError(f"image must have shape (height, width, 3), got {image.shape}")
    scales = _check_scales(scales)
    window = _size_pair(window, "window")
    overlap = check_rate(overlap, "overlap")
    batch_size = check_positive_int(batch_size, "batch_size")
    mean = _check_mean(mean, image.shape[-1])
    height, width = image.shape[:2]
    canvas = (max(height, window[0]), max(width, window[1]))
    tops = _window_starts(canvas[0], window[0], overlap)
    lefts = _window_starts(canvas[1], window[1], overlap)
    class_map = np.zeros((height, width), np.int32)
    # Rows [done, done + len(sums)) of the canvas whose windows are not all in.
    done = 0
    sums = counts = None
    for row, top in enumerate(tops):
        bottom = top + window[0]
        for left in lefts:
            crop = np.empty((*window, image.shape[-1]), np.float32)
            crop[...] = mean
            piece = image[top:bottom, left : left + window[1]]
            crop[: piece.shape[0], : piece.shape[1]] = preprocess_images(piece)
            probabilities = _tta_probabilities(
                model, crop, scales, flip, None, overlap, batch_size, mean
            )
            if sums is None:
                sums = np.zeros((0, canvas[1], probabilities.shape[-1]), np.float32)
                counts = np.zeros((0, canvas[1]), np.float32)
            grow = bottom - done - len(sums)
            if grow > 0:
                sums = np.concatenate(
                    [sums, np.zeros((grow, *sums.shape[1:]), np.float32)]
                )
                counts = np.concatenate(
                    [counts, np.zeros((grow, canvas[1]), np.float32)]
                )
            rows = slice(top - done, bottom - done)
            sums[rows, left : left + window[1]] += probabilities
            counts[rows, left : left + window[1]] += 1.0
        # Rows above the next window row are final.
        final = (tops[row + 1] if row + 1 < len(tops) else canvas[0]) - done
        keep = min(final, max(0, height - done))
        if keep > 0:
            averaged = sums[:keep, :width] / counts[:keep, :width, None]
            class_map[done : done + keep] = np.argmax(averaged, axis=-1)
        sums, counts = sums[final:], counts[final:]
        done += final
    return class_map


def sliding_windows(size, window, overlap=1 / 3):
    """Top-left corners of the windows `predict` runs over an image.

    Along each side of length L ≥ window w, windows start at
    `0, stride, 2·stride, …` with `stride = max(1, round(w · (1 − overlap)))`,
    plus a last one at `L − w` (aligned to the border) unless already there,
    so every pixel is covered. A side shorter than the window is padded to
    it by `predict` first; here it gets one window at 0.

    Args:
        size: `(height, width)` of the image.
        window: int or `(height, width)` of a window.
        overlap: float in [0, 1). Defaults to `1/3`.

    Returns:
        list of `(top, left)` int pairs, row by row.
    """
    height, width = _size_pair(size, "size")
    window = _size_pair(window, "window")
    overlap = check_rate(overlap, "overlap")
    tops = _window_starts(height, window[0], overlap)
    lefts = _window_starts(width, window[1], overlap)
    return [(top, left) for top in tops for left in lefts]


def _window_starts(length, window, overlap):
    if length <= window:
        return [0]
    stride = max(1, round(window * (1.0 - overlap)))
    starts = list(range(0, length - window + 1, stride))
    if starts[-1] != length - window:
        starts.append(length - window)
    return starts


def _probabilities(model, images, window, overlap, batch_size, mean):
    """Softmax probabilities `(V, h, w, C)` of the same-size `images`
    `(V, h, w, 3)`, whole or by overlapping windows."""
    count, height, width = images.shape[:3]
    if window is None:
        tile = (height, width)
        corners = [(0, 0)]
    else:
        tile = window
        canvas = (max(height, window[0]), max(width, window[1]))
        if canvas != (height, width):
            padded = np.empty((count, *canvas, images.shape[-1]), np.float32)
            padded[...] = mean
            padded[:, :height, :width] = images
            images = padded
        corners = sliding_windows(canvas, window, overlap)
    tiles = [(index, top, left) for index in range(count) for top, left in corners]

    sums = None
    for start in range(0, len(tiles), batch_size):
        chunk = tiles[start : start + batch_size]
        batch = np.stack(
            [
                images[index, top : top + tile[0], left : left + tile[1]]
                for index, top, left in chunk
            ]
        )
        probabilities = _forward(model, batch)
        if sums is None:
            sums = np.zeros((*images.shape[:3], probabilities.shape[-1]), np.float32)
        for (index, top, left), p in zip(chunk, probabilities, strict=True):
            sums[index, top : top + tile[0], left : left + tile[1]] += p
    if len(corners) > 1:
        covered = np.zeros(images.shape[1:3], np.float32)
        for top, left in corners:
            covered[top : top + tile[0], left : left + tile[1]] += 1.0
        sums /= covered[None, :, :, None]
    return sums[:, :height, :width]


def _forward(model, batch):
    """Runs `model` on a float32 NHWC batch; returns float32 softmax
    probabilities as NumPy."""
    if keras.backend.backend() == "jax" and isinstance(model, keras.Model):
        # Eager JAX dispatches layer by layer (≈50× slower than one jitted
        # call); `predict_on_batch` jits once per input shape. The TensorFlow
        # predict function relaxes repeated shapes to `None`, which kseg's
        # resize layers cannot trace, so TensorFlow runs eagerly.
        outputs = model.predict_on_batch(batch)
    else:
        outputs = model(batch, training=False)
    if isinstance(outputs, dict):
        if "logits" not in outputs:
            raise ValueError(
                "The model must return its class scores under 'logits', it "
                f"returns {sorted(outputs)}"
            )
        outputs = outputs["logits"]
    logits = keras.ops.cast(outputs, "float32")
    if tuple(logits.shape[:3]) != batch.shape[:3]:
        raise ValueError(
            "The model's logits must be (batch, height, width, classes) at the "
            f"input size {batch.shape[1:3]}, got shape {tuple(logits.shape)}"
        )
    return keras.ops.convert_to_numpy(keras.ops.softmax(logits, axis=-1))


def _resize(image, size):
    """kseg's bilinear half-pixel resize of one `(h, w, C)` NumPy array."""
    resized = resize(keras.ops.convert_to_tensor(image[None], "float32"), size)
    return keras.ops.convert_to_numpy(resized)[0]


def _check_image(image):
    """The model input of one image, as NumPy: `preprocess_images`, shared
    with the training pipeline and the exported graphs."""
    image = np.asarray(keras.ops.convert_to_numpy(image))
    if image.ndim != 3:
        raise ValueError(f"image must have shape (height, width, 3), got {image.shape}")
    return np.asarray(preprocess_images(image))


def _check_scales(scales):
    try:
        scales = tuple(float(s) for s in scales)
    except (TypeError, ValueError):
        raise ValueError(
            f"scales must be a sequence of positive floats, got {scales!r}"
        ) from None
    if not scales or not all(0 < s <= MAX_TEST_SCALE for s in scales):
        raise ValueError(
            "scales must be a non-empty sequence of floats in (0, "
            f"{MAX_TEST_SCALE:g}] (a scale s runs the model on s² times the "
            f"pixels), got {scales}"
        )
    return scales


def _check_mean(mean, channels):
    mean = np.asarray(mean, dtype=np.float32)
    if mean.shape != (channels,):
        raise ValueError(
            f"mean must have one value per image channel ({channels}), got "
            f"shape {mean.shape}"
        )
    return mean


def _size_pair(size, what):
    if isinstance(size, (int, np.integer)) and not isinstance(size, bool):
        size = (size, size)
    try:
        size = tuple(size)
    except TypeError:
        raise ValueError(
            f"{what} must be a positive int or (height, width), got {size!r}"
        ) from None
    if len(size) != 2:
        raise ValueError(
            f"{what} must be a positive int or (height, width), got {size}"
        )
    return tuple(check_positive_int(s, what) for s in size)
