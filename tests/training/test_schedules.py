"""PolyWarmup: the poly curve, the linear warm-up, serialization, bad options."""

import keras
import numpy as np
import pytest

from kseg.training.schedules import PolyWarmup


def reference(step, base, total, power, end, warmup, start_factor):
    def poly(t):
        return end + (base - end) * (1 - min(t, total) / total) ** power

    if step < warmup:
        return poly(warmup) * (start_factor + (1 - start_factor) * step / warmup)
    return poly(step)


@pytest.mark.parametrize("warmup", [0, 7])
def test_matches_the_poly_formula_with_warmup(warmup):
    schedule = PolyWarmup(
        0.01, decay_steps=50, power=0.9, end_learning_rate=1e-4, warmup_steps=warmup
    )
    for step in (0, 1, 6, 7, 8, 25, 49, 50, 60):
        expected = reference(step, 0.01, 50, 0.9, 1e-4, warmup, 0.1)
        np.testing.assert_allclose(float(schedule(step)), expected, rtol=1e-5)


def test_warmup_is_continuous_and_poly_decays_to_the_end_rate():
    schedule = PolyWarmup(0.004, decay_steps=100, warmup_steps=10)
    rates = np.array([float(schedule(step)) for step in range(120)])
    assert np.all(np.diff(rates[:10]) > 0)
    assert np.all(np.diff(rates[10:101]) < 0)
    np.testing.assert_allclose(rates[10], 0.004 * 0.9**0.9, rtol=1e-5)
    np.testing.assert_allclose(rates[100:], 0.0, atol=1e-12)


def test_serializes_and_drives_an_optimizer():
    schedule = PolyWarmup(0.01, decay_steps=20, warmup_steps=3, warmup_start_factor=0.5)
    restored = keras.optimizers.schedules.deserialize(
        keras.optimizers.schedules.serialize(schedule)
    )
    assert isinstance(restored, PolyWarmup)
    assert restored.get_config() == schedule.get_config()
    optimizer = keras.optimizers.SGD(schedule)
    optimizer.build([keras.Variable(1.0)])
    np.testing.assert_allclose(float(optimizer.learning_rate), float(schedule(0)))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"decay_steps": 0}, "decay_steps"),
        ({"decay_steps": 10.5}, "decay_steps"),
        ({"decay_steps": 10, "warmup_steps": 10}, "warmup_steps"),
        ({"decay_steps": 10, "power": -1}, "power"),
        ({"decay_steps": 10, "warmup_start_factor": 2}, "warmup_start_factor"),
    ],
)
def test_bad_options_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PolyWarmup(0.01, **kwargs)
