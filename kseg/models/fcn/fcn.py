"""FCN baseline: the "ResNet101" row of PAN's ablation tables."""

import keras

from kseg.backbones import pan_resnet101
from kseg.layers.common import ConvBNReLU
from kseg.models.segmenter import Segmenter, check_positive_int, check_rate


@keras.saving.register_keras_serializable(package="kseg")
class FCN(Segmenter):
    """Fully convolutional baseline: a classifier on the encoder's last
    feature, bilinearly upsampled to the image ("naive decoder").

    The baseline of "Pyramid Attention Network for Semantic Segmentation"
    (Li et al., BMVC 2018, Sec. 4.1.1): a dilated ResNet-101 (output stride
    16) whose output is "directly upsampled" — the "ResNet101" row of Tables
    1 and 3 (72.60 mIoU on VOC 2012 val), reproduced by
    `build_fcn_resnet101(21)`. The graph is
    `logits = up(conv1×1(dropout(head(res5))))`, where `up` is a bilinear
    (half-pixel) resize to the image size and `head` is the identity by
    default. The paper's wording ("directly upsample the feature network's
    output") and its FPA rows, which put only FPA between res5 and the
    classifier, point to a plain 1×1 classifier on res5; `head_filters`
    adds the 3×3 conv–BN–ReLU of the mmsegmentation / torchvision FCN head
    for other experiments.

    Example:
    >>> from kseg.backbones import build_resnet
    >>> backbone = build_resnet((1, 1, 1, 1), (8, 8, 8, 8), output_stride=16)
    >>> model = FCN(backbone, num_classes=3)
    >>> model(np.zeros((1, 64, 64, 3)))["logits"].shape
    (1, 64, 64, 3)

    Args:
        backbone: `keras.Model`. Encoder mapping images to the dict
            `{"res2", "res3", "res4", "res5"}` of stage features (see
            `kseg.backbones`); only `"res5"` is used.
        num_classes: int. Number of classes (logit channels).
        head_filters: int or `None`. Channels of a 3×3 conv–BN–ReLU between
            res5 and the classifier; `None` puts the classifier directly on
            res5. Defaults to `None`.
        dropout: float. Dropout rate before the classifier; the paper uses
            none. Defaults to `0.0`.
        dtype: dtype or `DTypePolicy` of the head layers; `None` uses the
            global policy. The logits are float32 regardless.
            Defaults to `None`.
        **kwargs: `keras.Model` keyword arguments (`name`, `trainable`).

    Input shape:
        Images `(batch, height, width, channels)` as the backbone takes them.

    Output shape:
        Dict `{"logits": (batch, height, width, num_classes)}`, float32.
    """

    def __init__(
        self,
        backbone,
        num_classes,
        head_filters=None,
        dropout=0.0,
        dtype=None,
        **kwargs,
    ):
        num_classes = check_positive_int(num_classes, "num_classes")
        if head_filters is not None:
            head_filters = check_positive_int(head_filters, "head_filters")
        dropout = check_rate(dropout, "dropout")
        policy = Segmenter.resolve_dtype(dtype)

        # === Layers ===
        head = None
        if head_filters is not None:
            head = ConvBNReLU(head_filters, 3, dtype=policy, name="head")
        dropout_layer = None
        if dropout > 0.0:
            dropout_layer = keras.layers.Dropout(dropout, dtype=policy, name="dropout")
        classifier = keras.layers.Conv2D(
            num_classes, 1, dtype=policy, name="classifier"
        )

        # === Functional Model ===
        images = Segmenter.make_inputs(backbone)
        x = Segmenter.backbone_features(backbone, images)["res5"]
        if head is not None:
            x = head(x)
        if dropout_layer is not None:
            x = dropout_layer(x)
        logits = Segmenter.full_resolution_logits(classifier(x), images, dtype=policy)
        super().__init__(
            inputs=images,
            outputs={"logits": logits},
            backbone=backbone,
            dtype=policy,
            **kwargs,
        )

        # === Config ===
        self.num_classes = num_classes
        self.head_filters = head_filters
        self.dropout = dropout

    def get_config(self):
        return {
            **super().get_config(),
            "num_classes": self.num_classes,
            "head_filters": self.head_filters,
            "dropout": self.dropout,
        }


def build_fcn_resnet101(num_classes, input_shape=(None, None, 3), **kwargs):
    """PAN's baseline: `FCN` on PAN's ResNet-101 (deep stem, output stride 16).

    The "ResNet101" row of PAN's Tables 1 and 3. The encoder is randomly
    initialized; load ImageNet weights into `model.backbone` before training.

    Args:
        num_classes: int. Number of classes (21 for VOC, 19 for Cityscapes).
        input_shape: 3 ints or `None`s. Image shape `(H, W, C)`.
            Defaults to `(None, None, 3)`.
        **kwargs: Further `FCN` arguments.
    """
    backbone = pan_resnet101(input_shape=input_shape, dtype=kwargs.get("dtype"))
    return FCN(backbone, num_classes, **kwargs)
