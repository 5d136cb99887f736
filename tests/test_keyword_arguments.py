"""Every kseg model and layer rejects an unknown constructor keyword with a
`TypeError` naming it (Keras layers raise `ValueError`; a functional
`keras.Model` drops it silently)."""

import keras
import pytest

from kseg import layers, models
from kseg.backbones import build_resnet
from kseg.layers import detection
from kseg.layers import segmodel as segmodel_layers
from kseg.models.gcn.gcn import CropLike
from kseg.models.panet.roi_heads import RoIHeads
from kseg.models.panet.rpn import RegionProposalNetwork


def _backbone(output_stride=16):
    return build_resnet(
        (1, 1, 1, 1), (8, 8, 8, 8), stem_width=8, output_stride=output_stride
    )


def _segmenter(cls=models.Segmenter, **kwargs):
    images = keras.Input((None, None, 3))
    return cls(inputs=images, outputs={"logits": images}, **kwargs)


# The smallest valid constructor call of each class, as `lambda **kwargs:`.
CONSTRUCTORS = {
    "AdaptiveFeaturePooling": lambda **kw: layers.AdaptiveFeaturePooling(4, **kw),
    "AnchorGenerator": lambda **kw: detection.AnchorGenerator(**kw),
    "BatchedNMS": lambda **kw: layers.BatchedNMS(**kw),
    "BoxHead": lambda **kw: layers.BoxHead(2, **kw),
    "DetectionLayer": lambda **kw: detection.DetectionLayer(2, **kw),
    "FeaturePyramid": lambda **kw: detection.FeaturePyramid(**kw),
    "MaskHead": lambda **kw: layers.MaskHead(2, **kw),
    "PANet": lambda **kw: models.PANet(
        build_resnet((1, 1, 1, 1), (4, 4, 4, 4), input_shape=(64, 64, 3)),
        2,
        filters=8,
        fc_units=16,
        **kw,
    ),
    "InstanceSegmenter": lambda **kw: _segmenter(cls=models.InstanceSegmenter, **kw),
    "ProposalLayer": lambda **kw: detection.ProposalLayer(**kw),
    "RegionProposalNetwork": lambda **kw: RegionProposalNetwork(**kw),
    "RoIHeads": lambda **kw: RoIHeads(2, **kw),
    "PyramidLevelSelect": lambda **kw: layers.PyramidLevelSelect(**kw),
    "PyramidRoIAlign": lambda **kw: layers.PyramidRoIAlign(7, **kw),
    "RPNHead": lambda **kw: detection.RPNHead(**kw),
    "BottomUpPathAugmentation": lambda **kw: layers.BottomUpPathAugmentation(4, **kw),
    "BoundaryRefinement": lambda **kw: layers.BoundaryRefinement(**kw),
    "ContextCRF": lambda **kw: layers.ContextCRF(3, **kw),
    "ConvBNReLU": lambda **kw: layers.ConvBNReLU(4, 3, **kw),
    "CropLike": lambda **kw: CropLike(**kw),
    "DenselyAdjacentPrediction": lambda **kw: layers.DenselyAdjacentPrediction(3, **kw),
    "ExFuse": lambda **kw: models.ExFuse(_backbone(32), 3, kernel_size=3, **kw),
    "FCN": lambda **kw: models.FCN(_backbone(), 3, head_filters=4, **kw),
    "FeaturePyramidAttention": lambda **kw: layers.FeaturePyramidAttention(4, **kw),
    "FullyConnectedFusionMaskHead": lambda **kw: layers.FullyConnectedFusionMaskHead(
        2, **kw
    ),
    "GCN": lambda **kw: models.GCN(_backbone(32), 3, kernel_size=3, **kw),
    "GlobalAttentionUpsample": lambda **kw: layers.GlobalAttentionUpsample(4, **kw),
    "GlobalConvolution": lambda **kw: layers.GlobalConvolution(4, **kw),
    "GuidanceCRF": lambda **kw: layers.GuidanceCRF(3, **kw),
    "GuidedFilter": lambda **kw: layers.GuidedFilter(2, 1.0, **kw),
    "LearnableUpsampling": lambda **kw: segmodel_layers.LearnableUpsampling(2, **kw),
    "PAN": lambda **kw: models.PAN(_backbone(), 3, filters=8, **kw),
    "ResizeLike": lambda **kw: layers.ResizeLike(**kw),
    "RoIAlign": lambda **kw: layers.RoIAlign(2, **kw),
    "SegModel": lambda **kw: models.SegModel(_backbone(), 3, feature_filters=4, **kw),
    "Segmenter": _segmenter,
    "SemanticEmbeddingBranch": lambda **kw: layers.SemanticEmbeddingBranch(4, **kw),
    "SemanticSupervisionHead": lambda **kw: layers.SemanticSupervisionHead(3, **kw),
    "StructuredPatchPrediction": lambda **kw: layers.StructuredPatchPrediction(3, **kw),
    "SubPixelUpsample": lambda **kw: layers.SubPixelUpsample(2, **kw),
}


def _registered_layer_classes():
    """Every `keras.layers.Layer` (models included) registered under "kseg"."""
    return sorted(
        key.split(">", 1)[1]
        for key, value in keras.saving.get_custom_objects().items()
        if key.startswith("kseg>")
        and isinstance(value, type)
        and issubclass(value, keras.layers.Layer)
    )


def test_every_registered_model_and_layer_is_covered():
    # A new kseg layer or model must be added to CONSTRUCTORS (and so tested).
    assert _registered_layer_classes() == sorted(CONSTRUCTORS)


@pytest.mark.parametrize("name", sorted(CONSTRUCTORS))
def test_unknown_keyword_argument_raises_type_error(name):
    construct = CONSTRUCTORS[name]
    # The valid call builds (with the base class's own keywords), so the
    # error below comes from the misspelt name alone.
    built = construct(name=f"valid_{name.lower()}", trainable=False)
    assert type(built).__name__ == name
    assert built.name == f"valid_{name.lower()}" and not built.trainable
    with pytest.raises(TypeError, match="unexpected keyword argument 'totally_bogus'"):
        construct(totally_bogus=7)


def test_suggests_the_closest_argument():
    with pytest.raises(TypeError, match=r"'filtrs' \(did you mean 'filters'\?\)"):
        CONSTRUCTORS["PAN"](filtrs=7)
    with pytest.raises(TypeError, match=r"'radus' \(did you mean 'radius'\?\)"):
        CONSTRUCTORS["GuidedFilter"](radus=3)
