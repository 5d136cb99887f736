"""torchvision's Mask R-CNN weights in kseg: `from_torchvision`.

kseg's Mask R-CNN baseline (`PANet` with its three components off) is
torchvision's `maskrcnn_resnet50_fpn` network: the same ResNet-50 v1.5 with
frozen batch norm, FPN with a max-pooled P6, RPN head, two-fc box head and
four-conv mask head. `from_torchvision` reads that model's state dict (its
parameter names, e.g. `backbone.body.layer1.0.conv1.weight`) and builds the
matching kseg model with torchvision's conventions on
(`kseg.models.panet.TORCHVISION_CONVENTIONS`: rounded anchors, proposal NMS
per level, unaligned RoIAlign), so that its detections are torchvision's.
The architecture is read from the state dict (block counts, widths, pyramid
channels, box head units, classes), so a reduced model of the same layout
converts too.

Files: `.pth` / `.pt` (read with torch, an optional dependency, imported
only then), or, without torch, `.npz` or `.safetensors` holding the same
names. Layout changes on the way: convolution kernels `(out, in, kh, kw)` →
`(kh, kw, in, out)`; torchvision's box deltas `(dx, dy, dw, dh)` → kseg's
`(dy, dx, dh, dw)`; the background class's box deltas and mask dropped
(kseg predicts boxes and masks for classes 1..C only); the box head's first
fc flattened from `(C, 7, 7)` to kseg's `(7, 7, C)`.
"""

import json
import re
import struct
from pathlib import Path

import numpy as np

from kseg.backbones import build_resnet, prepend_normalization
from kseg.models.panet.panet import (
    _IMAGENET_MEAN,
    _IMAGENET_STD,
    TORCHVISION_CONVENTIONS,
    PANet,
    weights_by_name,
)

SUFFIXES = (".pth", ".pt", ".npz", ".safetensors")
# The Mask R-CNN baseline: PANet with its components off.
BASELINE = {
    "bottom_up_path": False,
    "adaptive_pooling": False,
    "fully_connected_fusion": False,
    "heavier_head": False,
}
# torchvision box deltas (dx, dy, dw, dh) in kseg's order (dy, dx, dh, dw).
_YX = [1, 0, 3, 2]
_SAFETENSORS_DTYPES = {
    "F64": "<f8",
    "F32": "<f4",
    "F16": "<f2",
    "I64": "<i8",
    "I32": "<i4",
    "I16": "<i2",
    "I8": "i1",
    "U8": "u1",
    "BOOL": "?",
}


# === Reading state dicts ===


