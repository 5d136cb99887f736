"""Pyramid Attention Network (Li et al., BMVC 2018): FPA on res5 and a chain of
global attention upsample (GAU) decoder blocks."""

from kseg.models.pan.pan import PAN, build_pan_resnet101

__all__ = ["PAN", "build_pan_resnet101"]
