"""Writes the torchvision fixture of kseg's converter tests (once; needs torch).

A reduced Mask R-CNN in torchvision's own layout and key names
(`maskrcnn_resnet50_fpn`'s modules: `ResNet` with frozen batch norm,
`BackboneWithFPN`, `RPNHead`, `TwoMLPHead`, `MaskRCNNHeads`), small enough
for the default test suite: one bottleneck per stage with expansion 1 (stage
outputs 64/128/256/512 channels), 32 pyramid channels, a 64-unit box head,
5 classes (background included). Its weights are random with a fixed seed,
its batch-norm statistics randomised and its last layers scaled so that
random weights give real, well-separated detections. Written:

- `tests/models/data/torchvision_tiny.npz`: the state dict, torchvision's
  names, float32;
- `tests/models/data/torchvision_tiny_outputs.npz`: the `image` (uint8,
  `SIZE × SIZE × 3`) and torchvision's outputs on it, boxes as
  `[y1, x1, y2, x2]`: `proposals`, `boxes`, `scores`, `labels`, `masks`
  (the 28×28 probabilities of each detection's class, before pasting) and
  `pasted` (torchvision's `paste_masks_in_image` of them, > 0.5).

`build(...)` and `outputs(...)` also serve the slow parity test with
torchvision's full `maskrcnn_resnet50_fpn`.

    python -m venv /work/tv-venv
    /work/tv-venv/bin/pip install torch==2.14.1 torchvision==0.29.1
    /work/tv-venv/bin/python tools/torchvision_fixture.py
"""

import argparse
from pathlib import Path

import numpy as np
import torch
from torchvision.models.detection import MaskRCNN, maskrcnn_resnet50_fpn
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.roi_heads import paste_masks_in_image
from torchvision.models.resnet import Bottleneck, ResNet
from torchvision.ops import misc

SIZE = 128
NUM_CLASSES = 5  # background included, as torchvision counts
# The full model's class logits need no scaling: random weights give 100
# detections scoring 0.45..0.85 at 512² (the smallest gap 1.7e-5).
FULL_LOGIT_SCALE = 1.0
# Its mask logits reach ±50 (probabilities of 1e-23): scaled down to a few
# units, so the masks hold probabilities between 0 and 1 to compare.
FULL_MASK_SCALE = 0.05
OUT = Path(__file__).resolve().parents[1] / "tests" / "models" / "data"


class _SmallBottleneck(Bottleneck):
    expansion = 1


def tiny_model():
    """The reduced torchvision-layout Mask R-CNN (random weights)."""
    body = ResNet(
        _SmallBottleneck,
        [1, 1, 1, 1],
        width_per_group=16,
        norm_layer=misc.FrozenBatchNorm2d,
    )
    backbone = BackboneWithFPN(
        body,
        {"layer1": "0", "layer2": "1", "layer3": "2", "layer4": "3"},
        [64, 128, 256, 512],
        32,
    )
    return MaskRCNN(
        backbone,
        min_size=SIZE,
        max_size=SIZE,
        box_head=TwoMLPHead(32 * 7 * 7, 64),
        box_predictor=FastRCNNPredictor(64, NUM_CLASSES),
        mask_head=MaskRCNNHeads(32, (32, 32, 32, 32), 1),
        mask_predictor=MaskRCNNPredictor(32, 32, NUM_CLASSES),
    )


def full_model(size, num_classes=91):
    """torchvision's `maskrcnn_resnet50_fpn` (random weights) at `size`²."""
    return maskrcnn_resnet50_fpn(
        weights=None,
        weights_backbone=None,
        num_classes=num_classes,
        min_size=size,
        max_size=size,
    )


def randomise(model, seed=0, logit_scale=8.0, mask_scale=None):
    """Random batch-norm statistics and affine parameters (a fresh model's
    are 0 / 1, which frozen batch norm never changes), and the class and
    mask logits scaled up: random weights then give spread-out scores."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, misc.FrozenBatchNorm2d):
                n = module.weight.shape[0]
                module.weight.copy_(0.5 + torch.rand(n, generator=generator))
                module.bias.copy_(0.1 * torch.randn(n, generator=generator))
                module.running_mean.copy_(0.1 * torch.randn(n, generator=generator))
                module.running_var.copy_(0.5 + torch.rand(n, generator=generator))
        heads = model.roi_heads
        heads.box_predictor.cls_score.weight.mul_(logit_scale)
        mask_scale = logit_scale if mask_scale is None else mask_scale
        heads.mask_predictor.mask_fcn_logits.weight.mul_(mask_scale)
    return model.eval()


def test_image(size, seed=0):
    """`(size, size, 3)` uint8: smooth colour blobs and noise (a photo-like
    spread of values, the same on both sides)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    image = np.zeros((size, size, 3))
    for _ in range(6):
        cy, cx, r = rng.uniform(0.1, 0.9), rng.uniform(0.1, 0.9), rng.uniform(0.1, 0.3)
        blob = np.exp(-((y - cy) ** 2 + (x - cx) ** 2) / (2 * r * r))
        image += blob[..., None] * rng.uniform(0, 1, 3)
    image = image / image.max() * 200 + rng.uniform(0, 40, (size, size, 3))
    return np.clip(image, 0, 255).astype("uint8")


