"""Optimizers of the papers' recipes."""

import keras
from keras import ops

from kseg.training.schedules import PolyWarmup, StepWarmup


@keras.saving.register_keras_serializable(package="kseg")
class L2DecaySGD(keras.optimizers.SGD):
    """Momentum SGD whose weight decay is an L2 term added to the gradient.

    Caffe and PyTorch, where the papers' "SGD, momentum 0.9, weight decay
    1e-4" comes from, update `g ← g + λ·w` before the momentum step, so the
    decay goes through the momentum buffer. Keras's `SGD(weight_decay=λ)`
    instead shrinks the weights directly (`w ← w − lr·λ·w`, decoupled), which
    with momentum 0.9 decays about ten times less per step. This subclass
    restores the coupled rule; `exclude_from_weight_decay` is honoured.

    Example:
    >>> optimizer = L2DecaySGD(0.01, momentum=0.9, weight_decay=1e-4)

    Args:
        learning_rate: float or schedule. Defaults to `0.01`.
        momentum: float. Defaults to `0.0`.
        nesterov: bool. Defaults to `False`.
        weight_decay: float or `None`. L2 coefficient `λ`. Defaults to `None`.
        **kwargs: Further `keras.optimizers.SGD` arguments.
    """

    def _apply_weight_decay(self, variables):
        # The decay is part of the gradient (`update_step`), not a separate
        # shrink of the weights.
        return

    def update_step(self, gradient, variable, learning_rate):
        if self.weight_decay is not None and self._use_weight_decay(variable):
            gradient = ops.add(
                gradient,
                ops.multiply(ops.cast(self.weight_decay, variable.dtype), variable),
            )
        super().update_step(gradient, variable, learning_rate)


def build_optimizer(recipe, total_steps):
    """The recipe's optimizer with its schedule (`PolyWarmup` or
    `StepWarmup`) over `total_steps`.

    The warm-up is capped at `total_steps − 1` steps, so that a short trial
    of a recipe (`--set train.epochs=1`) keeps its schedule valid.
    """
    config = recipe.schedule
    warmup = min(config.warmup_steps, total_steps - 1)
    if config.name == "step":
        schedule = StepWarmup(
            recipe.optimizer.learning_rate,
            boundaries=[max(1, round(f * total_steps)) for f in config.step_fractions],
            gamma=config.gamma,
            warmup_steps=warmup,
            warmup_start_factor=config.warmup_start_factor,
        )
    else:
        schedule = PolyWarmup(
            recipe.optimizer.learning_rate,
            decay_steps=total_steps,
            power=config.power,
            end_learning_rate=config.end_learning_rate,
            warmup_steps=warmup,
            warmup_start_factor=config.warmup_start_factor,
        )
    optimizer = recipe.optimizer
    weight_decay = optimizer.weight_decay or None
    if optimizer.name == "sgd":
        return L2DecaySGD(
            schedule,
            momentum=optimizer.momentum,
            nesterov=optimizer.nesterov,
            weight_decay=weight_decay,
            global_clipnorm=optimizer.global_clipnorm,
        )
    return keras.optimizers.AdamW(
        schedule,
        weight_decay=optimizer.weight_decay,
        global_clipnorm=optimizer.global_clipnorm,
    )
