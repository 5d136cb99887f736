"""The box and mask heads of the PANet system (Mask R-CNN's, with PANet's
adaptive feature pooling, heavier head and fully-connected fusion as
switches).

He et al., "Mask R-CNN", ICCV 2017; Liu et al., "Path Aggregation Network for
Instance Segmentation", CVPR 2018, sections 3.2-3.3.
"""

import keras
import numpy as np
from keras import ops

from kseg.layers.common import KsegLayer, check_choice, check_positive_int
from kseg.layers.panet import AdaptiveFeaturePooling
from kseg.layers.units import (
    apply_unit,
    build_unit,
    check_normalization,
    conv_and_norm,
)


def _fuse(tensors, fusion):
    fused = tensors[0]
    for x in tensors[1:]:
        fused = ops.maximum(fused, x) if fusion == "max" else fused + x
    return fused


def _flatten(x):
    # A static width, because TF cannot infer -1 for zero RoIs.
    return ops.reshape(x, (ops.shape(x)[0], int(np.prod(x.shape[1:]))))


@keras.saving.register_keras_serializable(package="kseg")
class BoxHead(KsegLayer):
    """Box head: class logits and class-specific box deltas per RoI.

    The Mask R-CNN + FPN head "2fc" (flatten, fc `fc_units` + ReLU twice) or
    PANet's heavier head (`heavier_head=True`: 4 conv3×3 `conv_filters` +
    ReLU, flatten, one fc `fc_units` + ReLU), then a linear layer to `C + 1`
    class logits (background = 0; N(0, 0.01²) init) and one to `4·C`
    class-specific deltas (N(0, 0.001²)), as Detectron2.

    With adaptive feature pooling (PANet 3.2, Table 4) the input is a list of
    grids, one per level: with `fusion_position="after"` ("fc1fu.fc2", the
    paper's choice) each level has its own first parameter layer (fc1, or
    conv1 of the heavier head) through `AdaptiveFeaturePooling`, fused by
    `fusion`; with `"before"` ("fu.fc1fc2") the grids are fused first and
    the head is the plain one.

    Example:
    >>> head = BoxHead(num_classes=2, fc_units=16)
    >>> logits, deltas = head(np.zeros((5, 7, 7, 4)))
    >>> tuple(logits.shape), tuple(deltas.shape)
    ((5, 3), (5, 8))

    Args:
        num_classes: int. Object classes `C`.
        fc_units: int. Units of the fc layers. Defaults to `1024`.
        conv_filters: int. Channels of the heavier head's convs.
            Defaults to `256`.
        heavier_head: bool. PANet's heavier head. Defaults to `False`.
        fusion: str. `"max"` or `"sum"` across levels. Defaults to `"max"`.
        fusion_position: str. `"after"` or `"before"` the first parameter
            layer. Defaults to `"after"`.
        normalization: `None`, `"batch"` or `"sync_batch"`: BN after the
            heavier head's convs that this layer owns (the per-level conv1
            of `AdaptiveFeaturePooling` has none). Defaults to `None`.
        **kwargs: Base layer keyword arguments (`name`, `dtype`, ...).

    Input shape:
        `(R, 7, 7, C_in)` or a list of them (one per level).

    Output shape:
        `[class_logits (R, C + 1), box_deltas (R, 4·C)]`, float32.
    """

    def __init__(
        self,
        num_classes,
        fc_units=1024,
        conv_filters=256,
        heavier_head=False,
        fusion="max",
        fusion_position="after",
        normalization=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.num_classes = check_positive_int(num_classes, "num_classes")
        self.fc_units = check_positive_int(fc_units, "fc_units")
        self.conv_filters = check_positive_int(conv_filters, "conv_filters")
        self.heavier_head = bool(heavier_head)
        check_choice(fusion, ("max", "sum"), "fusion")
        check_choice(fusion_position, ("after", "before"), "fusion_position")
        self.fusion = fusion
        self.fusion_position = fusion_position
        self.normalization = check_normalization(normalization)

    def build(self, input_shape):
        levels = isinstance(input_shape, (list, tuple)) and isinstance(
            input_shape[0], (list, tuple)
        )
        self._adaptive = levels and self.fusion_position == "after"
        shape = tuple(input_shape[0] if levels else input_shape)
        dtype = self.dtype_policy
        self.convs, self.norms, self.fcs = [], [], []
        if self._adaptive:
            first = self.conv_filters if self.heavier_head else self.fc_units
            self.adaptive_pooling = AdaptiveFeaturePooling(
                first,
                fusion=self.fusion,
                layer_type="conv" if self.heavier_head else "fc",
                dtype=dtype,
                name="adaptive_pooling",
            )
            self.adaptive_pooling.build(list(input_shape))
            shape = self.adaptive_pooling.compute_output_shape(list(input_shape))
        if self.heavier_head:
            for i in range(1 if self._adaptive else 0, 4):
                conv, norm = conv_and_norm(
                    self, self.conv_filters, 3, f"conv{i + 1}", self.normalization
                )
                shape = build_unit(conv, norm, shape)
                self.convs.append(conv)
                self.norms.append(norm)
            fc_count = 1
        else:
            fc_count = 1 if self._adaptive else 2
        if len(shape) == 4:
            shape = (shape[0], int(np.prod(shape[1:])))
        for i in range(fc_count):
            fc = keras.layers.Dense(
                self.fc_units,
                activation="relu",
                dtype=dtype,
                name=f"fc{i + 3 - fc_count}",
            )
            fc.build(shape)
            shape = (shape[0], self.fc_units)
            self.fcs.append(fc)
        self.class_logits = keras.layers.Dense(
            self.num_classes + 1,
            kernel_initializer=keras.initializers.RandomNormal(stddev=0.01),
            dtype=dtype,
            name="class_logits",
        )
        self.class_logits.build(shape)
        self.box_deltas = keras.layers.Dense(
            4 * self.num_classes,
            kernel_initializer=keras.initializers.RandomNormal(stddev=0.001),
            dtype=dtype,
            name="box_deltas",
        )
        self.box_deltas.build(shape)

    def call(self, inputs, training=None):
        if isinstance(inputs, (list, tuple)):
            if self._adaptive:
                x = self.adaptive_pooling(list(inputs))
            else:
                x = _fuse(list(inputs), self.fusion)
        else:
            x = inputs
        for conv, norm in zip(self.convs, self.norms, strict=True):
            x = apply_unit(conv, norm, x, training)
        if len(x.shape) == 4:
            x = _flatten(x)
        for fc in self.fcs:
            x = fc(x)
        return [
            ops.cast(self.class_logits(x), "float32"),
            ops.cast(self.box_deltas(x), "float32"),
        ]

    def compute_output_spec(self, inputs, training=None):
        first = inputs[0] if isinstance(inputs, (list, tuple)) else inputs
        rois = first.shape[0]
        return [
            keras.KerasTensor((rois, self.num_classes + 1), "float32"),
            keras.KerasTensor((rois, 4 * self.num_classes), "float32"),
        ]

    def get_config(self):
        return {
            **super().get_config(),
            "num_classes": self.num_classes,
            "fc_units": self.fc_units,
            "conv_filters": self.conv_filters,
            "heavier_head": self.heavier_head,
            "fusion": self.fusion,
            "fusion_position": self.fusion_position,
            "normalization": self.normalization,
        }


MASK_FUSION_BRANCHES = ("conv2", "conv3", "conv4")
MASK_FUSIONS = ("sum", "max", "product")


@keras.saving.register_keras_serializable(package="kseg")
class MaskHead(KsegLayer):
    """Mask head: the Mask R-CNN FCN head with PANet's switches.

    Four conv3×3 (`filters`, ReLU), a 2×2 stride-2 transposed conv
    (`filters`, ReLU) and a 1×1 conv to `C` per-class mask logits. With
    `fully_connected_fusion` (PANet 3.3, Figure 4, Table 5) a short path from
    the output of `fusion_branch` — conv3×3 (`filters`) + ReLU, conv3×3
    (`filters // 2`) + ReLU, flatten, one fc to `mask_size²` — gives a
    class-agnostic foreground logit map fused with every class's logits by
    `mask_fusion`: `"sum"` (the paper's), `"max"`, or `"product"` (of the
    two logit maps). `MaskHead(C, fully_connected_fusion=True)` computes
    `FullyConnectedFusionMaskHead(C)` (same layer names, the weights load
    across; a test checks it); this layer adds the other rows of Table 5,
    the plain head and BN. With a list input (adaptive feature pooling)
    conv1 is one conv per level, fused by `fusion` (`AdaptiveFeaturePooling`).

    Example:
    >>> head = MaskHead(3, mask_size=8, filters=4, fully_connected_fusion=True)
    >>> tuple(head(np.zeros((2, 4, 4, 4))).shape)
    (2, 8, 8, 3)

    Args:
        num_classes: int. Per-class masks `C`.
        mask_size: int. Side of the masks (even). Defaults to `28`.
        filters: int. Channels of the convs. Defaults to `256`.
        fusion: str. `"max"` or `"sum"` across levels. Defaults to `"max"`.
        fully_connected_fusion: bool. Adds the fc short path.
            Defaults to `False`.
        fusion_branch: str. `"conv2"`, `"conv3"` or `"conv4"`: where the short
            path starts. Defaults to `"conv3"`.
        mask_fusion: str. `"sum"`, `"max"` or `"product"`. Defaults to
            `"sum"`.
        normalization: `None`, `"batch"` or `"sync_batch"`: BN after the convs
            this layer owns. Defaults to `None`.
        include_first_conv: bool. Whether the head owns conv1 for a single
            input (`False`: the input is conv1's output, e.g. after
            `AdaptiveFeaturePooling(layer_type="conv")`). Defaults to `True`.
        **kwargs: Base layer keyword arguments (`name`, `dtype`, ...).

    Input shape:
        `(R, mask_size / 2, mask_size / 2, C_in)` or a list of them.

    Output shape:
        `(R, mask_size, mask_size, C)` mask logits, float32.
    """

    def __init__(
        self,
        num_classes,
        mask_size=28,
        filters=256,
        fusion="max",
        fully_connected_fusion=False,
        fusion_branch="conv3",
        mask_fusion="sum",
        normalization=None,
        include_first_conv=True,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.include_first_conv = bool(include_first_conv)
        self.num_classes = check_positive_int(num_classes, "num_classes")
        self.mask_size = check_positive_int(mask_size, "mask_size")
        if self.mask_size % 2:
            raise ValueError(f"mask_size must be even, got {mask_size}")
        self.filters = check_positive_int(filters, "filters")
        if self.filters < 2:
            raise ValueError(f"filters must be >= 2, got {filters}")
        check_choice(fusion, ("max", "sum"), "fusion")
        check_choice(fusion_branch, MASK_FUSION_BRANCHES, "fusion_branch")
        check_choice(mask_fusion, MASK_FUSIONS, "mask_fusion")
        self.fusion = fusion
        self.fully_connected_fusion = bool(fully_connected_fusion)
        self.fusion_branch = fusion_branch
        self.mask_fusion = mask_fusion
        self.normalization = check_normalization(normalization)

    def build(self, input_shape):
        levels = isinstance(input_shape, (list, tuple)) and isinstance(
            input_shape[0], (list, tuple)
        )
        dtype = self.dtype_policy
        self.convs, self.norms = [], []
        shape = tuple(input_shape[0] if levels else input_shape)
        if levels:
            self.adaptive_pooling = AdaptiveFeaturePooling(
                self.filters,
                fusion=self.fusion,
                layer_type="conv",
                dtype=dtype,
                name="conv1",
            )
            self.adaptive_pooling.build(list(input_shape))
            shape = (*shape[:3], self.filters)
        grid = self.mask_size // 2
        for shape in input_shape if levels else [input_shape]:
            if len(shape) != 4:
                raise ValueError(
                    f"{self.name}: expected RoI grids of ndim=4, got {tuple(shape)}"
                )
            if tuple(shape[1:3]) != (grid, grid):
                raise ValueError(
                    f"{self.name}: input spatial size must be mask_size / 2 = "
                    f"{grid}, got {tuple(shape[1:3])}"
                )
        first = 0 if self.include_first_conv and not levels else 1
        for i in range(first, 4):
            conv, norm = conv_and_norm(
                self, self.filters, 3, f"conv{i + 1}", self.normalization
            )
            shape = build_unit(conv, norm, shape)
            self.convs.append(conv)
            self.norms.append(norm)
        self.deconv = keras.layers.Conv2DTranspose(
            self.filters, 2, strides=2, activation="relu", dtype=dtype, name="deconv"
        )
        self.deconv.build(shape)
        self.mask_logits = keras.layers.Conv2D(
            self.num_classes,
            1,
            kernel_initializer=keras.initializers.RandomNormal(stddev=0.001),
            dtype=dtype,
            name="mask_logits",
        )
        self.mask_logits.build(self.deconv.compute_output_shape(shape))
        if self.fully_connected_fusion:
            self.fc_conv1, self.fc_norm1 = conv_and_norm(
                self, self.filters, 3, "fc_conv1", self.normalization
            )
            build_unit(self.fc_conv1, self.fc_norm1, shape)
            self.fc_conv2, self.fc_norm2 = conv_and_norm(
                self, self.filters // 2, 3, "fc_conv2", self.normalization
            )
            build_unit(self.fc_conv2, self.fc_norm2, shape)
            self.fc = keras.layers.Dense(self.mask_size**2, dtype=dtype, name="fc")
            self.fc.build((shape[0], shape[1] * shape[2] * (self.filters // 2)))

    def call(self, inputs, training=None):
        stages = []
        if isinstance(inputs, (list, tuple)):
            x = self.adaptive_pooling(list(inputs))
            stages.append(x)
        else:
            x = inputs
            if not self.include_first_conv:
                stages.append(x)
        for conv, norm in zip(self.convs, self.norms, strict=True):
            x = apply_unit(conv, norm, x, training)
            stages.append(x)
        masks = self.mask_logits(self.deconv(x))
        if not self.fully_connected_fusion:
            return ops.cast(masks, "float32")
        short = stages[MASK_FUSION_BRANCHES.index(self.fusion_branch) + 1]
        short = apply_unit(self.fc_conv1, self.fc_norm1, short, training)
        short = apply_unit(self.fc_conv2, self.fc_norm2, short, training)
        short = self.fc(_flatten(short))
        foreground = ops.reshape(short, (-1, self.mask_size, self.mask_size, 1))
        if self.mask_fusion == "sum":
            fused = masks + foreground
        elif self.mask_fusion == "max":
            fused = ops.maximum(masks, foreground)
        else:
            fused = masks * foreground
        return ops.cast(fused, "float32")

    def compute_output_spec(self, inputs, training=None):
        first = inputs[0] if isinstance(inputs, (list, tuple)) else inputs
        return keras.KerasTensor(
            (first.shape[0], self.mask_size, self.mask_size, self.num_classes),
            "float32",
        )

    def get_config(self):
        return {
            **super().get_config(),
            "num_classes": self.num_classes,
            "mask_size": self.mask_size,
            "filters": self.filters,
            "fusion": self.fusion,
            "fully_connected_fusion": self.fully_connected_fusion,
            "fusion_branch": self.fusion_branch,
            "mask_fusion": self.mask_fusion,
            "normalization": self.normalization,
            "include_first_conv": self.include_first_conv,
        }


@keras.saving.register_keras_serializable(package="kseg")
class FullyConnectedFusionMaskHead(MaskHead):
    """Mask head with fully-connected fusion (PANet Figure 4).

    PANet section 3.3 (Table 5: short path from conv3, fused by sum). The FCN
    path conv1..conv4 (3×3, `filters`, ReLU), a 2×2 stride-2 transposed conv
    (`filters`, ReLU) and a 1×1 conv give per-class mask logits. A short path
    from conv3's output — conv3×3(`filters`) + ReLU, conv3×3(`filters // 2`) +
    ReLU, flatten, one dense layer to `mask_size²` — gives a class-agnostic
    foreground map that is added to every class mask. It is `MaskHead` with
    `fully_connected_fusion=True` (Table 5's other rows, BN and adaptive
    pooling are `MaskHead`'s switches), with this layer's own arguments.

    Example:
    >>> head = FullyConnectedFusionMaskHead(3, mask_size=8, filters=4)
    >>> tuple(head(np.zeros((2, 4, 4, 4))).shape)
    (2, 8, 8, 3)

    Args:
        num_classes: int. Number of per-class masks.
        mask_size: int. Side of the predicted masks (even). Defaults to `28`.
        filters: int. Channels of the convolutions (the short path's second
            conv has `filters // 2`). Defaults to `256`.
        include_first_conv: bool. Whether the head owns conv1. Set to `False`
            after `AdaptiveFeaturePooling(layer_type="conv")`, which already
            applies a conv1 per level. Defaults to `True`.
        **kwargs: Base layer keyword arguments (`name`, `dtype`, ...).

    Input shape:
        4D tensor `(R, mask_size / 2, mask_size / 2, C)` of RoI features.

    Output shape:
        4D tensor `(R, mask_size, mask_size, num_classes)` of mask logits.
    """

    def __init__(
        self, num_classes, mask_size=28, filters=256, include_first_conv=True, **kwargs
    ):
        super().__init__(
            num_classes,
            mask_size=mask_size,
            filters=filters,
            fully_connected_fusion=True,
            include_first_conv=include_first_conv,
            **kwargs,
        )

    def get_config(self):
        config = super().get_config()
        for key in (
            "fusion",
            "fully_connected_fusion",
            "fusion_branch",
            "mask_fusion",
            "normalization",
        ):
            config.pop(key)
        return config
