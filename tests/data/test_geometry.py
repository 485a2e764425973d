"""medtune.data.geometry: orientation, spacing planning, and the exact way back to the input grid."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch

from medtune.data.cases import Case
from medtune.data.geometry import (
    Grid,
    affine_problem,
    axcodes_of,
    canonical_axcodes,
    plan_spacing,
    slice_axis_name,
    spacing_outliers,
    to_input_grid,
    to_training_grid,
)
from medtune.data.intensity import ChannelNorm, Normalizer
from medtune.data.plan import DataPlan
from medtune.data.volume import load_case, read_case


def affine_of(axcodes: str, spacing=(0.8, 0.8, 4.0), origin=(12.0, -30.0, 7.5)) -> np.ndarray:
    """A voxel-to-world matrix whose array axes point along ``axcodes`` with ``spacing``."""
    directions = {"R": (0, 1), "L": (0, -1), "A": (1, 1), "P": (1, -1), "S": (2, 1), "I": (2, -1)}
    affine = np.zeros((4, 4))
    for axis, code in enumerate(axcodes):
        world, sign = directions[code]
        affine[world, axis] = sign * spacing[axis]
    affine[:3, 3] = origin
    affine[3, 3] = 1.0
    return affine


def blob_label(shape, seed=0) -> np.ndarray:
    """Two labelled boxes and a lone voxel: an asymmetric map a flip or a transpose would change."""
    label = np.zeros(shape, np.uint8)
    label[2:9, 3:12, 1:4] = 1
    label[5:7, 6:9, 2:3] = 2
    label[shape[0] - 2, 1, shape[2] - 1] = 2
    return label


def test_slice_axes_and_orientation_codes():
    assert canonical_axcodes("axial") == "RAS" and canonical_axcodes(-1) == "RAS"
    assert canonical_axcodes("coronal") == "RSA" and canonical_axcodes(0) == "ASR"
    assert slice_axis_name(2) == "axial"
    with pytest.raises(ValueError, match="sagittal"):
        slice_axis_name("oblique")
    assert axcodes_of(affine_of("LPS")) == "LPS" and axcodes_of(affine_of("PSR")) == "PSR"


@pytest.mark.parametrize("axcodes", ["LPS", "PSR"])
def test_reoriented_grid_matches_monai(axcodes):
    shape = (14, 11, 6)
    image = np.random.default_rng(0).normal(size=(2, *shape)).astype(np.float32)
    moved, _, grid = to_training_grid(image, None, affine_of(axcodes), "RAS")
    assert grid.reoriented.axcodes == "RAS" and moved.shape[1:] == grid.reoriented.shape
    expected = Grid(shape, affine_of(axcodes)).reoriented("RAS")
    assert expected.shape == grid.reoriented.shape and np.allclose(expected.affine, grid.reoriented.affine)
    # spacing follows the axes: the 4 mm axis is the file's third, wherever RAS puts it
    assert sorted(grid.reoriented.spacing) == pytest.approx([0.8, 0.8, 4.0])
    assert not grid.resampled


def test_plan_spacing_median_and_nnunet_anisotropy_rule():
    # isotropic: the median per axis
    assert plan_spacing([[1, 1, 1], [1, 1, 1.2], [0.9, 1, 1]], [[100] * 3] * 3) == [1.0, 1.0, 1.0]
    # thick slices (5 mm vs 0.7 mm, few of them): the 10th percentile of the slice spacings
    spacings = [[0.7, 0.7, 5.0], [0.8, 0.8, 5.0], [0.6, 0.6, 1.25]]
    shapes = [[512, 512, 60], [512, 512, 50], [512, 512, 200]]
    assert plan_spacing(spacings, shapes) == pytest.approx([0.7, 0.7, 1.25 + 0.2 * (5.0 - 1.25)])
    # anisotropic spacing but many slices: the median stays
    assert plan_spacing(spacings, [[64, 64, 400]] * 3) == pytest.approx([0.7, 0.7, 5.0])
    # never finer than the coarsest other axis
    mixed = [[0.5, 0.5, 5.0]] * 3 + [[0.5, 0.5, 0.3]] * 2  # median 5 mm, 10th percentile 0.3 mm
    assert plan_spacing(mixed, [[512, 512, 40]] * 5)[2] == pytest.approx(0.5, abs=1e-4)
    assert spacing_outliers({"a": (1, 1, 1), "b": (1, 1, 3.5), "c": (0.3, 1, 1)}, (1, 1, 1)) == ["b", "c"]


def test_unplaceable_affines_are_named():
    assert affine_problem(affine_of("RAS")) is None
    assert "zero" in affine_problem(np.diag([1.0, 0.0, 1.0, 1.0]))
    assert "NaN" in affine_problem(np.diag([1.0, np.nan, 1.0, 1.0]))
    parallel = np.eye(4)
    parallel[:3, 1] = parallel[:3, 0]
    assert "not invertible" in affine_problem(parallel)


def _write_case(folder, axcodes, spacing=(0.8, 0.8, 4.0), shape=(16, 14, 6)):
    """An image that *is* its label (values 0/1/2 as intensities) in ``axcodes``."""
    label = blob_label(shape)
    affine = affine_of(axcodes, spacing)
    folder.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(label.astype(np.float32), affine), str(folder / "image.nii.gz"))
    nib.save(nib.Nifti1Image(label, affine), str(folder / "label.nii.gz"))
    return Case(folder.name, [folder / "image.nii.gz"], folder / "label.nii.gz"), label, affine


class IdentityModel(torch.nn.Module):
    """Predicts the class its input's value names: one-hot logits of round(x)."""

    def forward_logits(self, x: torch.Tensor) -> torch.Tensor:  # (B, 1, *S) -> (B, 3, *S)
        index = x[:, 0].round().clamp(0, 2).long()
        return torch.nn.functional.one_hot(index, 3).movedim(-1, 1).float() * 20.0

    def parameters(self, recurse=True):
        return iter([torch.zeros(1)])


