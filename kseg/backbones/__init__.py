"""Encoders: the ResNet family (ResNet, ResNeXt, SE-ResNeXt, ExFuse's layer
rearrangement), `keras.applications` pretrained ResNets and ExFuse's
semantic supervision pretraining. Every encoder maps images to the dict
`{"res2", "res3", "res4", "res5"}` of stage features; `prepend_normalization`
puts input normalization inside an encoder."""

from kseg.backbones.normalization import prepend_normalization
from kseg.backbones.pretrained import (
    build_pretrained_resnet,
    pretrained_feature_layers,
)
from kseg.backbones.resnet import (
    BACKBONES,
    OUTPUT_STRIDES,
    STAGE_NAMES,
    build_backbone,
    build_resnet,
    count_multiply_adds,
    exfuse_resnext101_rearranged,
    pan_resnet101,
    resnet50,
    resnet101,
    resnet152,
    resnext101_32x4d,
    se_resnext131,
    segmodel_resnet101,
)
from kseg.backbones.semantic_supervision import (
    build_semantic_supervision_pretrainer,
    semantic_supervision_features,
)

__all__ = [
    "BACKBONES",
    "OUTPUT_STRIDES",
    "STAGE_NAMES",
    "build_backbone",
    "build_pretrained_resnet",
    "build_resnet",
    "build_semantic_supervision_pretrainer",
    "count_multiply_adds",
    "exfuse_resnext101_rearranged",
    "pan_resnet101",
    "prepend_normalization",
    "pretrained_feature_layers",
    "resnet50",
    "resnet101",
    "resnet152",
    "resnext101_32x4d",
    "se_resnext131",
    "segmodel_resnet101",
    "semantic_supervision_features",
]
