"""Test helpers shared by kseg's test suite (and usable by downstream projects).

Everything here is backend-agnostic: the same tests run under
`KERAS_BACKEND=tensorflow` and `KERAS_BACKEND=jax`.
"""

import os
import tempfile

import keras
import numpy as np
from keras.src import testing


def _to_numpy(x):
    return np.asarray(keras.ops.convert_to_numpy(x))


class TestCase(testing.TestCase):
    """`keras.src.testing.TestCase` plus kseg's extra checks.

    `run_layer_test` (inherited) checks the config round trip, symbolic and
    eager calls, one training step and a mixed-precision call.
    """

    def run_serialization_round_trip(self, layer, inputs, atol=1e-6):
        """Saves `layer` inside a model to `.keras`, reloads it and checks that
        the outputs are identical."""
        if isinstance(inputs, (list, tuple)):
            model_inputs = [
                keras.Input(shape=np.shape(x)[1:], dtype=_to_numpy(x).dtype)
                for x in inputs
            ]
        else:
            model_inputs = keras.Input(
                shape=np.shape(inputs)[1:], dtype=_to_numpy(inputs).dtype
            )
        model = keras.Model(model_inputs, layer(model_inputs))
        expected = model(inputs, training=False)
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "model.keras")
            model.save(path)
            restored = keras.saving.load_model(path)
        got = restored(inputs, training=False)
        for e, g in zip(
            keras.tree.flatten(expected), keras.tree.flatten(got), strict=True
        ):
            np.testing.assert_allclose(_to_numpy(g), _to_numpy(e), atol=atol)
        return restored

    def assert_xla_matches_eager(self, layer, inputs, atol=1e-5, rtol=1e-5):
        """Runs `layer` in a functional model compiled with `jit_compile=True`
        and checks the result against the eager call."""
        if isinstance(inputs, (list, tuple)):
            model_inputs = [keras.Input(shape=np.shape(x)[1:]) for x in inputs]
        else:
            model_inputs = keras.Input(shape=np.shape(inputs)[1:])
        model = keras.Model(model_inputs, layer(model_inputs))
        eager = model(inputs, training=False)
        model.compile(jit_compile=True)
        batch = np.shape(inputs[0] if isinstance(inputs, (list, tuple)) else inputs)
        compiled = model.predict(inputs, batch_size=batch[0], verbose=0)
        for e, c in zip(
            keras.tree.flatten(eager), keras.tree.flatten(compiled), strict=True
        ):
            np.testing.assert_allclose(c, _to_numpy(e), atol=atol, rtol=rtol)


def input_gradients(fn, *inputs):
    """Gradients of `sum(fn(*inputs))` with respect to every input, as NumPy."""
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        xs = [tf.convert_to_tensor(x) for x in inputs]
        with tf.GradientTape() as tape:
            tape.watch(xs)
            y = keras.ops.sum(fn(*xs))
        return [_to_numpy(g) for g in tape.gradient(y, xs)]
    if backend == "jax":
        import jax

        grad = jax.grad(
            lambda *xs: keras.ops.sum(fn(*xs)), argnums=tuple(range(len(inputs)))
        )
        return [_to_numpy(g) for g in grad(*inputs)]
    raise NotImplementedError(f"input_gradients does not support backend {backend}")


def weight_gradients(layer, inputs, loss_fn, training=True):
    """Gradients of `loss_fn(layer(inputs))` w.r.t. each trainable weight.

    Returns a dict mapping each trainable weight's path to its gradient
    (NumPy). A `None` gradient (the weight does not affect the loss) is
    returned as `None`.
    """
    backend = keras.backend.backend()
    if not layer.built:
        layer(inputs)
    weights = layer.trainable_weights
    if backend == "tensorflow":
        import tensorflow as tf

        with tf.GradientTape() as tape:
            loss = loss_fn(layer(inputs, training=training))
        grads = tape.gradient(loss, [w.value for w in weights])
    elif backend == "jax":
        import jax

        non_trainable = [v.value for v in layer.non_trainable_variables]

        def compute(trainable):
            out, _ = layer.stateless_call(
                trainable, non_trainable, inputs, training=training
            )
            return loss_fn(out)

        grads = jax.grad(compute)([w.value for w in weights])
    else:
        raise NotImplementedError(
            f"weight_gradients does not support backend {backend}"
        )
    return {
        w.path: (None if g is None else _to_numpy(g))
        for w, g in zip(weights, grads, strict=True)
    }
