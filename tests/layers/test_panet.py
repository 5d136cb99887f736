import keras
import numpy as np
import pytest
from absl.testing import parameterized

from kseg.layers.heads import FullyConnectedFusionMaskHead
from kseg.layers.panet import (
    AdaptiveFeaturePooling,
    BottomUpPathAugmentation,
    RoIAlign,
)
from kseg.testing import TestCase, input_gradients, weight_gradients


def _np(x):
    return np.asarray(keras.ops.convert_to_numpy(x), dtype="float64")


def _randomize(layer, seed):
    """Sets every weight of `layer` to fixed random values (returns them)."""
    rng = np.random.default_rng(seed)
    for weight in layer.weights:
        weight.assign(rng.normal(scale=0.5, size=weight.shape).astype("float32"))


def _conv_windows(xp, kernel, bias, stride, oh, ow):
    """Convolution of an already padded `xp`, windows from the top left."""
    filters = kernel.shape[-1]
    kh, kw = kernel.shape[:2]
    out = np.zeros((xp.shape[0], oh, ow, filters))
    for i in range(oh):
        for j in range(ow):
            patch = xp[:, i * stride : i * stride + kh, j * stride : j * stride + kw]
            out[:, i, j] = np.einsum("nabc,abco->no", patch, kernel) + bias
    return out


