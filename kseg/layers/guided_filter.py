"""He et al.'s guided filter and SegModel's guidance CRF.

Shen et al., "Semantic segmentation via structured patch prediction, context
CRF and guidance CRF" (CVPR 2017), section 5, Algorithm 1, eq. 11–16; the
filter is He et al., "Guided Image Filtering" (ECCV 2010 / TPAMI 2013).
"""

import numbers

import keras
import numpy as np
from keras import ops

from kseg.layers.common import KsegLayer, check_channels, check_rank

# Length of the short cumulative sums that `_cumsum` nests. XLA on CPU lowers a
# cumsum to a reduce-window over the whole axis, which costs O(length²): for a
# 512-pixel axis that is ~10× slower than nesting blocks of 8.
_SCAN_BLOCK = 8
# Axes up to this length take one plain cumsum: still cheap, and fewer ops
# keep eager JAX (one compilation per op and shape) fast on small images.
_PLAIN_SCAN_MAX = 32
# TensorFlow's Cumsum kernel runs at ~20 ns per element on CPU (8× an add):
# on the TensorFlow backend outside XLA the scans' blocks are products with a
# triangular matrix instead, 5× faster per scan at 128×128×84 and 512×512×21 (graph
# mode; the guidance CRF of SegModel-R50 at 512², 128×128×21 with three
# iterations, drops from ~375 to ~75 ms).
_MATMUL_SCAN_BLOCK = 16


def _check_positive_int(value, what):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{what} must be a positive int, got {value!r}")
    return int(value)


def _check_positive_float(value, what):
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or value <= 0:
        raise ValueError(f"{what} must be a positive number, got {value!r}")
    return float(value)


def _check_guide_and_inputs(guide_shape, input_shape, radius, what, name="inputs"):
    """Validates static shapes; returns the number of guide channels."""
    check_rank(guide_shape, 4, f"{what} guide")
    check_rank(input_shape, 4, f"{what} {name}")
    guide_channels = check_channels(guide_shape, f"{what} guide")
    if guide_channels not in (1, 3):
        raise ValueError(
            f"{what} guide must have 1 (gray) or 3 (RGB) channels, "
            f"got {guide_channels}: shape={guide_shape}"
        )
    check_channels(input_shape, f"{what} {name}")
    for axis, dim in ((0, "batch size"), (1, "height"), (2, "width")):
        g, x = guide_shape[axis], input_shape[axis]
        if g is not None and x is not None and g != x:
            raise ValueError(
                f"{what} guide and {name} must have the same {dim}, got "
                f"guide shape={guide_shape} and {name} shape={input_shape}"
            )
    sizes = [
        s
        for s in (guide_shape[1], guide_shape[2], input_shape[1], input_shape[2])
        if s is not None
    ]
    if sizes and 2 * radius + 1 > min(sizes):
        raise ValueError(
            f"{what} radius={radius} is too large for a {min(sizes)}-pixel image "
            f"side: 2 * radius + 1 must be <= min(height, width)"
        )
    return guide_channels


def _index(x, axis, index):
    return x[(slice(None),) * axis + (index,)]


def _matmul_scans():
    """Whether the scans take triangular matrix products: on TensorFlow
    outside XLA. Under XLA (JAX, `jit_compile=True`) nested cumsum blocks
    are faster (2× at 512×512×21 on CPU) and match OpenCV's speed."""
    if keras.config.backend() != "tensorflow":
        return False
    try:
        # Imported here: kseg.layers needs TensorFlow only on its own backend.
        # Private API: TensorFlow <= 2.21 has no public "is XLA compiling" query.
        from tensorflow.python.framework import ops as tf_ops
        from tensorflow.python.ops import control_flow_util
    except ImportError:
        return False
    graph = tf_ops.get_default_graph()
    return not control_flow_util.GraphOrParentsInXlaContext(graph)


def _matmul_cumsum(x, axis):
    """Inclusive cumulative sum of `x` along `axis` (static length) as one
    product with a lower-triangular matrix of ones: `length` multiply-adds per
    element, no transposes (the axes before `axis` become the batch, the ones
    after it the columns)."""
    length = x.shape[axis]
    dims = ops.shape(x)
    columns = 1
    for dim in dims[axis + 1 :]:
        columns = columns * dim
    lower = ops.convert_to_tensor(np.tril(np.ones((length, length))), dtype=x.dtype)
    flat = ops.reshape(x, (-1, length, columns))
    return ops.reshape(ops.matmul(lower, flat), dims)


