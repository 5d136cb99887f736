"""Reusable Keras layers from ExFuse, PAN, PANet and SegModel.

Imports only keras and numpy: usable in any Keras 3 project, on any backend.
"""

from kseg.layers.common import ConvBNReLU, ResizeLike, depth_to_space, resize
from kseg.layers.detection import (
    AnchorGenerator,
    BatchedNMS,
    BoxHead,
    DetectionLayer,
    FeaturePyramid,
    MaskHead,
    ProposalLayer,
    PyramidLevelSelect,
    PyramidRoIAlign,
    RPNHead,
)
from kseg.layers.exfuse import (
    BoundaryRefinement,
    DenselyAdjacentPrediction,
    GlobalConvolution,
    SemanticEmbeddingBranch,
    SemanticSupervisionHead,
    SubPixelUpsample,
)
from kseg.layers.guided_filter import GuidanceCRF, GuidedFilter, guided_filter
from kseg.layers.pan import FeaturePyramidAttention, GlobalAttentionUpsample
from kseg.layers.panet import (
    AdaptiveFeaturePooling,
    BottomUpPathAugmentation,
    FullyConnectedFusionMaskHead,
    RoIAlign,
)
from kseg.layers.segmodel import ContextCRF, StructuredPatchPrediction

# Short aliases.
GCN = GlobalConvolution
SEB = SemanticEmbeddingBranch
DAP = DenselyAdjacentPrediction
FPA = FeaturePyramidAttention
FPN = FeaturePyramid
GAU = GlobalAttentionUpsample
