"""Benchmark: one model as Keras, SavedModel, ONNX Runtime and TFLite float32 /
float16 / int8.

For each format: file size, median latency of one image (batch 1, after a
warm-up call; wall and process CPU time, `--threads` threads for TensorFlow
and LiteRT alike) and, for a trained model, mean IoU on the quickstart
validation set. Two models, both measured in the same run:

- `quickstart`: the quickstart recipe's PAN (`--model`, a `.keras` file
  trained by `kseg train`; trained here first when not given, a few
  minutes), at its 64×64 input, with the validation mIoU of every format;
- `pan-r50`: PAN on ResNet-50 (deep stem, output stride 16), untrained,
  at `--size` — deployment-sized convolutions, latency and size only.

Keras is timed with `predict_on_batch` (logits), SavedModel with its
`serving_default` signature, ONNX Runtime (float32, CPU; the row is left out
without the `onnx` extra) with `kseg.export.ONNXSegmenter`, TFLite with
`kseg.export.TFLiteSegmenter`.
int8 is calibrated on 100 quickstart training images.

    python benchmarks/export.py [--model MODEL.keras] [--runs 20] [--threads 1]
                                [--size 256]
"""

import argparse
import importlib.util
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from kseg.backbones import resnet50  # noqa: E402
from kseg.data import make_synthetic, preprocess_images  # noqa: E402
from kseg.export import (  # noqa: E402
    CLASS_MAP,
    IMAGES,
    QUANTIZATIONS,
    SERVING_SIGNATURE,
    ONNXSegmenter,
    TFLiteSegmenter,
    export_onnx,
    export_saved_model,
    export_tflite,
)
from kseg.models import (
    PAN,  # noqa: E402
    load_model,  # noqa: E402
)
from kseg.training import SegmentationMeanIoU  # noqa: E402
from kseg.training.recipe import load_recipe  # noqa: E402
from kseg.training.task import with_input_normalization  # noqa: E402
from kseg.training.trainer import train  # noqa: E402

CALIBRATION_IMAGES = 100


def _median_ms(fn, runs):
    """Median wall and process-CPU milliseconds of `fn()` after a warm-up."""
    fn()
    wall, cpu = [], []
    for _ in range(runs):
        start, start_cpu = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return 1e3 * float(np.median(wall)), 1e3 * float(np.median(cpu))


def _size_mib(path):
    path = Path(path)
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files) / 2**20


def _mean_iou(labels, class_maps, num_classes):
    metric = SegmentationMeanIoU(num_classes)
    metric.update_state(
        labels.astype("int32"), np.eye(num_classes, dtype="float32")[class_maps]
    )
    return 100.0 * float(metric.result())


def _measure(name, model, keras_path, size, calibration, val, workdir, args):
    """Rows `(format, MiB, wall ms, cpu ms, mIoU or None)` of one model."""
    image = np.random.default_rng(0).integers(0, 256, (1, *size, 3), np.uint8)
    num_classes = model.output["logits"].shape[-1]

    def miou(predict):
        if val is None:
            return None
        batches = [val.images[i : i + 50] for i in range(0, len(val), 50)]
        maps = np.concatenate([predict(batch) for batch in batches])
        return _mean_iou(val.labels, maps, num_classes)

    rows = []
    as_float = preprocess_images(image)

    def keras_class_map(images):
        return model.predict_on_batch(preprocess_images(images))["logits"].argmax(-1)

    rows.append(
        (
            "Keras",
            _size_mib(keras_path),
            *_median_ms(lambda: model.predict_on_batch(as_float), args.runs),
            miou(keras_class_map),
        )
    )

    saved = export_saved_model(model, workdir / "saved_models" / name)
    serve = tf.saved_model.load(str(saved)).signatures[SERVING_SIGNATURE]
    tensor = tf.constant(image)
    rows.append(
        (
            "SavedModel",
            _size_mib(saved),
            *_median_ms(lambda: serve(**{IMAGES: tensor}), args.runs),
            miou(lambda x: serve(**{IMAGES: tf.constant(x)})[CLASS_MAP].numpy()),
        )
    )

    if importlib.util.find_spec("onnxruntime") and importlib.util.find_spec("tf2onnx"):
        path = export_onnx(model, workdir / f"{name}.onnx")
        segmenter = ONNXSegmenter(path, num_threads=args.threads)
        rows.append(
            (
                "ONNX Runtime",
                _size_mib(path),
                *_median_ms(lambda: segmenter(image), args.runs),
                miou(lambda x: segmenter(x)[CLASS_MAP]),
            )
        )
    else:
        print("ONNX Runtime row left out: pip install kseg[onnx]")

    for quantization in QUANTIZATIONS:
        path = export_tflite(
            model,
            workdir / f"{name}_{quantization}.tflite",
            size,
            quantization,
            calibration,
            CALIBRATION_IMAGES,
        )
        segmenter = TFLiteSegmenter(path, num_threads=args.threads)
        rows.append(
            (
                f"TFLite {quantization}",
                _size_mib(path),
                *_median_ms(lambda s=segmenter: s(image), args.runs),
                miou(lambda x, s=segmenter: s(x)[CLASS_MAP]),
            )
        )
    return rows


