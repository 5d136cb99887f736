"""Benchmark: peak memory (RSS) and time of `kseg predict` by image size.

One `kseg predict` subprocess per image (a gradient with shapes and noise,
written as PNG); its peak RSS is the child's own `ru_maxrss` (`os.wait4`),
its time the wall time of the whole command (Python and TensorFlow start-up
included). The models have random weights, saved as `.keras`: memory
depends on the activations and the outputs, not on what the weights learnt.

- semantic (`--sizes`, default 1 4 16 64 MP): the quickstart recipe's PAN
  (48 filters, a ResNet of widths 16-64, output stride 8). `kseg predict`
  runs images above `--max-pixels` (default 1 megapixel) by 512×512
  windows, one row at a time, so its peak should stay near the image and
  its class map. The peer, measured in the same run, is the whole image in
  one call (`--max-pixels` above the image's size), at the sizes where that
  still fits in this machine's memory (`--peer-max` megapixels).
- semantic `--tta` (`--tta-sizes`, default 1 4 16 MP): PAN's six scales and
  flips; a run whose largest scale exceeds `--max-pixels` goes by windows.
- PANet (`--panet-sizes`, default 1 16 64 MP): the panet_quickstart
  recipe's model with `--score-threshold 0`, so every detection it returns
  (up to its `max_detections`) is pasted, drawn, written to the instance
  PNG and encoded as COCO RLE.

Growth from 16 to 64 MP should be about the image and its outputs (3 bytes
a pixel of image, 3 of overlay, 1 or 2 of class / instance map), not a
multiple of them.

    python benchmarks/predict_memory.py [--sizes 1 4 16 64] [--peer-max 4]
        [--tta-sizes 1 4 16] [--panet-sizes 1 16 64]
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402

MEGAPIXEL = 1 << 20


def save_model(path, recipe="quickstart"):
    """A recipe's model (`quickstart`: PAN, `panet_quickstart`: PANet),
    random weights, saved as `.keras`."""
    from kseg.data import SYNTHETIC_CLASSES, SYNTHETIC_INSTANCE_CLASSES
    from kseg.training.recipe import load_recipe
    from kseg.training.task import (
        BACKBONE_BUILDERS,
        build_model,
        with_input_normalization,
    )

    recipe = load_recipe(recipe)
    if recipe.task == "instance":
        from kseg.models import PANet

        # What the instance task builds, less its training arguments.
        size = tuple(recipe.data.crop_size)
        backbone = BACKBONE_BUILDERS[recipe.backbone.name](
            **{"input_shape": (*size, 3), **recipe.backbone.kwargs}
        )
        model = PANet(
            with_input_normalization(backbone),
            len(SYNTHETIC_INSTANCE_CLASSES),
            image_size=size,
            **recipe.model.kwargs,
        )
    else:
        model = build_model(recipe, len(SYNTHETIC_CLASSES))
    model.save(path)
    return path


def write_image(path, megapixels, seed=0):
    """A square PNG of `megapixels` (1 = 1024×1024): a colour gradient with
    discs and noise, written in bands so this process stays small."""
    from PIL import Image

    side = int(round(1024 * megapixels**0.5))
    rng = np.random.default_rng(seed)
    image = np.empty((side, side, 3), np.uint8)
    centres = rng.uniform(0, side, (8, 2))
    radii = rng.uniform(side / 20, side / 6, 8)
    colours = rng.integers(0, 256, (8, 3))
    x = np.arange(side)[None, :]
    for top in range(0, side, 1024):
        y = np.arange(top, min(top + 1024, side))[:, None]
        red, green = np.broadcast_arrays(255.0 * x / side, 255.0 * y / side)
        band = np.stack([red, green, np.full_like(red, 128.0)], -1)
        for (cy, cx), radius, colour in zip(centres, radii, colours, strict=True):
            band[(y - cy) ** 2 + (x - cx) ** 2 < radius**2] = colour
        band += rng.normal(0, 8, band.shape)
        image[top : top + len(band)] = np.clip(band, 0, 255)
    Image.fromarray(image).save(path, compress_level=1)
    return side


def measure(model, image, out, max_pixels=None, options=()):
    """Runs `kseg predict` once; returns (peak RSS MiB, seconds, exit status)."""
    command = [sys.executable, "-m", "kseg.cli", "predict", str(model), str(image)]
    command += ["--out", str(out), "--overwrite", *options]
    if max_pixels is not None:
        command += ["--max-pixels", str(max_pixels)]
    started = time.perf_counter()
    process = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    # wait4 gives this child's own resource usage (ru_maxrss in KiB on Linux).
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - started
    process.returncode = os.waitstatus_to_exitcode(status)
    error = process.stderr.read().decode(errors="replace")
    process.stderr.close()
    if process.returncode != 0:
        print(f"  kseg predict exited {process.returncode}: {error[-500:]}")
    return usage.ru_maxrss / 1024, seconds, process.returncode


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=float, nargs="*", default=(1, 4, 16, 64))
    parser.add_argument(
        "--peer-max",
        type=float,
        default=4,
        help="largest size (megapixels) run whole as the peer (default: 4)",
    )
    parser.add_argument("--tta-sizes", type=float, nargs="*", default=(1, 4, 16))
    parser.add_argument("--panet-sizes", type=float, nargs="*", default=(1, 16, 64))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="kseg-predict-memory-") as folder:
        folder = Path(folder)
        semantic = save_model(folder / "quickstart.keras")
        panet = None
        if args.panet_sizes:
            panet = save_model(folder / "panet.keras", "panet_quickstart")
        plans = {}
        for megapixels in args.sizes:
            runs = plans.setdefault(megapixels, [])
            runs.append(("kseg predict (default)", semantic, None, ()))
            if megapixels <= args.peer_max:
                runs.append(("whole image (peer)", semantic, "whole", ()))
        for megapixels in args.tta_sizes:
            plans.setdefault(megapixels, []).append(
                ("kseg predict --tta", semantic, None, ("--tta",))
            )
        for megapixels in args.panet_sizes:
            plans.setdefault(megapixels, []).append(
                ("PANet kseg predict", panet, None, ("--score-threshold", "0"))
            )
        rows = []
        for megapixels in sorted(plans):
            image = folder / f"{megapixels:g}mp.png"
            side = write_image(image, megapixels)
            for label, model, max_pixels, options in plans[megapixels]:
                if max_pixels == "whole":
                    max_pixels = side * side
                rss, seconds, status = measure(
                    model, image, folder / "out", max_pixels, options
                )
                rows.append((megapixels, side, label, rss, seconds, status))
                print(
                    f"{megapixels:g} MP ({side}x{side}) {label}: {rss:.0f} MiB, "
                    f"{seconds:.1f} s",
                    flush=True,
                )
            image.unlink()

    print()
    print("| megapixels | image | run | peak RSS (MiB) | seconds |")
    print("|---|---|---|---|---|")
    for megapixels, side, label, rss, seconds, status in rows:
        failed = "" if status == 0 else f" (exit {status})"
        print(
            f"| {megapixels:g} | {side}×{side} | {label}{failed} | {rss:.0f} | "
            f"{seconds:.1f} |"
        )


if __name__ == "__main__":
    main()