@pytest.mark.parametrize("axcodes", ["LPS", "PSR"])
def test_orientation_round_trip_through_prediction_is_exact(axcodes, tmp_path):
    from medtune.finetune.segmentation.inference import labels_on_input, predict_probabilities, write_label_map

    case, label, affine = _write_case(tmp_path / axcodes, axcodes)
    volume = load_case(case)
    assert volume.orientation == axcodes and volume.spacing == pytest.approx((0.8, 0.8, 4.0))
    own = list(Grid(label.shape, affine).reoriented("RAS").spacing)  # the 4 mm axis wherever RAS puts it
    plan = DataPlan("RAS", own, Normalizer([ChannelNorm("none")]))  # the dataset's spacing (its own, one case)
    full, grid = predict_probabilities(IdentityModel(), volume.image, volume.affine, plan, (8, 8, 2), overlap=0.5)
    assert grid.reoriented.axcodes == "RAS" and not grid.resampled
    labels = labels_on_input(full, grid, (0, 1, 2))
    out = write_label_map(labels, tmp_path / f"{axcodes}_pred.nii.gz", volume.affine, volume.header)
    written = nib.load(str(out))
    assert np.array_equal(np.asarray(written.dataobj), label)
    assert np.array_equal(written.affine, nib.load(str(case.label)).affine)


@pytest.mark.parametrize("axcodes", ["LPS", "PSR"])
def test_resampled_round_trip_keeps_the_grid_and_most_voxels(axcodes, tmp_path):
    from medtune.finetune.segmentation.inference import labels_on_input, predict_probabilities, probabilities_on_input

    case, label, affine = _write_case(tmp_path / axcodes, axcodes)
    volume = load_case(case)
    finer = [s / 2 for s in Grid(label.shape, affine).reoriented("RAS").spacing]  # 2x finer on every axis
    plan = DataPlan("RAS", finer, Normalizer([ChannelNorm("none")]))
    full, grid = predict_probabilities(IdentityModel(), volume.image, volume.affine, plan, (8, 8, 2))
    assert grid.resampled and grid.target.spacing == pytest.approx(tuple(finer))
    labels = labels_on_input(full, grid, (0, 1, 2))
    assert labels.shape == label.shape
    assert (labels == label).mean() > 0.97  # finer grid and back: only boundary voxels may move
    probs = probabilities_on_input(full, grid)
    assert probs.shape == (3, *label.shape)
    np.testing.assert_allclose(probs.sum(0), 1.0, atol=1e-4)


def test_label_follows_its_image_to_the_training_grid(tmp_path):
    case, label, _ = _write_case(tmp_path / "c", "PSR")
    volume = load_case(case)
    image, moved_label, grid = to_training_grid(volume.image, volume.label, volume.affine, "RAS", [0.8, 0.8, 2.0])
    assert moved_label.shape == image.shape[1:] and moved_label.dtype == np.uint8
    assert np.array_equal(np.rint(image[0]).astype(np.uint8), moved_label)  # nearest vs linear agree inside blobs
    back = to_input_grid(moved_label[None], grid, mode="nearest")[0]
    assert back.shape == label.shape and (back == label).mean() > 0.97


def save_with_sform(array: np.ndarray, rows: list[list[float]], path) -> None:
    """A NIfTI file whose sform is ``rows`` as given (nibabel refuses to build such an
    affine itself: scanners' and converters' broken headers get written this way)."""
    header = nib.Nifti1Header()
    header.set_data_shape(array.shape)
    header.set_data_dtype(array.dtype)
    header["sform_code"], header["qform_code"] = 1, 0
    for name, row in zip(("srow_x", "srow_y", "srow_z"), rows):
        header[name] = row
    header["pixdim"][1:4] = [np.linalg.norm([r[a] for r in rows]) for a in range(3)]
    nib.save(nib.Nifti1Image(array, None, header=header), str(path))


@pytest.mark.parametrize("broken, words", [(0.0, "zero"), (float("nan"), "NaN")])
def test_a_case_that_cannot_be_placed_is_refused_by_name(broken, words, tmp_path):
    folder = tmp_path / "flat"
    folder.mkdir()
    save_with_sform(np.ones((4, 4, 4), np.float32), [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, broken, 0]], folder / "i.nii.gz")
    _, problems = read_case(Case("flat", [folder / "i.nii.gz"]))
    assert problems and "case flat" in problems[0] and words in problems[0]
