"""`kseg.models.from_torchvision` on the fixture that
`tools/torchvision_fixture.py` wrote with torchvision: a reduced Mask R-CNN
in torchvision's layout and names (random weights) and torchvision's own
outputs on one image. No torch here: the state dict is read from `.npz` and
`.safetensors`."""

import json
import struct
import sys
from pathlib import Path
from unittest import mock

import numpy as np
import pytest

from kseg.models import backbone_from_torchvision, from_torchvision
from kseg.models.coco import COCO_CATEGORY_NAMES, coco_categories
from kseg.models.torchvision_weights import read_safetensors, read_state_dict
from kseg.testing import TestCase

DATA = Path(__file__).parent / "data"
WEIGHTS = DATA / "torchvision_tiny.npz"
OUTPUTS = DATA / "torchvision_tiny_outputs.npz"
SIZE = 128
# The parity bounds (float32 on both sides; observed: boxes 2e-5 px,
# scores 1.5e-6, masks 3.3e-5 at 128²).
BOX_TOL, SCORE_TOL, MASK_TOL = 1e-2, 1e-4, 1e-4


def _state():
    with np.load(WEIGHTS) as data:
        return {name: data[name] for name in data.files}


def write_safetensors(path, arrays):
    """A `.safetensors` file (the format's definition: header length, JSON
    header, little-endian data)."""
    header, blobs, offset = {}, [], 0
    codes = {"float32": "F32", "float16": "F16"}
    for name, array in arrays.items():
        blob = np.ascontiguousarray(array).astype(array.dtype.newbyteorder("<"))
        data = blob.tobytes()
        header[name] = {
            "dtype": codes[array.dtype.name],
            "shape": list(array.shape),
            "data_offsets": [offset, offset + len(data)],
        }
        blobs.append(data)
        offset += len(data)
    text = json.dumps(header).encode()
    Path(path).write_bytes(struct.pack("<Q", len(text)) + text + b"".join(blobs))


