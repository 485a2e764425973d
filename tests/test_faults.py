"""Nothing lost, nothing silent: careless users and hostile files, one table.

Every case runs a `medtune` command in-process against files prepared for it and checks
the same contract: exit code 2, exactly one `medtune: error:` line (no traceback) that
names the file, case or key at fault, and every file that existed before is unchanged
(safetensors compared tensor by tensor, other files byte by byte).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import pickle
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import nibabel as nib
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from medtune.cli import main
from tests import REPO


@pytest.fixture(scope="module")
def world(synth_brats, tiny_segmentation_recipe, tiny_pretrain_overrides, make_segmentation_run, make_pretrain_run,
          tmp_path_factory) -> dict:
    """A dataset, a finetuning run (best/ and two states) and a pretraining run (two
    states), from the tiny recipes shortened to 2 steps saved at each step; ``pretrain``
    holds the pretraining command's flags before ``--data``; ``make_run`` and
    ``make_pretrain_run`` make run folders by hand (no training)."""
    import copy

    import yaml

    root = tmp_path_factory.mktemp("world")
    data = root / "data"
    shutil.copytree(synth_brats, data)
    recipe = copy.deepcopy(tiny_segmentation_recipe)
    recipe["train"].update(max_steps=2, save_every=1)
    (root / "finetune.yaml").write_text(yaml.safe_dump(recipe))
    pretrain = ["--config", str(REPO / "configs" / "demo_pretrain.yaml"), "--set", *tiny_pretrain_overrides,
                "train.max_steps=2", "train.save_every=1", "figure=false"]
    world = {"root": root, "data": data, "recipe": root / "finetune.yaml", "run": root / "run", "pre": root / "pre",
             "pretrain": pretrain, "make_run": make_segmentation_run, "make_pretrain_run": make_pretrain_run}
    assert main(["finetune", "--config", str(world["recipe"]), "--data", str(data), "--output", str(world["run"])]) == 0
    assert main(["pretrain", *pretrain, "--data", str(data), "--output", str(world["pre"])]) == 0
    return world


def snapshot(folder: Path) -> dict[str, object]:
    """What every file holds: tensors for safetensors files, bytes (hashed) for the rest."""
    seen: dict[str, object] = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        key = str(path.relative_to(folder))
        if path.suffix == ".safetensors":
            try:
                seen[key] = {k: v.clone() for k, v in load_file(str(path)).items()}
                continue
            except Exception:  # noqa: BLE001 - a deliberately damaged file: compare its bytes
                pass
        seen[key] = hashlib.sha256(path.read_bytes()).hexdigest()
    return seen


def same(before: dict, after: dict) -> list[str]:
    """Files of ``before`` that are gone or differ in ``after``."""
    changed = []
    for key, value in before.items():
        now = after.get(key)
        if isinstance(value, dict):
            if not isinstance(now, dict) or set(now) != set(value) or any(not torch.equal(now[k], value[k]) for k in value):
                changed.append(key)
        elif now != value:
            changed.append(key)
    return changed


@dataclass
class Fault:
    """One row: ``prepare(world, tmp) -> argv`` and what the error line must name."""

    name: str
    prepare: Callable[[dict, Path], list[str]]
    names: Callable[[dict, Path], list[str]]


# --------------------------------------------------------------------------- preparations


def _msd_copy(world: dict, tmp: Path) -> Path:
    """The first two BraTS cases as an MSD task (4D images, dataset.json)."""
    msd = tmp / "msd"
    (msd / "imagesTr").mkdir(parents=True)
    (msd / "labelsTr").mkdir()
    cases = sorted(p for p in world["data"].iterdir() if p.is_dir())[:2]
    training = []
    for case in cases:
        ref = nib.load(str(case / f"{case.name}_flair.nii.gz"))
        stack = np.stack([np.asarray(nib.load(str(case / f"{case.name}_{m}.nii.gz")).dataobj)
                          for m in ("flair", "t1ce", "t1", "t2")], -1)
        nib.save(nib.Nifti1Image(stack, ref.affine), str(msd / "imagesTr" / f"{case.name}.nii.gz"))
        shutil.copy(case / f"{case.name}_seg.nii.gz", msd / "labelsTr" / f"{case.name}.nii.gz")
        training.append({"image": f"./imagesTr/{case.name}.nii.gz", "label": f"./labelsTr/{case.name}.nii.gz"})
    meta = {"modality": {"0": "FLAIR", "1": "T1gd", "2": "T1w", "3": "T2w"},
            "labels": {"0": "background", "1": "core", "2": "edema", "4": "enhancing"}, "training": training}
    (msd / "dataset.json").write_text(json.dumps(meta))
    return msd


def predict_into_labels(world, tmp):
    msd = _msd_copy(world, tmp)
    return ["predict", "--model", str(world["run"]), "--input", str(msd), "--output", str(msd / "labelsTr")]


def predict_over_existing(world, tmp):
    out = tmp / "preds"
    out.mkdir()
    case = sorted(p.name for p in world["data"].iterdir() if p.is_dir())[0]
    (out / f"{case}.nii.gz").write_bytes(b"an earlier prediction")
    return ["predict", "--model", str(world["run"]), "--input", str(world["data"]), "--output", str(out)]


def predict_output_is_a_file(world, tmp):
    (tmp / "out.nii.gz").write_bytes(b"a file")
    return ["predict", "--model", str(world["run"]), "--input", str(world["data"]), "--output", str(tmp / "out.nii.gz")]


def export_out_is_a_file(world, tmp):
    (tmp / "export").write_bytes(b"a file")
    return ["export", str(world["run"]), "--format", "full", "--out", str(tmp / "export")]


def run_folder_in_use(world, tmp):
    """Another run holds the folder's lock (an OS lock, here taken by this process)."""
    run = tmp / "busy"
    run.mkdir()
    fd = os.open(run / "run.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.write(fd, json.dumps({"pid": 4242, "host": "elsewhere", "started": "now"}).encode())
    LOCKS.append(fd)
    return ["finetune", "--config", str(world["recipe"]), "--data", str(world["data"]), "--output", str(run)]


def resume_with_another_objective(world, tmp):
    pre = tmp / "pre"
    shutil.copytree(world["pre"], pre)
    return ["pretrain", *world["pretrain"], "objective.name=mae", "--data", str(world["data"]), "--output", str(pre),
            "--resume", "latest"]


def resume_with_another_decoder(world, tmp):
    pre = tmp / "pre"
    shutil.copytree(world["pre"], pre)
    return ["pretrain", *world["pretrain"], "objective.decoder_width=16", "--data", str(world["data"]),
            "--output", str(pre),
            "--resume", "latest"]


def resume_with_another_adapter(world, tmp):
    run = tmp / "run"
    shutil.copytree(world["run"], run)
    return ["finetune", "--config", str(world["recipe"]), "--data", str(world["data"]), "--output", str(run),
            "--resume", "latest", "--set", "adapter={method: lora}"]


def modalities_on_other_grids(world, tmp):
    data = tmp / "data"
    shutil.copytree(world["data"], data)
    case = sorted(p for p in data.iterdir() if p.is_dir())[1]
    img = nib.load(str(case / f"{case.name}_t2.nii.gz"))
    affine = img.affine.copy()
    affine[0, 3] += 5.0  # shifted by 5 mm
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj), affine), str(case / f"{case.name}_t2.nii.gz"))
    return ["pretrain", *world["pretrain"], "--data", str(data), "--output", str(tmp / "p")]


