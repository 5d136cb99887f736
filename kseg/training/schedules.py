"""Learning-rate schedules of the papers' recipes."""

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="kseg")
class PolyWarmup(keras.optimizers.schedules.LearningRateSchedule):
    """Poly learning-rate decay with a linear warm-up.

    The "poly" policy of DeepLab, PAN ("poly LR, power 0.9") and SegModel:
    with base rate `lr0`, end rate `lr_end`, `T = decay_steps` and power `p`,

        poly(t) = lr_end + (lr0 − lr_end) · (1 − min(t, T) / T) ** p

    For the first `W = warmup_steps` steps the rate instead grows linearly
    from `warmup_start_factor · poly(W)` at step 0 to `poly(W)` at step `W`
    (TF Model Garden's `PolynomialWarmUp`), so the curve is continuous and
    the decay still ends at step `T` whatever the warm-up.

    Example:
    >>> schedule = PolyWarmup(0.01, decay_steps=100, warmup_steps=10)
    >>> [round(float(schedule(t)), 5) for t in (0, 10, 100)]
    [0.00091, 0.0091, 0.0]

    Args:
        initial_learning_rate: float. Base rate `lr0`.
        decay_steps: int. Step `T` at which the rate reaches `lr_end`
            (usually the total number of training steps).
        power: float. Poly exponent. Defaults to `0.9`.
        end_learning_rate: float. Rate from step `T` on. Defaults to `0.0`.
        warmup_steps: int. Steps of linear warm-up, `< decay_steps`.
            Defaults to `0`.
        warmup_start_factor: float in `[0, 1]`. Rate at step 0 as a fraction
            of `poly(W)`. Defaults to `0.1`.
        name: str. Defaults to `"poly_warmup"`.
    """

    def __init__(
        self,
        initial_learning_rate,
        decay_steps,
        power=0.9,
        end_learning_rate=0.0,
        warmup_steps=0,
        warmup_start_factor=0.1,
        name="poly_warmup",
    ):
        super().__init__()
        if isinstance(decay_steps, bool) or not isinstance(decay_steps, int):
            raise ValueError(f"decay_steps must be a positive int, got {decay_steps!r}")
        if decay_steps < 1:
            raise ValueError(f"decay_steps must be a positive int, got {decay_steps!r}")
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int):
            raise ValueError(f"warmup_steps must be an int, got {warmup_steps!r}")
        if not 0 <= warmup_steps < decay_steps:
            raise ValueError(
                f"warmup_steps must be in [0, decay_steps={decay_steps}), got "
                f"{warmup_steps}"
            )
        if initial_learning_rate <= 0:
            raise ValueError(
                f"initial_learning_rate must be positive, got {initial_learning_rate}"
            )
        if end_learning_rate < 0:
            raise ValueError(
                f"end_learning_rate must be non-negative, got {end_learning_rate}"
            )
        if power < 0:
            raise ValueError(f"power must be non-negative, got {power}")
        if not 0.0 <= warmup_start_factor <= 1.0:
            raise ValueError(
                f"warmup_start_factor must be in [0, 1], got {warmup_start_factor}"
            )
        self.initial_learning_rate = float(initial_learning_rate)
        self.decay_steps = decay_steps
        self.power = float(power)
        self.end_learning_rate = float(end_learning_rate)
        self.warmup_steps = warmup_steps
        self.warmup_start_factor = float(warmup_start_factor)
        self.name = name

    def _poly(self, step):
        progress = ops.minimum(step, self.decay_steps) / self.decay_steps
        return self.end_learning_rate + (
            self.initial_learning_rate - self.end_learning_rate
        ) * ops.power(1.0 - progress, self.power)

    def __call__(self, step):
        step = ops.cast(step, "float32")
        rate = self._poly(step)
        if self.warmup_steps == 0:
            return rate
        target = self._poly(ops.convert_to_tensor(float(self.warmup_steps)))
        fraction = step / self.warmup_steps
        warmup = target * (
            self.warmup_start_factor + (1.0 - self.warmup_start_factor) * fraction
        )
        return ops.where(step < self.warmup_steps, warmup, rate)

    def get_config(self):
        return {
            "initial_learning_rate": self.initial_learning_rate,
            "decay_steps": self.decay_steps,
            "power": self.power,
            "end_learning_rate": self.end_learning_rate,
            "warmup_steps": self.warmup_steps,
            "warmup_start_factor": self.warmup_start_factor,
            "name": self.name,
        }