class FromTorchvisionTest(TestCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.reference = dict(np.load(OUTPUTS))
        cls.model = from_torchvision(WEIGHTS, image_size=(SIZE, SIZE))
        image = cls.reference["image"][None].astype("float32")
        # Eager calls (predict's tracing costs 20 s here).
        cls.out = {
            k: np.asarray(v) for k, v in cls.model(image, training=False).items()
        }
        cls.stages = cls.model.detect(image)

    def test_detections_equal_torchvision(self):
        ref, out = self.reference, self.out
        count = len(ref["scores"])
        self.assertEqual(count, 100)
        self.assertEqual(int(out["num_detections"][0]), count)
        np.testing.assert_array_equal(out["classes"][0], ref["labels"])
        np.testing.assert_allclose(out["boxes"][0], ref["boxes"], atol=BOX_TOL)
        np.testing.assert_allclose(out["scores"][0], ref["scores"], atol=SCORE_TOL)
        np.testing.assert_allclose(out["masks"][0], ref["masks"], atol=MASK_TOL)

    def test_predict_pastes_masks_as_torchvision(self):
        from kseg.inference import predict_instances

        ref = self.reference
        self.assertEqual(self.model.mask_paste, "torchvision")
        (result,) = predict_instances(self.model, [ref["image"]], score_threshold=0)
        np.testing.assert_array_equal(result.classes, ref["labels"])
        masks = np.asarray(result.masks)
        self.assertEqual(masks.shape, ref["pasted"].shape)
        # Pixels may differ only where torchvision's own probability is 0.5
        # within the masks' tolerance (kseg's probabilities and boxes are
        # torchvision's up to float32 noise).
        from kseg.data.instance_transform import paste_masks_torchvision

        probabilities = paste_masks_torchvision(ref["masks"], ref["boxes"], SIZE, SIZE)
        differ = masks != ref["pasted"]
        self.assertLess(differ.sum(), 20)
        self.assertTrue(np.all(np.abs(probabilities[differ] - 0.5) < 1e-3))
        # SPEC's pasting of the same detections is another picture.
        from kseg.data import paste_masks

        spec = paste_masks(result.masks.masks[:, 1:-1, 1:-1], result.boxes, SIZE, SIZE)
        self.assertGreater(np.sum(spec != ref["pasted"]), 100)

    def test_proposals_equal_torchvision(self):
        ref = self.reference["proposals"]
        valid = np.asarray(self.stages["rpn"]["valid"][0])
        proposals = np.asarray(self.stages["rpn"]["proposals"][0])
        self.assertEqual(int(valid.sum()), len(ref))
        np.testing.assert_allclose(proposals[: len(ref)], ref, atol=BOX_TOL)

    def test_architecture_and_conventions(self):
        model = self.model
        self.assertEqual(model.num_classes, 4)
        self.assertEqual((model.filters, model.fc_units), (32, 64))
        self.assertFalse(model.bottom_up_path or model.adaptive_pooling)
        self.assertTrue(model.round_anchors and model.rpn_per_level_nms)
        self.assertFalse(model.aligned_roi_align)

    def test_imagenet_resnet_into_a_kseg_backbone(self):
        # An ImageNet ResNet's state dict: the fixture's body, its own names,
        # with a classifier. Its features must be the converted Mask R-CNN's
        # (whose detections equal torchvision's).
        prefix = "backbone.body."
        state = {
            name[len(prefix) :]: value
            for name, value in _state().items()
            if name.startswith(prefix)
        }
        state["fc.weight"] = np.zeros((10, 512), "float32")
        state["fc.bias"] = np.zeros(10, "float32")
        backbone = backbone_from_torchvision(state, input_shape=(SIZE, SIZE, 3))
        image = self.reference["image"][None].astype("float32")
        got = backbone(image)
        want = self.model.backbone(image)
        for level in ("res2", "res5"):
            np.testing.assert_allclose(
                np.asarray(got[level]), np.asarray(want[level]), rtol=1e-5, atol=1e-5
            )
        del state["layer4.0.bn2.running_var"]
        with self.assertRaisesRegex(ValueError, r"ImageNet ResNet.*layer4\.0\.bn2"):
            backbone_from_torchvision(state, input_shape=(SIZE, SIZE, 3))

    def test_spec_conventions_do_not_equal_torchvision(self):
        # The conventions are what makes the detections equal: with SPEC's
        # (aligned RoIAlign, one proposal NMS, exact anchors) they differ.
        spec = from_torchvision(
            WEIGHTS,
            image_size=(SIZE, SIZE),
            round_anchors=False,
            rpn_per_level_nms=False,
            aligned_roi_align=True,
        )
        image = self.reference["image"][None].astype("float32")
        scores = np.asarray(spec(image, training=False)["scores"])[0]
        self.assertGreater(np.abs(scores - self.reference["scores"]).max(), SCORE_TOL)


class StateDictFilesTest(TestCase):
    def test_safetensors_reads_the_same_arrays(self):
        state = _state()
        path = Path(self.get_temp_dir()) / "tiny.safetensors"
        write_safetensors(path, state)
        got = read_state_dict(path)
        self.assertEqual(sorted(got), sorted(state))
        for name, array in state.items():
            np.testing.assert_array_equal(got[name], array)

    def test_safetensors_bfloat16_and_float16(self):
        path = Path(self.get_temp_dir()) / "half.safetensors"
        values = np.array([1.5, -2.25, 3.0], "float32")
        bf16 = (values.view("<u4") >> 16).astype("<u2").tobytes()
        f16 = values.astype("<f2").tobytes()
        header = json.dumps(
            {
                "a": {"dtype": "BF16", "shape": [3], "data_offsets": [0, 6]},
                "b": {"dtype": "F16", "shape": [3], "data_offsets": [6, 12]},
                "__metadata__": {"format": "pt"},
            }
        ).encode()
        path.write_bytes(struct.pack("<Q", len(header)) + header + bf16 + f16)
        got = read_safetensors(path)
        np.testing.assert_array_equal(got["a"], values)
        np.testing.assert_array_equal(got["b"], values)

    def test_missing_extra_and_misshapen_keys_are_named(self):
        state = _state()
        missing = dict(state)
        del missing["roi_heads.box_head.fc7.bias"]
        with self.assertRaisesRegex(
            ValueError, r"missing 1 keys: roi_heads\.box_head\.fc7\.bias"
        ):
            from_torchvision(missing, image_size=(SIZE, SIZE))
        extra = {**state, "roi_heads.keypoint_head.0.weight": np.zeros(3)}
        with self.assertRaisesRegex(
            ValueError, r"unexpected keys: roi_heads\.keypoint_head"
        ):
            from_torchvision(extra, image_size=(SIZE, SIZE))
        wrong = dict(state)
        wrong["rpn.head.conv.0.0.weight"] = np.zeros((32, 32, 1, 1), "float32")
        with self.assertRaisesRegex(
            ValueError,
            r"rpn\.head\.conv\.0\.0\.weight has shape \(32, 32, 1, 1\).*"
            r"rpn/rpn_head/conv/kernel",
        ):
            from_torchvision(wrong, image_size=(SIZE, SIZE))

    def test_not_torchvision_names(self):
        with self.assertRaisesRegex(
            ValueError, "missing key 'backbone.body.layer1.0.conv1.weight'"
        ):
            from_torchvision({"conv.weight": np.zeros((3, 3))}, image_size=(SIZE, SIZE))

    def test_file_errors(self):
        folder = Path(self.get_temp_dir())
        with self.assertRaisesRegex(FileNotFoundError, "nowhere.pth: no such file"):
            read_state_dict(folder / "nowhere.pth")
        (folder / "weights.h5").write_bytes(b"x")
        with self.assertRaisesRegex(
            ValueError, r"unknown state dict format '\.h5'.*\.safetensors"
        ):
            read_state_dict(folder / "weights.h5")
        (folder / "bad.safetensors").write_bytes(b"\x00" * 4)
        with self.assertRaisesRegex(
            ValueError, "bad.safetensors: not a safetensors file"
        ):
            read_state_dict(folder / "bad.safetensors")

    def test_pth_without_torch_says_what_to_do(self):
        path = Path(self.get_temp_dir()) / "model.pth"
        path.write_bytes(b"x")
        with mock.patch.dict(sys.modules, {"torch": None}):  # not installed
            with self.assertRaisesRegex(
                ValueError, r"needs torch.*\.npz or \.safetensors"
            ):
                read_state_dict(path)


@pytest.mark.slow
def test_pth_files_are_read_with_torch(tmp_path):
    """A `.pth` state dict (torch.save: the file torchvision's URLs hold), a
    training checkpoint holding it under "model", and files that are not
    state dicts. Needs the `torch` extra, which CI's slow stage installs
    before `tests/models` (slow, so it runs there)."""
    torch = pytest.importorskip("torch")
    state = _state()
    tensors = {name: torch.from_numpy(value) for name, value in state.items()}
    torch.save(tensors, tmp_path / "maskrcnn.pth")
    torch.save({"model": tensors, "epoch": 3}, tmp_path / "checkpoint.pt")
    for name in ("maskrcnn.pth", "checkpoint.pt"):
        read = read_state_dict(tmp_path / name)
        assert sorted(read) == sorted(state)
        for key, value in state.items():
            np.testing.assert_array_equal(read[key], value)
    model = from_torchvision(tmp_path / "maskrcnn.pth", image_size=(SIZE, SIZE))
    reference = np.load(OUTPUTS)
    scores = model(reference["image"][None].astype("float32"))["scores"]
    np.testing.assert_allclose(
        np.asarray(scores)[0], reference["scores"], atol=SCORE_TOL
    )

    # A pickle that would run code: refused, and nothing runs.
    marker = tmp_path / "ran"

    class Hostile:
        def __reduce__(self):
            return (Path.touch, (marker,))

    torch.save({"weight": Hostile()}, tmp_path / "hostile.pth")
    with pytest.raises(ValueError, match=r"hostile\.pth: not a readable torch state"):
        read_state_dict(tmp_path / "hostile.pth")
    assert not marker.exists()
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes((tmp_path / "maskrcnn.pth").read_bytes()[:5000])
    with pytest.raises(ValueError, match=r"truncated\.pth: not a readable torch"):
        read_state_dict(truncated)
    torch.save(torch.zeros(3), tmp_path / "tensor.pth")
    with pytest.raises(ValueError, match=r"holds a Tensor, not a state dict"):
        read_state_dict(tmp_path / "tensor.pth")


def test_coco_categories():
    ids, names = coco_categories()
    assert ids == tuple(range(1, 91))
    assert (names[0], names[2], names[89]) == ("person", "car", "toothbrush")
    assert sum(name != "N/A" for name in names) == 80
    assert len(set(COCO_CATEGORY_NAMES) - {"N/A"}) == 81  # with the background


def test_paste_masks_torchvision_equals_torchvision():
    from kseg.data.instance_transform import paste_masks_torchvision

    ref = np.load(OUTPUTS)
    pasted = paste_masks_torchvision(ref["masks"], ref["boxes"], SIZE, SIZE)
    differ = (pasted > 0.5) != ref["pasted"]
    # Only where the probability is 0.5 up to float32 rounding of the
    # interpolation (a different summation order than torch's).
    assert np.all(np.abs(pasted[differ] - 0.5) < 1e-5), np.sum(differ)
    assert ref["pasted"].sum() > 1000
    # kseg's own pasting (SPEC's) is another function of the same masks.
    from kseg.data import paste_masks

    spec = np.stack(
        [np.asarray(paste_masks(m[None], b[None], SIZE, SIZE))[0]
         for m, b in zip(ref["masks"][:5], ref["boxes"][:5], strict=True)]
    )  # fmt: skip
    assert np.sum(spec != ref["pasted"][:5]) > 0
