"""Benchmark: parameters, graph GFLOPs and CPU forward latency of kseg's
models, with keras-hub's DeepLabV3+ on ResNet-50 as the peer.

Every model takes 512×512×3 images (`--size`), batch 1, 21 classes, on the
TensorFlow backend, with randomly initialized weights (latency and FLOPs do
not depend on them). keras-hub's `DeepLabV3ImageSegmenter` is built from
config, nothing is downloaded: `ResNetBackbone` ResNet-50 (v1, 7×7 stem,
output stride 32, as keras-hub builds it), ASPP on P5 with rates (6, 12, 18),
×8 upsampling to P2's stride 4 and the 48-channel low-level projection of P2
(the DeepLabV3+ decoder, as in keras-hub's preset).

- Parameters: `model.count_params()`, every weight (BN statistics included).
- GFLOPs: the traced inference graph (`training=False`) is counted by
  TensorFlow's profiler (`float_operation`), which counts a
  multiply and an add separately: GFLOPs = 2 × G multiply-adds for the
  convolutions. Ops without a registered FLOP count (resizes, ReLU, exp,
  cumulative sums, depth-to-space) count zero. Dilated convolutions count
  as TensorFlow runs them, a dense conv on the SpaceToBatchND-padded map
  (keras-hub's ASPP at 512²: 1224 output positions for 3 × 256 real ones).
- Latency: each model is called through the same `tf.function` (no XLA;
  `--xla` compiles every model with `jit_compile=True` instead),
  warmed up `--warmup` times, then timed `--runs` times round-robin — one
  call of every model per round — so that load from other processes on the
  machine falls on all models alike; the median is reported, with the load
  average before and after.

Targets (from the issue): PAN-R50 and ExFuse-R50 forward latency at or below
DeepLabV3+-R50's; the guidance CRF adds at most 10% to SegModel's forward
(the paper: 4.4 of 54.4 ms).

    python benchmarks/models.py [--size 512] [--runs 10] [--warmup 3]
        [--models pan_r50,deeplabv3plus_r50] [--paper-backbones] [--xla]
        [--breakdown N]
"""

import argparse
import gc
import os
import re
import sys
import time

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from kseg import backbones, models  # noqa: E402

# The v1 profiler API logs a deprecation notice on every call.
tf.get_logger().setLevel("ERROR")

NUM_CLASSES = 21
PEER = "deeplabv3plus_r50"
# The guidance CRF's added share of SegModel's forward pass must not exceed this.
CRF_SHARE_LIMIT = 0.10


def _deeplabv3plus_r50(size):
    # Imported here: only the peer needs the `bench` extra.
    import keras_hub

    encoder = keras_hub.models.ResNetBackbone(
        input_conv_filters=[64],
        input_conv_kernel_sizes=[7],
        stackwise_num_filters=[64, 128, 256, 512],
        stackwise_num_blocks=[3, 4, 6, 3],
        stackwise_num_strides=[1, 2, 2, 2],
        block_type="bottleneck_block",
        use_pre_activation=False,
        image_shape=(size, size, 3),
    )
    backbone = keras_hub.models.DeepLabV3Backbone(
        image_encoder=encoder,
        spatial_pyramid_pooling_key="P5",
        upsampling_size=8,
        dilation_rates=[6, 12, 18],
        low_level_feature_key="P2",
        projection_filters=48,
        image_shape=(size, size, 3),
    )
    return keras_hub.models.DeepLabV3ImageSegmenter(backbone, NUM_CLASSES)


def _pan_r50(size):
    # PAN's encoder design (deep stem, dilated res5) on ResNet-50's blocks.
    encoder = backbones.resnet50(
        input_shape=(size, size, 3), deep_stem=True, output_stride=16
    )
    return models.PAN(encoder, NUM_CLASSES)


def _pan_r50_peer_encoder(size):
    # PAN's decoder on exactly the peer's encoder (7×7 stem, output stride
    # 32), so that the comparison isolates FPA + GAU against ASPP + decoder.
    return models.PAN(backbones.resnet50(input_shape=(size, size, 3)), NUM_CLASSES)


