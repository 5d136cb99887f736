"""Global Convolutional Network ("Large Kernel Matters", Peng et al., CVPR
2017): large-kernel convolutions per encoder stage and a top-down decoder
with boundary refinement — the baseline of ExFuse."""

from kseg.models.gcn.gcn import GCN, CropLike, build_gcn_resnext101

__all__ = ["GCN", "CropLike", "build_gcn_resnext101"]
