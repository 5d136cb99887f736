"""Index-exact PNG codec for label maps.

Label PNGs store class indices either as grayscale values (Cityscapes, ADE20K,
SBD "SegmentationClassAug") or as palette indices (PASCAL VOC
"SegmentationClass"). Common decoders — `tf.io.decode_png`, OpenCV's
`IMREAD_UNCHANGED` — expand a palette image to its RGB colours and lose the
indices. The palette scanlines, however, have exactly the layout of grayscale
scanlines of the same bit depth, so rewriting the header's colour type from
palette (3) to grayscale (0) and dropping the palette lets OpenCV return the raw
indices, whatever the palette is. `encode_rgb_png` writes colour images (a
dataset image re-encoded for TFRecords, a prediction overlay).
"""

import struct
import zlib

import cv2
import numpy as np

_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_GRAY = 0
_PALETTE = 3
_COLOR_TYPE_NAMES = {0: "grayscale", 2: "RGB", 3: "palette", 4: "gray+alpha", 6: "RGBA"}


def _chunk(kind, payload):
    crc = zlib.crc32(kind + payload) & 0xFFFFFFFF
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)


def _read_chunks(data, path):
    """Returns the `(kind, payload)` chunks of a PNG byte string."""
    if not data.startswith(_SIGNATURE):
        raise ValueError(f"{path}: not a PNG file")
    chunks = []
    offset = len(_SIGNATURE)
    while offset < len(data):
        if offset + 8 > len(data):
            raise ValueError(f"{path}: truncated PNG chunk header at byte {offset}")
        (length,) = struct.unpack(">I", data[offset : offset + 4])
        kind = data[offset + 4 : offset + 8]
        end = offset + 12 + length
        if end > len(data):
            raise ValueError(f"{path}: truncated PNG chunk {kind!r} at byte {offset}")
        chunks.append((kind, data[offset + 8 : offset + 8 + length]))
        offset = end
        if kind == b"IEND":
            break
    if not chunks or chunks[0][0] != b"IHDR" or len(chunks[0][1]) != 13:
        raise ValueError(f"{path}: PNG does not start with a valid IHDR chunk")
    return chunks


def decode_index_png(data, path="<bytes>"):
    """Decodes a grayscale or palette PNG to its raw `uint8` indices.

    Args:
        data: bytes of a PNG file.
        path: str. Where the bytes came from, named in errors.

    Returns:
        `uint8` array of shape `(H, W)`.

    Raises:
        ValueError: if the data is not a PNG, is corrupt, has colour channels
            (RGB/RGBA/gray+alpha), or is 16-bit with values above 255.
    """
    chunks = _read_chunks(bytes(data), path)
    header = chunks[0][1]
    width, height, bit_depth, color_type = struct.unpack(">IIBB", header[:10])
    if color_type not in (_GRAY, _PALETTE):
        name = _COLOR_TYPE_NAMES.get(color_type, f"colour type {color_type}")
        raise ValueError(
            f"{path}: a label PNG must hold class indices (grayscale or palette), "
            f"got a {name} image"
        )
    gray_header = header[:9] + bytes([_GRAY]) + header[10:]
    # Ancillary chunks are dropped with the palette: some (sBIT, tRNS, bKGD) have
    # a colour-type-dependent layout and would be invalid after the rewrite.
    rewritten = b"".join(
        [_SIGNATURE, _chunk(b"IHDR", gray_header)]
        + [_chunk(kind, payload) for kind, payload in chunks if kind == b"IDAT"]
        + [_chunk(b"IEND", b"")]
    )
    decoded = cv2.imdecode(np.frombuffer(rewritten, np.uint8), cv2.IMREAD_UNCHANGED)
    if decoded is None or decoded.shape != (height, width):
        raise ValueError(f"{path}: corrupt PNG image data")
    if bit_depth < 8:
        # libpng scales sub-byte gray values to the full 8-bit range.
        decoded = decoded // (255 // (2**bit_depth - 1))
    elif bit_depth == 16:
        if decoded.max(initial=0) > 255:
            raise ValueError(
                f"{path}: 16-bit label PNG holds values up to {decoded.max()}, "
                "labels must fit in 0..255"
            )
    return decoded.astype(np.uint8)


def encode_rgb_png(image):
    """Encodes an RGB `uint8` image `(H, W, 3)` as an RGB PNG (bytes)."""
    ok, buffer = cv2.imencode(".png", cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    if not ok:
        raise ValueError(f"OpenCV could not encode an image of shape {image.shape}")
    return buffer.tobytes()


def encode_index_png(label, palette=None):
    """Encodes a `uint8` label map as an 8-bit grayscale or palette PNG.

    Args:
        label: integer array `(H, W)` with values in 0..255.
        palette: optional `uint8` array `(N, 3)`, N <= 256, RGB. When given, the
            result is a palette PNG (as VOC's `SegmentationClass`), its colour
            table padded with black to 256 entries; otherwise grayscale.

    Returns:
        bytes of the PNG file; `decode_index_png` returns `label` exactly.
    """
    label = np.asarray(label)
    if label.ndim != 2:
        raise ValueError(f"label must have shape (H, W), got {label.shape}")
    if label.size and (label.min() < 0 or label.max() > 255):
        raise ValueError(
            f"label values must be in 0..255, got [{label.min()}, {label.max()}]"
        )
    ok, buffer = cv2.imencode(".png", np.ascontiguousarray(label, dtype=np.uint8))
    if not ok:
        raise ValueError(f"OpenCV could not encode a label of shape {label.shape}")
    data = buffer.tobytes()
    if palette is None:
        return data
    palette = np.asarray(palette, dtype=np.uint8)
    if palette.ndim != 2 or palette.shape[1] != 3 or not 0 < len(palette) <= 256:
        raise ValueError(
            f"palette must have shape (N, 3), N <= 256, got {palette.shape}"
        )
    table = np.zeros((256, 3), dtype=np.uint8)
    table[: len(palette)] = palette
    chunks = _read_chunks(data, "<encoded label>")
    header = chunks[0][1]
    palette_header = header[:9] + bytes([_PALETTE]) + header[10:]
    return b"".join(
        [_SIGNATURE, _chunk(b"IHDR", palette_header), _chunk(b"PLTE", table.tobytes())]
        + [_chunk(kind, payload) for kind, payload in chunks if kind == b"IDAT"]
        + [_chunk(b"IEND", b"")]
    )
