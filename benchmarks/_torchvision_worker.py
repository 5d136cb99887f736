"""The torchvision side of `benchmarks/panet.py`, run in the peer's own
virtual environment (torch and torchvision are not kseg dependencies).

A long-lived worker: it reads one JSON command per line on stdin and writes
one JSON reply per line on stdout, so the benchmark can alternate kseg and
torchvision calls round by round. Commands:

- `{"cmd": "setup", "size": S, "num_classes": C, "threads": T,
  "detections": D, "proposals": P, "train_proposals": Q}`: builds
  `maskrcnn_resnet50_fpn` with random weights, `min_size = max_size = S`,
  score threshold 0; replies with the parameter count and the versions;
- `{"cmd": "infer"}`: one timed inference call (transform, backbone, RPN,
  heads, mask pasting); replies `{"ms", "detections", "mask_shape"}`;
- `{"cmd": "stages"}`: the same work as four separately timed stages;
  replies `{"ms": {stage: ms}}`;
- `{"cmd": "train_setup", "boxes": [[[y1, x1, y2, x2], ..], ..]}` (one list
  per image) then `{"cmd": "train"}`: one timed SGD training step on random
  images with those boxes, filled rectangles as masks and classes 1, 2, ..;
- `{"cmd": "train_stages", "upto": K}` (after `train_setup`): forward and
  backward of the training step's first K stages (`TRAIN_STAGES`: backbone
  + FPN, RPN with its targets and losses, RoI sampling and box pooling, box
  head and losses, mask targets, mask pooling, head and loss), the loss a
  sum of what they computed, no optimizer step; replies `{"ms"}`. Timings of
  K and K − 1 differ by stage K's forward and backward;
- `{"cmd": "reference"}`: the inference call's labels and boxes;
- `{"cmd": "save_state", "path": P}`: writes the model's state dict to the
  `.npz` file P (torchvision's names, float32) and its image to
  `P.image.npy` (HWC, 0-255), for kseg's converted row;
- `{"cmd": "quit"}`.
"""

import json
import sys
import time

import torch
import torchvision
from torchvision.models.detection import maskrcnn_resnet50_fpn
from torchvision.models.detection.roi_heads import (
    fastrcnn_loss,
    maskrcnn_inference,
    maskrcnn_loss,
    project_masks_on_boxes,
)

# Side of the mask logits and targets (maskrcnn_loss's discretization size).
MASK_SIZE = 28


def _targets(boxes, size):
    """torchvision targets of `[y1, x1, y2, x2]` pixel boxes per image: the
    boxes as `[x1, y1, x2, y2]`, classes 1, 2, 3, .. and filled masks."""
    targets = []
    for image_boxes in boxes:
        masks = torch.zeros(len(image_boxes), size, size, dtype=torch.uint8)
        for mask, (y1, x1, y2, x2) in zip(masks, image_boxes, strict=True):
            mask[int(y1) : int(y2), int(x1) : int(x2)] = 1
        yxyx = torch.tensor(image_boxes, dtype=torch.float32)
        targets.append(
            {
                "boxes": yxyx[:, [1, 0, 3, 2]],
                "labels": torch.arange(1, len(image_boxes) + 1),
                "masks": masks,
            }
        )
    return targets