def read_state_dict(path):
    """`{name: float32 NumPy array}` from a torchvision state dict file:
    `.pth`/`.pt` (with torch; a checkpoint holding it under `"model"` or
    `"state_dict"` too), `.npz` or `.safetensors` (without torch)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (a torchvision state dict)")
    suffix = path.suffix.lower()
    if suffix in (".pth", ".pt"):
        state = _read_torch(path)
    elif suffix == ".npz":
        with np.load(path, allow_pickle=False) as data:
            state = {name: data[name] for name in data.files}
    elif suffix == ".safetensors":
        state = read_safetensors(path)
    else:
        raise ValueError(
            f"{path}: unknown state dict format {path.suffix!r}; expected one of "
            f"{', '.join(SUFFIXES)}"
        )
    return _as_arrays(state, path)


def _read_torch(path):
    try:
        import torch
    except ImportError:
        raise ValueError(
            f"{path}: reading a .pth file needs torch (pip install torch), or "
            "save the state dict as .npz or .safetensors of the same names"
        ) from None
    try:
        # weights_only: tensors and plain containers, never code to run.
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several kinds for a bad file
        reason = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise ValueError(
            f"{path}: not a readable torch state dict ({type(error).__name__}: "
            f"{reason[:300]}); kseg reads tensors only (torch.load with "
            "weights_only=True)"
        ) from None
    for key in ("model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ValueError(
            f"{path}: holds a {type(state).__name__}, not a state dict "
            "(save model.state_dict())"
        )
    return state


def _as_arrays(state, where):
    arrays = {}
    for name, value in state.items():
        if hasattr(value, "detach"):  # a torch tensor
            value = value.detach().cpu().float().numpy()
        arrays[str(name)] = np.asarray(value)
    if not arrays:
        raise ValueError(f"{where}: the state dict is empty")
    return arrays


def read_safetensors(path):
    """`{name: array}` of a `.safetensors` file (8-byte little-endian header
    length, a JSON header of `dtype`, `shape`, `data_offsets`, the data),
    read with NumPy alone; bfloat16 is widened to float32."""
    path = Path(path)
    data = path.read_bytes()
    if len(data) < 8:
        raise ValueError(f"{path}: not a safetensors file (shorter than 8 bytes)")
    (length,) = struct.unpack("<Q", data[:8])
    if 8 + length > len(data):
        raise ValueError(f"{path}: not a safetensors file (header past the end)")
    try:
        header = json.loads(data[8 : 8 + length])
    except ValueError as error:
        raise ValueError(f"{path}: not a safetensors file ({error})") from None
    body = memoryview(data)[8 + length :]
    arrays = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        start, stop = entry["data_offsets"]
        raw = body[start:stop]
        if entry["dtype"] == "BF16":
            bits = np.frombuffer(raw, "<u2").astype("<u4") << 16
            array = bits.view("<f4")
        elif entry["dtype"] in _SAFETENSORS_DTYPES:
            array = np.frombuffer(raw, _SAFETENSORS_DTYPES[entry["dtype"]])
        else:
            raise ValueError(f"{path}: {name} has unsupported dtype {entry['dtype']}")
        arrays[name] = array.reshape(entry["shape"])
    return arrays


# === Architecture ===


def _normalize_names(state):
    """torchvision's older names (`rpn.head.conv.weight`,
    `mask_head.mask_fcn1.weight`, `fpn.inner_blocks.0.weight`) as the
    current ones; `num_batches_tracked` counters dropped."""
    renamed = {}
    for name, value in state.items():
        if name.endswith("num_batches_tracked"):
            continue
        name = re.sub(
            r"^rpn\.head\.conv\.(weight|bias)$", r"rpn.head.conv.0.0.\1", name
        )
        name = re.sub(
            r"^roi_heads\.mask_head\.mask_fcn(\d)\.",
            lambda m: f"roi_heads.mask_head.{int(m[1]) - 1}.0.",
            name,
        )
        name = re.sub(
            r"^backbone\.fpn\.(inner|layer)_blocks\.(\d)\.(weight|bias)$",
            r"backbone.fpn.\1_blocks.\2.0.\3",
            name,
        )
        renamed[name] = value
    return renamed


def _need(state, name, where):
    if name not in state:
        raise ValueError(
            f"{where}: missing key {name!r}; is this torchvision's "
            "maskrcnn_resnet50_fpn state dict (model.state_dict())?"
        )
    return state[name]


def resnet_architecture(state, where="state dict", prefix="backbone.body."):
    """The `kseg.backbones.build_resnet` arguments of torchvision's ResNet
    under `prefix`: `block_counts`, `expansion`, `group_width`,
    `stem_width`."""
    blocks = []
    for stage in range(1, 5):
        count = 0
        while f"{prefix}layer{stage}.{count}.conv1.weight" in state:
            count += 1
        if count == 0:
            _need(state, f"{prefix}layer{stage}.0.conv1.weight", where)
        blocks.append(count)
    stem_width = _need(state, f"{prefix}conv1.weight", where).shape[0]
    inner = _need(state, f"{prefix}layer1.0.conv1.weight", where).shape[0]
    out = _need(state, f"{prefix}layer1.0.conv3.weight", where).shape[0]
    # torchvision's stages have 64, 128, 256, 512 planes; kseg's widths.
    if out % 64:
        raise ValueError(
            f"{where}: layer1 outputs {out} channels; expected a multiple of 64 "
            "(torchvision's bottleneck ResNets)"
        )
    return {
        "block_counts": tuple(blocks),
        "expansion": out // 64,
        "group_width": inner,
        "stem_width": stem_width,
    }


def torchvision_architecture(state, where="state dict"):
    """The kseg model arguments that torchvision's state dict describes:
    `block_counts`, `expansion`, `group_width`, `stem_width`, `filters`,
    `fc_units`, `num_classes` (without the background)."""
    architecture = resnet_architecture(state, where)
    filters = _need(state, "backbone.fpn.inner_blocks.0.0.weight", where).shape[0]
    fc_units = _need(state, "roi_heads.box_head.fc6.weight", where).shape[0]
    classes = _need(state, "roi_heads.box_predictor.cls_score.weight", where).shape[0]
    if classes < 2:
        raise ValueError(
            f"{where}: the box predictor has {classes} classes; expected at least 2"
        )
    return {
        **architecture,
        "filters": filters,
        "fc_units": fc_units,
        "num_classes": classes - 1,
    }


def build_torchvision_model(architecture, image_size=(1024, 1024), **kwargs):
    """The kseg Mask R-CNN baseline of `architecture`
    (`torchvision_architecture`) with torchvision's conventions on; `kwargs`
    override any `PANet` argument."""
    backbone = build_resnet(
        block_counts=architecture["block_counts"],
        expansion=architecture["expansion"],
        group_width=architecture["group_width"],
        stem_width=architecture["stem_width"],
        input_shape=(*image_size, 3),
        name="resnet",
    )
    backbone = prepend_normalization(
        backbone, _IMAGENET_MEAN, _IMAGENET_STD, name="imagenet_normalization"
    )
    arguments = {
        **BASELINE,
        **TORCHVISION_CONVENTIONS,
        "filters": architecture["filters"],
        "fc_units": architecture["fc_units"],
        **kwargs,
    }
    return PANet(backbone, architecture["num_classes"], **arguments)


# === Mapping ===


def _conv(array):
    return np.transpose(array, (2, 3, 1, 0))


def _dense(array):
    return np.transpose(array)


def _bn_names(torch_prefix, kseg_prefix):
    return [
        (f"{torch_prefix}.weight", f"{kseg_prefix}/gamma", None),
        (f"{torch_prefix}.bias", f"{kseg_prefix}/beta", None),
        (f"{torch_prefix}.running_mean", f"{kseg_prefix}/moving_mean", None),
        (f"{torch_prefix}.running_var", f"{kseg_prefix}/moving_variance", None),
    ]


def _conv_names(torch_prefix, kseg_prefix, bias=True):
    pairs = [(f"{torch_prefix}.weight", f"{kseg_prefix}/kernel", _conv)]
    if bias:
        pairs.append((f"{torch_prefix}.bias", f"{kseg_prefix}/bias", None))
    return pairs


def _box_head_fc1(filters, pool=7):
    def convert(weight):
        units = weight.shape[0]
        weight = weight.reshape(units, filters, pool, pool)
        return np.transpose(weight, (2, 3, 1, 0)).reshape(-1, units)

    return convert


def _box_deltas_kernel(weight):
    # (4·K, units), K with the background → (units, 4·C), kseg's order.
    units = weight.shape[1]
    per_class = weight.reshape(-1, 4, units)[1:, _YX]
    return per_class.reshape(-1, units).T


def _box_deltas_bias(bias):
    return bias.reshape(-1, 4)[1:, _YX].reshape(-1)


def _rpn_deltas_kernel(weight):
    out, channels = weight.shape[0], weight.shape[1]
    weight = weight.reshape(out // 4, 4, channels, 1, 1)[:, _YX]
    return _conv(weight.reshape(out, channels, 1, 1))


def _rpn_deltas_bias(bias):
    return bias.reshape(-1, 4)[:, _YX].reshape(-1)


def _deconv(weight):
    # ConvTranspose2d (in, out, kh, kw) → Conv2DTranspose (kh, kw, out, in).
    return np.transpose(weight, (2, 3, 1, 0))


def resnet_mapping(architecture, names, prefix):
    """`[(torchvision name, kseg weight path, transform or None)]` of a
    torchvision ResNet under `prefix` and kseg's `build_resnet` layers."""
    pairs = _conv_names(f"{prefix}conv1", "stem_conv", bias=False)
    pairs += _bn_names(f"{prefix}bn1", "stem_bn")
    for stage, count in enumerate(architecture["block_counts"]):
        for block in range(count):
            torch_block = f"{prefix}layer{stage + 1}.{block}"
            kseg_block = f"res{stage + 2}_block{block + 1}"
            for k in (1, 2, 3):
                pairs += _conv_names(
                    f"{torch_block}.conv{k}", f"{kseg_block}_{k}_conv", bias=False
                )
                pairs += _bn_names(f"{torch_block}.bn{k}", f"{kseg_block}_{k}_bn")
            if f"{torch_block}.downsample.0.weight" in names:
                pairs += _conv_names(
                    f"{torch_block}.downsample.0",
                    f"{kseg_block}_shortcut_conv",
                    bias=False,
                )
                pairs += _bn_names(
                    f"{torch_block}.downsample.1", f"{kseg_block}_shortcut_bn"
                )
    return pairs


