"""The one instance transform: an image fitted into an instance model's fixed
input (`instance_eval_transform`: resize so it fits, zero padding) and the
detections taken back to the image: `boxes_to_image` (divide by the fit's
scale, clip) and `paste_weights` / `paste_masks` (each detection's S × S
mask probabilities, 28 × 28 for PANet, resized bilinearly into its box,
threshold). COCO evaluation, `predict_instances` (Keras models and `.tflite`
files) and the SavedModel's graph all use these, so every path maps the
same detections to the same pixels.
"""

import numpy as np
from keras import ops


def boxes_to_image(boxes, scale, height, width):
    """Boxes `(..., 4)` `[y1, x1, y2, x2]` in pixels of the fitted model input
    back in the image: divided by the fit's `scale` `(y, x)` (what
    `instance_eval_transform` returns) and clipped to the `height × width`
    image. `keras.ops`: NumPy arrays in and out of `ops.convert_to_numpy`,
    or tensors in a graph (the SavedModel's)."""
    scale = ops.cast(scale, boxes.dtype)
    scale = ops.concatenate([scale, scale], axis=-1)
    limits = ops.cast(ops.stack([height, width, height, width]), boxes.dtype)
    return ops.minimum(ops.maximum(boxes / scale, 0.0), limits)


def paste_weights(low, high, length, size):
    """Bilinear weights `(N, length, size)` taking `size` mask samples to the
    `length` image pixels along one axis, for boxes spanning `[low, high)`
    (`(N,)` each), float32.

    Image pixel i (centre i + 0.5) lies in a box when `low <= i + 0.5 <
    high`; it samples the mask at `(i + 0.5 − low) · size / (high − low) − 0.5`
    (mask pixel centres at integers), clamped to the mask, bilinearly; its
    weights are zero outside the box and for empty boxes. Pasting a mask is
    `rows · mask · colsᵀ`.
    """
    centres = ops.cast(ops.arange(length), "float32") + 0.5
    low = ops.cast(low, "float32")[:, None]
    high = ops.cast(high, "float32")[:, None]
    extent = high - low
    valid = extent > 0
    coordinate = (centres[None] - low) * size / ops.where(valid, extent, 1.0) - 0.5
    coordinate = ops.clip(coordinate, 0.0, size - 1.0)
    lower = ops.floor(coordinate)
    fraction = (coordinate - lower)[..., None]
    lower = ops.cast(lower, "int32")
    upper = ops.minimum(lower + 1, size - 1)
    weights = (
        ops.one_hot(lower, size) * (1.0 - fraction)
        + ops.one_hot(upper, size) * fraction
    )
    inside = ops.logical_and(
        ops.logical_and(centres[None] >= low, centres[None] < high), valid
    )
    return weights * ops.cast(inside, "float32")[..., None]


def paste_masks(masks, boxes, height, width, threshold=0.5):
    """Pastes box-relative mask probabilities into an image.

    Each S × S mask is resized bilinearly onto the image pixels whose centres
    lie inside its box (mask pixel centres spread evenly over the box, edge
    values held beyond the outermost centres) and thresholded; pixels outside
    the box are 0. This is SPEC's "bilinear resize of the 28×28 probabilities
    into the box, threshold 0.5".

    Example:

    >>> paste_masks(np.ones((1, 28, 28)), np.array([[1, 2, 3, 4]]), 5, 6)[0]
    ... # True on rows 1-2, columns 2-3

    Args:
        masks: `(D, S, S)` probabilities (or `(D, S_h, S_w)`).
        boxes: `(D, 4)` boxes `[y1, x1, y2, x2]` in pixels of the target image
            (pixel (i, j) covers `[i, i + 1) × [j, j + 1)`).
        height, width: int. Target image size.
        threshold: float or None. Masks are `probability >= threshold`; None
            returns the pasted probabilities. Defaults to 0.5.

    Returns:
        bool `(D, height, width)`, or float32 with `threshold=None`. D full
        image planes: `paste_mask_crops` holds only the boxes.
    """
    return np.asarray(paste_mask_crops(masks, boxes, height, width, threshold))