def msd_path_outside_the_dataset(world, tmp):
    msd = _msd_copy(world, tmp)
    outside = tmp / "outside.nii.gz"
    shutil.copy(msd / "imagesTr" / sorted(os.listdir(msd / "imagesTr"))[0], outside)
    meta = json.loads((msd / "dataset.json").read_text())
    meta["training"][0]["image"] = "../outside.nii.gz"
    (msd / "dataset.json").write_text(json.dumps(meta))
    return ["pretrain", *world["pretrain"], "--data", str(msd), "--output", str(tmp / "p")]


def _finetune(world, tmp, *flags: str) -> list[str]:
    """The tiny finetuning command on the shared dataset into a fresh folder, plus ``flags``."""
    return ["finetune", "--config", str(world["recipe"]), "--data", str(world["data"]), "--output", str(tmp / "r"),
            *flags]


def boolean_step_count(world, tmp):
    return _finetune(world, tmp, "--set", "train.max_steps=true")


def nan_learning_rate(world, tmp):
    return _finetune(world, tmp, "--set", "train.optim.lr=.nan")


def two_dimensional_images(world, tmp):
    data = tmp / "data"
    shutil.copytree(world["data"], data)
    case = sorted(p for p in data.iterdir() if p.is_dir())[0]
    img = nib.load(str(case / f"{case.name}_t1.nii.gz"))
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj)[:, :, 0], img.affine), str(case / f"{case.name}_t1.nii.gz"))
    return ["pretrain", *world["pretrain"], "--data", str(data), "--output", str(tmp / "p")]


