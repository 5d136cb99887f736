"""Index-exact label PNG codec."""

import struct
import zlib

import cv2
import numpy as np
import pytest
import tensorflow as tf

from kseg.data import decode_index_png, encode_index_png, voc_colormap


def _chunk(kind, payload):
    crc = zlib.crc32(kind + payload) & 0xFFFFFFFF
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)


def _handmade_png(values, bit_depth, color_type, palette=None):
    """A minimal PNG writer (filter type 0) for bit depths OpenCV does not write."""
    height, width = values.shape
    rows = []
    for row in values:
        bits = "".join(format(int(v), f"0{bit_depth}b") for v in row)
        bits += "0" * (-len(bits) % 8)
        rows.append(b"\x00" + int(bits, 2).to_bytes(len(bits) // 8, "big"))
    header = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    chunks = [_chunk(b"IHDR", header)]
    if palette is not None:
        chunks.append(_chunk(b"PLTE", palette.tobytes()))
        chunks.append(_chunk(b"tRNS", b"\x00"))
    chunks += [_chunk(b"IDAT", zlib.compress(b"".join(rows))), _chunk(b"IEND", b"")]
    return b"\x89PNG\r\n\x1a\n" + b"".join(chunks)


@pytest.mark.parametrize("bit_depth", [1, 2, 4, 8])
@pytest.mark.parametrize("color_type", [0, 3])
def test_low_bit_depth_palette_and_gray_decode_to_indices(bit_depth, color_type):
    rng = np.random.default_rng(bit_depth)
    values = rng.integers(0, 2**bit_depth, size=(5, 11))
    # A palette whose colours say nothing about the indices.
    palette = rng.integers(0, 256, size=(2**bit_depth, 3), dtype=np.uint8)
    data = _handmade_png(values, bit_depth, color_type, palette if color_type else None)
    np.testing.assert_array_equal(decode_index_png(data), values)


def test_palette_round_trip_matches_tensorflow_colours():
    rng = np.random.default_rng(0)
    label = rng.integers(0, 21, size=(9, 13)).astype(np.uint8)
    label[2:4, 5:9] = 255
    data = encode_index_png(label, voc_colormap())
    np.testing.assert_array_equal(decode_index_png(data), label)
    rgb = tf.io.decode_png(data, channels=3).numpy()
    np.testing.assert_array_equal(rgb, voc_colormap()[label])
    gray = encode_index_png(label)
    np.testing.assert_array_equal(tf.io.decode_png(gray)[..., 0].numpy(), label)


def test_sixteen_bit_gray():
    ok, data = cv2.imencode(".png", np.array([[0, 7], [255, 1]], np.uint16))
    assert ok
    np.testing.assert_array_equal(decode_index_png(data.tobytes()), [[0, 7], [255, 1]])
    ok, data = cv2.imencode(".png", np.array([[0, 256]], np.uint16))
    with pytest.raises(
        ValueError, match="x.png: 16-bit label PNG holds values up to 256"
    ):
        decode_index_png(data.tobytes(), "x.png")


def test_bad_inputs_name_the_source():
    with pytest.raises(ValueError, match="a.png: not a PNG file"):
        decode_index_png(b"\xff\xd8\xff\xe0 jpeg", "a.png")
    data = encode_index_png(np.zeros((3, 3), np.uint8))
    with pytest.raises(ValueError, match="b.png: truncated PNG chunk"):
        decode_index_png(data[:40], "b.png")
    rgb = _handmade_png(np.zeros((2, 6)), 8, 2)
    with pytest.raises(ValueError, match="c.png: .* got a RGB image"):
        decode_index_png(rgb, "c.png")
    broken = data.replace(
        data[data.index(b"IDAT") + 4 : data.index(b"IDAT") + 8], b"\0" * 4
    )
    with pytest.raises(ValueError, match="d.png: corrupt PNG"):
        decode_index_png(broken, "d.png")
    with pytest.raises(ValueError, match="values must be in 0..255"):
        encode_index_png(np.array([[256]]))
    with pytest.raises(ValueError, match=r"shape \(H, W\)"):
        encode_index_png(np.zeros((2, 2, 1)))