def outputs(model, image):
    """torchvision's proposals and detections on `image` (uint8 HWC), boxes
    as `[y1, x1, y2, x2]`, masks the 28×28 probabilities before pasting."""
    tensor = torch.from_numpy(image).permute(2, 0, 1).float() / 255.0
    with torch.inference_mode():
        images, _ = model.transform([tensor])
        features = model.backbone(images.tensors)
        proposals, _ = model.rpn(images, features)
        detections, _ = model.roi_heads(features, proposals, images.image_sizes)
    out = detections[0]
    yxyx = [1, 0, 3, 2]
    return {
        "image": image,
        "proposals": proposals[0][:, yxyx].numpy(),
        "boxes": out["boxes"][:, yxyx].numpy(),
        "scores": out["scores"].numpy(),
        "labels": out["labels"].numpy().astype("int32"),
        "masks": out["masks"][:, 0].numpy(),
        # torchvision's pasting of those masks, thresholded at 0.5.
        "pasted": paste_masks_in_image(out["masks"], out["boxes"], image.shape[:2])[
            :, 0
        ].numpy()
        > 0.5,
    }


def state_arrays(model):
    return {
        k: v.detach().numpy().astype("float32") for k, v in model.state_dict().items()
    }


def write_full(size, out, logit_scale=FULL_LOGIT_SCALE, mask_scale=FULL_MASK_SCALE):
    """torchvision's full `maskrcnn_resnet50_fpn` (COCO's 91 classes, random
    weights, seed 0) at `size`²: `maskrcnn_full.npz` (its state dict) and
    `maskrcnn_full_outputs.npz` (its outputs on `test_image(size)`)."""
    torch.manual_seed(0)
    model = randomise(full_model(size), logit_scale=logit_scale, mask_scale=mask_scale)
    result = outputs(model, test_image(size))
    out.mkdir(parents=True, exist_ok=True)
    np.savez(out / "maskrcnn_full.npz", **state_arrays(model))
    np.savez(out / "maskrcnn_full_outputs.npz", **result)
    return model, result


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--logit-scale", type=float, default=FULL_LOGIT_SCALE)
    parser.add_argument("--mask-scale", type=float, default=FULL_MASK_SCALE)
    parser.add_argument(
        "--full",
        type=int,
        metavar="SIZE",
        help="write the full maskrcnn_resnet50_fpn at SIZE² instead (slow test)",
    )
    args = parser.parse_args()
    if args.full:
        model, result = write_full(
            args.full, args.out, args.logit_scale, args.mask_scale
        )
        scores = np.concatenate([result["scores"], [np.nan]])
        gaps = -np.diff(result["scores"]) if len(scores) > 2 else [np.nan]
        print(
            f"{len(model.state_dict())} tensors; {len(scores) - 1} detections, "
            f"scores {np.nanmin(scores):.4f}..{np.nanmax(scores):.4f} (smallest "
            f"gap {np.min(gaps):.2e}), "
            f"{len(set(result['labels'].tolist()))} classes; mask probabilities "
            f"in (0.01, 0.99): {np.mean(np.abs(result['masks'] - 0.5) < 0.49):.0%}"
        )
        return
    torch.manual_seed(0)
    model = randomise(tiny_model())
    result = outputs(model, test_image(SIZE))
    args.out.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out / "torchvision_tiny.npz", **state_arrays(model))
    np.savez_compressed(args.out / "torchvision_tiny_outputs.npz", **result)
    print(
        f"{len(model.state_dict())} tensors; {len(result['scores'])} detections, "
        f"scores {result['scores'].min():.3f}..{result['scores'].max():.3f}, "
        f"labels {np.bincount(result['labels']).tolist()}"
    )


if __name__ == "__main__":
    main()
