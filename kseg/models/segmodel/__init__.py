"""SegModel (Shen et al., CVPR 2017): a dilated FCN unary refined by structured
patch prediction, a distance-aware context CRF and a guided-filter guidance
CRF."""

from kseg.models.segmodel.segmodel import SegModel, build_segmodel_resnet101

__all__ = ["SegModel", "build_segmodel_resnet101"]