def output_below_a_file(world, tmp):
    (tmp / "plain_file").write_bytes(b"not a folder")
    return ["finetune", "--config", str(world["recipe"]), "--data", str(world["data"]),
            "--output", str(tmp / "plain_file" / "run")]


def pickle_that_runs_code(world, tmp):
    class Payload:
        def __reduce__(self):
            return (os.system, ("echo this must never run",))

    (tmp / "weights.pt").write_bytes(pickle.dumps({"model.cls_token": Payload()}))
    return _finetune(world, tmp, "--backbone", str(tmp / "weights.pt"))


def truncated_state(world, tmp):
    run = tmp / "run"
    shutil.copytree(world["run"], run)
    newest = run / "state" / "step_0000002" / "model.safetensors"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    return ["finetune", "--config", str(world["recipe"]), "--data", str(world["data"]), "--output", str(run),
            "--resume", "latest", "--set", "train.max_steps=3"]


def two_channel_images_for_a_four_channel_model(world, tmp):
    images = tmp / "imagesTs"
    images.mkdir()
    nib.save(nib.Nifti1Image(np.random.rand(32, 32, 16, 2).astype(np.float32), np.eye(4)), str(images / "p_01.nii.gz"))
    return ["predict", "--model", str(world["run"]), "--input", str(images), "--output", str(tmp / "o")]


def four_d_file_as_a_modality(world, tmp):
    data = tmp / "data"
    shutil.copytree(world["data"], data)
    case = sorted(p for p in data.iterdir() if p.is_dir())[0]
    flair = case / f"{case.name}_flair.nii.gz"
    img = nib.load(str(flair))
    nib.save(nib.Nifti1Image(np.stack([np.asarray(img.dataobj)] * 2, -1), img.affine), str(flair))
    return ["pretrain", *world["pretrain"], "--data", str(data), "--output", str(tmp / "p")]


def _rewrite_with_sform(path: Path, rows: list[list[float]]) -> None:
    """``path`` again with the sform ``rows`` as given (nibabel will not build such an affine)."""
    data = np.asarray(nib.load(str(path)).dataobj)
    header = nib.Nifti1Header()
    header.set_data_shape(data.shape)
    header.set_data_dtype(data.dtype)
    header["sform_code"], header["qform_code"] = 1, 0
    for name, row in zip(("srow_x", "srow_y", "srow_z"), rows):
        header[name] = row
    nib.save(nib.Nifti1Image(data, None, header=header), str(path))


def _broken_affine_case(world, tmp, rows) -> list[str]:
    data = tmp / "data"
    shutil.copytree(world["data"], data)
    case = sorted(p for p in data.iterdir() if p.is_dir())[1]
    for path in case.iterdir():
        _rewrite_with_sform(path, rows)
    return ["pretrain", *world["pretrain"], "--data", str(data), "--output", str(tmp / "p")]


def affine_not_invertible(world, tmp):
    return _broken_affine_case(world, tmp, [[1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 1, 0]])  # two axes along x


def zero_spacing(world, tmp):
    return _broken_affine_case(world, tmp, [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 0, 0]])


def nan_spacing(world, tmp):
    return _broken_affine_case(world, tmp, [[1, 0, 0, 0], [0, float("nan"), 0, 0], [0, 0, 1, 0]])


def label_on_another_grid(world, tmp):
    data = tmp / "data"
    shutil.copytree(world["data"], data)
    case = sorted(p for p in data.iterdir() if p.is_dir())[0]
    seg = case / f"{case.name}_seg.nii.gz"
    img = nib.load(str(seg))
    affine = img.affine.copy()
    affine[2, 3] += 0.01  # 0.01 mm: beyond the 1e-3 mm a label may differ from its image
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj), affine), str(seg))
    return ["finetune", "--config", str(world["recipe"]), "--data", str(data), "--output", str(tmp / "r")]