def _fcn_r50(size):
    encoder = backbones.resnet50(
        input_shape=(size, size, 3), deep_stem=True, output_stride=16
    )
    return models.FCN(encoder, NUM_CLASSES)


def _gcn_r50(size):
    return models.GCN(backbones.resnet50(input_shape=(size, size, 3)), NUM_CLASSES)


def _exfuse_r50(size):
    # Every ExFuse switch; layer rearrangement is a backbone choice and has
    # no ResNet-50 layout in the paper, so the encoder keeps {3, 4, 6, 3}.
    return models.ExFuse(
        backbones.resnet50(input_shape=(size, size, 3)),
        NUM_CLASSES,
        semantic_supervision=True,
        ecre=True,
        seb=True,
        dap=True,
    )


def _segmodel_r50(size, guidance_crf=False):
    # SegModel's unary encoder design (dilated to output stride 16) on
    # ResNet-50's blocks; Table 3's "Patch" column, and "Guide" with the CRF.
    return models.SegModel(
        backbones.resnet50(input_shape=(size, size, 3), output_stride=16),
        NUM_CLASSES,
        context_crf=True,
        patch_prediction=True,
        guidance_crf=guidance_crf,
    )


# name → (label, backbone description, builder(size)). Timed, at ResNet-50.
MODELS = {
    "fcn_r50": ("FCN", "ResNet-50 deep stem OS16", _fcn_r50),
    "gcn_r50": ("GCN (ExFuse baseline)", "ResNet-50 OS32", _gcn_r50),
    "exfuse_r50": ("ExFuse (SS+ECRE+SEB+DAP)", "ResNet-50 OS32", _exfuse_r50),
    "pan_r50": ("PAN", "ResNet-50 deep stem OS16", _pan_r50),
    "pan_r50_os32": (
        "PAN (the peer's encoder)",
        "ResNet-50 OS32",
        _pan_r50_peer_encoder,
    ),
    "segmodel_r50": ("SegModel (Patch+Context)", "ResNet-50 OS16", _segmodel_r50),
    "segmodel_r50_guide": (
        "SegModel (+Guidance CRF)",
        "ResNet-50 OS16",
        lambda size: _segmodel_r50(size, guidance_crf=True),
    ),
    PEER: ("DeepLabV3+ (keras-hub)", "ResNet-50 OS32", _deeplabv3plus_r50),
}
# The papers' encoders: parameters and GFLOPs only (`--paper-backbones`).
PAPER_MODELS = {
    "fcn_r101": ("FCN", "ResNet-101 deep stem OS16", models.build_fcn_resnet101),
    "gcn_x101": (
        "GCN (ExFuse baseline)",
        "ResNeXt-101 32x4d OS32",
        models.build_gcn_resnext101,
    ),
    "exfuse_x101": (
        "ExFuse (SS+LR+ECRE+SEB+DAP)",
        "ResNeXt-101 {8,8,9,8} OS32",
        models.build_exfuse_resnext101,
    ),
    "pan_r101": ("PAN", "ResNet-101 deep stem OS16", models.build_pan_resnet101),
    "segmodel_r101": (
        "SegModel (+Guidance CRF)",
        "ResNet-101 OS16",
        models.build_segmodel_resnet101,
    ),
}


def count_flops(model, size):
    """FLOPs of one inference call on a `size`² image, counted by TensorFlow's
    profiler on the traced graph (a multiply-add is 2 FLOPs).

    The graph of the concrete function has every shape static (the input
    spec is), so the profiler counts it as it would the frozen graph (same
    totals), without copying the weights into constants: freezing the
    largest models held several copies of ~1 GB of weights at once.

    Returns:
        `(total, per_layer)`: the total, and a dict mapping each layer of the
        model (`encoder/<stage>` inside a kseg encoder) to its FLOPs.
    """
    spec = tf.TensorSpec((1, size, size, 3), tf.float32)
    concrete = tf.function(lambda x: model(x, training=False)).get_concrete_function(
        spec
    )
    builder = tf.compat.v1.profiler.ProfileOptionBuilder
    options = builder(builder.float_operation()).with_empty_output().build()
    profile = tf.compat.v1.profiler.profile(
        concrete.graph, cmd="scope", options=options
    )
    per_layer = {}
    nodes = list(profile.children)
    while nodes:
        node = nodes.pop()
        nodes.extend(node.children)
        if node.float_ops:
            key = _layer_key(node.name, model)
            per_layer[key] = per_layer.get(key, 0) + node.float_ops
    return profile.total_float_ops, per_layer


