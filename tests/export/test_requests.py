"""What the SavedModel signatures refuse before running: empty requests and
0×0 images, and encoded images whose headers declare more pixels than the
cap (refused before they are decoded)."""

import io
import os
import struct
import subprocess
import sys
import textwrap
import zlib

import numpy as np
import pytest
import tensorflow as tf

from kseg import testing
from kseg.data import decode_image
from kseg.export import build_serving_module
from kseg.export.requests import encoded_image_sizes


def claimed_png(height, width):
    """A valid RGB PNG of `height × width` black pixels, compressed row by
    row (small in memory and on disk: 10000² is ~300 KB)."""

    def chunk(kind, data):
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    compressor = zlib.compressobj(9)
    row = bytes(1 + 3 * width)
    data = b"".join(compressor.compress(row) for _ in range(height))
    data += compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", data)
        + chunk(b"IEND", b"")
    )


def _encode(image, kind):
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format=kind)
    return buffer.getvalue()


def test_header_sizes_are_the_decoded_sizes():
    image = np.random.default_rng(0).integers(0, 256, (37, 53, 3), dtype=np.uint8)
    encoded = [_encode(image, kind) for kind in ("PNG", "JPEG", "GIF", "BMP")]
    encoded.append(_encode(image[..., 0], "PNG"))  # gray
    encoded.append(claimed_png(3, 5))
    encoded.append(b"not an image at all, not at all")
    sizes = encoded_image_sizes(tf.constant(encoded)).numpy()
    expected = [(37, 53)] * 5 + [(3, 5), (0, 0)]
    np.testing.assert_array_equal(sizes, expected)
    for data, size in zip(encoded[:-1], sizes[:-1], strict=True):
        assert decode_image(data).shape[:2] == tuple(int(v) for v in size)


def _tiny_segmenter():
    import keras

    inputs = keras.Input((None, None, 3))
    return keras.Model(inputs, {"logits": keras.layers.Conv2D(2, 1)(inputs)})


@pytest.fixture(scope="module")
def modules():
    """Serving modules with a 1000-pixel cap: semantic and instance."""
    detector = testing.fixed_detector(
        np.array([[0, 0, 8, 8]], np.float32),
        np.array([0.9], np.float32),
        np.array([1], np.int32),
        np.ones((1, 28, 28), np.float32),
        1,
        (64, 64),
    )
    return {
        "semantic": build_serving_module(_tiny_segmenter(), max_pixels=1000),
        "instance": build_serving_module(detector, max_pixels=1000),
    }


@pytest.mark.parametrize("kind", ["semantic", "instance"])
@pytest.mark.parametrize("shape", [(0, 16, 16, 3), (1, 0, 0, 3), (2, 5, 0, 3)])
def test_requests_without_pixels_are_refused(modules, kind, shape):
    # Before: the semantic model failed inside ("Incompatible shapes: [16]
    # vs [0,64,64,3]"), PANet answered empty outputs.
    module = modules[kind]
    assert module.serving_default(tf.zeros((1, 4, 4, 3), tf.uint8))
    with pytest.raises(tf.errors.InvalidArgumentError, match="holds no pixels"):
        module.serving_default(tf.zeros(shape, tf.uint8))


@pytest.mark.parametrize("kind", ["semantic", "instance"])
def test_bytes_requests_are_capped_by_their_headers(modules, kind):
    serving_bytes = modules[kind].serving_bytes
    small = claimed_png(20, 25)
    assert serving_bytes(tf.constant([small, small]))  # 1000 pixels: the cap
    for request in ([claimed_png(40, 30)], [small, small, small]):
        with pytest.raises(
            tf.errors.InvalidArgumentError,
            match="cap of 1000 pixels.*image headers declare",
        ):
            serving_bytes(tf.constant(request))


_DECODE_BOMB = textwrap.dedent(
    """
    import resource, sys
    import keras, numpy as np, tensorflow as tf
    from kseg.export import build_serving_module
    inputs = keras.Input((None, None, 3))
    model = keras.Model(inputs, {"logits": keras.layers.Conv2D(2, 1)(inputs)})
    module = build_serving_module(model)  # the default 16 MP cap
    warm_up = tf.io.encode_png(np.zeros((64, 64, 3), np.uint8))
    module.serving_bytes(tf.constant([warm_up.numpy()]))
    bomb = open(sys.argv[1], "rb").read()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    try:
        module.serving_bytes(tf.constant([bomb]))
        print("ANSWERED")
    except tf.errors.InvalidArgumentError as error:
        print("REFUSED", "image headers declare" in error.message)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print((after - before) * 1024)
    """
)


def test_a_decompression_bomb_is_refused_without_decoding(tmp_path):
    # A ~300 KB PNG declaring 10000 × 10000 pixels (100 MP, over the 16 MP
    # cap). Before: decoded first (+300 MB, the decoded pixels), then
    # refused by the pixel cap.
    height = width = 10000
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(claimed_png(height, width))
    assert bomb.stat().st_size < 1_000_000
    result = subprocess.run(
        [sys.executable, "-c", _DECODE_BOMB, str(bomb)],
        capture_output=True,
        text=True,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"),
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    status, growth = result.stdout.split("\n")[-3:-1]
    # Decoding would allocate height · width · 3 bytes; refusing from the
    # header allocates nothing that grows with the image.
    assert int(growth) < height * width * 3 / 10
    assert status == "REFUSED True"
