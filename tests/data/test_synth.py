"""``medtune data synth --kind``: every kind through the CLI, with the same on-disk guarantees."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from medtune.cli import main
from medtune.data.synth import (
    SYNTH_KINDS,
    synthesize_brats,
    synthesize_ct,
    synthesize_referring,
    synthesize_vqa,
    write_synthetic,
)
from medtune.errors import ConfigError

from tests import REPO


# kind -> (tiny CLI settings, the same set made by calling its generator, the file to tamper with)
KINDS = {
    "brats": (
        ["--cases", "2", "--shape", "16", "16", "8"],
        lambda out: synthesize_brats(out, cases=2, shape=(16, 16, 8), seed=5),
        "BraTS20_Training_001/BraTS20_Training_001_seg.nii.gz",
    ),
    "ct": (
        ["--cases", "2", "--shape", "16", "16", "8", "--test-cases", "1"],
        lambda out: synthesize_ct(out, cases=2, shape=(16, 16, 8), seed=5, test_cases=1),
        "labelsTr/ct_001.nii.gz",
    ),
    "shapes": (
        ["--images", "3", "--image-size", "24"],
        lambda out: synthesize_referring(out, num_images=3, image_size=24, seed=5),
        "referring.jsonl",
    ),
    "referring": (
        ["--images", "3", "--image-size", "24"],
        lambda out: synthesize_referring(out, num_images=3, image_size=24, seed=5),
        "masks/img_00001_0.png",
    ),
    "vqa": (
        ["--images", "4", "--image-size", "16"],
        lambda out: synthesize_vqa(out, images=4, img_size=16, seed=5),
        "trainset.json",
    ),
}


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _expected_names(kind: str, root: Path) -> set[str]:
    """The files a kind's own index names (plus the index), to check nothing more or less is written."""
    if kind == "brats":
        return {f"BraTS20_Training_00{i}/BraTS20_Training_00{i}_{m}.nii.gz"
                for i in (1, 2) for m in ("flair", "t1", "t1ce", "t2", "seg")}
    if kind == "ct":
        meta = json.loads((root / "dataset.json").read_text())
        listed = [e[k] for e in meta["training"] for k in ("image", "label")] + meta["test"]
        return {"dataset.json"} | {name.removeprefix("./") for name in listed}
    if kind in ("shapes", "referring"):
        lines = [json.loads(line) for line in (root / "referring.jsonl").read_text().splitlines()]
        return {"referring.jsonl"} | {line["image"] for line in lines} | {line["mask"] for line in lines}
    records = [r for name in ("trainset.json", "testset.json") for r in json.loads((root / name).read_text())]
    return {"trainset.json", "testset.json"} | {f"images/{r['image_name']}" for r in records}


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_synth_kind_writes_once_and_refuses_other_content(kind, tmp_path, capsys):
    flags, generate, tampered = KINDS[kind]
    out = tmp_path / "out"
    argv = ["data", "synth", "--kind", kind, "--out", str(out), "--seed", "5", *flags]
    assert main(argv) == 0
    files = _files(out)
    assert f"wrote {len(files)} files" in capsys.readouterr().out
    assert set(files) == _expected_names(kind, out)
    generate(tmp_path / "direct")
    assert files == _files(tmp_path / "direct")  # the CLI's settings reach the generator unchanged

    stamps = {name: (out / name).stat().st_mtime_ns for name in files}
    assert main(argv) == 0  # the same command again: nothing rewritten
    assert "wrote 0 files" in capsys.readouterr().out
    assert {name: (out / name).stat().st_mtime_ns for name in files} == stamps

    (out / tampered).write_bytes(b"other content")
    missing = next(name for name in sorted(files) if name != tampered)
    (out / missing).unlink()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already exists with other content" in err[0] and str(out / tampered) in err[0]
    assert (out / tampered).read_bytes() == b"other content"
    assert not (out / missing).exists()  # refused before anything was written
    assert sorted(p.name for p in tmp_path.iterdir()) == ["direct", "out"]  # no temporary folder left


def test_shapes_and_referring_are_one_set(tmp_path):
    assert write_synthetic("shapes", tmp_path / "a", seed=2, images=2, image_size=24)
    assert write_synthetic("referring", tmp_path / "b", seed=2, images=2, image_size=24)
    assert _files(tmp_path / "a") == _files(tmp_path / "b")


def test_synth_defaults_are_what_the_demo_configs_are_made_for():
    """The demo writes its sets with the defaults; the demo recipes' image sizes fit them."""
    referring = yaml.safe_load((REPO / "configs/demo_referring.yaml").read_text())["model"]
    vqa = yaml.safe_load((REPO / "configs/demo_vqa.yaml").read_text())
    assert SYNTH_KINDS.get("shapes").settings({}) == {"images": 150, "image_size": 32}
    assert SYNTH_KINDS.get("referring").settings({}) == {"images": 150, "image_size": 32}
    assert referring["image_size"] == 32
    assert SYNTH_KINDS.get("vqa").settings({}) == {"images": 240, "image_size": 64}
    assert vqa["data"]["format"] == "vqa_rad" and vqa["backbone"]["in_chans"] == 1
    assert SYNTH_KINDS.get("brats").settings({"cases": 2}) == {"cases": 2, "shape": (64, 64, 48), "anatomy": 0}
    demo = (REPO / "scripts" / "demo.sh").read_text()
    assert "data synth --kind referring" in demo and "data synth --kind vqa" in demo