def _layer_key(op_name, model):
    # Op names are "<model>_1/<layer>_1/.../<op>"; inside a kseg encoder the
    # layer names start with the stage ("res3_block2_...", "stem1_conv").
    scopes = [re.sub(r"_\d+$", "", part) for part in op_name.split("/")]
    if len(scopes) < 3:
        return "(model)"
    backbone = getattr(model, "backbone", None)
    if isinstance(backbone, keras.Model) and scopes[1] == backbone.name:
        stage = scopes[2].split("_")[0]
        if stage.startswith("stem"):
            return "encoder/stem"
        if stage in backbones.STAGE_NAMES:
            return f"encoder/{stage}"
        return f"{scopes[1]}/{scopes[2]}"
    return scopes[1]


def _forward(model, jit_compile=False):
    compiled = tf.function(lambda x: model(x, training=False), jit_compile=jit_compile)

    def call(images):
        outputs = compiled(images)
        logits = outputs["logits"] if isinstance(outputs, dict) else outputs
        return logits.numpy()

    return call


def time_round_robin(forwards, images, runs, warmup):
    """Median seconds per call of every forward, timed one call of each per
    round so that machine load spreads evenly over the models."""
    for forward in forwards.values():
        for _ in range(warmup):
            forward(images)
    times = {name: [] for name in forwards}
    for _ in range(runs):
        for name, forward in forwards.items():
            start = time.perf_counter()
            forward(images)
            times[name].append(time.perf_counter() - start)
    return {name: float(np.median(t)) for name, t in times.items()}


def _verdict(ok):
    return "PASS" if ok else "FAIL"