def weight_mapping(architecture, names):
    """`[(torchvision name, kseg weight path, transform or None)]` for the
    baseline of `architecture`, every tensor of the state dict once (`names`:
    the state dict's names, which tell the blocks with a projection
    shortcut)."""
    pairs = resnet_mapping(architecture, names, "backbone.body.")
    for level in range(4):
        pairs += _conv_names(
            f"backbone.fpn.inner_blocks.{level}.0",
            f"feature_pyramid/lateral_{level + 2}",
        )
        pairs += _conv_names(
            f"backbone.fpn.layer_blocks.{level}.0",
            f"feature_pyramid/output_{level + 2}",
        )
    pairs += _conv_names("rpn.head.conv.0.0", "rpn/rpn_head/conv")
    pairs += _conv_names("rpn.head.cls_logits", "rpn/rpn_head/objectness")
    pairs += [
        ("rpn.head.bbox_pred.weight", "rpn/rpn_head/deltas/kernel", _rpn_deltas_kernel),
        ("rpn.head.bbox_pred.bias", "rpn/rpn_head/deltas/bias", _rpn_deltas_bias),
        (
            "roi_heads.box_head.fc6.weight",
            "roi_heads/box_head/fc1/kernel",
            _box_head_fc1(architecture["filters"]),
        ),
        ("roi_heads.box_head.fc6.bias", "roi_heads/box_head/fc1/bias", None),
        ("roi_heads.box_head.fc7.weight", "roi_heads/box_head/fc2/kernel", _dense),
        ("roi_heads.box_head.fc7.bias", "roi_heads/box_head/fc2/bias", None),
        (
            "roi_heads.box_predictor.cls_score.weight",
            "roi_heads/box_head/class_logits/kernel",
            _dense,
        ),
        (
            "roi_heads.box_predictor.cls_score.bias",
            "roi_heads/box_head/class_logits/bias",
            None,
        ),
        (
            "roi_heads.box_predictor.bbox_pred.weight",
            "roi_heads/box_head/box_deltas/kernel",
            _box_deltas_kernel,
        ),
        (
            "roi_heads.box_predictor.bbox_pred.bias",
            "roi_heads/box_head/box_deltas/bias",
            _box_deltas_bias,
        ),
    ]
    for k in range(4):
        pairs += _conv_names(
            f"roi_heads.mask_head.{k}.0", f"roi_heads/mask_head/conv{k + 1}"
        )
    pairs += [
        (
            "roi_heads.mask_predictor.conv5_mask.weight",
            "roi_heads/mask_head/deconv/kernel",
            _deconv,
        ),
        (
            "roi_heads.mask_predictor.conv5_mask.bias",
            "roi_heads/mask_head/deconv/bias",
            None,
        ),
        (
            "roi_heads.mask_predictor.mask_fcn_logits.weight",
            "roi_heads/mask_head/mask_logits/kernel",
            lambda w: _conv(w[1:]),
        ),
        (
            "roi_heads.mask_predictor.mask_fcn_logits.bias",
            "roi_heads/mask_head/mask_logits/bias",
            lambda b: b[1:],
        ),
    ]
    return pairs


