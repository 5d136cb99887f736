"""Reusable Keras layers from ExFuse, PAN, PANet and SegModel.

Written with `keras.ops` and NumPy, so they run on any Keras 3 backend. Besides
the public `keras` and `numpy` (and the standard library), they import two
private APIs, checked by tests/test_private_apis.py:

- `keras.src.backend` (at import): `kseg.layers.common.resize` calls its
  `image.resize` for a size only known when traced, which the public
  `keras.ops.image.resize` rejects.
- `tensorflow.python` (on the TensorFlow backend only, when a guided filter
  is called): `kseg.layers.guided_filter` asks whether XLA is compiling the
  graph to choose how it computes its cumulative sums.

On JAX, importing and calling kseg.layers does not import TensorFlow.
"""

from kseg.layers.common import ConvBNReLU, ResizeLike, depth_to_space, resize
from kseg.layers.detection import (
    AnchorGenerator,
    DetectionLayer,
    FeaturePyramid,
    ProposalLayer,
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
from kseg.layers.heads import BoxHead, FullyConnectedFusionMaskHead, MaskHead
from kseg.layers.nms import BatchedNMS
from kseg.layers.pan import FeaturePyramidAttention, GlobalAttentionUpsample
from kseg.layers.panet import (
    AdaptiveFeaturePooling,
    BottomUpPathAugmentation,
    RoIAlign,
)
from kseg.layers.roi_align import PyramidLevelSelect, PyramidRoIAlign
from kseg.layers.segmodel import (
    ContextCRF,
    LearnableUpsampling,
    StructuredPatchPrediction,
)

# Short aliases.
GCN = GlobalConvolution
SEB = SemanticEmbeddingBranch
DAP = DenselyAdjacentPrediction
FPA = FeaturePyramidAttention
FPN = FeaturePyramid
GAU = GlobalAttentionUpsample