def conv2d_same(x, kernel, bias, stride=1):
    """TF/Keras "same" convolution (extra padding at the bottom/right)."""
    _, h, w, _ = x.shape
    kh, kw = kernel.shape[:2]
    oh, ow = -(-h // stride), -(-w // stride)
    ph = max((oh - 1) * stride + kh - h, 0)
    pw = max((ow - 1) * stride + kw - w, 0)
    xp = np.pad(x, ((0, 0), (ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2), (0, 0)))
    return _conv_windows(xp, kernel, bias, stride, oh, ow)


def conv2d_padded(x, kernel, bias, stride, pad):
    """PyTorch's `Conv2d(padding=pad, stride=stride)`: `pad` zeros on every
    side, then the windows from the top-left corner."""
    _, h, w, _ = x.shape
    kh, kw = kernel.shape[:2]
    xp = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    oh = (h + 2 * pad - kh) // stride + 1
    ow = (w + 2 * pad - kw) // stride + 1
    return _conv_windows(xp, kernel, bias, stride, oh, ow)


def deconv2x2(x, kernel, bias):
    """2×2 stride-2 transposed conv; Keras kernel layout (kh, kw, out, in)."""
    n, h, w, _ = x.shape
    out = np.zeros((n, 2 * h, 2 * w, kernel.shape[2]))
    for i in range(h):
        for j in range(w):
            for a in range(2):
                for b in range(2):
                    out[:, 2 * i + a, 2 * j + b] = x[:, i, j] @ kernel[a, b].T + bias
    return out


def relu(x):
    return np.maximum(x, 0.0)


def conv_weights(conv):
    return _np(conv.kernel), _np(conv.bias)


# --- RoIAlign reference: Mask R-CNN / Detectron2 ROIAlign, one sample at a time.


def bilinear_ref(fmap, y, x):
    height, width = fmap.shape[:2]
    if y < -1.0 or y > height or x < -1.0 or x > width:
        return np.zeros(fmap.shape[-1])
    y = min(max(y, 0.0), height - 1.0)
    x = min(max(x, 0.0), width - 1.0)
    y0, x0 = int(np.floor(y)), int(np.floor(x))
    y1, x1 = min(y0 + 1, height - 1), min(x0 + 1, width - 1)
    ly, lx = y - y0, x - x0
    return (
        (1 - ly) * (1 - lx) * fmap[y0, x0]
        + (1 - ly) * lx * fmap[y0, x1]
        + ly * (1 - lx) * fmap[y1, x0]
        + ly * lx * fmap[y1, x1]
    )


def roi_align_ref(features, boxes, box_indices, output_size, sr, stride, aligned):
    features = np.asarray(features, "float64")
    oh, ow = output_size
    out = np.zeros((len(boxes), oh, ow, features.shape[-1]))
    for r, (box, b) in enumerate(zip(boxes, box_indices, strict=True)):
        y1, x1, y2, x2 = np.asarray(box, "float64") / stride
        if aligned:
            y1, x1, y2, x2 = y1 - 0.5, x1 - 0.5, y2 - 0.5, x2 - 0.5
        roi_h, roi_w = y2 - y1, x2 - x1
        if not aligned:
            roi_h, roi_w = max(roi_h, 1.0), max(roi_w, 1.0)
        bin_h, bin_w = roi_h / oh, roi_w / ow
        for iy in range(oh):
            for ix in range(ow):
                total = np.zeros(features.shape[-1])
                for sy in range(sr):
                    for sx in range(sr):
                        y = y1 + (iy + (sy + 0.5) / sr) * bin_h
                        x = x1 + (ix + (sx + 0.5) / sr) * bin_w
                        total += bilinear_ref(features[b], y, x)
                out[r, iy, ix] = total / (sr * sr)
    return out


def _roi_inputs(seed=0):
    rng = np.random.default_rng(seed)
    features = rng.normal(size=(3, 6, 7, 2)).astype("float32")
    boxes = np.array(
        [
            [1.0, 2.0, 9.0, 11.0],  # inside
            [-5.0, -3.0, 6.0, 4.0],  # partly above/left of the image
            [8.0, 9.0, 15.0, 17.5],  # partly below/right (image 12×14)
            [4.2, 5.1, 4.5, 5.3],  # tiny
            [3.0, 3.0, 3.0, 3.0],  # empty
            [-9.0, -9.0, -4.0, -5.0],  # fully outside: samples beyond −1 → 0
            [0.0, 0.0, 12.0, 14.0],  # whole image
        ],
        "float32",
    )
    box_indices = np.array([0, 2, 1, 1, 0, 2, 1], "int32")
    return features, boxes, box_indices


class RoIAlignTest(TestCase):
    def test_hand_computed_values(self):
        # A linear map is reproduced exactly by bilinear sampling.
        features = (4 * np.arange(4)[:, None] + np.arange(4)[None, :]).astype(
            "float32"
        )[None, :, :, None]
        boxes = np.array([[0.0, 0.0, 4.0, 4.0]], "float32")
        unaligned = RoIAlign(2, sampling_ratio=1, aligned=False)(
            [features, boxes, np.array([0], "int32")]
        )
        # Sample points y, x ∈ {1, 3}.
        np.testing.assert_allclose(_np(unaligned)[0, :, :, 0], [[5, 7], [13, 15]])
        aligned = RoIAlign(2, sampling_ratio=1, aligned=True)(
            [features, boxes, np.array([0], "int32")]
        )
        # Shifted by half a pixel: y, x ∈ {0.5, 2.5}.
        np.testing.assert_allclose(
            _np(aligned)[0, :, :, 0], [[2.5, 4.5], [10.5, 12.5]], atol=1e-6
        )

    @parameterized.parameters(True, False)
    def test_single_map_matches_reference(self, aligned):
        features, boxes, box_indices = _roi_inputs()
        layer = RoIAlign((3, 2), sampling_ratio=2, strides=2, aligned=aligned)
        out = layer([features, boxes, box_indices])
        expected = roi_align_ref(features, boxes, box_indices, (3, 2), 2, 2, aligned)
        self.assertEqual(tuple(out.shape), (7, 3, 2, 2))
        np.testing.assert_allclose(_np(out), expected, atol=1e-5)
        # The fully-outside box pools zeros; the others do not.
        np.testing.assert_array_equal(_np(out)[5], 0.0)
        self.assertGreater(np.abs(_np(out)[1]).max(), 0.0)

    @parameterized.parameters(True, False)
    def test_levels_match_reference(self, aligned):
        rng = np.random.default_rng(1)
        levels = [
            rng.normal(size=(3, 6, 7, 2)).astype("float32"),
            rng.normal(size=(3, 3, 4, 2)).astype("float32"),
        ]
        _, boxes, box_indices = _roi_inputs()
        layer = RoIAlign(2, sampling_ratio=3, strides=(2, 4), aligned=aligned)
        out = layer([levels, boxes, box_indices])
        self.assertIsInstance(out, list)
        self.assertLen(out, 2)
        for level, stride, got in zip(levels, (2, 4), out, strict=True):
            expected = roi_align_ref(
                level, boxes, box_indices, (2, 2), 3, stride, aligned
            )
            np.testing.assert_allclose(_np(got), expected, atol=1e-5)

    def test_dynamic_number_of_boxes(self):
        features = np.random.default_rng(2).normal(size=(2, 5, 5, 3))
        layer = RoIAlign(2, strides=1)
        inputs = [
            keras.Input((5, 5, 3), batch_size=2),
            keras.Input((4,)),
            keras.Input((), dtype="int32"),
        ]
        model = keras.Model(inputs, layer(inputs))
        self.assertEqual(model.output_shape, (None, 2, 2, 3))
        for count in (0, 1, 4):
            boxes = np.tile(np.array([[0.5, 1.0, 4.0, 3.5]], "float32"), (count, 1))
            indices = np.arange(count, dtype="int32") % 2
            out = layer([features.astype("float32"), boxes, indices])
            self.assertEqual(tuple(out.shape), (count, 2, 2, 3))
            expected = roi_align_ref(features, boxes, indices, (2, 2), 2, 1, True)
            np.testing.assert_allclose(_np(out), expected, atol=1e-5)

    def test_layer(self):
        features, boxes, box_indices = _roi_inputs()
        self.run_layer_test(
            RoIAlign,
            init_kwargs={"output_size": 2, "strides": 2},
            input_data=[features, boxes, box_indices],
            expected_output_shape=(7, 2, 2, 2),
            expected_num_trainable_weights=0,
            # No weights to train; Keras's generator cannot carry the int input.
            run_training_check=False,
        )
        self.run_layer_test(
            RoIAlign,
            init_kwargs={"output_size": (2, 3), "strides": (2, 4), "aligned": False},
            input_data=[[features, features[:, ::2, ::2]], boxes, box_indices],
            expected_output_shape=[(7, 2, 3, 2), (7, 2, 3, 2)],
            run_training_check=False,
        )

    def test_serialization_round_trip(self):
        features, boxes, box_indices = _roi_inputs()
        self.run_serialization_round_trip(
            RoIAlign(2, sampling_ratio=1, strides=2), [features, boxes, box_indices]
        )

    def test_xla_matches_eager(self):
        features, boxes, box_indices = _roi_inputs()
        # The helper batches all inputs together, so use as many boxes as images.
        self.assert_xla_matches_eager(
            RoIAlign(3, strides=2), [features, boxes[:3], box_indices[:3]]
        )

    def test_xla_levels_match_eager(self):
        features, boxes, box_indices = _roi_inputs()
        levels = [features, features[:, ::2, ::2]]
        layer = RoIAlign(2, strides=(2, 4))
        inputs = [
            [keras.Input((6, 7, 2)), keras.Input((3, 4, 2))],
            keras.Input((4,)),
            keras.Input((), dtype="int32"),
        ]
        model = keras.Model(inputs, layer(inputs))
        data = [levels, boxes[:3], box_indices[:3]]
        eager = model(data)
        model.compile(jit_compile=True)
        compiled = model.predict(data, batch_size=3, verbose=0)
        for e, c in zip(eager, compiled, strict=True):
            np.testing.assert_allclose(c, _np(e), atol=1e-5)

    def test_mixed_precision_keeps_box_precision(self):
        rng = np.random.default_rng(3)
        features = rng.normal(size=(1, 320, 320, 2)).astype("float32")
        # Odd coordinates above 2048 are not representable in float16: an
        # autocast box would move by a pixel and change the result by ~0.1.
        boxes = np.array([[2101.0, 2203.0, 2401.0, 2477.0]], "float32")
        indices = np.array([0], "int32")
        layer = RoIAlign(2, strides=8, dtype="mixed_float16")
        out = layer([features, boxes, indices])
        self.assertEqual(keras.backend.standardize_dtype(out.dtype), "float16")
        expected = roi_align_ref(features, boxes, indices, (2, 2), 2, 8, True)
        np.testing.assert_allclose(_np(out), expected, atol=1e-2)

    @parameterized.parameters(True, False)
    def test_feature_gradient_is_the_bilinear_weights(self, aligned):
        # RoIAlign is linear in the features: d sum(out · w) / d f[b, y, x]
        # is the reference pooled from a one-hot map at (b, y, x), times w —
        # the sum of the bilinear weights of every sample that reads it.
        features, boxes, box_indices = _roi_inputs()
        layer = RoIAlign((3, 2), sampling_ratio=2, strides=2, aligned=aligned)
        target = np.random.default_rng(5).normal(size=(7, 3, 2, 2))
        (grad,) = input_gradients(
            lambda f: layer([f, boxes, box_indices]) * target.astype("float32"),
            features,
        )
        expected = np.zeros(features.shape)
        for index in np.ndindex(*features.shape[:3]):
            one_hot = np.zeros(features.shape)
            one_hot[index] = 1.0
            pooled = roi_align_ref(one_hot, boxes, box_indices, (3, 2), 2, 2, aligned)
            expected[index] = np.sum(pooled * target, axis=(0, 1, 2))
        np.testing.assert_allclose(grad, expected, atol=1e-5)

    def test_rejects_bad_options(self):
        with pytest.raises(ValueError, match="sampling_ratio"):
            RoIAlign(2, sampling_ratio=-1)
        with pytest.raises(ValueError, match="output_size"):
            RoIAlign((2, 2, 2))
        with pytest.raises(ValueError, match="output_size"):
            RoIAlign(0)
        with pytest.raises(ValueError, match="strides"):
            RoIAlign(2, strides=(4, -8))
        with pytest.raises(ValueError, match="strides"):
            RoIAlign(2, strides="4")

    def test_rejects_bad_inputs(self):
        features, boxes, box_indices = _roi_inputs()
        levels = [features, features[:, ::2, ::2]]
        with pytest.raises(ValueError, match="strides must be a list"):
            RoIAlign(2, strides=4)([levels, boxes, box_indices])
        with pytest.raises(ValueError, match="2 feature levels but 3 strides"):
            RoIAlign(2, strides=(4, 8, 16))([levels, boxes, box_indices])
        with pytest.raises(ValueError, match="single map"):
            RoIAlign(2, strides=(4, 8))([features, boxes, box_indices])
        with pytest.raises(ValueError, match="boxes must have shape"):
            RoIAlign(2)([features, boxes[:, :3], box_indices])
        with pytest.raises(ValueError, match="box_indices"):
            RoIAlign(2)([features, boxes, box_indices[:3]])
        with pytest.raises(ValueError, match="channel count"):
            RoIAlign(2, strides=(4, 8))(
                [[features, features[..., :1]], boxes, box_indices]
            )
        with pytest.raises(ValueError, match="rank 4"):
            RoIAlign(2)([features[0], boxes, box_indices])
        with pytest.raises(ValueError, match=r"\[features, boxes, box_indices\]"):
            RoIAlign(2)([features, boxes])


# --- Bottom-up path augmentation.


def _pyramid(seed=0, channels=2, sizes=((6, 5), (3, 3), (2, 2))):
    rng = np.random.default_rng(seed)
    return [rng.normal(size=(2, h, w, channels)).astype("float32") for h, w in sizes]


def _bottom_up_reference(layer, pyramid):
    """[N2, N3, ...] in float64: N_{i+1} = ReLU(conv3×3(ReLU(conv3×3 stride
    2(N_i)) + P_{i+1})), N2 = P2; the stride-2 conv pads one pixel on every
    side (SPEC, PyTorch's padding=1)."""
    n = pyramid[0].astype("float64")
    outputs = [n]
    for i in range(1, len(pyramid)):
        down = conv2d_padded(n, *conv_weights(layer.downsample_convs[i - 1]), 2, 1)
        down = relu(down)
        n = relu(conv2d_same(down + pyramid[i], *conv_weights(layer.fuse_convs[i - 1])))
        outputs.append(n)
    return outputs


class BottomUpPathAugmentationTest(TestCase):
    def test_matches_reference(self):
        pyramid = _pyramid()
        layer = BottomUpPathAugmentation(filters=2)
        layer.build([p.shape for p in pyramid])
        _randomize(layer, 1)
        out = layer(pyramid)
        self.assertLen(out, 3)
        np.testing.assert_array_equal(_np(out[0]), pyramid[0])
        expected = _bottom_up_reference(layer, pyramid)
        for got, want in zip(out, expected, strict=True):
            np.testing.assert_allclose(_np(got), want, atol=1e-5)

    def test_each_level_has_its_own_convs(self):
        pyramid = _pyramid(channels=3)
        layer = BottomUpPathAugmentation(filters=3)
        layer(pyramid)
        self.assertLen(layer.trainable_weights, 8)
        self.assertEqual(tuple(layer.downsample_convs[0].strides), (2, 2))
        self.assertEqual(tuple(layer.fuse_convs[0].strides), (1, 1))
        # N3 feeds N4: changing P3 changes N4 too (the path is chained).
        changed = [pyramid[0], pyramid[1] + 1.0, pyramid[2]]
        before, after = layer(pyramid), layer(changed)
        self.assertFalse(np.allclose(_np(before[2]), _np(after[2])))

    def test_layer(self):
        self.run_layer_test(
            BottomUpPathAugmentation,
            init_kwargs={"filters": 3},
            input_shape=[(2, 8, 8, 3), (2, 4, 4, 3), (2, 2, 2, 3)],
            expected_output_shape=[(2, 8, 8, 3), (2, 4, 4, 3), (2, 2, 2, 3)],
            expected_num_trainable_weights=8,
            # Keras's TF generator adapter rejects list-structured data;
            # test_every_weight_gets_a_gradient covers training instead.
            run_training_check=False,
        )

    def test_every_weight_gets_a_gradient(self):
        layer = BottomUpPathAugmentation(2)
        grads = weight_gradients(
            layer, _pyramid(), lambda out: sum(keras.ops.sum(n) for n in out)
        )
        self.assertLen(grads, 8)
        for path, grad in grads.items():
            self.assertIsNotNone(grad, path)
            self.assertGreater(np.abs(grad).sum(), 0.0, path)

    def test_symbolic_unknown_spatial_size(self):
        inputs = [keras.Input((None, None, 2)) for _ in range(3)]
        outputs = BottomUpPathAugmentation(2)(inputs)
        self.assertEqual([o.shape for o in outputs], [(None, None, None, 2)] * 3)

    def test_serialization_round_trip(self):
        self.run_serialization_round_trip(BottomUpPathAugmentation(2), _pyramid())

    def test_mixed_precision(self):
        pyramid = _pyramid()
        layer = BottomUpPathAugmentation(2, dtype="mixed_float16")
        layer.build([p.shape for p in pyramid])
        _randomize(layer, 1)
        out = layer(pyramid)
        for n in out[1:]:
            self.assertEqual(keras.backend.standardize_dtype(n.dtype), "float16")
        self.assertEqual(
            keras.backend.standardize_dtype(layer.weights[0].dtype), "float32"
        )
        # float16 against the float64 reference: ~3 significant digits of
        # values of order 1, over two chained levels.
        expected = _bottom_up_reference(layer, pyramid)
        for got, want in zip(out, expected, strict=True):
            np.testing.assert_allclose(_np(got), want, atol=2e-2, rtol=1e-2)

    def test_rejects_bad_inputs(self):
        pyramid = _pyramid()
        with pytest.raises(ValueError, match="at least 2"):
            BottomUpPathAugmentation(2)(pyramid[:1])
        with pytest.raises(ValueError, match="at least 2"):
            BottomUpPathAugmentation(2)(pyramid[0])
        with pytest.raises(ValueError, match="level 1 has 2 channels"):
            BottomUpPathAugmentation(3)([pyramid[0][..., :1].repeat(3, -1), pyramid[1]])
        with pytest.raises(ValueError, match="level 2 has spatial shape"):
            BottomUpPathAugmentation(2)(
                [pyramid[0], pyramid[1], np.zeros((2, 1, 2, 2), "float32")]
            )
        with pytest.raises(ValueError, match="rank 4"):
            BottomUpPathAugmentation(2)([pyramid[0], pyramid[1][0]])
        with pytest.raises(ValueError, match="filters"):
            BottomUpPathAugmentation(0)


# --- Adaptive feature pooling.


def _grids(seed=0, levels=3, shape=(2, 3, 3, 2)):
    rng = np.random.default_rng(seed)
    return [rng.normal(size=shape).astype("float32") for _ in range(levels)]


def _afp_reference(layer, grids):
    """Adaptive feature pooling in float64: per-level conv/fc + ReLU, fused."""
    per_level = []
    for grid, sub in zip(grids, layer.level_layers, strict=True):
        kernel, bias = _np(sub.kernel), _np(sub.bias)
        grid = np.asarray(grid, "float64")
        if layer.layer_type == "conv":
            per_level.append(relu(conv2d_same(grid, kernel, bias)))
        else:
            per_level.append(relu(grid.reshape(len(grid), -1) @ kernel + bias))
    return np.max(per_level, 0) if layer.fusion == "max" else np.sum(per_level, 0)


class AdaptiveFeaturePoolingTest(TestCase):
    @parameterized.product(fusion=["max", "sum"], layer_type=["conv", "fc"])
    def test_matches_reference(self, fusion, layer_type):
        grids = _grids()
        layer = AdaptiveFeaturePooling(3, fusion=fusion, layer_type=layer_type)
        layer.build([g.shape for g in grids])
        _randomize(layer, 2)
        per_level = []
        for grid, sub in zip(grids, layer.level_layers, strict=True):
            kernel, bias = _np(sub.kernel), _np(sub.bias)
            if layer_type == "conv":
                per_level.append(
                    relu(conv2d_same(grid.astype("float64"), kernel, bias))
                )
            else:
                flat = grid.reshape(len(grid), -1).astype("float64")
                per_level.append(relu(flat @ kernel + bias))
        expected = np.max(per_level, 0) if fusion == "max" else np.sum(per_level, 0)
        out = _np(layer(grids))
        np.testing.assert_allclose(out, expected, atol=1e-5)
        if fusion == "max":
            # Max fusion picks, element-wise, one level's value.
            self.assertTrue(np.all(np.isclose(out, np.stack(per_level)).any(0)))

    def test_layer(self):
        self.run_layer_test(
            AdaptiveFeaturePooling,
            init_kwargs={"filters": 3},
            # A tuple: Keras's TF generator adapter rejects list-structured data.
            input_data=tuple(_grids(levels=4, shape=(2, 4, 4, 2))),
            expected_output_shape=(2, 4, 4, 3),
            expected_num_trainable_weights=8,
        )
        self.run_layer_test(
            AdaptiveFeaturePooling,
            init_kwargs={"filters": 5, "fusion": "sum", "layer_type": "fc"},
            input_data=tuple(_grids(levels=2)),
            expected_output_shape=(2, 5),
            expected_num_trainable_weights=4,
        )

    def test_serialization_round_trip(self):
        self.run_serialization_round_trip(
            AdaptiveFeaturePooling(3, layer_type="fc"), _grids()
        )

    def test_mixed_precision(self):
        grids = _grids()
        layer = AdaptiveFeaturePooling(3, dtype="mixed_float16")
        layer.build([g.shape for g in grids])
        _randomize(layer, 2)
        out = layer(grids)
        self.assertEqual(keras.backend.standardize_dtype(out.dtype), "float16")
        # float16 against the float64 reference, values of order 1.
        np.testing.assert_allclose(
            _np(out), _afp_reference(layer, grids), atol=2e-2, rtol=1e-2
        )

    def test_after_roi_align(self):
        # RoIAlign of two levels, then max fusion, against the two NumPy
        # references chained.
        features, boxes, box_indices = _roi_inputs()
        levels = [features, features[:, ::2, ::2]]
        pooled = RoIAlign(3, sampling_ratio=2, strides=(2, 4))(
            [levels, boxes, box_indices]
        )
        layer = AdaptiveFeaturePooling(4)
        layer.build([tuple(p.shape) for p in pooled])
        _randomize(layer, 6)
        out = _np(layer(pooled))
        self.assertEqual(out.shape, (7, 3, 3, 4))
        expected_pooled = [
            roi_align_ref(level, boxes, box_indices, (3, 3), 2, stride, True)
            for level, stride in zip(levels, (2, 4), strict=True)
        ]
        np.testing.assert_allclose(
            out, _afp_reference(layer, expected_pooled), atol=1e-4
        )

    def test_zero_rois(self):
        out = AdaptiveFeaturePooling(3, layer_type="fc")(
            [np.zeros((0, 2, 2, 2), "float32")] * 2
        )
        self.assertEqual(tuple(out.shape), (0, 3))

    def test_rejects_bad_options_and_inputs(self):
        with pytest.raises(ValueError, match="fusion"):
            AdaptiveFeaturePooling(3, fusion="mean")
        with pytest.raises(ValueError, match="layer_type"):
            AdaptiveFeaturePooling(3, layer_type="dense")
        grids = _grids()
        with pytest.raises(ValueError, match="same grid shape"):
            AdaptiveFeaturePooling(3)([grids[0], grids[1][:, :2]])
        with pytest.raises(ValueError, match="list of at least 1"):
            AdaptiveFeaturePooling(3)(grids[0])
        with pytest.raises(ValueError, match="rank 4"):
            AdaptiveFeaturePooling(3)([grids[0][0]])


# --- Fully-connected fusion mask head.


def ff_reference(layer, x):
    """Returns (FCN per-class logits, class-agnostic fc map) in float64."""
    x = x.astype("float64")
    convs = [conv_weights(c) for c in layer.convs]
    for kernel, bias in convs[:-1]:
        x = relu(conv2d_same(x, kernel, bias))
    conv3 = x
    fcn = relu(conv2d_same(conv3, *convs[-1]))
    fcn = relu(deconv2x2(fcn, *conv_weights(layer.deconv)))
    fcn = conv2d_same(fcn, *conv_weights(layer.mask_logits))
    short = relu(conv2d_same(conv3, *conv_weights(layer.fc_conv1)))
    short = relu(conv2d_same(short, *conv_weights(layer.fc_conv2)))
    fc = short.reshape(len(short), -1) @ _np(layer.fc.kernel) + _np(layer.fc.bias)
    size = layer.mask_size
    return fcn, fc.reshape(len(short), size, size, 1)


class FullyConnectedFusionMaskHeadTest(TestCase):
    @parameterized.parameters(True, False)
    def test_matches_reference(self, include_first_conv):
        x = np.random.default_rng(4).normal(size=(2, 4, 4, 4)).astype("float32")
        layer = FullyConnectedFusionMaskHead(
            3, mask_size=8, filters=4, include_first_conv=include_first_conv
        )
        layer.build(x.shape)
        _randomize(layer, 5)
        self.assertLen(layer.convs, 4 if include_first_conv else 3)
        self.assertEqual(tuple(layer.fc_conv2.kernel.shape), (3, 3, 4, 2))
        self.assertEqual(tuple(layer.fc.kernel.shape), (4 * 4 * 2, 64))
        out = _np(layer(x))
        fcn, fc = ff_reference(layer, x)
        self.assertEqual(out.shape, (2, 8, 8, 3))
        np.testing.assert_allclose(out, fcn + fc, atol=1e-4)
        # The fc map is the same addend for every class mask.
        np.testing.assert_allclose(out - fcn, np.repeat(fc, 3, axis=-1), atol=1e-4)

    def test_fc_map_added_identically_to_every_class(self):
        x = np.random.default_rng(6).normal(size=(2, 4, 4, 3)).astype("float32")
        layer = FullyConnectedFusionMaskHead(4, mask_size=8, filters=4)
        layer.build(x.shape)
        _randomize(layer, 7)
        layer.mask_logits.kernel.assign(np.zeros(layer.mask_logits.kernel.shape))
        layer.mask_logits.bias.assign(np.zeros(layer.mask_logits.bias.shape))
        out = _np(layer(x))
        for c in range(1, 4):
            np.testing.assert_array_equal(out[..., c], out[..., 0])
        np.testing.assert_allclose(out[..., :1], ff_reference(layer, x)[1], atol=1e-4)
        self.assertGreater(np.abs(out).max(), 0.0)

    def test_layer(self):
        self.run_layer_test(
            FullyConnectedFusionMaskHead,
            init_kwargs={"num_classes": 2, "mask_size": 8, "filters": 4},
            input_shape=(2, 4, 4, 3),
            expected_output_shape=(2, 8, 8, 2),
            expected_num_trainable_weights=18,
        )

    def test_serialization_round_trip(self):
        x = np.random.default_rng(8).normal(size=(2, 4, 4, 4)).astype("float32")
        self.run_serialization_round_trip(
            FullyConnectedFusionMaskHead(
                2, mask_size=8, filters=4, include_first_conv=False
            ),
            x,
            atol=1e-5,
        )

    def test_mixed_precision(self):
        x = np.random.default_rng(9).normal(size=(2, 4, 4, 4)).astype("float32")
        layer = FullyConnectedFusionMaskHead(2, 8, 4, dtype="mixed_float16")
        layer.build(x.shape)
        _randomize(layer, 10)
        out = layer(x)
        # Computed in float16, the logits returned in float32 (as MaskHead's,
        # for the float32 loss).
        self.assertEqual(keras.backend.standardize_dtype(out.dtype), "float32")
        self.assertEqual(
            keras.backend.standardize_dtype(layer.fc.kernel.dtype), "float32"
        )
        self.assertEqual(layer.fc.compute_dtype, "float16")
        fcn, fc = ff_reference(layer, x)
        expected = fcn + fc
        # Seven float16 layers deep: relative to the output's scale.
        scale = np.abs(expected).max()
        np.testing.assert_allclose(_np(out), expected, atol=1e-2 * scale, rtol=1e-2)

    def test_rejects_bad_options_and_inputs(self):
        with pytest.raises(ValueError, match="even"):
            FullyConnectedFusionMaskHead(2, mask_size=7)
        with pytest.raises(ValueError, match="filters"):
            FullyConnectedFusionMaskHead(2, filters=1)
        with pytest.raises(ValueError, match="num_classes"):
            FullyConnectedFusionMaskHead(0)
        with pytest.raises(ValueError, match="mask_size / 2 = 4"):
            FullyConnectedFusionMaskHead(2, mask_size=8, filters=4)(
                np.zeros((1, 7, 7, 4), "float32")
            )
        with pytest.raises(ValueError, match="ndim=4"):
            FullyConnectedFusionMaskHead(2, mask_size=8, filters=4)(
                np.zeros((4, 4, 4), "float32")
            )
