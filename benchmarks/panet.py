"""Benchmark: kseg's PANet and Mask R-CNN baseline against torchvision's
`maskrcnn_resnet50_fpn`, on the same CPU, in the same run.

Same work for both sides: random weights, one 512×512 image (`--size`; a
faint one, see `grey_image`: random weights blow up on full-contrast input), 80
object classes, 1000 proposals after the RPN's NMS, score threshold 0 so that
both return exactly 100 detections (asserted), with the masks pasted at image
resolution inside the timed call ((100, 512, 512) probabilities), batch 1, 2
threads (`--threads`: TensorFlow's intra-op pool, one inter-op thread;
`torch.set_num_threads`).

Rows:

- kseg Mask R-CNN baseline: `build_panet_resnet50_fpn` with every PANet
  switch off (`bottom_up_path`, `adaptive_pooling`,
  `fully_connected_fusion`, `heavier_head`);
- kseg PANet: `build_panet_resnet50_fpn`'s defaults (bottom-up path
  augmentation, adaptive feature pooling, fully-connected fusion: the paper's
  PANet, Table 3's "+FF" row); `--heavier-head` adds a row with the heavier
  box head (Table 3's "+HHD");
- each in TensorFlow graph mode (`tf.function`) and under XLA
  (`jit_compile=True`; the first call's compile time is printed);
- torchvision's Mask R-CNN, in its own virtual environment (torch is not a
  kseg dependency), as a long-lived subprocess (`_torchvision_worker.py`)
  under `torch.inference_mode()`;
- with torchvision: kseg's Mask R-CNN converted from that very model's
  weights (`kseg.models.from_torchvision`: the baseline with torchvision's
  conventions), same weights, same image, graph mode; its detections are
  checked against torchvision's (classes equal, boxes within 1e-2 px).

Each round calls every kseg row once, each call followed by one torchvision
call, so that load from other processes falls on both sides alike; medians
are reported, with the load average before and after. Stage shares: the same
work split into four separately timed calls on stored intermediate inputs
(backbone + FPN (+ bottom-up path), RPN + proposals, box head + NMS, mask
head + pasting), as a share of their sum. Parameters count every weight,
batch-norm statistics included, on both sides.

Training rows: one training step at batch 2 (`model.train_on_batch`, SGD,
graph mode) on synthetic images with three ground-truth rectangles each, of
kseg's Mask R-CNN baseline and PANet, against torchvision's `model.train()`
forward + backward + SGD step on the same boxes (its
`rpn_post_nms_top_n_train` set to kseg's 1000 proposals). Each is split into
`TRAIN_STAGES` by timing the step cut after each stage, forward and backward
(`KsegTrainStages`; the worker's `train_stages`): differences of the fastest
cut runs; the optimizer's share is the full step less the last cut, so
noise can show it as 0.

Targets (issue 21): inference Mask R-CNN ≤ 0.8× torchvision's, PANet ≤ 1.3×;
training Mask R-CNN ≤ 0.9×, PANet ≤ 1.4× torchvision's Mask R-CNN.

Both sides run on the same allocator: the script restarts itself with
kseg's (`--allocator kseg`, the default: tcmalloc when installed, as every
`kseg` command) and the torchvision worker inherits it; `--allocator
process` keeps this Python's own malloc.

Measured (2-core AMD EPYC, load 1.6–1.9; torch 2.14.1, torchvision 0.29.1,
TensorFlow 2.21, tcmalloc; `--runs 3 --stage-runs 2 --train-runs 3`),
median ms and ratio to torchvision:

    baseline, graph       2577  0.94×    (target 0.8×: not met)
    baseline, XLA         2143  0.79×    (met)
    PANet, graph          4891  1.79×
    PANet, XLA            4418  1.62×    (target 1.3×: not met)
    converted, graph      2327  0.85×
    torchvision           2728
    baseline train step   9360  1.07×    (target 0.9×: not met)
    PANet train step     11879  1.36×    (target 1.4×: met)
    torchvision train     8710

Training stage split, ms (backbone+FPN / RPN targets+loss / RoI sampling +
box pool / box head+loss / mask targets / mask pool+head+loss / optimizer):

    kseg baseline    4413 / 1653 /  235 /  924 / 159 / 655 / 801
    kseg PANet       5212 / 1206 / 1376 / 3016 / 830 / 937 /   0
    torchvision      3653 / 1164 / 1665 /  491 / 497 / 370 /   0

Before issue 21 the baseline step took 20.0 s and PANet's 28.5 s here: the
mask head trained on 128 RoIs an image (now the batch's foreground RoIs,
`RoIHeads.foreground_rows`; 9.7 s → under 1 s), and RoIAlign pooled every
RoI from every level with dense matrix products in training (now the
gathers where they cost less, as at inference; 2.7 s → 0.2 s). What limits
the baseline now is the network itself: backbone + FPN forward and backward
(+760 ms against torch's kernels; Keras 3's batch norm is unfused, 0.6 s of
the backbone's 2.9 s, and TensorFlow's fused kernel was no faster here) and
the RPN stage (+490 ms), against which kseg's RoI pooling saves 1.4 s.
XLA does not pay for training on a CPU (31.7 s a step, 244 s to compile).
PANet's extra head work is its design: four fc1 layers (one per level) in
the box head, the bottom-up path's convolutions.

Inference, stage shares at tcmalloc (backbone+FPN / RPN+proposals / box
head+NMS / mask head+paste): baseline graph 28/10/21/41%, PANet graph
16/5/36/43%, torchvision 26/8/27/38%. The converted row (kseg's baseline
holding the worker's own weights, torchvision's conventions on) checks its
detections against torchvision's as a set (class equal, box within 1e-2 px;
the faint image's scores nearly tie, so one of 100 may differ here: the slow
parity test compares them on a real-contrast image).

torch's threads degrade far more than TensorFlow's on an oversubscribed CPU,
so the ratios depend on the machine's load: compare runs at similar load.

The peer's environment (once, outside the repository):

    python -m venv /work/tv-venv
    /work/tv-venv/bin/pip install torch==2.14.1 torchvision==0.29.1

    python benchmarks/panet.py --torch-python /work/tv-venv/bin/python
        [--size 512] [--runs 10] [--stage-runs 3] [--train-runs 3]
        [--no-xla] [--no-train] [--no-torch] [--heavier-head]
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from kseg.allocator import active_allocator, restart_with_allocator  # noqa: E402
from kseg.data import crop_instance_mask  # noqa: E402
from kseg.data.instance_transform import paste_weights  # noqa: E402
from kseg.models.panet import build_panet_resnet50_fpn  # noqa: E402
from kseg.models.panet.roi_heads import select_class_masks  # noqa: E402

NUM_CLASSES = 80
DETECTIONS = 100
PROPOSALS = 1000
TRAIN_PROPOSALS = 1000
IMAGENET_MEAN = (123.675, 116.28, 103.53)
TORCH_PYTHON_ENV = "KSEG_TORCH_PYTHON"
WORKER = Path(__file__).with_name("_torchvision_worker.py")
STAGES = ("backbone_fpn", "rpn_proposals", "box_head_nms", "mask_head_paste")
STAGE_TITLES = ("backbone+FPN", "RPN+proposals", "box head+NMS", "mask head+paste")
BASELINE = dict(
    bottom_up_path=False,
    adaptive_pooling=False,
    fully_connected_fusion=False,
    heavier_head=False,
)
TARGETS = {"baseline": 0.8, "panet": 1.3}
VENV_HELP = (
    "torchvision's side needs its own virtual environment:\n"
    "    python -m venv /work/tv-venv\n"
    "    /work/tv-venv/bin/pip install torch==2.14.1 torchvision==0.29.1\n"
    f"then pass --torch-python /work/tv-venv/bin/python (or set {TORCH_PYTHON_ENV});"
    " --no-torch runs the kseg rows alone"
)


# === kseg ===


def paste(boxes, masks, size):
    """`(D, size, size)` probabilities: each `(S, S)` mask resized bilinearly
    into its box (`kseg.data.instance_transform.paste_weights`: two matrix
    products)."""
    rows = paste_weights(boxes[:, 0], boxes[:, 2], size, masks.shape[-1])
    cols = paste_weights(boxes[:, 1], boxes[:, 3], size, masks.shape[-1])
    return tf.matmul(tf.matmul(rows, masks), cols, transpose_b=True)


class KsegRow:
    """One kseg model, its timed full call and its four stage calls."""

    def __init__(self, key, label, switches, size, jit, model=None):
        self.key, self.label, self.size, self.jit = key, label, size, jit
        self.model = model or build_panet_resnet50_fpn(
            NUM_CLASSES,
            image_size=(size, size),
            score_threshold=0.0,
            max_detections=DETECTIONS,
            rpn_pre_nms_top_k_test=PROPOSALS,
            rpn_post_nms_top_k_test=PROPOSALS,
            **switches,
        )
        model = self.model
        heads = model.roi_heads

        def full(images):
            out = model(images, training=False)
            return out["num_detections"], paste(out["boxes"][0], out["masks"][0], size)

        def backbone_fpn(images):
            features = model.backbone(images, training=False)
            pyramid = model.fpn([features[f"res{i}"] for i in range(2, 6)])
            levels = (
                model.bottom_up(pyramid[:4]) if model.bottom_up_path else pyramid[:4]
            )
            return pyramid, levels

        def rpn_proposals(pyramid, images):
            out = model.rpn([pyramid, images], training=False)
            return out["proposals"], out["valid"]

        def box_head_nms(levels, proposals, valid, images):
            class_logits, box_deltas = heads.box_head(
                heads.box_pool([levels, proposals])
            )
            rois = proposals.shape[1]
            out = heads.detection(
                [
                    tf.reshape(class_logits, (-1, rois, NUM_CLASSES + 1)),
                    tf.reshape(box_deltas, (-1, rois, 4 * NUM_CLASSES)),
                    proposals,
                    valid,
                    images,
                ]
            )
            return out["boxes"], out["classes"], out["num_detections"]

        def mask_head_paste(levels, boxes, classes):
            logits = heads.mask_head(heads.mask_pool([levels, boxes]))
            masks = select_class_masks(logits, classes)
            return paste(boxes[0], tf.reshape(masks, (-1, 28, 28)), size)

        compile_ = lambda f: tf.function(f, jit_compile=jit)  # noqa: E731
        self.full = compile_(full)
        self.stage_fns = [
            compile_(f)
            for f in (backbone_fpn, rpn_proposals, box_head_nms, mask_head_paste)
        ]
        self.stage_args = None

    def params(self):
        return self.model.count_params()

    def call(self, images):
        start = time.perf_counter()
        count, masks = self.full(images)
        masks = masks.numpy()
        ms = (time.perf_counter() - start) * 1e3
        if int(count.numpy()[0]) != DETECTIONS or masks.shape != (
            DETECTIONS,
            self.size,
            self.size,
        ):
            raise RuntimeError(
                f"{self.label}: {int(count.numpy()[0])} detections, masks "
                f"{masks.shape}; expected {DETECTIONS} and "
                f"({DETECTIONS}, {self.size}, {self.size})"
            )
        return ms

    def stages(self, images):
        """Milliseconds of the four stages, each a separate call on the
        previous stage's stored outputs (stored on the first call)."""
        backbone_fpn, rpn_proposals, box_head_nms, mask_head_paste = self.stage_fns
        if self.stage_args is None:
            pyramid, levels = backbone_fpn(images)
            proposals, valid = rpn_proposals(pyramid, images)
            boxes, classes, _ = box_head_nms(levels, proposals, valid, images)
            self.stage_args = [
                (images,),
                (pyramid, images),
                (levels, proposals, valid, images),
                (levels, boxes, classes),
            ]
        times = []
        for fn, args in zip(self.stage_fns, self.stage_args, strict=True):
            start = time.perf_counter()
            out = fn(*args)
            # Wait for every output (TensorFlow may return before it is done).
            tf.nest.map_structure(lambda t: t.numpy(), out)
            times.append((time.perf_counter() - start) * 1e3)
        return times