def load_torchvision_weights(model, state, where="state dict"):
    """Copies torchvision's `state` (`{name: array}`) into `model`, the
    baseline `build_torchvision_model` built for it. Missing or extra
    names, or a shape that does not fit, raise `ValueError` naming them.
    Returns the model's weights that got no value (none for the baseline)."""
    state = _normalize_names(state)
    architecture = torchvision_architecture(state, where)
    mapping = weight_mapping(architecture, set(state))
    return _assign(
        mapping,
        state,
        weights_by_name(model),
        where,
        "torchvision's maskrcnn_resnet50_fpn layout",
        "build_torchvision_model",
    )


def _assign(mapping, state, variables, where, layout, builder):
    expected = {name for name, _, _ in mapping}
    missing = sorted(expected - set(state))
    extra = sorted(set(state) - expected)
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} keys: {_names(missing)}")
        if extra:
            parts.append(f"{len(extra)} unexpected keys: {_names(extra)}")
        raise ValueError(
            f"{where}: not the state dict of {layout} ({'; '.join(parts)})"
        )
    values = []
    for name, path, convert in mapping:
        if path not in variables:
            raise ValueError(
                f"{where}: the kseg model has no weight {path!r} for {name!r} "
                f"(build it with {builder})"
            )
        variable = variables[path]
        array = np.asarray(state[name], "float32")
        value = convert(array) if convert is not None else array
        if tuple(value.shape) != tuple(variable.shape):
            raise ValueError(
                f"{where}: {name} has shape {tuple(array.shape)}, which does "
                f"not fit kseg's {path} of shape {tuple(variable.shape)}"
            )
        values.append((variable, value))
    for variable, value in values:
        variable.assign(value)
    return sorted(set(variables) - {path for _, path, _ in mapping})


