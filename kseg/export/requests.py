"""What a kseg SavedModel's signatures take: their names, the checks every
request passes in the graph, and the decoding of encoded images. Shared by
the semantic (`kseg.export.saved_model`) and the instance
(`kseg.export.instance_saved_model`) exports."""

import tensorflow as tf

from kseg.data import decode_image

SERVING_SIGNATURE = "serving_default"
BYTES_SIGNATURE = "serving_bytes"
IMAGES = "images"
IMAGE_BYTES = "image_bytes"


def check_request(images, max_pixels):
    """`images` once checked: rank 4 `(N, H, W, 3)` and at most `max_pixels`
    pixels in all (N·H·W); otherwise an `InvalidArgumentError` that says
    what was sent and what is allowed. In the graph, so TF Serving answers
    a bad request with an error instead of running it: TF Serving does not
    check request shapes against the signature.

    The rank and shape come from `Rank` / `Shape` ops (`tf.raw_ops`): the
    public `tf.rank` and `tf.debugging.assert_rank` answer from the traced
    static shape, so the check would vanish from the graph.
    """
    # Only range slices of the shape: an index past a rank-3 shape would
    # fail first, with TensorFlow's "slice index out of bounds". Where the
    # traced rank 4 lets Grappler fold `Rank` away (a Python call of the
    # loaded signature), the size check still catches an (H, W, 3) image:
    # its H·W·3·3 differs from its size H·W·3.
    shape = tf.raw_ops.Shape(input=images, out_type=tf.int64)
    leading = shape[:3]
    batch = tf.debugging.Assert(
        tf.logical_and(
            tf.equal(tf.raw_ops.Rank(input=images), 4),
            tf.equal(tf.reduce_prod(leading) * 3, tf.size(images, out_type=tf.int64)),
        ),
        [
            "images must be a batch (N, H, W, 3) of RGB images (3 channels); "
            "send one image (H, W, 3) as a batch of one, [image]; got shape",
            shape,
        ],
    )
    channels = tf.debugging.Assert(
        tf.reduce_all(tf.equal(shape[-1:], 3)), ["images must have 3 (RGB) channels"]
    )
    # An empty batch or a 0×0 image would reach the model (a semantic model
    # failed inside with "Incompatible shapes", PANet returned nothing).
    not_empty = tf.debugging.Assert(
        tf.reduce_all(tf.greater(leading, 0)),
        [
            "the request holds no pixels: send at least one image of at least "
            "1×1 pixels (N, H, W ≥ 1); got shape",
            shape,
        ],
    )
    cap = _pixel_cap(tf.reduce_prod(leading), max_pixels, "pixels sent:")
    with tf.control_dependencies([batch, channels, not_empty, cap]):
        return tf.identity(images)


def _pixel_cap(pixels, max_pixels, what):
    """The assertion `pixels <= max_pixels`, naming the cap and the fix."""
    return tf.debugging.Assert(
        tf.less_equal(pixels, max_pixels),
        [
            f"the request holds more than the exported cap of {max_pixels} "
            "pixels (N·H·W): send smaller images or fewer per request, or "
            f"export with a larger --max-pixels; {what}",
            pixels,
        ],
    )


def encoded_image_sizes(image_bytes):
    """The `(height, width)` each encoded image's header declares, float64
    `(N, 2)`, read without decoding: the JPEG frame header
    (`tf.image.extract_jpeg_shape`), the PNG IHDR, the GIF logical screen,
    the BMP info header — what `decode_image` will allocate. Anything else
    is (0, 0): the decoder rejects it. Float64, so the product of two
    forged 32-bit sides cannot overflow."""

    def number(contents, start, length, little_endian):
        raw = tf.cast(
            tf.io.decode_raw(tf.strings.substr(contents, start, length), tf.uint8),
            tf.float64,
        )
        if little_endian:
            raw = tf.reverse(raw, [0])
        return tf.reduce_sum(raw * 256.0 ** tf.range(length - 1, -1, -1, tf.float64))

    def size(contents):
        magic = tf.strings.substr(contents, 0, 4)
        long_enough = tf.strings.length(contents) >= 26
        none = lambda: tf.zeros([2], tf.float64)  # noqa: E731
        png = lambda: tf.stack(  # noqa: E731
            [number(contents, 20, 4, False), number(contents, 16, 4, False)]
        )
        gif = lambda: tf.stack(  # noqa: E731
            [number(contents, 8, 2, True), number(contents, 6, 2, True)]
        )

        def bmp():
            # int32 little-endian; a negative height is a top-down bitmap.
            height = number(contents, 22, 4, True)
            height = tf.where(height >= 2.0**31, 2.0**32 - height, height)
            return tf.stack([height, number(contents, 18, 4, True)])

        def jpeg():
            return tf.cast(tf.image.extract_jpeg_shape(contents)[:2], tf.float64)

        return tf.case(
            [
                (tf.equal(tf.strings.substr(magic, 0, 3), b"\xff\xd8\xff"), jpeg),
                (tf.logical_and(long_enough, tf.equal(magic, b"\x89PNG")), png),
                (
                    tf.logical_and(
                        long_enough, tf.equal(tf.strings.substr(magic, 0, 3), b"GIF")
                    ),
                    gif,
                ),
                (
                    tf.logical_and(
                        long_enough, tf.equal(tf.strings.substr(magic, 0, 2), b"BM")
                    ),
                    bmp,
                ),
            ],
            default=none,
            exclusive=True,
        )

    return tf.map_fn(
        size, image_bytes, fn_output_signature=tf.TensorSpec([2], tf.float64)
    )


def decode_images(image_bytes, max_pixels):
    """Decodes a string batch `(N,)` of encoded images to uint8 `(N, H, W, 3)`.

    Every image must have the size of the first: a batch is one tensor. An
    empty batch is an `InvalidArgumentError`, and so is a batch whose
    headers declare more than `max_pixels` pixels in all: it is refused
    before anything is decoded (a 292 KB PNG may declare 10000 × 10000).
    """
    not_empty = tf.debugging.assert_positive(
        tf.size(image_bytes),
        message=f"{BYTES_SIGNATURE}: the request holds no image; send at least one",
    )
    with tf.control_dependencies([not_empty]):
        sizes = encoded_image_sizes(image_bytes)
    cap = _pixel_cap(
        tf.reduce_sum(tf.reduce_prod(sizes, axis=-1)),
        max_pixels,
        "pixels the image headers declare:",
    )
    with tf.control_dependencies([cap]):
        image_bytes = tf.identity(image_bytes)
    size = tf.shape(decode_image(image_bytes[0]))[:2]

    def decode_one(contents):
        image = decode_image(contents)
        same_size = tf.debugging.assert_equal(
            tf.shape(image)[:2],
            size,
            message=f"{BYTES_SIGNATURE}: every image of one request must have "
            "the same height and width; send images of other sizes in separate "
            "requests",
        )
        with tf.control_dependencies([same_size]):
            return tf.identity(image)

    return tf.map_fn(
        decode_one,
        image_bytes,
        fn_output_signature=tf.TensorSpec([None, None, 3], tf.uint8),
    )