def grey_image(size, seed=0):
    """`(size, size, 3)` RGB in 0–255: ImageNet's mean colour with ±1 grey
    level of uniform noise. With random weights (batch-norm statistics at
    their initial values) a random-weight network's activations grow with
    the input's contrast: on uniform noise in 0–255 kseg's box logits reach
    ±200, every softmax is one-hot and the RPN's deltas collapse the
    proposals onto the image border, so there are not 100 detections with a
    score above 0. A faint image keeps the outputs in range (near-uniform
    scores, 1000 proposals); the work does not depend on the pixels.
    torchvision's side gets the same image, scaled to [0, 1]."""
    rng = np.random.default_rng(seed)
    mean = np.asarray(IMAGENET_MEAN, "float32")
    return mean + rng.uniform(-1.0, 1.0, (size, size, 3)).astype("float32")


def synthetic_instances(batch, size, seed=0):
    """Images in 0–255 and three filled rectangles per image (classes 1..3):
    kseg's `(x, y)` and the `[y1, x1, y2, x2]` boxes for torchvision."""
    rng = np.random.default_rng(seed)
    images = rng.uniform(0, 255, (batch, size, size, 3)).astype("float32")
    boxes = np.zeros((batch, 3, 4), "float32")
    masks = np.zeros((batch, 3, 112, 112), "uint8")
    for b in range(batch):
        for m in range(3):
            y, x = rng.integers(0, size // 2, 2)
            h, w = rng.integers(size // 8, size // 2, 2)
            full = np.zeros((size, size), "uint8")
            full[y : y + h, x : x + w] = 1
            boxes[b, m] = [y, x, y + h, x + w]
            masks[b, m] = crop_instance_mask(full, boxes[b, m])
    classes = np.tile(np.arange(1, 4, dtype="int32"), (batch, 1))
    x = {"images": tf.constant(images)}
    y = {
        "boxes": tf.constant(boxes),
        "classes": tf.constant(classes),
        "masks": tf.constant(masks),
    }
    return x, y, boxes


# === torchvision ===


class TorchvisionWorker:
    """`_torchvision_worker.py` in the peer's Python, one JSON line per call."""

    def __init__(self, python):
        self.process = subprocess.Popen(
            [python, str(WORKER)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def __call__(self, cmd, **kwargs):
        self.process.stdin.write(json.dumps({"cmd": cmd, **kwargs}) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the torchvision worker exited during {cmd!r}")
        reply = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"torchvision worker, {cmd!r}: {reply['error']}")
        return reply

    def close(self):
        if self.process.poll() is None:
            self.process.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
            self.process.stdin.flush()
            self.process.wait(timeout=60)


def torch_python(args):
    if args.no_torch:
        return None
    python = args.torch_python or os.environ.get(TORCH_PYTHON_ENV)
    if not python:
        sys.exit(f"No --torch-python given. {VENV_HELP}")
    if not Path(python).exists():
        sys.exit(f"--torch-python {python} does not exist. {VENV_HELP}")
    return python


# === Report ===


def _median(values):
    return statistics.median(values) if values else float("nan")


def _shares(stage_times):
    """Per stage, the median share (%) of the four stages' sum."""
    if not stage_times:
        return ["–"] * len(STAGES)
    medians = [_median([t[i] for t in stage_times]) for i in range(len(STAGES))]
    total = sum(medians)
    return [f"{100 * m / total:.0f}%" for m in medians]


def _ratio(row):
    if row["ref"] is None:
        return "–"
    return f"{row['ms'] / row['ref']:.2f}×"


def _target(row):
    if row["ref"] is None or row["target"] is None:
        return "–"
    verdict = "met" if row["ms"] <= row["target"] * row["ref"] else "not met"
    return f"≤ {row['target']}×: {verdict}"


def print_table(rows, loads, threads, size, compile_times):
    print()
    print(
        f"PANet vs torchvision Mask R-CNN, {size}×{size}, batch 1, {NUM_CLASSES} "
        f"classes, {DETECTIONS} detections with pasted masks, {threads} threads, "
        f"allocator: {active_allocator()} (both sides); "
        f"load average (1, 5, 15 min) before {loads[0]}, after {loads[1]}"
    )
    print()
    titles = " | ".join(f"{t} share" for t in STAGE_TITLES)
    header = f"model | mode | parameters | median ms | {titles} | vs torchvision"
    print(f"| {header} | target |")
    print("|" + "---|" * (6 + len(STAGES)))
    for row in rows:
        shares = " | ".join(row["shares"])
        print(
            f"| {row['label']} | {row['mode']} | {row['params'] / 1e6:.1f} M | "
            f"{row['ms']:.0f} | {shares} | {_ratio(row)} | {_target(row)} |"
        )
    print()
    for label, seconds in compile_times.items():
        print(f"XLA warm-up (first call, compile included) of {label}: {seconds:.1f} s")


def progress(message):
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def load_average():
    return tuple(round(x, 2) for x in os.getloadavg())


# === Main ===


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--stage-runs", type=int, default=3)
    parser.add_argument("--train-runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--torch-python", default=None)
    parser.add_argument("--no-torch", action="store_true")
    parser.add_argument("--no-xla", action="store_true")
    parser.add_argument("--no-train", action="store_true")
    parser.add_argument("--heavier-head", action="store_true")
    parser.add_argument(
        "--allocator",
        default="kseg",
        choices=("kseg", "process"),
        help="kseg: restart with kseg's allocator (tcmalloc when installed, as "
        "every kseg command), which the torchvision worker inherits; process: "
        "this Python's own malloc for both",
    )
    args = parser.parse_args(argv)
    if args.allocator == "kseg" and argv is None:  # the script, not a caller's call
        restart_with_allocator(sys.argv)

    python = torch_python(args)
    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    keras.utils.set_random_seed(0)

    variants = [
        ("baseline", "kseg Mask R-CNN baseline", BASELINE),
        ("panet", "kseg PANet (BPA+AFP+FF)", {}),
    ]
    if args.heavier_head:
        variants.append(("panet_hhd", "kseg PANet (+HHD)", {"heavier_head": True}))
    modes = [("graph", False)] + ([] if args.no_xla else [("XLA", True)])
    rows = [
        KsegRow(key, label, switches, args.size, jit)
        for key, label, switches in variants
        for _, jit in modes
    ]
    mode_names = [name for name, _ in modes]
    images = tf.constant(grey_image(args.size)[None], tf.float32)

    peer = TorchvisionWorker(python) if python else None
    try:
        info = None
        if peer:
            info = peer(
                "setup",
                size=args.size,
                num_classes=NUM_CLASSES,
                threads=args.threads,
                detections=DETECTIONS,
                proposals=PROPOSALS,
                train_proposals=TRAIN_PROPOSALS,
            )
            peer.params = info["params"]
            print(
                f"torch {info['torch']}, torchvision {info['torchvision']}, "
                f"{info['threads']} threads"
            )
            rows.append(converted_row(peer, args.size))
            check = peer("infer")
            if check["detections"] != DETECTIONS or check["mask_shape"] != [
                DETECTIONS,
                1,
                args.size,
                args.size,
            ]:
                raise RuntimeError(f"torchvision returned {check}")

        compile_times = {}
        for row in rows:
            mode = "XLA" if row.jit else "graph"
            progress(f"warming up {row.label} ({mode}) and its stages")
            start = time.perf_counter()
            row.call(images)
            if row.jit:
                compile_times[f"{row.label}"] = time.perf_counter() - start
            for _ in range(args.warmup):
                row.call(images)
            row.stages(images)
        for _ in range(args.warmup):
            if peer:
                peer("infer")
                peer("stages")

        loads = [load_average()]
        times = {id(row): [] for row in rows}
        stage_times = {id(row): [] for row in rows}
        peer_times, peer_stages = [], []
        for run in range(args.runs):
            progress(f"round {run + 1} of {args.runs}")
            for row in rows:
                times[id(row)].append(row.call(images))
                if peer:
                    peer_times.append(peer("infer")["ms"])
            if run < args.stage_runs:
                for row in rows:
                    stage_times[id(row)].append(row.stages(images))
                    if peer:
                        stages = peer("stages")["ms"]
                        peer_stages.append([stages[s] for s in STAGES])

        peer_ms = _median(peer_times) if peer else None
        table = []
        for i, row in enumerate(rows):
            table.append(
                {
                    "label": row.label,
                    "mode": mode_names[i % len(modes)] if row.key else "graph",
                    "params": row.params(),
                    "ms": _median(times[id(row)]),
                    "ref": peer_ms,
                    "target": TARGETS.get(row.key),
                    "shares": _shares(stage_times[id(row)]),
                }
            )
        if peer:
            table.append(
                {
                    "label": "torchvision maskrcnn_resnet50_fpn",
                    "mode": "eager, inference_mode",
                    "params": info["params"],
                    "ms": peer_ms,
                    "ref": None,
                    "target": None,
                    "shares": _shares(peer_stages),
                }
            )

        loads.append(load_average())
        print_table(table, loads, args.threads, args.size, compile_times)
        if not args.no_train:
            train_loads = [load_average()]
            train_table = train_rows(args, peer)
            train_loads.append(load_average())
            print_train_table(train_table, train_loads)
    finally:
        if peer:
            peer.close()


def converted_row(peer, size):
    """kseg's Mask R-CNN holding the torchvision worker's own weights
    (`from_torchvision`), graph mode; its detections must be the worker's."""
    import tempfile

    from kseg.models import from_torchvision

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "maskrcnn.npz"
        peer("save_state", path=str(path))
        image = np.load(f"{path}.image.npy")[None]
        model = from_torchvision(
            path,
            image_size=(size, size),
            score_threshold=0.0,
            max_detections=DETECTIONS,
            rpn_pre_nms_top_k_test=PROPOSALS,
            rpn_post_nms_top_k_test=PROPOSALS,
        )
    out = model(image, training=False)
    reference = peer("reference")
    classes = np.asarray(out["classes"])[0]
    boxes = np.asarray(out["boxes"])[0]
    ref_classes = np.asarray(reference["labels"])
    ref_boxes = np.asarray(reference["boxes"])
    # The faint image's scores nearly tie (see `grey_image`): compare as sets.
    found = sum(
        bool(np.any((ref_classes == c) & (np.abs(ref_boxes - b).max(axis=1) <= 1e-2)))
        for c, b in zip(classes, boxes, strict=True)
    )
    print(
        f"converted model: {found}/{DETECTIONS} detections are torchvision's "
        "(class equal, box within 1e-2 px)"
    )
    return KsegRow(
        None, "kseg Mask R-CNN, torchvision's weights", {}, size, False, model
    )


TRAIN_STAGES = (
    "backbone+FPN",
    "RPN targets+loss",
    "RoI sampling+box pool",
    "box head+loss",
    "mask targets",
    "mask pool+head+loss",
    "optimizer",
)
TRAIN_TARGETS = {"baseline": 0.9, "panet": 1.4}


class KsegTrainStages:
    """A kseg model's training step cut after each of its first six stages
    (`TRAIN_STAGES`), forward and backward (`tf.GradientTape`, graph mode)
    without the optimizer; the cut loss is the stages' own losses, or a
    mean of what a stage without one computed. Timings of cut K and K − 1
    differ by stage K's work; the optimizer's is the full step less cut 6.
    The same cuts as the torchvision worker's `train_stages`."""

    def __init__(self, model, x, y):
        self.model = model
        images = x["images"]
        variables = model.trainable_variables
        self.cuts = []
        for upto in range(1, 7):

            @tf.function
            def cut(upto=upto):
                with tf.GradientTape() as tape:
                    loss = self.loss(images, y, upto)
                gradients = tape.gradient(loss, variables)
                return tf.add_n([tf.reduce_sum(g) for g in gradients if g is not None])

            cut()
            self.cuts.append(cut)

    def loss(self, images, y, upto):
        from keras import ops

        from kseg.models.panet.roi_heads import box_losses, sample_rois

        model, heads = self.model, self.model.roi_heads
        gt_boxes, gt_classes, gt_masks, gt_valid = model._ground_truth(y)
        features = model.backbone(images, training=True)
        pyramid = model.fpn(
            [features[name] for name in ("res2", "res3", "res4", "res5")],
            training=True,
        )
        levels = pyramid[:4]
        if model.bottom_up_path:
            levels = model.bottom_up(levels, training=True)
        loss = sum(ops.mean(level) for level in [*pyramid, *levels])
        if upto == 1:
            return loss
        rpn = model.rpn([pyramid, images], training=True)
        rpn_losses = model.rpn.losses_for(rpn, gt_boxes, gt_valid)
        loss = loss * 0.0 + rpn_losses["rpn_objectness"] + rpn_losses["rpn_box"]
        if upto == 2:
            return loss
        samples = sample_rois(
            rpn["proposals"], rpn["valid"], gt_boxes, gt_classes, gt_valid,
            heads.seed_generator, heads.batch_size_per_image,
            heads.positive_fraction, heads.foreground_iou,
        )  # fmt: skip
        rois = samples["rois"]
        count = rois.shape[1]
        pooled = heads.box_pool([levels, rois], training=True)
        grids = pooled if isinstance(pooled, list) else [pooled]
        if upto == 3:
            return loss + sum(ops.mean(grid) for grid in grids)
        class_logits, box_deltas = heads.box_head(pooled, training=True)
        loss = loss + sum(
            box_losses(
                ops.reshape(class_logits, (-1, count, heads.num_classes + 1)),
                ops.reshape(box_deltas, (-1, count, 4 * heads.num_classes)),
                samples,
                heads.num_classes,
            )
        )
        if upto == 4:
            return loss
        limit = min(count, int(heads.batch_size_per_image * heads.positive_fraction))
        if upto == 5:
            return (
                loss
                + heads.foreground_rows(
                    samples,
                    limit,
                    lambda take: ops.mean(
                        heads.mask_rows(samples, gt_boxes, gt_masks, limit, take)[
                            "targets"
                        ]
                    ),
                )
                * 0.0
            )
        return loss + heads.foreground_rows(
            samples,
            limit,
            lambda take: heads._mask_loss(
                levels, samples, gt_boxes, gt_masks, limit, take, True
            ),
        )

    def __call__(self):
        """ms of each cut, in order."""
        times = []
        for cut in self.cuts:
            start = time.perf_counter()
            cut().numpy()
            times.append((time.perf_counter() - start) * 1e3)
        return times


def _stage_split(cut_times, step_times):
    """Per stage, ms: differences of the cuts' fastest runs (the least
    disturbed by other processes), the optimizer the fastest full step less
    the last cut; negative differences (noise) shown as 0."""
    cuts = [min(t[i] for t in cut_times) for i in range(len(cut_times[0]))]
    cuts.append(min(step_times))
    split, previous = [], 0.0
    for value in cuts:
        split.append(max(value - previous, 0.0))
        previous = value
    return split


def train_rows(args, peer):
    """Training steps at batch 2: kseg's Mask R-CNN baseline and PANet, and
    torchvision's Mask R-CNN, alternating, each with its stage split."""
    x, y, boxes = synthetic_instances(2, args.size)
    models = {}
    for key, label, switches in (
        ("baseline", "kseg Mask R-CNN baseline training step (batch 2)", BASELINE),
        ("panet", "kseg PANet training step (batch 2)", {}),
    ):
        progress(f"training steps: building and tracing {label}")
        model = build_panet_resnet50_fpn(
            NUM_CLASSES, image_size=(args.size, args.size), **switches
        )
        model.compile(optimizer=keras.optimizers.SGD(1e-4))
        start = time.perf_counter()
        model.train_on_batch(x, y)
        first = time.perf_counter() - start
        models[key] = (label, model, KsegTrainStages(model, x, y), first)
    if peer:
        peer("train_setup", boxes=boxes.tolist())
        peer("train")
        for upto in range(1, 7):
            peer("train_stages", upto=upto)
    steps = {key: [] for key in [*models, "torchvision"]}
    cuts = {key: [] for key in [*models, "torchvision"]}
    for run in range(args.train_runs):
        progress(f"training round {run + 1} of {args.train_runs}")
        for key, (_, model, stages, _) in models.items():
            start = time.perf_counter()
            model.train_on_batch(x, y)
            steps[key].append((time.perf_counter() - start) * 1e3)
            if peer:
                steps["torchvision"].append(peer("train")["ms"])
            cuts[key].append(stages())
            if peer and key == "panet":
                cuts["torchvision"].append(
                    [peer("train_stages", upto=k)["ms"] for k in range(1, 7)]
                )
    peer_ms = _median(steps["torchvision"]) if peer else None
    rows = []
    for key, (label, model, _, first) in models.items():
        rows.append(
            {
                "label": label,
                "params": model.count_params(),
                "ms": _median(steps[key]),
                "ref": peer_ms,
                "target": TRAIN_TARGETS[key],
                "split": _stage_split(cuts[key], steps[key]),
                "first": first,
            }
        )
    if peer:
        rows.append(
            {
                "label": "torchvision Mask R-CNN training step (batch 2)",
                "params": peer.params,
                "ms": peer_ms,
                "ref": None,
                "target": None,
                "split": _stage_split(cuts["torchvision"], steps["torchvision"]),
                "first": None,
            }
        )
    return rows


def print_train_table(rows, loads):
    print()
    print(
        "Training step, batch 2 (graph mode; SGD), ms: median step, then each "
        "stage's forward and backward from the fastest of the cut steps "
        f"(KsegTrainStages, the worker's train_stages); load before {loads[0]}, "
        f"after {loads[1]}"
    )
    print()
    header = " | ".join(TRAIN_STAGES)
    print(f"| model | parameters | median ms | vs torchvision | target | {header} |")
    print("|" + "---|" * (5 + len(TRAIN_STAGES)))
    for row in rows:
        split = " | ".join(f"{ms:.0f}" for ms in row["split"])
        print(
            f"| {row['label']} | {row['params'] / 1e6:.1f} M | {row['ms']:.0f} | "
            f"{_ratio(row)} | {_target(row)} | {split} |"
        )
    print()
    for row in rows:
        if row["first"] is not None:
            print(
                f"first step (tracing included) of {row['label']}: {row['first']:.1f} s"
            )


if __name__ == "__main__":
    main()
