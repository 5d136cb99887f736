"""The TF Serving SavedModel of an instance segmentation model (PANet).

`kseg.export.export_saved_model` dispatches here for a model returning
`masks` (and no `logits`). The signatures, traced with dynamic batch, height
and width:

- `serving_default`: input `images`, uint8 `(N, H, W, 3)` RGB of any size
  (at most `max_pixels` pixels per request; rank and channels checked in the
  graph, as for the semantic export);
- `serving_bytes`: input `image_bytes`, string `(N,)` of encoded images of
  one size (decoded by `kseg.data.decode_image`).

Both return, for D = the model's `max_detections`:

- `num_detections` int32 `(N,)`: the rows of each image that hold a detection;
- `boxes` float32 `(N, D, 4)`: `[y1, x1, y2, x2]` in image pixels (pixel
  (i, j) covers `[i, i + 1) × [j, j + 1)`), clipped to the image;
- `scores` float32 `(N, D)`, `classes` int32 `(N, D)` (1..C, 0 = padding);
- `masks` float32 `(N, D, 28, 28)`: each detection's mask probabilities
  inside its box;
- `instance_map` int32 `(N, H, W)`: the row of the best-scoring detection
  whose pasted mask (probability ≥ 0.5) covers the pixel, −1 for none.

In the graph each image is fitted into the model's fixed input as the
evaluation pipeline fits it (`kseg.data.instance_eval_transform`: resize so
it fits, optionally to a shorter edge, zero padding), the boxes are divided by
the resize scale, and the masks are pasted with the sampling of
`kseg.data.instance_transform.paste_weights` (bilinear, mask pixel centres spread
evenly over the box, edge values held), one detection at a time inside its
box, so memory stays O(N·H·W) and the work grows with the boxes.
"""

import tensorflow as tf

from kseg.data import instance_eval_transform
from kseg.data.instance_transform import boxes_to_image, paste_weights
from kseg.export.requests import check_request, decode_images

NUM_DETECTIONS = "num_detections"
BOXES = "boxes"
SCORES = "scores"
CLASSES = "classes"
MASKS = "masks"
INSTANCE_MAP = "instance_map"
INSTANCE_OUTPUTS = (NUM_DETECTIONS, BOXES, SCORES, CLASSES, MASKS, INSTANCE_MAP)
# What the model, and the ONNX and TFLite files, return.
DETECTION_OUTPUTS = (BOXES, SCORES, CLASSES, MASKS, NUM_DETECTIONS)


def check_instance_model(model):
    """Raises `ValueError` unless `model` is an exportable instance model: one
    RGB input of a fixed size, a dict of `boxes`, `scores`, `classes`,
    `masks`, `num_detections`."""
    shape = model.input_shape
    if (
        not isinstance(shape, tuple)
        or len(shape) != 4
        or shape[-1] != 3
        or None in shape[1:3]
    ):
        raise ValueError(
            "An instance model must take one RGB image input of a fixed size "
            f"(batch, height, width, 3), its input shape is {shape}"
        )
    missing = [key for key in DETECTION_OUTPUTS if key not in model.output]
    if missing:
        raise ValueError(f"The instance model's outputs lack {missing}")


