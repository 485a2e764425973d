"""medtune.data: preprocessing functions, LabelSpec, synthetic data (hand-worked cases)."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch
from scipy import ndimage

from medtune.data import (
    LabelSpec,
    crop_foreground,
    crop_to_bbox,
    find_cases,
    foreground_mask,
    load_case,
    nonzero_bbox,
    pad_to_multiple,
    paste_from_bbox,
    synthesize_brats,
    zscore_nonzero,
)
from medtune.errors import DataError


def test_zscore_nonzero_hand_worked():
    image = np.zeros((2, 2, 3), dtype=np.float32)
    image[0, 0, :] = [1.0, 2.0, 3.0]  # mean 2, std sqrt(2/3)
    image[1, 1, 1] = 5.0  # a single value: shifted only
    out = zscore_nonzero(image)
    np.testing.assert_allclose(out[0, 0], np.array([-1, 0, 1]) / np.sqrt(2 / 3), rtol=1e-6)
    assert out[1, 1, 1] == 0.0 and out.dtype == np.float32
    # background stays exactly 0
    assert np.all(out[0, 1] == 0) and np.count_nonzero(out[1]) == 0


def test_zscore_nonzero_tensor_hand_worked():
    # a uint8 (C, H, W) image as VQADataset and `predict` hand it over
    image = torch.tensor([[[0, 2], [4, 6]], [[7, 0], [7, 7]]], dtype=torch.uint8)
    out = zscore_nonzero(image)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32 and out.shape == (2, 2, 2)
    std = np.sqrt(8 / 3)  # of 2, 4, 6 around their mean 4; the zero stays background
    np.testing.assert_allclose(out[0].numpy(), [[0.0, -2 / std], [0.0, 2 / std]], rtol=1e-6)
    assert torch.equal(out[1], torch.zeros(2, 2))  # one distinct value: shifted to 0
    # a tensor gets exactly the numbers its numpy array gets
    pixels = torch.randint(0, 256, (3, 9, 7), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    assert np.array_equal(zscore_nonzero(pixels).numpy(), zscore_nonzero(pixels.numpy()))
    with pytest.raises(TypeError, match="list"):
        zscore_nonzero([[1.0, 2.0]])


def test_zscore_nonzero_statistics_and_background():
    rng = np.random.default_rng(0)
    image = rng.uniform(1, 100, size=(3, 10, 12, 8)).astype(np.float32) * rng.uniform(1, 5, size=(3, 1, 1, 1))
    image[:, :2] = 0  # background
    image[1, 5:, :, :] = 0  # modality-specific background
    out = zscore_nonzero(image)
    for m in range(3):
        nonzero = image[m] != 0
        assert np.all(out[m][~nonzero] == 0.0)
        assert abs(out[m][nonzero].mean()) < 1e-5
        assert abs(out[m][nonzero].std() - 1) < 1e-4


def test_foreground_mask_all_vs_any():
    image = np.zeros((2, 3, 3), dtype=np.float32)
    image[0, 0, 0] = image[1, 0, 0] = 1  # both nonzero
    image[0, 1, 1] = 2  # only the first
    fg_all, fg_any = foreground_mask(image, "all"), foreground_mask(image, "any")
    assert fg_all.dtype == bool and fg_all.shape == (3, 3)
    assert np.argwhere(fg_all).tolist() == [[0, 0]]
    assert np.argwhere(fg_any).tolist() == [[0, 0], [1, 1]]
    with pytest.raises(ValueError):
        foreground_mask(image, "most")


def test_bbox_crop_paste_hand_worked():
    mask = np.zeros((5, 6, 7), dtype=bool)
    mask[1, 2, 3] = mask[2, 4, 3] = True
    assert nonzero_bbox(mask) == ((1, 3), (2, 5), (3, 4))
    image = np.arange(2 * 5 * 6 * 7, dtype=np.float32).reshape(2, 5, 6, 7)
    cropped = crop_to_bbox(image, nonzero_bbox(mask))
    assert cropped.shape == (2, 2, 3, 1)
    assert cropped[1, 0, 0, 0] == image[1, 1, 2, 3] and cropped[0, 1, 2, 0] == image[0, 2, 4, 3]
    pasted = paste_from_bbox(cropped, nonzero_bbox(mask), (5, 6, 7))
    assert pasted.shape == (2, 5, 6, 7)
    np.testing.assert_array_equal(pasted[:, 1:3, 2:5, 3:4], cropped)
    assert pasted.sum() == cropped.sum()
    assert nonzero_bbox(np.zeros((3, 4), bool)) == ((0, 3), (0, 4))  # empty: full extent


def test_crop_foreground_uses_any_modality():
    image = np.zeros((2, 6, 6, 6), dtype=np.float32)
    image[0, 1, 1, 1] = 1
    image[1, 4, 3, 2] = 1
    label = np.zeros((6, 6, 6), np.uint8)
    label[4, 3, 2] = 2
    cropped, cropped_label, bbox = crop_foreground(image, label)
    assert bbox == ((1, 5), (1, 4), (1, 3))
    assert cropped.shape == (2, 4, 3, 2) and cropped_label[3, 2, 1] == 2


def test_pad_to_multiple():
    array = np.ones((3, 5, 7), dtype=np.float32)
    padded = pad_to_multiple(array, 4, axes=(1, 2))
    assert padded.shape == (3, 8, 8)
    np.testing.assert_array_equal(padded[:, :5, :7], array)
    assert padded[:, 5:].sum() == 0 and padded[:, :, 7:].sum() == 0
    assert pad_to_multiple(array, (1, 5), axes=(0, 1)).shape == (3, 5, 7)
    assert pad_to_multiple(array, (2, 3), axes=(0, 2)).shape == (4, 5, 9)


def test_label_spec_round_trip_and_regions():
    spec = LabelSpec.brats()
    label = np.array([[0, 1], [2, 4]], dtype=np.uint8)
    index = spec.to_index(label)
    assert index.dtype == np.int64 and index.tolist() == [[0, 1], [2, 3]]
    np.testing.assert_array_equal(spec.to_values(index), label)
    assert spec.to_values(np.array([3]))[0] == 4  # channel 3 -> label 4
    masks = spec.region_masks(label)
    assert spec.region_names == ("WT", "TC", "ET") and masks.shape == (3, 2, 2)
    assert masks[0].tolist() == [[False, True], [True, True]]  # WT = 1, 2, 4
    assert masks[1].tolist() == [[False, True], [False, True]]  # TC = 1, 4
    assert masks[2].tolist() == [[False, False], [False, True]]  # ET = 4
    # torch tensors go through the same tables
    t_index = spec.to_index(torch.from_numpy(label))
    assert torch.equal(t_index, torch.from_numpy(index))
    assert torch.equal(spec.to_values(t_index), torch.from_numpy(label))
    assert torch.equal(spec.region_masks(torch.from_numpy(label)), torch.from_numpy(masks))


def test_label_spec_brats2023_and_invalid_values():
    spec = LabelSpec.brats(et_value=3)
    assert spec.regions["ET"] == (3,) and spec.to_values(np.array([3]))[0] == 3
    assert LabelSpec.from_values([0, 1, 2, 3], brats=True).regions == spec.regions
    # four classes of another dataset are four labels, not BraTS regions
    other = LabelSpec.from_values([0, 1, 2, 3], names={1: "white matter", 2: "grey matter", 3: "csf"})
    assert other.regions == {"white matter": (1,), "grey matter": (2,), "csf": (3,)} and not other.is_brats
    assert LabelSpec.from_values([0, 1, 2, 4]).regions == {"label1": (1,), "label2": (2,), "label4": (4,)}
    with pytest.raises(DataError, match="case X: label.*\\[3\\]"):
        LabelSpec.brats().to_index(np.array([0, 3, 1], np.uint8), where="case X: label")
    with pytest.raises(DataError, match="\\[4\\]"):
        spec.to_index(torch.tensor([4, 0]))
    with pytest.raises(ValueError):
        LabelSpec((0, 1), {"A": (2,)}, None)


def test_label_spec_from_dataset_json(tmp_path):
    msd = tmp_path / "msd.json"
    msd.write_text('{"labels": {"0": "background", "1": "edema", "2": "non-enhancing", "3": "enhancing"}}')
    spec = LabelSpec.from_dataset_json(msd)
    assert spec.values == (0, 1, 2, 3) and spec.regions["enhancing"] == (3,)
    v2 = tmp_path / "v2.json"
    v2.write_text('{"labels": {"background": 0, "kidney": 1, "tumor": 2, "whole": [1, 2]}}')
    spec = LabelSpec.from_dataset_json(v2)
    assert spec.values == (0, 1, 2) and spec.regions == {"whole": (1, 2)}
    assert spec.names == ("background", "kidney", "tumor")


def test_synthesize_brats_files_labels_and_contrast(tmp_path):
    folders = synthesize_brats(tmp_path, cases=4, shape=(48, 48, 32), seed=3)
    assert [f.name for f in folders] == [f"BraTS20_Training_{i:03d}" for i in (1, 2, 3, 4)]
    names = sorted(p.name for p in folders[0].iterdir())
    assert names == [f"BraTS20_Training_001_{m}.nii.gz" for m in ("flair", "seg", "t1", "t1ce", "t2")]
    img = nib.load(str(folders[0] / "BraTS20_Training_001_seg.nii.gz"))
    np.testing.assert_array_equal(img.affine, np.eye(4))
    assert img.shape == (48, 48, 32)

    cases = find_cases(tmp_path)
    has_et = []
    for case in cases:
        volume = load_case(case)
        image, label = volume.image, volume.label  # image order: flair, t1ce, t1, t2
        assert set(np.unique(label).tolist()) <= {0, 1, 2, 4}
        brain = (image != 0).all(0)
        assert np.array_equal(brain, (image != 0).any(0))  # one brain mask for all modalities
        assert 0.2 < brain.mean() < 0.6  # an ellipsoid, not the whole box
        assert not label[~brain].any()  # the tumour lies inside the brain
        tumour = label > 0
        core = (label == 1) | (label == 4)
        assert core.sum() > 0 and (label == 2).sum() > 0
        # nested: the core sits inside the whole tumour with edema around it
        grown_core = ndimage.binary_dilation(core)
        assert (tumour | ~brain)[grown_core].mean() > 0.95
        healthy = brain & ~tumour
        flair, t1ce = image[0], image[1]
        assert flair[label == 2].mean() > 1.5 * flair[healthy].mean()  # edema bright in flair
        has_et.append(bool((label == 4).any()))
        if has_et[-1]:
            assert t1ce[label == 4].mean() > 1.5 * t1ce[healthy].mean()  # enhancing rim
            # the rim surrounds the necrosis: ET voxels lie farther from the core centre
            centre = np.argwhere(core).mean(0)
            radius = lambda mask: np.linalg.norm(np.argwhere(mask) - centre, axis=1).mean()  # noqa: E731
            assert radius(label == 4) > radius(label == 1)
        # texture: not piecewise constant
        assert np.unique(flair[healthy]).size > 50
    assert has_et == [True, True, True, False]  # every 4th case without ET