def _print_table(title, rows):
    print(title)
    print(f"{'format':<16} {'MiB':>8} {'ms':>9} {'cpu ms':>9} {'mIoU %':>7}")
    for fmt, mib, wall, cpu, miou in rows:
        miou_text = "-" if miou is None else f"{miou:.2f}"
        print(f"{fmt:<16} {mib:>8.2f} {wall:>9.2f} {cpu:>9.2f} {miou_text:>7}")
    timings = {row[0]: row[2] for row in rows}
    speedup = timings["TFLite float32"] / timings["TFLite int8"]
    verdict = "meets" if speedup >= 2.0 else "misses"
    print(f"int8 vs float32 TFLite: {speedup:.2f}x faster ({verdict} the 2x target)")
    if rows[0][4] is not None:
        int8 = {row[0]: row[4] for row in rows}["TFLite int8"]
        print(f"int8 mIoU - Keras mIoU: {int8 - rows[0][4]:+.2f} points")
    print()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="quickstart-trained .keras file")
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--size", type=int, default=256)
    args = parser.parse_args()
    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    tf.config.threading.set_inter_op_parallelism_threads(args.threads)

    recipe = load_recipe("quickstart")
    data = recipe.data
    calibration = make_synthetic(
        "train", CALIBRATION_IMAGES, data.image_size, recipe.train.seed
    ).images
    val = make_synthetic("val", data.num_val_images, data.image_size, recipe.train.seed)

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        model_path = args.model
        if model_path is None:
            print("training the quickstart recipe (pass --model to skip) ...")
            model_path = train(recipe, runs_dir=workdir / "runs", verbose=0).model_path
        quickstart = load_model(model_path)

        keras.utils.set_random_seed(0)
        backbone = resnet50(deep_stem=True, output_stride=16)
        pan_r50 = PAN(with_input_normalization(backbone), len(val.class_names))
        pan_r50_path = workdir / "pan_r50.keras"
        pan_r50.save(pan_r50_path)

        print(
            f"TF {tf.__version__}, Keras {keras.__version__}, {os.cpu_count()} CPUs, "
            f"{args.threads} thread(s), batch 1, median of {args.runs} runs\n"
        )
        size = (data.image_size, data.image_size)
        rows = _measure(
            "quickstart", quickstart, model_path, size, calibration, val, workdir, args
        )
        _print_table(
            f"quickstart PAN (trained), {size[0]}x{size[1]}, mIoU on the "
            f"{len(val)} quickstart validation images",
            rows,
        )
        size = (args.size, args.size)
        rows = _measure(
            "pan_r50", pan_r50, pan_r50_path, size, calibration, None, workdir, args
        )
        _print_table(f"PAN ResNet-50 (untrained), {size[0]}x{size[1]}", rows)


if __name__ == "__main__":
    main()
