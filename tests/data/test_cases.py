"""medtune.data: case readers (BraTS/MSD/nnU-Net), load_case, bad inputs, check, CLI."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medtune.cli import main
from medtune.data import Case, check_dataset, find_cases, load_case
from medtune.errors import DataError

CASE1 = "BraTS20_Training_001"
CASE2 = "BraTS20_Training_002"


@pytest.fixture
def brats(tmp_path, synth_brats) -> Path:
    """A private, writable copy of the shared synthetic dataset."""
    return Path(shutil.copytree(synth_brats, tmp_path / "brats"))


def _save(array: np.ndarray, path: Path) -> None:
    nib.save(nib.Nifti1Image(array, np.eye(4)), str(path))


def test_find_cases_brats_order_and_label(synth_brats):
    cases = find_cases(synth_brats)
    assert [c.case_id for c in cases] == [CASE1, CASE2, "BraTS20_Training_003"]
    assert [p.name for p in cases[0].images] == [f"{CASE1}_{m}.nii.gz" for m in ("flair", "t1ce", "t1", "t2")]
    assert cases[0].label.name == f"{CASE1}_seg.nii.gz"
    t1_only = find_cases(synth_brats, "brats", modalities=("t1",))
    assert [p.name for p in t1_only[0].images] == [f"{CASE1}_t1.nii.gz"]  # not t1ce


def test_load_case_shapes_and_values(synth_brats):
    case = find_cases(synth_brats)[0]
    volume = load_case(case)
    assert volume.image.shape == (4, 32, 32, 16) and volume.image.dtype == np.float32
    assert volume.label.shape == (32, 32, 16) and volume.label.dtype == np.uint8
    np.testing.assert_array_equal(volume.affine, np.eye(4))
    t1 = nib.load(str(case.images[2])).get_fdata()
    np.testing.assert_array_equal(volume.image[2], t1)  # modality order kept
    assert volume.spacing == (1.0, 1.0, 1.0)


def test_brats2019_nesting_and_case355_label_name(brats):
    (brats / "HGG").mkdir()
    (brats / "LGG").mkdir()
    shutil.move(str(brats / CASE1), brats / "HGG" / CASE1)
    shutil.move(str(brats / CASE2), brats / "LGG" / CASE2)
    shutil.move(str(brats / "BraTS20_Training_003"), brats / "HGG" / "BraTS20_Training_003")
    # BraTS20_Training_355 quirk: the label file is named otherwise
    folder = brats / "HGG" / CASE1
    label = nib.load(str(folder / f"{CASE1}_seg.nii.gz")).get_fdata().astype(np.uint8)
    (folder / f"{CASE1}_seg.nii.gz").unlink()
    _save(label, folder / "W39_1998.09.19_Segm.nii")
    cases = find_cases(brats, require_labels=True)
    assert [c.case_id for c in cases] == [CASE1, CASE2, "BraTS20_Training_003"]
    assert cases[0].label.name == "W39_1998.09.19_Segm.nii"
    np.testing.assert_array_equal(load_case(cases[0]).label, label)


def test_brats2023_file_names(brats):
    folder = brats / CASE1
    for old, new in (("flair", "t2f"), ("t1ce", "t1c"), ("t1", "t1n"), ("t2", "t2w"), ("seg", "seg")):
        (folder / f"{CASE1}_{old}.nii.gz").rename(folder / f"BraTS-GLI-00001-000-{new}.nii.gz")
    case = find_cases(brats)[0]
    assert [p.name for p in case.images] == [f"BraTS-GLI-00001-000-{m}.nii.gz" for m in ("t2f", "t1c", "t1n", "t2w")]
    assert case.label.name == "BraTS-GLI-00001-000-seg.nii.gz"


def _write_msd(root: Path) -> np.ndarray:
    """Two 4D cases whose channel c holds the value 10 * (c + 1) inside a box."""
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    image = np.zeros((8, 9, 6, 4), np.float32)
    for c in range(4):
        image[2:6, 2:7, 1:5, c] = 10 * (c + 1)
    label = np.zeros((8, 9, 6), np.uint8)
    label[3:5, 3:5, 2:4] = 3
    training = []
    for name in ("BRATS_001", "BRATS_002"):
        _save(image, root / "imagesTr" / f"{name}.nii.gz")
        _save(label, root / "labelsTr" / f"{name}.nii.gz")
        training.append({"image": f"./imagesTr/{name}.nii.gz", "label": f"./labelsTr/{name}.nii.gz"})
    meta = {
        "name": "BRATS",
        "modality": {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"},
        "labels": {"0": "background", "1": "edema", "2": "non-enhancing tumor", "3": "enhancing tumour"},
        "training": training,
    }
    (root / "dataset.json").write_text(json.dumps(meta))
    return label


def test_msd_layout_4d_channels(tmp_path):
    label = _write_msd(tmp_path)
    cases = find_cases(tmp_path)  # auto -> msd, every channel in json order
    assert [c.case_id for c in cases] == ["BRATS_001", "BRATS_002"] and cases[0].channels == (0, 1, 2, 3)
    volume = load_case(cases[0])
    assert volume.image.shape == (4, 8, 9, 6)
    assert [volume.image[m].max() for m in range(4)] == [10, 20, 30, 40]
    np.testing.assert_array_equal(volume.label, label)
    # BraTS names select MSD channels through aliases: flair, t1ce(=t1gd), t1(=T1w), t2(=T2w)
    brats_order = find_cases(tmp_path, "msd", modalities=("flair", "t1ce", "t1", "t2"))
    assert brats_order[0].channels == (0, 2, 1, 3)
    assert [load_case(brats_order[0]).image[m].max() for m in range(4)] == [10, 30, 20, 40]
    assert check_dataset(tmp_path) == []  # labels 0..3 declared by dataset.json
    with pytest.raises(DataError, match="modality 'pd'"):
        find_cases(tmp_path, modalities=("pd",))


def test_nnunet_layout(tmp_path):
    (tmp_path / "imagesTr").mkdir()
    (tmp_path / "labelsTr").mkdir()
    for case in ("kid_000", "kid_001"):
        for channel in range(2):
            _save(np.full((5, 6, 7), channel + 1, np.float32), tmp_path / "imagesTr" / f"{case}_{channel:04d}.nii.gz")
        _save(np.eye(5, 6, dtype=np.uint8)[..., None].repeat(7, -1), tmp_path / "labelsTr" / f"{case}.nii.gz")
    meta = {"channel_names": {"0": "T2", "1": "ADC"}, "labels": {"background": 0, "tumor": 1},
            "numTraining": 2, "file_ending": ".nii.gz"}
    (tmp_path / "dataset.json").write_text(json.dumps(meta))
    cases = find_cases(tmp_path)
    assert [c.case_id for c in cases] == ["kid_000", "kid_001"]
    assert [p.name for p in cases[1].images] == ["kid_001_0000.nii.gz", "kid_001_0001.nii.gz"]
    volume = load_case(cases[1])
    assert volume.image.shape == (2, 5, 6, 7) and volume.image[1].min() == 2
    assert volume.label.sum() == 5 * 7
    assert find_cases(tmp_path, modalities=("adc",))[0].images[0].name == "kid_000_0001.nii.gz"
    assert check_dataset(tmp_path) == []
    # nnU-Net v1: "modality" and a "training" list naming images without _0000
    v1 = {"modality": {"0": "T2", "1": "ADC"}, "labels": {"0": "background", "1": "tumor"},
          "training": [{"image": "./imagesTr/kid_000.nii.gz", "label": "./labelsTr/kid_000.nii.gz"}]}
    (tmp_path / "dataset.json").write_text(json.dumps(v1))
    assert [len(c.images) for c in find_cases(tmp_path)] == [2, 2]
    (tmp_path / "imagesTr" / "kid_001_0001.nii.gz").unlink()
    with pytest.raises(DataError, match="case kid_001: modality file missing: .*kid_001_0001.nii.gz"):
        find_cases(tmp_path)


# ---------------------------------------------------------------- bad inputs


def test_missing_and_empty_folders(tmp_path, brats):
    with pytest.raises(DataError, match="not found: .*nowhere"):
        find_cases(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty: .*empty"):
        find_cases(tmp_path / "empty")
    (brats / "BraTS20_Training_004").mkdir()
    with pytest.raises(DataError, match="case BraTS20_Training_004: folder .* holds no NIfTI"):
        find_cases(brats)


def test_missing_modality_file(brats):
    (brats / CASE2 / f"{CASE2}_t1ce.nii.gz").unlink()
    with pytest.raises(DataError, match=f"case {CASE2}: modality file missing: .*{CASE2}_t1ce.nii.gz"):
        find_cases(brats)


def test_missing_label_when_required(brats):
    (brats / CASE1 / f"{CASE1}_seg.nii.gz").unlink()
    assert find_cases(brats)[0].label is None
    with pytest.raises(DataError, match=f"case {CASE1}: no label"):
        find_cases(brats, require_labels=True)


def test_modality_shape_mismatch(brats):
    _save(np.ones((32, 32, 15), np.int16), brats / CASE1 / f"{CASE1}_t2.nii.gz")
    with pytest.raises(DataError, match=f"case {CASE1}: .*{CASE1}_t2.nii.gz has shape \\(32, 32, 15\\)"):
        load_case(find_cases(brats)[0])


def test_label_shape_mismatch(brats):
    _save(np.zeros((32, 31, 16), np.uint8), brats / CASE1 / f"{CASE1}_seg.nii.gz")
    with pytest.raises(DataError, match=f"case {CASE1}: label .*{CASE1}_seg.nii.gz has shape"):
        load_case(find_cases(brats)[0])


def test_nan_voxels(brats):
    data = np.ones((32, 32, 16), np.float32)
    data[3, 4, 5] = np.nan
    data[0, 0, 0] = np.inf
    _save(data, brats / CASE2 / f"{CASE2}_flair.nii.gz")
    with pytest.raises(DataError, match=f"case {CASE2}: 2 NaN/Inf voxels in .*{CASE2}_flair.nii.gz"):
        load_case(find_cases(brats)[1])


def test_corrupt_nifti(brats):
    path = brats / CASE1 / f"{CASE1}_t1.nii.gz"
    path.write_bytes(path.read_bytes()[:200])  # truncated gzip stream
    with pytest.raises(DataError, match=f"case {CASE1}: cannot read NIfTI.* {path}"):
        load_case(find_cases(brats)[0])
    path.write_bytes(gzip.compress(b"not a nifti header at all" * 20))
    with pytest.raises(DataError, match=f"case {CASE1}: cannot read NIfTI {path}"):
        load_case(find_cases(brats)[0])


def test_missing_file_in_case(tmp_path):
    case = Case("lonely", [tmp_path / "lonely_flair.nii.gz"])
    with pytest.raises(DataError, match="case lonely: file not found: .*lonely_flair.nii.gz"):
        load_case(case)


# ---------------------------------------------------------------- check and CLI


def test_check_dataset_reports_every_problem(brats, synth_brats):
    assert check_dataset(synth_brats) == []
    label = nib.load(str(brats / CASE1 / f"{CASE1}_seg.nii.gz")).get_fdata().astype(np.uint8)
    label[0, 0, 0] = 3  # not a BraTS 2020 value
    _save(label, brats / CASE1 / f"{CASE1}_seg.nii.gz")
    (brats / CASE2 / f"{CASE2}_t2.nii.gz").unlink()
    _save(np.full((32, 32, 16), np.nan, np.float32), brats / "BraTS20_Training_003" / "BraTS20_Training_003_t1.nii.gz")
    problems = check_dataset(brats)
    assert len(problems) == 3, problems
    assert any(CASE1 in p and "seg.nii.gz" in p and "[3]" in p for p in problems)
    assert any(CASE2 in p and f"{CASE2}_t2.nii.gz" in p for p in problems)
    assert any("BraTS20_Training_003" in p and "NaN/Inf" in p for p in problems)
    # BraTS 2023 numbering accepts 3 (and then refuses 4, which case 1 also has)
    problems_2023 = check_dataset(brats, label_values=[0, 1, 2, 3])
    assert any(CASE1 in p and "[4]" in p for p in problems_2023)


def test_check_dataset_shape_and_affine_mismatch_name_file(brats):
    _save(np.ones((30, 32, 16), np.int16), brats / CASE2 / f"{CASE2}_t1ce.nii.gz")
    nib.save(nib.Nifti1Image(np.ones((32, 32, 16), np.int16), np.diag([2.0, 1, 1, 1])),
             str(brats / CASE1 / f"{CASE1}_t2.nii.gz"))
    problems = check_dataset(brats)
    assert len(problems) == 2, problems
    assert CASE2 in problems[1] and f"{CASE2}_t1ce.nii.gz" in problems[1] and "shape" in problems[1]
    assert CASE1 in problems[0] and f"{CASE1}_t2.nii.gz" in problems[0] and "affine" in problems[0]


def test_cli_check_and_synth(tmp_path, brats, capsys):
    assert main(["data", "check", str(brats)]) == 0
    assert "ok: 3 cases" in capsys.readouterr().out
    (brats / CASE1 / f"{CASE1}_flair.nii.gz").write_bytes(b"garbage")
    assert main(["data", "check", str(brats), "--layout", "brats"]) == 2
    out = capsys.readouterr().out
    assert CASE1 in out and f"{CASE1}_flair.nii.gz" in out
    assert main(["data", "check", str(tmp_path / "missing")]) == 2
    out_dir = tmp_path / "synth"
    assert main(["data", "synth", "--out", str(out_dir), "--cases", "2", "--shape", "16", "16", "8"]) == 0
    assert str(out_dir) in capsys.readouterr().out
    assert [c.case_id for c in find_cases(out_dir)] == [CASE1, CASE2]
    assert nib.load(str(out_dir / CASE2 / f"{CASE2}_t1.nii.gz")).shape == (16, 16, 8)


def test_cli_synth_never_overwrites_other_data(tmp_path, capsys):
    out_dir = tmp_path / "synth"
    argv = ["data", "synth", "--out", str(out_dir), "--cases", "2", "--shape", "16", "16", "8"]
    assert main(argv) == 0
    label = out_dir / CASE1 / f"{CASE1}_seg.nii.gz"
    before, stamp = label.read_bytes(), label.stat().st_mtime_ns
    assert main(argv) == 0  # the same command again: nothing rewritten (caches keyed on mtime stay valid)
    assert label.stat().st_mtime_ns == stamp
    capsys.readouterr()
    assert main(argv[:-3] + ["24", "24", "8"]) == 2  # another shape over the same cases: refused
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already exists" in err[0] and CASE1 in err[0]
    assert label.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["synth"]  # no temporary folder left
    assert main(argv[:4] + ["--cases", "3", "--shape", "16", "16", "8"]) == 0  # adds the missing case only
    assert label.stat().st_mtime_ns == stamp and (out_dir / "BraTS20_Training_003").is_dir()
    (tmp_path / "file").write_text("x")
    assert main(["data", "synth", "--out", str(tmp_path / "file")]) == 2
    assert "is a file" in capsys.readouterr().err


def test_data_cli_does_not_import_torch():
    import subprocess
    import sys

    code = (
        "import sys, medtune.data, medtune.data.cli, medtune.data.check, medtune.data.synth.brats,"
        " medtune.data.synth.shapes, medtune.data.synth.vqa;"
        "medtune.data.find_cases; assert 'torch' not in sys.modules, 'torch imported'"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_resolve_modalities_gives_canonical_channel_names(tmp_path):
    import json

    from medtune.data.cases import canonical_modality, resolve_modalities

    assert [canonical_modality(n) for n in ("FLAIR", "T1w", "t1gd", "T2w", "t2f", "CT")] == [
        "flair", "t1", "t1ce", "t2", "flair", "CT"]
    assert resolve_modalities(tmp_path, "brats") == ["flair", "t1ce", "t1", "t2"]
    assert resolve_modalities(tmp_path, "brats", ["t2", "flair"]) == ["t2", "flair"]
    (tmp_path / "dataset.json").write_text(json.dumps({"modality": {"1": "T1w", "0": "FLAIR"}, "training": []}))
    assert resolve_modalities(tmp_path, "msd") == ["flair", "t1"]


# ---------------------------------------------------------------- real datasets: MSD tasks, layouts, inputs


def _write_single_modality_msd(root: Path, name: str = "hippocampus", count: int = 3) -> None:
    """An MSD task as downloaded (Heart, Liver, Hippocampus, ...): one 3D image per case,
    a one-entry modality map, macOS ``._*`` files in the folders, a test list."""
    for folder in ("imagesTr", "labelsTr", "imagesTs"):
        (root / folder).mkdir(parents=True)
    training = []
    rng = np.random.default_rng(0)
    for i in range(1, count + 1):
        case = f"{name}_{i:03d}"
        _save(rng.normal(100, 10, size=(9, 11, 7)).astype(np.float32), root / "imagesTr" / f"{case}.nii.gz")
        label = np.zeros((9, 11, 7), np.uint8)
        label[2:5, 3:6, 1:4] = 1
        label[5:7, 3:6, 1:4] = 2
        _save(label, root / "labelsTr" / f"{case}.nii.gz")
        (root / "imagesTr" / f"._{case}.nii.gz").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
        training.append({"image": f"./imagesTr/{case}.nii.gz", "label": f"./labelsTr/{case}.nii.gz"})
    _save(rng.normal(100, 10, size=(9, 11, 7)).astype(np.float32), root / "imagesTs" / f"{name}_100.nii.gz")
    (root / "dataset.json").write_text(json.dumps({
        "modality": {"0": "MRI"}, "labels": {"0": "background", "1": "Anterior", "2": "Posterior"},
        "training": training, "test": [f"./imagesTs/{name}_100.nii.gz"],
    }))


def test_a_single_modality_msd_task_loads_as_downloaded(tmp_path):
    from medtune.data.cases import detect_layout
    from medtune.data.inputs import input_cases, label_files

    _write_single_modality_msd(tmp_path)
    assert detect_layout(tmp_path) == "msd"
    cases = find_cases(tmp_path)
    assert [c.case_id for c in cases] == ["hippocampus_001", "hippocampus_002", "hippocampus_003"]
    volume = load_case(cases[0])  # a 3D image is the task's one channel
    assert volume.image.shape == (1, 9, 11, 7) and volume.label.max() == 2
    assert check_dataset(tmp_path) == []
    test = input_cases(tmp_path, subset="test")
    assert [c.case_id for c in test] == ["hippocampus_100"] and load_case(test[0]).image.shape == (1, 9, 11, 7)
    assert [c.case_id for c in input_cases(tmp_path / "imagesTs")] == ["hippocampus_100"]
    assert [case for case, _ in label_files(tmp_path)] == [c.case_id for c in cases]  # no images needed


def test_layout_auto_tells_msd_nnunet_and_brats_apart(tmp_path, synth_brats):
    from medtune.data.cases import detect_layout

    assert detect_layout(synth_brats) == "brats"
    v1 = tmp_path / "Task004_Hippocampus"  # nnU-Net v1 converted: same json, channel files
    _write_single_modality_msd(v1)
    for image in list((v1 / "imagesTr").glob("h*.nii.gz")):
        image.rename(image.with_name(image.name.replace(".nii.gz", "_0000.nii.gz")))
    assert detect_layout(v1) == "nnunet"
    assert [len(c.images) for c in find_cases(v1)] == [1, 1, 1]
    v2 = tmp_path / "Dataset004"
    shutil.copytree(v1, v2)
    (v2 / "dataset.json").write_text(json.dumps({"channel_names": {"0": "MRI"}, "labels": {"background": 0, "a": 1,
                                                 "p": 2}, "file_ending": ".nii.gz", "numTraining": 3}))
    assert detect_layout(v2) == "nnunet" and len(find_cases(v2)) == 3


def test_data_check_on_one_case_folder_and_geometry_report(tmp_path, brats, capsys):
    assert main(["data", "check", str(brats / CASE1)]) == 0
    out = capsys.readouterr().out
    assert f"case {CASE1}: RAS, spacing 1 x 1 x 1 mm" in out and "ok: 1 cases" in out
    case = brats / CASE2
    for path in case.iterdir():  # one case stored with 3 mm slices: handled, flagged
        img = nib.load(str(path))
        nib.save(nib.Nifti1Image(np.asarray(img.dataobj), np.diag([-1.0, -1.0, 3.5, 1.0])), str(path))
    assert main(["data", "check", str(brats)]) == 0
    out = capsys.readouterr().out
    assert f"case {CASE2}: LPS, spacing 1 x 1 x 3.5 mm" in out
    assert f"warning: case {CASE2}: spacing" in out and "1 spacing warning" in out


def test_a_symlinked_image_keeps_the_link_name(tmp_path):
    from medtune.data.inputs import input_cases

    store = tmp_path / "store"
    store.mkdir()
    _save(np.ones((4, 4, 4), np.float32), store / "scan_7f3a.nii.gz")
    images = tmp_path / "images"
    images.mkdir()
    (images / "patient_01.nii.gz").symlink_to(store / "scan_7f3a.nii.gz")
    assert [c.case_id for c in input_cases(images)] == ["patient_01"]
    msd = tmp_path / "msd"
    _write_single_modality_msd(msd, count=1)
    target = msd / "imagesTr" / "hippocampus_001.nii.gz"
    target.rename(store / "blob.nii.gz")
    target.symlink_to(store / "blob.nii.gz")
    assert [c.case_id for c in find_cases(msd)] == ["hippocampus_001"]