PASTE_STYLES = ("kseg", "torchvision")


def paste_mask_crops(masks, boxes, height, width, threshold=0.5, style="kseg"):
    """`paste_masks` as a `PastedMasks`: each mask pasted inside its box when
    it is read, so memory grows with the boxes, not with D × H × W. The same
    pixels as `paste_masks` (which is built on it). `style="torchvision"`
    pastes as torchvision's `paste_masks_in_image` does
    (`torchvision_paste_weights`), for models converted from torchvision."""
    if style not in PASTE_STYLES:
        raise ValueError(f"style must be one of {PASTE_STYLES}, got {style!r}")
    masks = np.asarray(masks, dtype=np.float64)
    boxes = np.asarray(boxes, dtype=np.float64)
    if masks.ndim != 3:
        raise ValueError(f"masks must have shape (D, S, S), got {masks.shape}")
    if boxes.shape != (len(masks), 4):
        raise ValueError(
            f"boxes must have shape ({len(masks)}, 4) for {len(masks)} masks, got "
            f"{boxes.shape}"
        )
    if threshold is not None and not threshold > 0:
        raise ValueError(
            "threshold must be positive or None (outside its box a mask's "
            f"probability is 0), got {threshold!r}"
        )
    return PastedMasks(masks, boxes, height, width, threshold, style)


def _torch_resize_matrix(size_in, size_out):
    """`(size_out, size_in)` weights of torch's bilinear resize
    (`align_corners=False`), float32: output pixel `o` samples
    `max((o + 0.5) · size_in / size_out − 0.5, 0)`."""
    scale = np.float32(size_in / size_out)
    source = np.maximum(
        scale * (np.arange(size_out, dtype="float32") + np.float32(0.5))
        - np.float32(0.5),
        np.float32(0.0),
    )
    lower = source.astype("int64")
    upper = np.minimum(lower + 1, size_in - 1)
    fraction = source - lower.astype("float32")
    weights = np.zeros((size_out, size_in), "float32")
    rows = np.arange(size_out)
    weights[rows, lower] += np.float32(1.0) - fraction
    weights[rows, upper] += fraction
    return weights


def torchvision_paste_weights(low, high, length, size):
    """torchvision's `paste_masks_in_image` along one axis, for one box
    spanning `[low, high]`: `(length, size + 2)` float32 weights taking the
    mask padded by one zero sample on each side to the image's `length`
    pixels. The box is widened by `(size + 2) / size` about its centre and
    truncated to whole pixels (torch's `.to(int64)`), the padded mask
    resized bilinearly to its `stop − start + 1` pixels; other pixels weigh
    0. Masks so pasted fade out over the padding, and their boxes move by
    up to a pixel (SPEC's `paste_weights` resize into the exact box)."""
    half = np.float32(0.5)
    scale = np.float32((size + 2) / size)
    low, high = np.float32(low), np.float32(high)
    extent = (high - low) * half * scale
    centre = (high + low) * half
    start, stop = int(centre - extent), int(centre + extent)
    pixels = max(stop - start + 1, 1)
    resized = _torch_resize_matrix(size + 2, pixels)
    weights = np.zeros((length, size + 2), "float32")
    first, last = max(start, 0), min(start + pixels, length)
    if first < last:
        weights[first:last] = resized[first - start : last - start]
    return weights


# Rows of a mask pasted at a time (`PastedMasks.crop`).
_PASTE_ROWS = 256


