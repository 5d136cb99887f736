"""Segmentation models: functional `keras.Model`s built on a kseg backbone.

One re-export per line (`name as name` marks it public for linters).
"""

from kseg.models.exfuse import AUXILIARY_LOSS_WEIGHTS as AUXILIARY_LOSS_WEIGHTS
from kseg.models.exfuse import ExFuse as ExFuse
from kseg.models.exfuse import build_exfuse_resnext101 as build_exfuse_resnext101
from kseg.models.fcn import FCN as FCN
from kseg.models.fcn import build_fcn_resnet101 as build_fcn_resnet101
from kseg.models.gcn import GCN as GCN
from kseg.models.gcn import build_gcn_resnext101 as build_gcn_resnext101
from kseg.models.pan import PAN as PAN
from kseg.models.pan import build_pan_resnet101 as build_pan_resnet101
from kseg.models.panet import PANet as PANet
from kseg.models.panet import build_panet_resnet50_fpn as build_panet_resnet50_fpn
from kseg.models.panet import (
    build_panet_resnext101_fpn as build_panet_resnext101_fpn,
)
from kseg.models.saving import load_model as load_model
from kseg.models.segmenter import InstanceSegmenter as InstanceSegmenter
from kseg.models.segmenter import Segmenter as Segmenter
from kseg.models.segmodel import SegModel as SegModel
from kseg.models.segmodel import build_segmodel_resnet101 as build_segmodel_resnet101
from kseg.models.torchvision_weights import (
    backbone_from_torchvision as backbone_from_torchvision,
)
from kseg.models.torchvision_weights import from_torchvision as from_torchvision
