"""ExFuse (Zhang et al., ECCV 2018): the GCN framework with semantic
supervision, layer rearrangement, semantic embedding branches, explicit
channel resolution embedding and densely adjacent prediction."""

from kseg.models.exfuse.exfuse import (
    AUXILIARY_LOSS_WEIGHTS,
    ExFuse,
    build_exfuse_resnext101,
)

__all__ = ["AUXILIARY_LOSS_WEIGHTS", "ExFuse", "build_exfuse_resnext101"]
