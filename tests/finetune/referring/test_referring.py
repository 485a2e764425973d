"""Referring segmentation: metrics, CLIP features, and a tiny model that learns from text."""

from __future__ import annotations

import collections
import json
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from medtune.checkpoints.io import save_safetensors
from medtune.errors import CheckpointError, ConfigError
from medtune.finetune.referring.metrics import ReferringMetrics, referring_metrics
from medtune.models.clip import (
    TINY_CLIP,
    build_clip,
    encode_image_levels,
    encode_text_words,
    vit_level_indices,
)


def box(size: int, top: int, left: int, height: int, width: int) -> torch.Tensor:
    mask = torch.zeros(size, size, dtype=torch.bool)
    mask[top : top + height, left : left + width] = True
    return mask


def test_metrics_hand_worked_oiou_differs_from_miou():
    # sample 1: 2 x 2 prediction, 2 x 2 truth shifted by one column: I = 2, U = 6, IoU = 1/3
    # sample 2: identical 2 x 4 boxes: I = U = 8, IoU = 1
    pred = torch.stack([box(6, 0, 0, 2, 2), box(6, 3, 0, 2, 4)])
    target = torch.stack([box(6, 0, 1, 2, 2), box(6, 3, 0, 2, 4)])
    metrics = referring_metrics(pred, target)
    assert metrics["oIoU"] == pytest.approx(10 / 14)
    assert metrics["mIoU"] == pytest.approx((1 / 3 + 1) / 2)
    assert metrics["prec@0.5"] == pytest.approx(0.5) and metrics["prec@0.9"] == pytest.approx(0.5)
    # accumulated over batches == one call; an empty/empty pair has IoU 1 and leaves oIoU unchanged
    acc = ReferringMetrics()
    acc.update(pred[:1], target[:1])
    acc.update(pred[1:], target[1:])
    acc.update(torch.zeros(1, 6, 6, dtype=torch.bool), torch.zeros(1, 6, 6, dtype=torch.bool))
    combined = acc.compute()
    assert combined["oIoU"] == pytest.approx(10 / 14)
    assert combined["mIoU"] == pytest.approx((1 / 3 + 1 + 1) / 3)
    assert combined["num_samples"] == 3
    # a prediction for the wrong object scores 0
    assert referring_metrics(box(6, 0, 0, 2, 2)[None], box(6, 4, 4, 2, 2)[None])["oIoU"] == 0.0


def test_clip_features_match_open_clip_and_weights_load_from_local_file(tmp_path):
    torch.manual_seed(0)
    model, tokenizer = build_clip(tiny_config=TINY_CLIP)
    model.eval()
    tokens = tokenizer(["the red circle", "a blue square on the right"])
    text = encode_text_words(model, tokens)
    assert text.words.shape == (2, 32, 64) and text.sentence.shape == (2, 64)
    assert torch.allclose(text.sentence, model.encode_text(tokens), atol=1e-5)
    images = torch.randn(2, 3, 32, 32)
    levels = encode_image_levels(model, images, num_levels=2)
    reference = model.visual.forward_intermediates(images, indices=[0, 1], intermediates_only=True)
    assert [tuple(l.shape) for l in levels.levels] == [(2, 64, 8, 8)] * 2
    for ours, theirs in zip(levels.levels, reference["image_intermediates"]):
        assert torch.allclose(ours, theirs, atol=1e-5)
    assert levels.patch_embeds.shape == (2, 64, 64)
    assert vit_level_indices(12) == [3, 7, 11] and vit_level_indices(2, 3) == [0, 0, 1]
    # weights only from a local file; a download tag is not a file
    path = save_safetensors(model.state_dict(), tmp_path / "clip.safetensors")
    torch.manual_seed(1)
    loaded, _ = build_clip(tiny_config=TINY_CLIP, weights=path)
    assert torch.equal(loaded.visual.conv1.weight, model.visual.conv1.weight)
    # OpenAI ships CLIP as a TorchScript archive: its tensors are read, its code never run
    torch.jit.save(torch.jit.script(model), str(tmp_path / "openai_style.pt"))
    before = set(Path(tempfile.gettempdir()).glob("medtune_clip_*"))
    from_script, _ = build_clip(tiny_config=TINY_CLIP, weights=tmp_path / "openai_style.pt")
    assert all(torch.equal(a, b) for a, b in zip(from_script.state_dict().values(), model.state_dict().values()))
    assert set(Path(tempfile.gettempdir()).glob("medtune_clip_*")) == before  # temporary copy removed
    with pytest.raises(CheckpointError, match="never downloaded"):
        build_clip("ViT-B-16", weights="openai")
    with pytest.raises(ConfigError):
        build_clip("no-such-clip")