@keras.saving.register_keras_serializable(package="kseg")
class StepWarmup(keras.optimizers.schedules.LearningRateSchedule):
    """Step decay with a linear warm-up: Detectron's and PANet's schedule
    ("LR 0.02 with warm-up, ×0.1 steps").

    The rate is `lr0 · gamma^k` after the k-th of the `boundaries` (steps,
    ascending); for the first `W = warmup_steps` steps it grows linearly from
    `warmup_start_factor · lr0` at step 0 to `lr0` at step `W`.

    Example:
    >>> schedule = StepWarmup(0.02, boundaries=(60, 80), warmup_steps=10)
    >>> [round(float(schedule(t)), 5) for t in (0, 10, 59, 60, 80)]
    [0.002, 0.02, 0.02, 0.002, 0.0002]

    Args:
        initial_learning_rate: float. Base rate `lr0`.
        boundaries: ascending positive ints. Steps at which the rate is
            multiplied by `gamma`.
        gamma: float in (0, 1]. Factor at each boundary. Defaults to `0.1`.
        warmup_steps: int. Steps of linear warm-up. Defaults to `0`.
        warmup_start_factor: float in `[0, 1]`. Rate at step 0 as a fraction
            of `lr0`. Defaults to `0.1`.
        name: str. Defaults to `"step_warmup"`.
    """

    def __init__(
        self,
        initial_learning_rate,
        boundaries,
        gamma=0.1,
        warmup_steps=0,
        warmup_start_factor=0.1,
        name="step_warmup",
    ):
        super().__init__()
        boundaries = tuple(int(b) for b in boundaries)
        if any(b < 1 for b in boundaries) or list(boundaries) != sorted(boundaries):
            raise ValueError(
                f"boundaries must be ascending positive steps, got {boundaries}"
            )
        if initial_learning_rate <= 0:
            raise ValueError(
                f"initial_learning_rate must be positive, got {initial_learning_rate}"
            )
        if not 0.0 < gamma <= 1.0:
            raise ValueError(f"gamma must be in (0, 1], got {gamma}")
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int):
            raise ValueError(f"warmup_steps must be an int, got {warmup_steps!r}")
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
        if not 0.0 <= warmup_start_factor <= 1.0:
            raise ValueError(
                f"warmup_start_factor must be in [0, 1], got {warmup_start_factor}"
            )
        self.initial_learning_rate = float(initial_learning_rate)
        self.boundaries = boundaries
        self.gamma = float(gamma)
        self.warmup_steps = warmup_steps
        self.warmup_start_factor = float(warmup_start_factor)
        self.name = name

    def __call__(self, step):
        step = ops.cast(step, "float32")
        passed = sum(
            (ops.cast(step >= boundary, "float32") for boundary in self.boundaries),
            ops.zeros((), "float32"),
        )
        rate = self.initial_learning_rate * ops.power(self.gamma, passed)
        if self.warmup_steps == 0:
            return rate
        fraction = step / self.warmup_steps
        warmup = self.initial_learning_rate * (
            self.warmup_start_factor + (1.0 - self.warmup_start_factor) * fraction
        )
        return ops.where(step < self.warmup_steps, warmup, rate)

    def get_config(self):
        return {
            "initial_learning_rate": self.initial_learning_rate,
            "boundaries": list(self.boundaries),
            "gamma": self.gamma,
            "warmup_steps": self.warmup_steps,
            "warmup_start_factor": self.warmup_start_factor,
            "name": self.name,
        }
