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
    pixels = tf.reduce_prod(leading)
    cap = tf.debugging.Assert(
        tf.less_equal(pixels, max_pixels),
        [
            f"the request holds more than the exported cap of {max_pixels} "
            "pixels (N·H·W): send smaller images or fewer per request, or "
            "export with a larger --max-pixels; pixels sent:",
            pixels,
        ],
    )
    with tf.control_dependencies([batch, channels, cap]):
        return tf.identity(images)


def decode_images(image_bytes):
    """Decodes a string batch `(N,)` of encoded images to uint8 `(N, H, W, 3)`.

    Every image must have the size of the first: a batch is one tensor. An
    empty batch is an `InvalidArgumentError`.
    """
    not_empty = tf.debugging.assert_positive(
        tf.size(image_bytes),
        message=f"{BYTES_SIGNATURE}: the request holds no image; send at least one",
    )
    with tf.control_dependencies([not_empty]):
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