def backbone_from_torchvision(source, input_shape=(None, None, 3)):
    """kseg's ResNet encoder holding torchvision's ImageNet ResNet weights
    (`torchvision.models.resnet50` / `resnet101` state dicts, their names:
    `conv1.weight`, `layer1.0.conv1.weight`, ...; the classifier `fc` is
    left out), with torchvision's input normalization inside: it takes RGB
    in 0–255, like every kseg backbone.

    Args:
        source: a `.pth`/`.pt` (needs torch), `.npz` or `.safetensors`
            file, or the state dict itself.
        input_shape: `(H, W, 3)`. Defaults to `(None, None, 3)`.

    Returns:
        A `keras.Model` of `kseg.backbones.build_resnet`'s outputs
        `{"res2", .., "res5"}`, usable as `PANet`'s or any kseg model's
        backbone.
    """
    if isinstance(source, (str, Path)):
        where = str(source)
        state = read_state_dict(source)
    else:
        where = "state dict"
        state = _as_arrays(dict(source), where)
    state = {
        name: value
        for name, value in state.items()
        if not name.endswith("num_batches_tracked") and not name.startswith("fc.")
    }
    architecture = resnet_architecture(state, where, prefix="")
    backbone = build_resnet(
        **architecture, input_shape=tuple(input_shape), name="resnet"
    )
    variables = {
        f"{layer.name}/{variable.name}": variable
        for layer in backbone.layers
        for variable in layer.weights
    }
    _assign(
        resnet_mapping(architecture, set(state), ""),
        state,
        variables,
        where,
        "torchvision's ImageNet ResNet",
        "build_resnet",
    )
    return prepend_normalization(
        backbone, _IMAGENET_MEAN, _IMAGENET_STD, name="imagenet_normalization"
    )


def _names(names, limit=8):
    shown = ", ".join(names[:limit])
    return shown + (f", … ({len(names) - limit} more)" if len(names) > limit else "")


def from_torchvision(source, image_size=(1024, 1024), **kwargs):
    """kseg's Mask R-CNN baseline holding torchvision's Mask R-CNN weights.

    Example (torchvision's COCO model, file from its model zoo):
    >>> model = from_torchvision("maskrcnn_resnet50_fpn_coco-bf2d0c1e.pth",
    ...                          image_size=(800, 1344))  # doctest: +SKIP
    >>> model.predict(images)["classes"]  # COCO ids: 1 is "person"  # doctest: +SKIP

    Args:
        source: path of a `.pth`/`.pt` (needs torch), `.npz` or
            `.safetensors` file of `maskrcnn_resnet50_fpn`'s state dict (its
            names), or the state dict itself (`{name: tensor or array}`).
        image_size: `(H, W)` static input size (multiples of 64).
            Defaults to `(1024, 1024)`.
        **kwargs: Further `PANet` arguments (`score_threshold`,
            `max_detections`, ...; torchvision's conventions are on unless
            overridden).

    Returns:
        A `PANet` (the baseline: no bottom-up path, adaptive pooling or
        fully-connected fusion) with `num_classes` = torchvision's classes
        less the background: 90 for COCO, whose class k is COCO category id
        k (`kseg.models.coco.coco_categories`).
    """
    if isinstance(source, (str, Path)):
        where = str(source)
        state = read_state_dict(source)
    else:
        where = "state dict"
        state = _as_arrays(dict(source), where)
    state = _normalize_names(state)
    architecture = torchvision_architecture(state, where)
    model = build_torchvision_model(architecture, image_size, **kwargs)
    load_torchvision_weights(model, state, where)
    return model
