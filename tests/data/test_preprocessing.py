"""`preprocess_images`, and that training, inference and export feed a model
the same tensor for the same image."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from kseg.data import augment, eval_transform, preprocess_images
from kseg.inference import predict

HEIGHT, WIDTH = 6, 5


def _image(seed=0):
    image = np.random.default_rng(seed).integers(0, 256, (HEIGHT, WIDTH, 3))
    image[0, 0], image[-1, -1] = 0, 255
    return image.astype(np.uint8)


@pytest.mark.parametrize(
    "dtype", ["uint8", "int16", "int32", "int64", "float16", "float32", "float64"]
)
@pytest.mark.parametrize("shape", [(HEIGHT, WIDTH, 3), (2, HEIGHT, WIDTH, 3)])
def test_casts_to_float32_and_keeps_the_values(dtype, shape):
    values = np.random.default_rng(1).uniform(0, 255, shape)
    if np.dtype(dtype).kind != "f":
        values = np.round(values)
    images = values.astype(dtype)
    out = preprocess_images(images)
    assert isinstance(out, tf.Tensor)
    assert out.dtype == tf.float32
    assert tuple(out.shape) == shape
    np.testing.assert_array_equal(out.numpy(), images.astype(np.float32))


def test_accepts_tensors_and_lists():
    image = _image()
    expected = image.astype(np.float32)
    np.testing.assert_array_equal(preprocess_images(tf.constant(image)), expected)
    np.testing.assert_array_equal(preprocess_images(image.tolist()), expected)


def test_graph_safe_with_unknown_batch_and_size():
    function = tf.function(
        preprocess_images,
        input_signature=[tf.TensorSpec([None, None, None, 3], tf.uint8)],
    )
    images = np.stack([_image(2), _image(3)])
    np.testing.assert_array_equal(function(images), images.astype(np.float32))
    dataset = tf.data.Dataset.from_tensors(_image(4)).map(preprocess_images)
    (element,) = list(dataset)
    assert element.shape == (HEIGHT, WIDTH, 3) and element.dtype == tf.float32


@pytest.mark.parametrize(
    "images, match",
    [
        (np.zeros((4, 4), np.uint8), r"images must have shape \(height, width, 3\)"),
        (np.zeros((1, 1, 4, 4, 3), np.uint8), "images must have shape"),
        (np.zeros((4, 4, 1), np.uint8), "3 channels"),
        (np.zeros((2, 4, 4, 4), np.uint8), "3 channels"),
        (np.zeros((0, 4, 3), np.uint8), "must not be empty"),
        (np.zeros((1, 4, 0, 3), np.uint8), "must not be empty"),
        (np.zeros((4, 4, 3), bool), "integers or floats, got bool"),
        (np.zeros((4, 4, 3), np.complex64), "integers or floats, got complex64"),
        (np.full((4, 4, 3), "a"), "integers or floats, got string"),
    ],
)
def test_bad_images_raise(images, match):
    with pytest.raises(ValueError, match=match):
        preprocess_images(images)


# === One preprocessing for training, inference and export ===


class InputRecorder(keras.layers.Layer):
    """Identity that copies its input into a variable: the copy survives
    tracing, so it shows what a jitted `predict_on_batch` or an exported
    SavedModel fed the model."""

    def __init__(self, shape, **kwargs):
        super().__init__(**kwargs)
        self.shape = tuple(shape)
        self.seen = self.add_weight(
            shape=self.shape, initializer="zeros", trainable=False, name="seen"
        )

    def compute_output_spec(self, x):
        return keras.KerasTensor(x.shape, x.dtype)

    def call(self, x):
        self.seen.assign(keras.ops.cast(x, "float32"))
        return x


def _recording_model():
    inputs = keras.Input((None, None, 3))
    recorder = InputRecorder((1, HEIGHT, WIDTH, 3))
    logits = keras.layers.Conv2D(2, 1)(recorder(inputs))
    return keras.Model(inputs, {"logits": logits}), recorder


def _training_input(image):
    """What `model.fit` gets from the trainer's pipeline for `image`, with
    the augmentation switched to the identity (scale 1, no flip, no jitter,
    crop = image)."""
    from kseg.training.recipe import apply_overrides, load_recipe
    from kseg.training.semantic import train_pipeline

    recipe = apply_overrides(
        load_recipe("quickstart"),
        [
            f"data.crop_size=[{HEIGHT}, {WIDTH}]",
            "data.scale_range=[1.0, 1.0]",
            "data.aspect_range=[1.0, 1.0]",
            "data.flip=false",
            "data.color_jitter=null",
            "data.shuffle_buffer=1",
        ],
    )
    label = np.zeros((HEIGHT, WIDTH), np.uint8)
    pairs = tf.data.Dataset.from_tensors((image, label))
    images, _ = next(iter(train_pipeline(pairs, recipe.data, 1, seed=3)))
    return images.numpy()[0]


def test_training_and_inference_feed_the_model_the_same_tensor():
    image = _image(5)
    expected = preprocess_images(image).numpy()

    np.testing.assert_array_equal(_training_input(image), expected)
    label = np.zeros((HEIGHT, WIDTH), np.uint8)
    evaluated, _ = eval_transform(image, label)
    np.testing.assert_array_equal(evaluated.numpy(), expected)
    augmented, _ = augment(
        image,
        label,
        (HEIGHT, WIDTH),
        scale_range=(1.0, 1.0),
        aspect_range=(1.0, 1.0),
        flip=False,
        seed=tf.constant([1, 2]),
    )
    np.testing.assert_array_equal(augmented.numpy(), expected)

    model, recorder = _recording_model()
    predict(model, image)
    fed = keras.ops.convert_to_numpy(recorder.seen.value)
    np.testing.assert_array_equal(fed[0], expected)


@pytest.mark.skipif(
    keras.backend.backend() != "tensorflow",
    reason="exporting a SavedModel needs the TensorFlow backend",
)
def test_exported_saved_model_feeds_the_model_the_training_tensor(tmp_path):
    from kseg.export import IMAGES, SERVING_SIGNATURE, export_saved_model

    image = _image(6)
    model, recorder = _recording_model()
    path = export_saved_model(model, tmp_path / "recorder")
    loaded = tf.saved_model.load(str(path))
    (seen,) = [v for v in loaded.model_variables if v.shape == recorder.shape]
    loaded.signatures[SERVING_SIGNATURE](**{IMAGES: tf.constant(image[None])})
    np.testing.assert_array_equal(seen.numpy()[0], _training_input(image))
    np.testing.assert_array_equal(seen.numpy()[0], preprocess_images(image).numpy())
