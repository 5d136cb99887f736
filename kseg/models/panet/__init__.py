"""PANet (Liu et al., CVPR 2018): Mask R-CNN + FPN with bottom-up path
augmentation, adaptive feature pooling and fully-connected fusion, trained
end to end with `model.fit`."""

from kseg.models.panet.panet import (
    LOSS_NAMES,
    TORCHVISION_CONVENTIONS,
    PANet,
    build_panet_resnet50_fpn,
    build_panet_resnext101_fpn,
)
from kseg.models.panet.roi_heads import RoIHeads
from kseg.models.panet.rpn import RegionProposalNetwork
from kseg.models.panet.transfer import load_weights_by_name, set_trainable

__all__ = [
    "LOSS_NAMES",
    "PANet",
    "RegionProposalNetwork",
    "RoIHeads",
    "TORCHVISION_CONVENTIONS",
    "build_panet_resnet50_fpn",
    "build_panet_resnext101_fpn",
    "load_weights_by_name",
    "set_trainable",
]