class PastedMasks:
    """D masks of an `height × width` image, pasted inside their boxes on
    demand (`paste_mask_crops`): what `paste_masks` returns, without the D
    full image planes.

    Reads like the `(D, H, W)` array: `shape`, `dtype`, `len`, `masks[k]`
    (one full plane), `masks[k, rows, cols]`, and `np.asarray(masks)` (all
    D planes). `crop(k)` and `crop_rows(k, first, stop)` give a mask inside
    its box only, for work whose memory stays with the boxes.

    A pixel's probability is computed in float64 from the float32 sampling
    weights of `paste_weights` (or `torchvision_paste_weights` for
    `style="torchvision"`; at most two taps along each axis), one
    pixel at a time, so it does not depend on which rows are pasted
    together (matrix products round differently by shape): a crop, a band
    of rows and the full plane agree exactly.
    """

    def __init__(self, masks, boxes, height, width, threshold=0.5, style="kseg"):
        self.masks = np.asarray(masks, np.float64)
        if style == "torchvision":
            self.masks = np.pad(self.masks, ((0, 0), (1, 1), (1, 1)))
        self.threshold = threshold
        self.shape = (len(self.masks), int(height), int(width))
        self.dtype = np.dtype(np.float32 if threshold is None else np.bool_)
        self.ndim = 3
        self._spans = []
        for k, mask in enumerate(self.masks):
            if style == "torchvision":
                y1, x1, y2, x2 = boxes[k]
                rows = torchvision_paste_weights(y1, y2, height, mask.shape[0] - 2)
                cols = torchvision_paste_weights(x1, x2, width, mask.shape[1] - 2)
                self._add_span(rows, cols)
                continue
            # One box at a time: nothing here grows with D × H or D × W.
            rows = ops.convert_to_numpy(
                paste_weights(
                    boxes[k : k + 1, 0], boxes[k : k + 1, 2], height, len(mask)
                )
            )[0]
            cols = ops.convert_to_numpy(
                paste_weights(
                    boxes[k : k + 1, 1], boxes[k : k + 1, 3], width, mask.shape[1]
                )
            )[0]
            self._add_span(rows, cols)

    def _add_span(self, rows, cols):
        """Records a mask's box and sampling taps from its `(H, S)` row and
        `(W, S)` column weights."""
        top, bottom = _span(rows)
        left, right = _span(cols)
        if bottom <= top or right <= left:
            top = bottom = left = right = 0
        self._spans.append(
            (top, left, _taps(rows[top:bottom]), _taps(cols[left:right]))
        )

    def __len__(self):
        return self.shape[0]

    def box(self, index):
        """`(top, bottom, left, right)`: the pixels a mask may cover."""
        top, left, rows, cols = self._spans[index]
        return top, top + len(rows[0]), left, left + len(cols[0])

    def crop_rows(self, index, first, stop):
        """Mask `index` on image rows `[first, stop)` (clipped to its box)
        and its box's columns: `(first, left, array)`."""
        top, left, rows, cols = self._spans[index]
        first = min(max(first, top), top + len(rows[0]))
        stop = max(min(stop, top + len(rows[0])), first)
        row_lower, row_upper, row_low, row_high = (
            tap[first - top : stop - top, None] for tap in rows
        )
        column_lower, column_upper, column_low, column_high = cols
        mask = self.masks[index]

        def sample(mask_rows):
            return (
                column_low * mask[mask_rows, column_lower]
                + column_high * mask[mask_rows, column_upper]
            )

        pasted = row_low * sample(row_lower) + row_high * sample(row_upper)
        if self.threshold is None:
            return first, left, pasted.astype(np.float32)
        return first, left, pasted >= self.threshold

    def crop(self, index):
        """`(top, left, array)`: mask `index` inside its box, pasted
        `_PASTE_ROWS` rows at a time (the float64 sums of a whole box
        would be 8 bytes a pixel, several times over)."""
        top, bottom, left, right = self.box(index)
        if self.threshold is not None:
            result = np.empty((bottom - top, right - left), self.dtype)
            for first in range(top, bottom, _PASTE_ROWS):
                _, _, rows = self.crop_rows(index, first, first + _PASTE_ROWS)
                result[first - top : first - top + len(rows)] = rows
            return top, left, result
        return self.crop_rows(index, top, bottom)

    def plane(self, index):
        """Mask `index` as a full `(H, W)` array."""
        top, left, crop = self.crop(index)
        result = np.zeros(self.shape[1:], self.dtype)
        result[top : top + crop.shape[0], left : left + crop.shape[1]] = crop
        return result

    def __getitem__(self, key):
        first, rest = (key[0], key[1:]) if isinstance(key, tuple) else (key, ())
        if isinstance(first, (int, np.integer)):
            if not -len(self) <= first < len(self):
                raise IndexError(f"mask {first} of {len(self)}")
            return self.plane(int(first) % len(self))[rest]
        return np.asarray(self)[key]

    def __array__(self, dtype=None, copy=None):
        result = np.zeros(self.shape, self.dtype)
        for index in range(len(self)):
            top, left, crop = self.crop(index)
            result[index, top : top + crop.shape[0], left : left + crop.shape[1]] = crop
        return result if dtype is None else result.astype(dtype, copy=False)