def test_tiny_model_learns_from_text_and_beats_text_blind_union(tmp_path):
    """The CLI on a generated shapes set: loss falls, oIoU beats 'union of all shapes'."""
    from medtune.cli import main

    data, run = tmp_path / "data", tmp_path / "run"
    assert main(["data", "synth", "--kind", "referring", "--out", str(data), "--images", "150"]) == 0
    argv = ["finetune", "--config", "configs/demo_referring.yaml", "--data", str(data), "--output", str(run),
            "--set", "train.max_steps=120", "train.eval_every=0", "train.log_every=20"]
    assert main(argv) == 0
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(line)]
    assert len(losses) == 6 and losses[-1] < 0.6 * losses[0]
    scores = json.loads((run / "summary.json").read_text())["final"]

    # Text-blind baseline: for every expression, predict the union of all shapes in its image.
    lines = [json.loads(line) for line in (data / "referring.jsonl").read_text().splitlines()]
    val = [line for line in lines if line["split"] == "val"]
    masks = {line["mask"]: np.asarray(Image.open(data / line["mask"])) > 0 for line in val}
    by_image = collections.defaultdict(list)
    for line in val:
        by_image[line["image"]].append(masks[line["mask"]])
    union = torch.from_numpy(np.stack([np.any(by_image[line["image"]], axis=0) for line in val]))
    truth = torch.from_numpy(np.stack([masks[line["mask"]] for line in val]))
    blind = referring_metrics(union, truth)
    assert scores["num_samples"] == len(val)
    assert scores["oIoU"] > blind["oIoU"] + 0.05, (scores, blind)
    assert scores["mIoU"] > blind["mIoU"] + 0.05, (scores, blind)

    # the run folder predicts masks at the input image's size
    out = tmp_path / "mask.png"
    assert main(["predict", "--model", str(run), "--input", str(data / val[0]["image"]),
                 "--expression", val[0]["expression"], "--output", str(out)]) == 0
    predicted = np.asarray(Image.open(out))
    assert predicted.shape == (32, 32) and set(np.unique(predicted)) <= {0, 255}
    # every expression of a .jsonl: masks and the summary of their scores
    assert main(["predict", "--model", str(run), "--input", str(data / "referring.jsonl"),
                 "--output", str(tmp_path / "all")]) == 0
    summary = json.loads((tmp_path / "all" / "summary.json").read_text())
    assert summary["expressions"] == len(lines) and 0 < summary["metrics"]["oIoU"] <= 1
    # flags of other tasks are not flags of this one
    with pytest.raises(SystemExit):
        main(argv + ["--text-weights", "x.pt"])