def split_naming_missing_cases(world, tmp):
    cases = sorted(p.name for p in world["data"].iterdir() if p.is_dir())
    split = tmp / "splits_final.json"
    split.write_text(json.dumps([{"train": [cases[0], "BraTS20_Training_404"], "val": ["BraTS20_Training_405"]}]))
    return _finetune(world, tmp, "--split", str(split), "--fold", "0")


def adapter_export_of_full_finetuning(world, tmp):
    run = world["make_run"](tmp / "full_run", "full")
    return ["export", str(run), "--format", "adapter", "--out", str(tmp / "export")]


def timm_export_of_a_monai_backbone(world, tmp):
    from medtune.models import BackboneConfig

    config = BackboneConfig(name="swinunetr", in_chans=4, img_size=32,
                            options={"feature_size": 12, "depths": [1, 1, 1, 1], "num_heads": [1, 1, 1, 1]})
    run = world["make_pretrain_run"](tmp / "swinunetr_run", config)
    return ["export", str(run), "--format", "timm", "--out", str(tmp / "export")]


def onnx_export_of_vqa(world, tmp):
    from medtune.checkpoints.runs import RunConfig, write_run_config
    from medtune.config import to_dict
    from medtune.finetune import get_task
    from medtune.finetune.vqa import build_vqa_model
    from medtune.finetune.weights import save_trained

    cfg = get_task("vqa").read_config(REPO / "configs" / "demo_vqa.yaml")
    run = tmp / "vqa_run"
    write_run_config(run, RunConfig("vqa", to_dict(cfg), {"answers": ["yes", "no", "1"]}))
    save_trained(build_vqa_model(cfg, 3), run, run, "vqa")
    return ["export", str(run), "--format", "onnx", "--out", str(tmp / "export")]


def backbone_missing_from_the_hub_cache(world, tmp):
    return _finetune(world, tmp, "--backbone", "hf-hub:medtune-test/not-in-any-cache")


def unknown_loss_term(world, tmp):
    return _finetune(world, tmp, "--set", "loss={dice_ce: 1.0, focal: 0.5}")


def negative_loss_weight(world, tmp):
    return _finetune(world, tmp, "--set", "loss.pne=-0.1")


def _segment3d(world, tmp, model: dict, crop: list[int], loss: dict) -> list[str]:
    import yaml

    recipe = {"task": "segment3d", "data": {"mode": "3d", "crop_size": crop, "num_workers": 0}, "model": model,
              "loss": loss, "train": {"max_steps": 1, "batch_size": 1}}
    (tmp / "segment3d.yaml").write_text(yaml.safe_dump(recipe))
    return ["finetune", "--config", str(tmp / "segment3d.yaml"), "--data", str(world["data"]), "--output", str(tmp / "r")]


def loss_the_network_cannot_feed(world, tmp):
    model = {"network": "transbtsv2", "options": {"base_channels": 2, "embed_dim": 8, "num_heads": 2}}
    return _segment3d(world, tmp, model, [16, 16, 16], {"dice_ce": 1.0, "cga_sam": 20.0})


def crop_too_small_for_the_network(world, tmp):
    return _segment3d(world, tmp, {"network": "swinunetr"}, [32, 32, 16], {"dice_ce": 1.0})