class Worker:
    def setup(self, size, num_classes, threads, detections, proposals, train_proposals):
        torch.set_num_threads(threads)
        torch.manual_seed(0)
        self.size = size
        self.detections = detections
        self.model = maskrcnn_resnet50_fpn(
            weights=None,
            weights_backbone=None,
            num_classes=num_classes + 1,
            min_size=size,
            max_size=size,
            box_score_thresh=0.0,
            box_detections_per_img=detections,
            rpn_pre_nms_top_n_test=proposals,
            rpn_post_nms_top_n_test=proposals,
            rpn_post_nms_top_n_train=train_proposals,
        ).eval()
        # `benchmarks/panet.py`'s `grey_image` (the mean colour, ±1 grey
        # level), in torchvision's [0, 1].
        mean = torch.tensor(self.model.transform.image_mean)[:, None, None]
        noise = torch.rand(3, size, size, generator=torch.Generator().manual_seed(0))
        self.image = mean + (2 * noise - 1) / 255.0
        # Every weight, batch-norm statistics included (as Keras counts them).
        stats = [b for n, b in self.model.named_buffers() if "running_" in n]
        return {
            "params": sum(t.numel() for t in [*self.model.parameters(), *stats]),
            "torch": torch.__version__,
            "torchvision": torchvision.__version__,
            "threads": torch.get_num_threads(),
        }

    def infer(self):
        with torch.inference_mode():
            start = time.perf_counter()
            out = self.model([self.image])[0]
            ms = (time.perf_counter() - start) * 1e3
        return {
            "ms": ms,
            "detections": int(out["boxes"].shape[0]),
            "mask_shape": list(out["masks"].shape),
        }

    def stages(self):
        model = self.model
        heads = model.roi_heads
        times = {}
        with torch.inference_mode():
            start = time.perf_counter()
            images, _ = model.transform([self.image])
            features = model.backbone(images.tensors)
            times["backbone_fpn"] = time.perf_counter() - start

            start = time.perf_counter()
            proposals, _ = model.rpn(images, features)
            times["rpn_proposals"] = time.perf_counter() - start

            start = time.perf_counter()
            box_features = heads.box_roi_pool(features, proposals, images.image_sizes)
            class_logits, box_regression = heads.box_predictor(
                heads.box_head(box_features)
            )
            boxes, scores, labels = heads.postprocess_detections(
                class_logits, box_regression, proposals, images.image_sizes
            )
            times["box_head_nms"] = time.perf_counter() - start

            start = time.perf_counter()
            mask_features = heads.mask_head(
                heads.mask_roi_pool(features, boxes, images.image_sizes)
            )
            mask_logits = heads.mask_predictor(mask_features)
            probs = maskrcnn_inference(mask_logits, labels)
            detections = [
                {"boxes": b, "scores": s, "labels": c, "masks": m}
                for b, s, c, m in zip(boxes, scores, labels, probs, strict=True)
            ]
            out = model.transform.postprocess(
                detections, images.image_sizes, [(self.size, self.size)]
            )[0]
            times["mask_head_paste"] = time.perf_counter() - start
        if out["masks"].shape[0] != self.detections:
            raise RuntimeError(f"stages gave {out['masks'].shape[0]} detections")
        return {"ms": {k: v * 1e3 for k, v in times.items()}}

    def reference(self):
        """The inference call's detections: `labels`, `boxes` as
        `[y1, x1, y2, x2]` (kseg's order)."""
        with torch.inference_mode():
            out = self.model([self.image])[0]
        return {
            "labels": out["labels"].tolist(),
            "boxes": out["boxes"][:, [1, 0, 3, 2]].tolist(),
        }

    def save_state(self, path):
        import numpy as np

        state = {
            name: value.detach().numpy().astype("float32")
            for name, value in self.model.state_dict().items()
        }
        np.savez(path, **state)
        # The worker's image as kseg takes it: HWC, RGB in 0-255.
        image = (self.image.permute(1, 2, 0) * 255.0).numpy().astype("float32")
        np.save(f"{path}.image.npy", image)
        return {"tensors": len(state)}

    def train_setup(self, boxes):
        self.train_images = [torch.rand(3, self.size, self.size) for _ in boxes]
        self.train_targets = _targets(boxes, self.size)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=1e-4)
        return {}

    def train_stages(self, upto):
        """The training step's first `upto` stages, forward and backward
        (torchvision's `GeneralizedRCNN.forward` and `RoIHeads.forward` in
        training, cut after stage `upto`)."""
        model, heads = self.model, self.model.roi_heads
        model.train()
        start = time.perf_counter()
        images, targets = model.transform(self.train_images, self.train_targets)
        features = model.backbone(images.tensors)
        loss = sum(f.mean() for f in features.values())
        if upto >= 2:
            proposals, rpn_losses = model.rpn(images, features, targets)
            loss = loss * 0.0 + sum(rpn_losses.values())
        if upto >= 3:
            proposals, matched, labels, box_targets = heads.select_training_samples(
                proposals, targets
            )
            pooled = heads.box_roi_pool(features, proposals, images.image_sizes)
            loss = loss + pooled.mean()
        if upto >= 4:
            class_logits, box_regression = heads.box_predictor(heads.box_head(pooled))
            loss = loss + sum(
                fastrcnn_loss(class_logits, box_regression, labels, box_targets)
            )
        if upto >= 5:
            positive = [torch.where(image_labels > 0)[0] for image_labels in labels]
            mask_proposals = [p[k] for p, k in zip(proposals, positive, strict=True)]
            mask_matched = [m[k] for m, k in zip(matched, positive, strict=True)]
            # maskrcnn_loss computes them again in stage 6 (its own cost).
            with torch.no_grad():
                for target, p, m in zip(
                    targets, mask_proposals, mask_matched, strict=True
                ):
                    project_masks_on_boxes(target["masks"], p, m, MASK_SIZE)
        if upto >= 6:
            mask_logits = heads.mask_predictor(
                heads.mask_head(
                    heads.mask_roi_pool(features, mask_proposals, images.image_sizes)
                )
            )
            loss = loss + maskrcnn_loss(
                mask_logits,
                mask_proposals,
                [t["masks"] for t in targets],
                [t["labels"] for t in targets],
                mask_matched,
            )
        self.optimizer.zero_grad()
        loss.backward()
        ms = (time.perf_counter() - start) * 1e3
        model.eval()
        return {"ms": ms}

    def train(self):
        self.model.train()
        start = time.perf_counter()
        losses = self.model(self.train_images, self.train_targets)
        loss = sum(losses.values())
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        ms = (time.perf_counter() - start) * 1e3
        self.model.eval()
        return {"ms": ms, "loss": float(loss.detach())}


def main():
    worker = Worker()
    for line in sys.stdin:
        command = json.loads(line)
        name = command.pop("cmd")
        if name == "quit":
            break
        try:
            reply = getattr(worker, name)(**command)
        except Exception as error:  # reported to the benchmark, which raises
            reply = {"error": f"{type(error).__name__}: {error}"}
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