def _print_targets(rows, latency):
    print("targets:")
    peer = 1e3 * latency[PEER] if PEER in latency else None
    for name in ("pan_r50", "pan_r50_os32", "exfuse_r50"):
        if name in latency and peer is not None:
            ms = 1e3 * latency[name]
            label, backbone, _ = MODELS[name]
            print(
                f"  {_verdict(ms <= peer)}  {label}, {backbone}: latency <= "
                f"DeepLabV3+-R50: {ms:.0f} ms vs {peer:.0f} ms ({ms / peer:.2f}x)"
            )
    if "segmodel_r50" in latency and "segmodel_r50_guide" in latency:
        base, full = latency["segmodel_r50"], latency["segmodel_r50_guide"]
        added = (full - base) / base
        flops_added = rows["segmodel_r50_guide"][3] / rows["segmodel_r50"][3] - 1
        print(
            f"  {_verdict(added <= CRF_SHARE_LIMIT)}  guidance CRF adds <= "
            f"{CRF_SHARE_LIMIT:.0%} to SegModel-R50's forward: "
            f"{1e3 * base:.0f} -> {1e3 * full:.0f} ms, {added:+.1%} "
            f"({(full - base) / full:.1%} of the full forward; GFLOPs "
            f"{flops_added:+.1%}; paper 4.4 of 54.4 ms, +8.8%)"
        )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument(
        "--models",
        default=",".join(MODELS),
        help=f"comma-separated subset of {', '.join(MODELS)}",
    )
    parser.add_argument(
        "--paper-backbones",
        action="store_true",
        help="also count parameters and GFLOPs (not latency) of the papers' "
        f"ResNet-101 / ResNeXt-101 models: {', '.join(PAPER_MODELS)}",
    )
    parser.add_argument(
        "--xla",
        action="store_true",
        help="time every model under tf.function(jit_compile=True) instead",
    )
    parser.add_argument(
        "--breakdown",
        type=int,
        default=0,
        metavar="N",
        help="print each model's N layers with the most GFLOPs",
    )
    args = parser.parse_args()
    names = [n for n in args.models.split(",") if n]
    unknown = sorted(set(names) - set(MODELS))
    if unknown:
        parser.error(f"unknown models {unknown}; choose from {', '.join(MODELS)}")
    if args.runs < 1 or args.warmup < 0 or args.size < 64:
        parser.error("--runs must be >= 1, --warmup >= 0 and --size >= 64")

    images = tf.constant(
        np.random.default_rng(0).uniform(0, 255, (1, args.size, args.size, 3)),
        tf.float32,
    )
    rows, breakdowns, forwards = {}, {}, {}
    for name in names:
        label, backbone, build = MODELS[name]
        model = build(args.size)
        flops, breakdowns[name] = count_flops(model, args.size)
        rows[name] = (label, backbone, model.count_params() / 1e6, flops / 1e9)
        forwards[name] = _forward(model, jit_compile=args.xla)
        print(f"built and counted {name}", file=sys.stderr, flush=True)
    load_before = os.getloadavg()
    start = time.perf_counter()
    latency = time_round_robin(forwards, images, args.runs, args.warmup)
    elapsed = time.perf_counter() - start
    load_after = os.getloadavg()
    del forwards, model
    paper_rows = {}
    if args.paper_backbones:
        for name, (label, backbone, build) in PAPER_MODELS.items():
            # One large model at a time: the timed ones are no longer needed.
            keras.backend.clear_session()
            gc.collect()
            model = build(NUM_CLASSES, input_shape=(args.size, args.size, 3))
            flops, breakdowns[name] = count_flops(model, args.size)
            params = model.count_params() / 1e6
            paper_rows[name] = (label, backbone, params, flops / 1e9)
            del model

    print(
        f"kseg models vs keras-hub DeepLabV3+, {args.size}x{args.size}x3, batch 1, "
        f"{NUM_CLASSES} classes, TF {tf.__version__} CPU, {os.cpu_count()} CPUs, "
        f"random weights"
    )
    print(
        f"latency: tf.function ({'XLA' if args.xla else 'no XLA'}), median of "
        f"{args.runs} round-robin runs "
        f"after {args.warmup} warm-up calls each ({elapsed:.0f} s); load average "
        "(1/5/15 min) before "
        + "/".join(f"{x:.1f}" for x in load_before)
        + ", after "
        + "/".join(f"{x:.1f}" for x in load_after)
    )
    print(
        "params: all weights (BN statistics included); GFLOPs: TF profiler on the "
        "traced inference graph, 1 multiply-add = 2 FLOPs"
    )
    header = (
        f"{'model':<28} {'backbone':<27} {'params M':>9} {'GFLOPs':>8} "
        f"{'median ms':>10} {'vs DLv3+':>9}"
    )
    print(header)
    print("-" * len(header))
    peer_ms = 1e3 * latency[PEER] if PEER in latency else None
    for name, (label, backbone, params, gflops) in rows.items():
        ms = 1e3 * latency[name]
        ratio = f"{ms / peer_ms:.2f}x" if peer_ms else "-"
        print(
            f"{label:<28} {backbone:<27} {params:>9.1f} {gflops:>8.1f} "
            f"{ms:>10.0f} {ratio:>9}"
        )
    for label, backbone, params, gflops in paper_rows.values():
        print(f"{label:<28} {backbone:<27} {params:>9.1f} {gflops:>8.1f} {'-':>10}")
    _print_targets(rows, latency)
    if args.breakdown:
        for name, per_layer in breakdowns.items():
            total = sum(per_layer.values())
            top = sorted(per_layer.items(), key=lambda item: -item[1])
            print(f"{name}: GFLOPs by layer (of {total / 1e9:.1f})")
            for layer, flops in top[: args.breakdown]:
                print(f"  {layer:<48} {flops / 1e9:>8.2f} {flops / total:>6.1%}")


if __name__ == "__main__":
    main()