def _cumsum(x, axis):
    """Inclusive cumulative sum of `x` along `axis`.

    With a static length the axis is split into blocks: a cumsum inside each
    block plus the (recursive, exclusive) cumsum of the block totals. Same
    result, linear cost under XLA (see `_SCAN_BLOCK`); on the TensorFlow
    backend outside XLA the in-block sums are triangular matrix products (see
    `_MATMUL_SCAN_BLOCK`).
    """
    length = x.shape[axis]
    if length is None:
        return ops.cumsum(x, axis=axis)
    matmul = _matmul_scans()
    block = _MATMUL_SCAN_BLOCK if matmul else _SCAN_BLOCK
    if length <= (2 * _MATMUL_SCAN_BLOCK if matmul else _PLAIN_SCAN_MAX):
        return _matmul_cumsum(x, axis) if matmul else ops.cumsum(x, axis=axis)
    pad = -length % block
    if pad:
        widths = [(0, 0)] * len(x.shape)
        widths[axis] = (0, pad)
        x = ops.pad(x, widths)
    dims = list(ops.shape(x))
    dims[0] = -1
    blocked = ops.reshape(
        x, (*dims[:axis], (length + pad) // block, block, *dims[axis + 1 :])
    )
    if matmul:
        inner = _matmul_cumsum(blocked, axis + 1)
    else:
        inner = ops.cumsum(blocked, axis=axis + 1)
    totals = _index(inner, axis + 1, -1)
    offsets = _cumsum(totals, axis) - totals
    out = ops.reshape(inner + ops.expand_dims(offsets, axis + 1), dims)
    return _index(out, axis, slice(0, length)) if pad else out


def _box_sum(x, radius, axis):
    """Sums over `[i − radius, i + radius]` along `axis`, clipped at the border.

    The window sum `S_i = C[min(i + radius, n − 1)] − C[i − radius − 1]` (`C`
    the cumulative sum, zero before the first pixel) is the cumulative sum of
    `d_i = x[i + radius] − x[i − radius − 1]` (out-of-image terms zero, `d_0`
    the first window sum `x[0] + … + x[radius]`). Taking the two shifted
    slices before the cumulative sum keeps every running sum window-sized, so
    float32 keeps its precision on large images (18× smaller error than
    differencing the image-long cumulative sums, measured on 512×512), and
    the result needs no further pass. The cost does not depend on the radius.
    Needs `radius < n`.
    """
    head = ops.sum(_index(x, axis, slice(0, radius + 1)), axis=axis, keepdims=True)
    entering = ops.concatenate([head, _index(x, axis, slice(radius + 1, None))], axis)
    leaving = _index(x, axis, slice(0, -(radius + 1)))
    entering_pad, leaving_pad = [(0, 0)] * 4, [(0, 0)] * 4
    entering_pad[axis], leaving_pad[axis] = (0, radius), (radius + 1, 0)
    return _cumsum(
        ops.pad(entering, entering_pad) - ops.pad(leaving, leaving_pad), axis
    )


def _running_box_sum(x, radius, axis):
    """`_box_sum` as one loop over `axis` (static length): `S_0 = x_0 + … +
    x_radius`, `S_i = S_{i−1} + x[i + radius] − x[i − radius − 1]`
    (out-of-image terms zero), each step one slice of the other axes.

    The same running sums of window-sized differences as `_box_sum`, so the
    same float32 precision. Under XLA the loop updates its output in place:
    ~1.3 passes over the tensor per axis against ~3–4 for the nested cumsum
    blocks (512×512×84 on CPU: 76 against 170–250 ms CPU time), and the cost
    does not depend on the radius.
    """
    length = x.shape[axis]
    sizes = [-1 if d is None else d for d in x.shape]
    sizes[axis] = 1

    def starts(i):
        return [i if k == axis else 0 for k in range(len(sizes))]

    def row(i):
        # x[i] if 0 <= i < length else 0; the index is clamped for the slice.
        inside = ops.cast(ops.logical_and(i >= 0, i < length), x.dtype)
        return ops.slice(x, starts(ops.clip(i, 0, length - 1)), sizes) * inside

    def step(i, out):
        previous = ops.slice(out, starts(i - 1), sizes)
        current = previous + row(i + radius) - row(i - radius - 1)
        return ops.slice_update(out, starts(i), current)

    head = ops.sum(_index(x, axis, slice(0, radius + 1)), axis=axis, keepdims=True)
    out = ops.slice_update(ops.zeros_like(x), [0] * len(sizes), head)
    return ops.fori_loop(1, length, step, out)


def _loop_scans(x, axis):
    """Whether `_box_sums` takes `_running_box_sum` along `axis`: with a
    static length above `_PLAIN_SCAN_MAX` and not on TensorFlow outside XLA
    (there a loop step costs graph-op dispatches; the matrix-product scans
    win)."""
    length = x.shape[axis]
    return length is not None and length > _PLAIN_SCAN_MAX and not _matmul_scans()


def _box_sums(x, radius):
    """Box sums over both spatial axes of NHWC `x` (see `_box_sum`).

    The 2-D box sum is a symmetric linear map, so its gradient is the same
    box sum of the incoming gradient: given as a custom gradient on the loop
    path, whose loops autodiff would otherwise record step by step.
    """
    if not (_loop_scans(x, 1) or _loop_scans(x, 2)):
        return _box_sum(_box_sum(x, radius, 1), radius, 2)

    def box(y):
        for axis in (1, 2):
            if _loop_scans(y, axis):
                y = _running_box_sum(y, radius, axis)
            else:
                y = _box_sum(y, radius, axis)
        return y

    @ops.custom_gradient
    def forward(y):
        def grad(*args, upstream=None):
            if upstream is None:
                (upstream,) = args
            return box(upstream)

        return box(y), grad

    return forward(x)


def _window_counts(size, radius):
    """Number of in-image pixels of each clipped 1-D window along an axis."""
    i = ops.arange(size, dtype="float32")
    last = ops.cast(size - 1, "float32")
    return ops.minimum(i + radius, last) - ops.maximum(i - radius, 0.0) + 1.0


def _box_mean(x, radius, inverse_counts):
    return _box_sums(x, radius) * inverse_counts


def _guide_statistics(guide, radius, epsilon):
    """Everything about the guide that does not depend on the filtered input.

    Returns the centred guide, its window means `μ_k`, the entries of
    `(Σ_k + εU)⁻¹` (one for gray; rr, rg, rb, gg, gb, bb of the symmetric
    inverse for RGB) and the inverse window pixel counts.
    """
    shape = ops.shape(guide)
    counts = ops.multiply(
        ops.reshape(_window_counts(shape[1], radius), (1, -1, 1, 1)),
        ops.reshape(_window_counts(shape[2], radius), (1, 1, -1, 1)),
    )
    inverse_counts = 1.0 / counts
    # The filter is invariant to adding a constant to the guide; centring it
    # avoids cancellation in `E[I²] − μ²` for bright images.
    guide = guide - ops.mean(guide, axis=(1, 2), keepdims=True)
    if guide.shape[-1] == 1:
        moments = _box_mean(
            ops.concatenate([guide, guide * guide], axis=-1), radius, inverse_counts
        )
        mean, second = ops.split(moments, 2, axis=-1)
        return guide, mean, [1.0 / (second - mean * mean + epsilon)], inverse_counts

    r, g, b = ops.split(guide, 3, axis=-1)
    moments = _box_mean(
        ops.concatenate([guide, r * r, r * g, r * b, g * g, g * b, b * b], axis=-1),
        radius,
        inverse_counts,
    )
    mr, mg, mb, rr, rg, rb, gg, gb, bb = ops.split(moments, 9, axis=-1)
    # Σ + εU, ε on the diagonal only.
    srr = rr - mr * mr + epsilon
    srg = rg - mr * mg
    srb = rb - mr * mb
    sgg = gg - mg * mg + epsilon
    sgb = gb - mg * mb
    sbb = bb - mb * mb + epsilon
    # Inverse of the symmetric 3×3 matrix as adjugate / determinant.
    arr = sgg * sbb - sgb * sgb
    arg = srb * sgb - srg * sbb
    arb = srg * sgb - srb * sgg
    agg = srr * sbb - srb * srb
    agb = srg * srb - srr * sgb
    abb = srr * sgg - srg * srg
    inverse_det = 1.0 / (srr * arr + srg * arg + srb * arb)
    inverse = [a * inverse_det for a in (arr, arg, arb, agg, agb, abb)]
    return guide, moments[..., :3], inverse, inverse_counts


def _filter(statistics, inputs, radius):
    """Guided-filters float32 NHWC `inputs` with precomputed guide statistics."""
    guide, mean, inverse, inverse_counts = statistics
    guide_channels = guide.shape[-1]
    guides = ops.split(guide, guide_channels, axis=-1)
    means = ops.split(mean, guide_channels, axis=-1)
    # A constant input comes out unchanged, so removing the per-image mean
    # first is exact; it avoids cancellation in `E[I·p] − μ·p̄` for inputs far
    # from zero (logits, say).
    offset = ops.mean(inputs, axis=(1, 2), keepdims=True)
    p = inputs - offset
    moments = _box_mean(
        ops.concatenate([p] + [g * p for g in guides], axis=-1),
        radius,
        inverse_counts,
    )
    p_mean, *ip_mean = ops.split(moments, 1 + guide_channels, axis=-1)
    cov = [m - mu * p_mean for m, mu in zip(ip_mean, means, strict=True)]
    if guide_channels == 1:
        a = [inverse[0] * cov[0]]
    else:
        irr, irg, irb, igg, igb, ibb = inverse
        a = [
            irr * cov[0] + irg * cov[1] + irb * cov[2],
            irg * cov[0] + igg * cov[1] + igb * cov[2],
            irb * cov[0] + igb * cov[1] + ibb * cov[2],
        ]
    b = p_mean
    for a_k, mu in zip(a, means, strict=True):
        b = b - a_k * mu
    smoothed = _box_mean(ops.concatenate(a + [b], axis=-1), radius, inverse_counts)
    *a_mean, b_mean = ops.split(smoothed, 1 + guide_channels, axis=-1)
    out = b_mean + offset
    for a_k, g in zip(a_mean, guides, strict=True):
        out = out + a_k * g
    return out


def guided_filter(guide, inputs, radius, epsilon):
    """He et al.'s guided filter of every channel of `inputs`, in float32.

    For each window `ω_k` of `(2·radius + 1)²` pixels, `a_k = (Σ_k + εU)⁻¹
    cov_k(I, p)` and `b_k = p̄_k − a_kᵀ μ_k`; the output is `q_i = ā_iᵀ I_i +
    b̄_i`, with `ā`, `b̄` the means of `a`, `b` over the windows containing `i`.
    Every mean is over the window clipped at the image border and divides by
    the number of in-image pixels. Box sums come from cumulative sums (of
    shifted differences, see `_box_sum`), so the cost does not depend on the
    radius. For an RGB guide `Σ_k` is the 3×3 colour covariance, `ε` is added
    to its diagonal only and the inverse is adjugate / determinant.
    Everything is computed in float32 whatever the input dtypes.

    The filter is linear in `inputs`, `q = F p`, and autodiff gives its
    gradient: `Fᵀ g = n ⊙ F(g ⊘ n)` for an incoming gradient `g`, with `n`
    the window pixel counts (`w_ij n_i = w_ji n_j`), i.e. the same filter
    applied to `g` wherever the windows are not clipped.

    Example:
    >>> guide = np.random.uniform(0, 255, (1, 16, 16, 3))
    >>> probs = np.random.uniform(size=(1, 16, 16, 21))
    >>> guided_filter(guide, probs, radius=2, epsilon=1.0).shape
    (1, 16, 16, 21)

    Args:
        guide: tensor `(N, H, W, 1)` (gray) or `(N, H, W, 3)` (RGB). `epsilon`
            is in the guide's squared intensity units.
        inputs: tensor `(N, H, W, C)` to filter, each channel independently.
        radius: int. Window radius `r >= 1`; the image must fit one full
            window: `2·radius + 1 <= min(H, W)` (checked when the sizes are
            static).
        epsilon: float. Regularization `ε > 0` added to the guide variance.

    Returns:
        float32 tensor `(N, H, W, C)`.

    Raises:
        ValueError: wrong ranks, a guide that is not 1- or 3-channel, an
            unknown input channel count, different static batch or spatial
            sizes, a radius that is not a positive int or breaks
            `2·radius + 1 <= min(H, W)`, or `epsilon <= 0`.
    """
    radius = _check_positive_int(radius, "guided_filter radius")
    epsilon = _check_positive_float(epsilon, "guided_filter epsilon")
    if not hasattr(guide, "shape"):
        guide = ops.convert_to_tensor(guide)
    if not hasattr(inputs, "shape"):
        inputs = ops.convert_to_tensor(inputs)
    _check_guide_and_inputs(
        tuple(guide.shape), tuple(inputs.shape), radius, "guided_filter"
    )
    guide = ops.cast(guide, "float32")
    inputs = ops.cast(inputs, "float32")
    return _filter(_guide_statistics(guide, radius, epsilon), inputs, radius)


@keras.saving.register_keras_serializable(package="kseg")
class GuidedFilter(KsegLayer):
    """He et al.'s guided filter as a layer (always float32).

    The message-passing step of SegModel's guidance CRF (Shen et al., CVPR
    2017, section 5, eq. 11–12): each channel of the input is filtered with
    edge-preserving weights computed from the guide image. See
    `guided_filter` for the exact definition (clipped windows divided by the
    true pixel count, ε on the covariance diagonal). The output is float32
    under every dtype policy: the box sums lose small values in float16.

    Example:
    >>> layer = GuidedFilter(radius=2, epsilon=1.0)
    >>> guide = np.random.uniform(0, 255, (2, 16, 16, 3))
    >>> layer([guide, np.zeros((2, 16, 16, 4))]).shape
    (2, 16, 16, 4)

    Args:
        radius: int. Window radius; windows are `(2·radius + 1)²` pixels and
            `2·radius + 1 <= min(height, width)` is required.
        epsilon: float. Regularization added to the guide (co)variance, in
            squared guide intensity units (`1.0` for 0–255 images is strong
            edge preservation).
        **kwargs: Base layer keyword arguments (`name`, `dtype`, ...).

    Input shape:
        List `[guide, inputs]`: guide `(batch, height, width, 1 or 3)`,
        inputs `(batch, height, width, channels)`.

    Output shape:
        float32 tensor `(batch, height, width, channels)`.
    """

    def __init__(self, radius, epsilon, **kwargs):
        super().__init__(**kwargs)
        self.radius = _check_positive_int(radius, "radius")
        self.epsilon = _check_positive_float(epsilon, "epsilon")
        # Inputs stay in their dtype and are cast to float32 in `call`, never
        # rounded to the float16 compute dtype first.
        self.autocast = False
        self.input_spec = [
            keras.layers.InputSpec(ndim=4),
            keras.layers.InputSpec(ndim=4),
        ]

    def build(self, input_shape):
        guide_shape, inputs_shape = _split_pair(input_shape, self.name)
        _check_guide_and_inputs(guide_shape, inputs_shape, self.radius, self.name)

    def call(self, inputs, training=None):
        guide, x = inputs
        return guided_filter(guide, x, self.radius, self.epsilon)

    def compute_output_shape(self, input_shape):
        return tuple(_split_pair(input_shape, self.name)[1])

    def compute_output_spec(self, inputs):
        return keras.KerasTensor(
            self.compute_output_shape([tuple(x.shape) for x in inputs]),
            dtype="float32",
        )

    def get_config(self):
        return {
            **super().get_config(),
            "radius": self.radius,
            "epsilon": self.epsilon,
        }


def _split_pair(input_shape, what):
    if (
        not isinstance(input_shape, (list, tuple))
        or len(input_shape) != 2
        or not all(isinstance(s, (list, tuple)) for s in input_shape)
    ):
        raise ValueError(
            f"{what} expects a list of two inputs, got input_shape={input_shape}"
        )
    return tuple(input_shape[0]), tuple(input_shape[1])


def _potts(shape, dtype=None):
    """Potts compatibility: 0 for the same class, 1 for different classes."""
    return ops.cast(1.0 - np.eye(shape[0], shape[1]), dtype or "float32")


def _serialize_initializer(initializer):
    if isinstance(initializer, (str, numbers.Real)):
        return initializer
    return keras.initializers.serialize(keras.initializers.get(initializer))


@keras.saving.register_keras_serializable(package="kseg")
class GuidanceCRF(KsegLayer):
    """Mean-field CRF whose message passing is a guided filter (float32).

    The guidance CRF of SegModel (Shen et al., CVPR 2017, section 5,
    Algorithm 1), written for logits `z = −φ`: `z⁰ = z_u`, then `iterations`
    times `q = softmax(z)` (over classes), `g = GuidedFilter(I, q)` per class,
    `m[..., c] = Σ_c' g[..., c'] μ[c', c]` with the learnable compatibility
    `μ` (C×C, initialised Potts: 0 on the diagonal, 1 off it) and
    `z = z_u − λ·m` with the learnable scalar `λ`. The guide statistics are
    computed once and shared by all iterations. The paper runs 3 iterations at
    ¼ resolution against the ×4-downsampled image with ε = 1 for 0–255
    intensities; radius 3 is the authors' released deploy setting. Weights and
    output are float32 under every dtype policy.

    Example:
    >>> crf = GuidanceCRF(num_classes=21)
    >>> logits = np.random.normal(size=(2, 32, 32, 21))
    >>> image = np.random.uniform(0, 255, (2, 32, 32, 3))
    >>> crf([logits, image]).shape
    (2, 32, 32, 21)

    Args:
        num_classes: int. Number of classes `C` (the logits' channels).
        iterations: int. Mean-field iterations `k_max >= 1`. Defaults to `3`.
        radius: int. Guided-filter window radius. Defaults to `3`.
        epsilon: float. Guided-filter regularization, in squared guide
            intensity units; `1.0` assumes a guide with 0–255 intensities.
            Defaults to `1.0`.
        compatibility_initializer: `"potts"` or a Keras initializer for the
            `(C, C)` compatibility `μ`. Defaults to `"potts"`.
        lambda_initializer: float (a constant) or a Keras initializer for the
            scalar weight `λ`. Defaults to `1.0`.
        **kwargs: Base layer keyword arguments (`name`, `dtype`, ...).

    Input shape:
        List `[logits, guide_image]`: logits `(batch, height, width,
        num_classes)`, guide `(batch, height, width, 1 or 3)`.

    Output shape:
        float32 logits `(batch, height, width, num_classes)`.
    """

    def __init__(
        self,
        num_classes,
        iterations=3,
        radius=3,
        epsilon=1.0,
        compatibility_initializer="potts",
        lambda_initializer=1.0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.num_classes = _check_positive_int(num_classes, "num_classes")
        self.iterations = _check_positive_int(iterations, "iterations")
        self.radius = _check_positive_int(radius, "radius")
        self.epsilon = _check_positive_float(epsilon, "epsilon")
        if compatibility_initializer != "potts":
            keras.initializers.get(compatibility_initializer)
        if not isinstance(lambda_initializer, numbers.Real):
            keras.initializers.get(lambda_initializer)
        self.compatibility_initializer = compatibility_initializer
        self.lambda_initializer = lambda_initializer
        # Inputs are cast to float32 in `call`, never rounded to float16 first.
        self.autocast = False
        self.input_spec = [
            keras.layers.InputSpec(ndim=4),
            keras.layers.InputSpec(ndim=4),
        ]

    def build(self, input_shape):
        logits_shape, guide_shape = _split_pair(input_shape, self.name)
        _check_guide_and_inputs(
            guide_shape, logits_shape, self.radius, self.name, name="logits"
        )
        if logits_shape[-1] != self.num_classes:
            raise ValueError(
                f"{self.name} logits must have num_classes={self.num_classes} "
                f"channels, got shape={logits_shape}"
            )
        if self.compatibility_initializer == "potts":
            compatibility_initializer = _potts
        else:
            compatibility_initializer = keras.initializers.get(
                self.compatibility_initializer
            )
        if isinstance(self.lambda_initializer, numbers.Real):
            lambda_initializer = keras.initializers.Constant(
                float(self.lambda_initializer)
            )
        else:
            lambda_initializer = keras.initializers.get(self.lambda_initializer)
        self.compatibility = self.add_weight(
            shape=(self.num_classes, self.num_classes),
            initializer=compatibility_initializer,
            dtype="float32",
            name="compatibility",
        )
        self.lambda_weight = self.add_weight(
            shape=(), initializer=lambda_initializer, dtype="float32", name="lambda"
        )

    def call(self, inputs, training=None):
        logits, guide = inputs
        unary = ops.cast(logits, "float32")
        statistics = _guide_statistics(
            ops.cast(guide, "float32"), self.radius, self.epsilon
        )
        compatibility = ops.cast(self.compatibility, "float32")
        lambda_weight = ops.cast(self.lambda_weight, "float32")
        z = unary
        for _ in range(self.iterations):
            g = _filter(statistics, ops.softmax(z, axis=-1), self.radius)
            z = unary - lambda_weight * ops.einsum("nhwc,cd->nhwd", g, compatibility)
        return z

    def compute_output_shape(self, input_shape):
        logits_shape = _split_pair(input_shape, self.name)[0]
        return (*logits_shape[:3], self.num_classes)

    def compute_output_spec(self, inputs):
        return keras.KerasTensor(
            self.compute_output_shape([tuple(x.shape) for x in inputs]),
            dtype="float32",
        )

    def get_config(self):
        return {
            **super().get_config(),
            "num_classes": self.num_classes,
            "iterations": self.iterations,
            "radius": self.radius,
            "epsilon": self.epsilon,
            "compatibility_initializer": _serialize_initializer(
                self.compatibility_initializer
            ),
            "lambda_initializer": _serialize_initializer(self.lambda_initializer),
        }