def paste_instance_map(boxes, scores, masks, num_detections, height, width):
    """The `instance_map` `(N, H, W)` int32 of detections in image pixels:
    the row of the best-scoring detection (the first on ties) whose mask
    pasted into its box has probability ≥ 0.5 at the pixel, −1 for none.

    One detection at a time, inside its box: the work and the memory of
    a detection grow with its box, not with N × H × W. Each pixel's
    probability is `kseg.data.instance_transform.PastedMasks`' float64
    two-by-two tap sum of `paste_weights`, so the map is the one
    `predict_instances` pastes.

    Args:
        boxes: float32 `(N, D, 4)` `[y1, x1, y2, x2]` image pixels.
        scores: float32 `(N, D)`.
        masks: float32 `(N, D, S, S)` probabilities.
        num_detections: int32 `(N,)`: rows beyond it are ignored.
        height, width: scalar int tensors, the image size.
    """
    batch = tf.shape(boxes)[0]
    count = tf.shape(boxes)[1]
    size = masks.shape[-1]
    masks = tf.cast(masks, tf.float64)
    best = tf.fill(tf.stack([batch, height, width]), float("-inf"))
    index = tf.fill(tf.stack([batch, height, width]), -1)

    def taps(low, high, length):
        """`(start, lower, upper, low weight, high weight)` of the pixels
        inside `[low, high)` along one axis (see `PastedMasks`)."""
        weights = paste_weights(low[None], high[None], length, size)[0]
        inside = tf.reduce_any(weights > 0, axis=1)
        start = tf.cast(tf.argmax(tf.cast(inside, tf.int32)), tf.int32)
        weights = weights[start : start + tf.reduce_sum(tf.cast(inside, tf.int32))]
        lower = tf.argmax(tf.cast(weights > 0, tf.int32), axis=1, output_type=tf.int32)
        upper = tf.minimum(lower + 1, size - 1)
        low_weight = tf.cast(tf.gather(weights, lower, batch_dims=1), tf.float64)
        high_weight = tf.where(
            upper > lower,
            tf.cast(tf.gather(weights, upper, batch_dims=1), tf.float64),
            tf.constant(0.0, tf.float64),
        )
        return start, lower, upper, low_weight, high_weight

    def body(i, best, index):
        image, k = i // count, i % count
        top, row_lower, row_upper, row_low, row_high = taps(
            boxes[image, k, 0], boxes[image, k, 2], height
        )
        left, col_lower, col_upper, col_low, col_high = taps(
            boxes[image, k, 1], boxes[image, k, 3], width
        )
        mask = masks[image, k]

        def sample(mask_rows):
            rows = tf.gather(mask, mask_rows)
            return col_low * tf.gather(rows, col_lower, axis=1) + col_high * tf.gather(
                rows, col_upper, axis=1
            )

        pasted = row_low[:, None] * sample(row_lower) + row_high[:, None] * sample(
            row_upper
        )
        begin = tf.stack([image, top, left])
        end = begin + tf.concat([[1], tf.shape(pasted)], axis=0)
        strides = tf.ones([3], tf.int32)
        old_best = tf.strided_slice(best, begin, end, strides)[0]
        old_index = tf.strided_slice(index, begin, end, strides)[0]
        score = scores[image, k]
        covers = (pasted >= 0.5) & (k < num_detections[image]) & (score > old_best)
        best = tf.raw_ops.TensorStridedSliceUpdate(
            input=best,
            begin=begin,
            end=end,
            strides=strides,
            value=tf.where(covers, score, old_best)[None],
        )
        index = tf.raw_ops.TensorStridedSliceUpdate(
            input=index,
            begin=begin,
            end=end,
            strides=strides,
            value=tf.where(covers, k, old_index)[None],
        )
        return i + 1, best, index

    _, _, index = tf.while_loop(
        lambda i, best, index: i < batch * count,
        body,
        (tf.constant(0), best, index),
        parallel_iterations=1,
    )
    return index


def detect_images(model, images, short_edge=None, max_size=None):
    """The signature outputs for uint8 images `(N, H, W, 3)` (one size);
    graph-safe with unknown `N`, `H` and `W`.

    The model runs one image at a time (`tf.map_fn`), each fitted into the
    model's input on its own.
    """
    model_size = tuple(int(v) for v in model.input_shape[1:3])
    detections = int(model.output["scores"].shape[-1])
    mask_shape = tuple(int(v) for v in model.output["masks"].shape[-2:])

    def detect(image):
        inputs, scale = instance_eval_transform(image, model_size, short_edge, max_size)
        outputs = model(inputs[None], training=False)
        height, width = tf.shape(image)[0], tf.shape(image)[1]
        boxes = boxes_to_image(
            tf.cast(outputs["boxes"][0], tf.float32), scale, height, width
        )
        return (
            tf.cast(tf.reshape(outputs["num_detections"], [-1])[0], tf.int32),
            boxes,
            tf.cast(outputs["scores"][0], tf.float32),
            tf.cast(outputs["classes"][0], tf.int32),
            tf.cast(outputs["masks"][0], tf.float32),
        )

    count, boxes, scores, classes, masks = tf.map_fn(
        detect,
        images,
        fn_output_signature=(
            tf.TensorSpec([], tf.int32),
            tf.TensorSpec([detections, 4], tf.float32),
            tf.TensorSpec([detections], tf.float32),
            tf.TensorSpec([detections], tf.int32),
            tf.TensorSpec([detections, *mask_shape], tf.float32),
        ),
    )
    shape = tf.shape(images)
    height, width = shape[1], shape[2]
    return {
        NUM_DETECTIONS: count,
        BOXES: boxes,
        SCORES: scores,
        CLASSES: classes,
        MASKS: masks,
        INSTANCE_MAP: paste_instance_map(boxes, scores, masks, count, height, width),
    }


def build_instance_serving_module(model, max_pixels, short_edge=None, max_size=None):
    """The `tf.Module` of an instance model's `serving_default` and
    `serving_bytes` (see `kseg.export.saved_model.build_serving_module`)."""
    check_instance_model(model)
    module = tf.Module()
    module.serving_default = tf.function(
        lambda images: detect_images(
            model, check_request(images, max_pixels), short_edge, max_size
        ),
        input_signature=[tf.TensorSpec([None, None, None, 3], tf.uint8, name="images")],
        autograph=False,
    )
    module.serving_bytes = tf.function(
        lambda image_bytes: module.serving_default(
            decode_images(image_bytes, max_pixels)
        ),
        input_signature=[tf.TensorSpec([None], tf.string, name="image_bytes")],
        autograph=False,
    )
    module.model_variables = list(
        module.serving_default.get_concrete_function().variables
    )
    return module