def test_letterbox_and_scoring_at_original_size(tmp_path, tiny_clip_config):
    """Letterboxed inputs keep the aspect ratio; scores are taken on each image's own grid."""
    from medtune.data.referring import ReferringDataset, load_referring_records
    from medtune.finetune.referring import CMMaskSDConfig, ReferringModelConfig, build_referring_model
    from medtune.finetune.referring.evaluate import evaluate_referring
    from medtune.finetune.referring.model import BranchOutput

    Image.new("RGB", (40, 20), (200, 10, 10)).save(tmp_path / "img.png")  # width 40, height 20
    top_rows = np.zeros((20, 40), np.uint8)
    top_rows[:5] = 255  # the top quarter of the image
    Image.fromarray(top_rows).save(tmp_path / "mask.png")
    (tmp_path / "r.jsonl").write_text(json.dumps({"image": "img.png", "expression": "top", "mask": "mask.png"}) + "\n")
    records = load_referring_records(tmp_path / "r.jsonl")

    results = {}
    for letterbox in (False, True):
        cfg = ReferringModelConfig(tiny_clip=tiny_clip_config, image_size=16, context_length=8, fusion_dim=16,
                                   decoder_layers=1, decoder_heads=2, decoder_ffn_dim=16, letterbox=letterbox,
                                   cmmasksd=CMMaskSDConfig())
        model = build_referring_model(cfg)
        dataset = ReferringDataset(records, model.tokenizer, 16, letterbox=letterbox)
        sample = dataset[0]
        if letterbox:  # 40 x 20 -> 16 x 8 centred: rows 4..11 hold the image
            assert sample["mask"][:4].sum() == 0 and sample["mask"][12:].sum() == 0
            assert sample["mask"][4:6].sum() == 2 * 16  # the top quarter, squeezed to 2 rows
            assert sample["image"][:, :4].abs().max() < 0.02  # padding is CLIP's mean colour = 0
        else:
            assert sample["mask"][:4].sum() == 4 * 16 and sample["mask"][4:].sum() == 0
        # logits at 1/4 of the input: only the first row (input rows 0..3) is foreground
        logits = torch.full((1, 1, 4, 4), -10.0)
        logits[..., 0, :] = 10.0
        model.forward_branch = lambda images, tokens, **_: BranchOutput(logits.expand(images.shape[0], -1, -1, -1))
        results[letterbox] = evaluate_referring(model, dataset, original_size=True)
    # stretched: input rows 0..3 are the image's top quarter; letterboxed: they are padding
    assert results[False]["oIoU"] > 0.7
    assert results[True]["oIoU"] == 0.0


def test_cris_heads_by_hand():
    """Dynamic kernel projector: sample b is convolved with the 3x3 kernel + bias its own
    sentence produced; FPN fusion: the sentence gates the deepest level (a zero gate
    makes the result independent of the deepest map)."""
    import torch.nn.functional as F

    from medtune.finetune.referring.layers import DynamicKernelProjector, FPNFusion

    torch.manual_seed(0)
    projector = DynamicKernelProjector(dim=16, sentence_dim=12).eval()
    pixels, sentence = torch.randn(3, 16, 4, 4), torch.randn(3, 12)
    with torch.no_grad():
        logits = projector(pixels, sentence)
        features = projector.upsample(pixels)  # [3, 8, 16, 16]
        params = projector.text_to_kernel(sentence)
        for b in range(3):
            kernel = params[b, :-1].reshape(1, 8, 3, 3)
            expected = F.conv2d(features[b : b + 1], kernel, params[b, -1:], padding=1)
            assert torch.allclose(logits[b : b + 1], expected, atol=1e-5)
    assert logits.shape == (3, 1, 16, 16)

    fusion = FPNFusion([8, 8, 8], sentence_dim=12, dim=16).eval()
    levels = [torch.randn(2, 8, 8, 8), torch.randn(2, 8, 4, 4), torch.randn(2, 8, 2, 2)]
    with torch.no_grad():
        gated = fusion(levels, sentence[:2])
        assert gated.shape == (2, 16, 4, 4)  # gathered at the middle level's resolution
        other_deepest = [*levels[:2], torch.randn(2, 8, 2, 2)]
        assert not torch.allclose(fusion(other_deepest, sentence[:2]), gated, atol=1e-4)
        fusion.sentence_gate.weight.zero_()
        fusion.sentence_gate.bias.zero_()
        assert torch.allclose(fusion(levels, sentence[:2]), fusion(other_deepest, sentence[:2]), atol=1e-6)

