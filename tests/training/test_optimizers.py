"""L2DecaySGD: weight decay added to the gradient before the momentum step."""

import keras
import numpy as np

from kseg.training.optimizers import L2DecaySGD


def test_decay_goes_through_the_momentum_buffer():
    lr, momentum, decay = 0.1, 0.9, 0.01
    optimizer = L2DecaySGD(lr, momentum=momentum, weight_decay=decay)
    weight = keras.Variable(np.array([1.0, -2.0], "float32"))
    gradients = [np.array([0.5, 0.25], "float32"), np.array([-1.0, 0.0], "float32")]
    w, velocity = np.array([1.0, -2.0]), np.zeros(2)
    for gradient in gradients:
        optimizer.apply_gradients([(gradient, weight)])
        velocity = momentum * velocity - lr * (gradient + decay * w)
        w = w + velocity
        np.testing.assert_allclose(weight.numpy(), w, rtol=1e-6)


def test_excluded_variables_get_no_decay_and_config_round_trips():
    optimizer = L2DecaySGD(0.1, weight_decay=0.5)
    kept, excluded = (
        keras.Variable(1.0, name="kernel"),
        keras.Variable(1.0, name="bias"),
    )
    optimizer.exclude_from_weight_decay(var_names=["bias"])
    optimizer.apply_gradients([(0.0, kept), (0.0, excluded)])
    np.testing.assert_allclose(float(kept.numpy()), 1.0 - 0.1 * 0.5)
    np.testing.assert_allclose(float(excluded.numpy()), 1.0)
    restored = keras.optimizers.deserialize(keras.optimizers.serialize(optimizer))
    assert isinstance(restored, L2DecaySGD) and restored.weight_decay == 0.5
