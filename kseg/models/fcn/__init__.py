"""FCN baseline: a dilated encoder, a classifier on res5 and bilinear upsampling."""

from kseg.models.fcn.fcn import FCN, build_fcn_resnet101

__all__ = ["FCN", "build_fcn_resnet101"]