def damaged_compressed_cache(world, tmp):
    from medtune.data.chunked import ChunkedArray
    from medtune.data.config import build_pretrain_data
    from medtune.pretrain.config import load_pretrain_config

    settings = [*world["pretrain"][3:], "data.cache_format=compressed", f"data.cache_dir={tmp / 'cache'}"]
    config = load_pretrain_config(world["pretrain"][1], [*settings, f"data.root={world['data']}"])
    build_pretrain_data(config.data, show_progress=False)  # the compressed cache the command will read
    for path in (tmp / "cache").glob("*/image.zst"):
        chunks, data = ChunkedArray(path), bytearray(path.read_bytes())
        for start, stop in zip(chunks._offsets, chunks._offsets[1:]):
            data[chunks._base + (start + stop) // 2] ^= 0xFF  # same size: only the checksums tell
        path.write_bytes(bytes(data))
    return ["pretrain", *world["pretrain"][:3], *settings, "--data", str(world["data"]), "--output", str(tmp / "p")]


LOCKS: list[int] = []

FAULTS = [
    Fault("predict into the dataset's label folder", predict_into_labels, lambda w, t: ["labelsTr", "ground-truth"]),
    Fault("predict over an existing prediction", predict_over_existing, lambda w, t: ["already exists", "--overwrite"]),
    Fault("predict --output names a file", predict_output_is_a_file, lambda w, t: ["out.nii.gz", "is a file"]),
    Fault("export --out names a file", export_out_is_a_file, lambda w, t: ["export", "is a file"]),
    Fault("a run folder in use by another run", run_folder_in_use, lambda w, t: ["busy", "pid 4242 on elsewhere"]),
    Fault("resume with another objective", resume_with_another_objective, lambda w, t: ["objective", "'mae'"]),
    Fault("resume with another decoder", resume_with_another_decoder, lambda w, t: ["objective.decoder_width", "32 -> 16"]),
    Fault("resume with another adapter", resume_with_another_adapter, lambda w, t: ["adapter.method", "lora"]),
    Fault("modalities on other voxel grids", modalities_on_other_grids, lambda w, t: ["_t2.nii.gz", "affine"]),
    Fault("dataset.json names a file outside", msd_path_outside_the_dataset, lambda w, t: ["../outside.nii.gz", "outside"]),
    Fault("a boolean step count", boolean_step_count, lambda w, t: ["train.max_steps", "boolean"]),
    Fault("a NaN learning rate", nan_learning_rate, lambda w, t: ["train.optim.lr", "finite"]),
    Fault("2D NIfTI images", two_dimensional_images, lambda w, t: ["_t1.nii.gz", "not a 3D volume"]),
    Fault("an output below a file", output_below_a_file, lambda w, t: ["plain_file"]),
    Fault("a pickle that would run code", pickle_that_runs_code, lambda w, t: ["weights.pt", "not a plain weights file"]),
    Fault("a truncated saved state", truncated_state, lambda w, t: ["step_0000002", "latest-valid"]),
    Fault("2-channel images for a 4-channel model", two_channel_images_for_a_four_channel_model,
          lambda w, t: ["p_01", "2 channel", "trained on 4 (flair, t1ce, t1, t2)"]),
    Fault("a 4D file as one modality", four_d_file_as_a_modality, lambda w, t: ["_flair.nii.gz", "4D image with 2 channels"]),
    Fault("an affine that is not invertible", affine_not_invertible,
          lambda w, t: ["case BraTS20_Training_002", "not invertible"]),
    Fault("a zero voxel spacing", zero_spacing, lambda w, t: ["case BraTS20_Training_002", "zero"]),
    Fault("a NaN voxel spacing", nan_spacing, lambda w, t: ["case BraTS20_Training_002", "NaN"]),
    Fault("a label on another grid than its image", label_on_another_grid,
          lambda w, t: ["_seg.nii.gz", "affine"]),
    Fault("a split file naming cases that do not exist", split_naming_missing_cases,
          lambda w, t: ["splits_final.json", "BraTS20_Training_404, BraTS20_Training_405"]),
    Fault("export full finetuning as an adapter", adapter_export_of_full_finetuning,
          lambda w, t: ["full_run", "'adapter'", "exports as: full, timm, hub, onnx"]),
    Fault("export a MONAI backbone as timm", timm_export_of_a_monai_backbone,
          lambda w, t: ["swinunetr_run", "MONAI's, not timm's", "exports as: monai, hub"]),
    Fault("export a VQA run as ONNX", onnx_export_of_vqa,
          lambda w, t: ["vqa_run", "'onnx' is not an export format of a vqa run", "exports as: full, timm, hub"]),
    Fault("a hf-hub backbone missing from the cache", backbone_missing_from_the_hub_cache,
          lambda w, t: ["hf-hub:medtune-test/not-in-any-cache", "not in the local Hugging Face cache", "--allow-download"]),
    Fault("an unknown loss term", unknown_loss_term, lambda w, t: ["unknown loss 'focal'", "dice_ce"]),
    Fault("a negative loss weight", negative_loss_weight, lambda w, t: ["loss.pne", ">= 0", "-0.1"]),
    Fault("a loss term the network cannot feed", loss_the_network_cannot_feed,
          lambda w, t: ["segment3d.yaml", "cga_sam", "sam_logits"]),
    Fault("a crop too small for the network", crop_too_small_for_the_network,
          lambda w, t: ["swinunetr", "[32, 32, 16]", "at least 64"]),
    Fault("a damaged chunk of the compressed cache", damaged_compressed_cache,
          lambda w, t: [str(t / "cache"), "image.zst: chunk", "is damaged", "delete the file to rebuild"]),
]


@pytest.mark.parametrize("fault", FAULTS, ids=[f.name for f in FAULTS])
def test_bad_input_gives_one_line_exit_2_and_changes_nothing(fault, world, tmp_path, capsys):
    argv = fault.prepare(world, tmp_path)
    before = {"world": snapshot(world["root"]), "tmp": snapshot(tmp_path)}
    capsys.readouterr()
    try:
        code = main(argv)
    finally:
        while LOCKS:
            os.close(LOCKS.pop())
    err = capsys.readouterr().err
    errors = [line for line in err.replace("\r", "\n").splitlines() if line.startswith("medtune: error:")]
    assert code == 2, err[-3000:]
    assert len(errors) == 1 and "Traceback" not in err, err[-3000:]
    for expected in fault.names(world, tmp_path):
        assert expected in errors[0], (expected, errors[0])
    assert not same(before["world"], snapshot(world["root"]))
    assert not same(before["tmp"], snapshot(tmp_path))


# --------------------------------------------------------------------------- what those refusals allow


def test_latest_valid_resumes_from_the_newest_whole_state(world, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(world["run"], run)
    newest = run / "state" / "step_0000002" / "model.safetensors"
    newest.write_bytes(newest.read_bytes()[:100])
    argv = ["finetune", "--config", str(world["recipe"]), "--data", str(world["data"]), "--output", str(run),
            "--resume", "latest-valid", "--set", "train.max_steps=3", "train.eval_every=0"]
    assert main(argv) == 0
    assert json.loads((run / "state" / "step_0000003" / "trainer_state.json").read_text())["step"] == 3


def test_a_torn_metrics_line_is_dropped_at_resume(world, tmp_path, caplog):
    run = tmp_path / "run"
    shutil.copytree(world["run"], run)
    with open(run / "metrics.jsonl", "a") as handle:
        handle.write('{"step": 3, "loss": 0.')  # the kill came mid-write
    argv = ["finetune", "--config", str(world["recipe"]), "--data", str(world["data"]), "--output", str(run),
            "--resume", "latest", "--set", "train.max_steps=3", "train.eval_every=0"]
    assert main(argv) == 0
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3]
    assert "written in part" in caplog.text


def test_resume_may_change_steps_and_writes_the_config_once_the_state_has_loaded(world, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(world["run"], run)
    argv = ["finetune", "--config", str(world["recipe"]), "--data", str(world["data"]), "--output", str(run),
            "--resume", "latest", "--set", "train.max_steps=3", "train.optim.lr=5e-4", "train.eval_every=0"]
    assert main(argv) == 0
    config = json.loads((run / "config.json").read_text())
    assert config["train"]["max_steps"] == 3 and config["train"]["optim"]["lr"] == 5e-4


def test_overwrite_writes_over_predictions_when_asked(world, tmp_path):
    argv = ["predict", "--model", str(world["run"]), "--input", str(world["data"]), "--output", str(tmp_path / "p")]
    assert main(argv) == 0
    assert main(argv) == 2
    assert main(argv + ["--overwrite"]) == 0


def test_a_stale_lock_of_a_dead_run_is_taken_over(world, tmp_path):
    """A lock file left by a run that died (its OS lock went with it) does not block."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.lock").write_text(json.dumps({"pid": 999999, "host": "this", "started": "long ago"}))
    argv = ["finetune", "--config", str(world["recipe"]), "--data", str(world["data"]), "--output", str(run),
            "--set", "train.max_steps=1", "data.val_fraction=0"]
    assert main(argv) == 0
    holder = json.loads((run / "run.lock").read_text())
    assert holder["pid"] == os.getpid()