def test_synth_refuses_bad_settings(tmp_path, capsys):
    out = str(tmp_path / "out")
    assert main(["data", "synth", "--kind", "vqa", "--out", out, "--cases", "2"]) == 2  # a brats flag
    assert "synth vqa: --cases is not one of its options (--images, --image-size)" in capsys.readouterr().err
    assert main(["data", "synth", "--kind", "shapes", "--out", out, "--image-size", "16"]) == 2
    assert "synth shapes: --image-size must be >= 24, got 16" in capsys.readouterr().err
    assert main(["data", "synth", "--out", out, "--shape", "16", "4", "8"]) == 2
    assert "synth brats: --shape must be >= 8" in capsys.readouterr().err
    assert main(["data", "synth", "--out", out, "--anatomy", "3"]) == 2
    assert "synth brats: --anatomy must be <= 2, got 3" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    (tmp_path / "file").write_text("x")
    assert main(["data", "synth", "--kind", "vqa", "--out", str(tmp_path / "file"), "--images", "1"]) == 2
    assert "is a file" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="unknown synthetic dataset kind 'mnist'"):
        write_synthetic("mnist", tmp_path / "m")
    with pytest.raises(ConfigError, match="takes 3 integer"):
        write_synthetic("brats", tmp_path / "m", shape=(16, 16))


def test_brats_anatomy_2_moves_the_tumour_towards_healthy_tissue():
    """``anatomy`` 2: the same label; each case's tumour contrasts lie between the class's own
    and a healthy tissue's (fraction 0.4-0.9 of the way, per class and modality), so the
    tumour's intensities come closer to the parenchyma's and differ between cases."""
    import numpy as np

    from medtune.data.synth import synthesize_case
    from medtune.data.synth.anatomy import CSF_CONTRAST
    from medtune.data.synth.brats import _TISSUE_CONTRAST, subtle_tumour_contrast

    contrast = {k: np.asarray(v, dtype=np.float32) for k, v in {**_TISSUE_CONTRAST, "csf": CSF_CONTRAST}.items()}
    own = np.stack([contrast["edema"], contrast["necrosis"], contrast["enhancing"]])
    parenchyma = (contrast["grey"] + contrast["white"]) / 2
    healthy = np.stack([parenchyma, contrast["csf"], parenchyma])
    drawn = [subtle_tumour_contrast(np.random.default_rng(seed), contrast) for seed in range(2)]
    for tumour in drawn:
        moved = healthy != own  # (necrosis and CSF share t1ce's contrast: nothing to move there)
        fraction = (tumour - own)[moved] / (healthy - own)[moved]
        assert tumour.shape == (3, 4) and (0.4 <= fraction).all() and (fraction <= 0.9).all()
        assert np.array_equal(tumour[~moved], own[~moved])
    assert not np.allclose(drawn[0], drawn[1])  # case by case

    shape = (32, 32, 16)
    image1, label1 = synthesize_case(np.random.default_rng([0, 1]), shape, anatomy=1)
    image2, label2 = synthesize_case(np.random.default_rng([0, 1]), shape, anatomy=2)
    assert np.array_equal(label1, label2) and (image2[0] > 0).sum() == (image1[0] > 0).sum()

    def gap(image):  # edema's mean against the healthy brain's, per modality, over the brain's spread
        brain = (image[0] > 0) & (label1 == 0)
        return np.abs(image[:, label1 == 2].mean(1) - image[:, brain].mean(1)) / image[:, brain].std(1)

    assert gap(image2).mean() < 0.6 * gap(image1).mean()


def test_brats_anatomy_adds_structure_and_keeps_the_tumour():
    """``anatomy``: CSF, grey and white matter fractions (summing to 1, each the majority
    somewhere), a bias field around 1, partial-volume edges; the label is drawn as without it."""
    import numpy as np

    from medtune.data.synth import anatomy, synthesize_case
    from medtune.data.synth.brats import smooth_noise

    shape = (32, 32, 16)
    plain_image, plain_label = synthesize_case(np.random.default_rng([0, 1]), shape)
    image, label = synthesize_case(np.random.default_rng([0, 1]), shape, anatomy=True)
    assert np.array_equal(label, plain_label) and image.shape == plain_image.shape == (4, *shape)
    brain = plain_image[0] > 0
    assert np.array_equal(image[0] > 0, brain) and not np.allclose(image[:, brain], plain_image[:, brain])

    grid = [g.astype(np.float32) for g in np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")]
    centre, radii = [(n - 1) / 2 for n in shape], [0.42 * n for n in shape]
    radial = np.sqrt(sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radii)))
    fractions = anatomy.healthy_fractions(np.random.default_rng(0), grid, radial, centre, radii, smooth_noise)
    inside = radial < 1
    assert np.allclose(sum(fractions.values()), 1.0, atol=1e-5)
    for tissue in ("csf", "grey", "white"):
        assert (fractions[tissue][inside] > 0.5).mean() > 0.02, tissue
    bias = anatomy.bias_field(np.random.default_rng(0), grid, 4)
    assert bias.shape == (4, *shape) and 0.5 < bias.min() and bias.max() < 2.0 and abs(bias.mean() - 1) < 0.15
    edge = np.zeros((1, 8, 8, 8), dtype=np.float32)
    edge[:, 4:] = 1.0
    blurred = anatomy.partial_volume(edge)
    assert 0.0 < blurred[0, 3, 4, 4] < 0.5 < blurred[0, 4, 4, 4] < 1.0  # the edge voxels mix both sides