def as_pasted_masks(masks):
    """`masks` as something with `PastedMasks`' `crop` / `crop_rows` /
    `box`: itself, or a `(D, H, W)` array's planes wrapped whole."""
    if isinstance(masks, PastedMasks):
        return masks
    return _Planes(np.asarray(masks))


class _Planes:
    """A `(D, H, W)` array read through `PastedMasks`' crop methods."""

    def __init__(self, masks):
        self.masks = masks
        self.shape = masks.shape

    def __len__(self):
        return len(self.masks)

    def box(self, index):
        return 0, self.shape[1], 0, self.shape[2]

    def crop_rows(self, index, first, stop):
        first = min(max(first, 0), self.shape[1])
        return first, 0, self.masks[index, first : max(stop, first)]

    def crop(self, index):
        return 0, 0, self.masks[index]


def _taps(weights):
    """A `paste_weights` row set `(L, S)` (at most two adjacent nonzero
    weights a row) as `(lower, upper, lower weight, upper weight)`, each
    `(L,)`; the upper weight is 0 where both taps are one sample."""
    lower = np.argmax(weights > 0, axis=1)
    upper = np.minimum(lower + 1, weights.shape[1] - 1)
    pixels = np.arange(len(weights))
    low_weight = weights[pixels, lower].astype(np.float64)
    high_weight = np.where(upper > lower, weights[pixels, upper], 0.0)
    return lower, upper, low_weight, high_weight.astype(np.float64)


def _span(weights):
    """`(first, stop)` of the pixels with a weight (inside the box)."""
    inside = np.flatnonzero(weights.any(axis=1))
    if inside.size == 0:
        return 0, 0
    return int(inside[0]), int(inside[-1]) + 1


def paste_masks_torchvision(masks, boxes, height, width):
    """torchvision's `paste_masks_in_image`, in NumPy: each `(M, M)` mask
    padded by one zero pixel, its box widened by `(M + 2) / M` about its
    centre and truncated to whole pixels, the padded mask resized bilinearly
    to the box's `x2 − x1 + 1` by `y2 − y1 + 1` pixels and written there.

    It differs from kseg's pasting (`kseg.data.paste_masks`: SPEC's resize
    into the exact box, edge values held to the box's border): masks fade
    out over the padding pixel, and boxes move by up to a pixel. With it,
    a converted model's pasted masks are torchvision's.

    Args:
        masks: `(N, M, M)` probabilities.
        boxes: `(N, 4)` boxes `[y1, x1, y2, x2]` in image pixels.
        height, width: ints. The image size.

    Returns:
        `(N, height, width)` float32 probabilities.
    """
    masks = np.asarray(masks, "float32")
    boxes = np.asarray(boxes, "float32").reshape(-1, 4)
    pasted = PastedMasks(masks, boxes, height, width, None, style="torchvision")
    return np.asarray(pasted)
