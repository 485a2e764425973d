"""The pretraining recipes against the official code, number for number (docs/fidelity.md).

The pinned values were computed once by running the official code (CPU, ``.cuda()``
removed from its source, float64 inputs) on the closed-form recipes below:

- FreMAE: ``FocalFrequencyLoss_2D_pooling(log_matrix=True, pass_band=10)`` of
  Rubics-Xuan/FreMIM ``tools/loss.py`` (commit 67c1c0c), called as its training script
  does: ``high = criterion(pred_high, target, pass_manner="high", stage_manner="low_level",
  ave_spectrum=False)``, ``low = criterion(pred_low, target, "low", "high_level", False)``,
  total ``1 * high + 1.3 * low`` (``compute_loss``).
- MFM: Jiahao000/MFM ``MFM.forward`` of ``models/mfm.py`` (``RECOVER_TARGET_TYPE: masked``)
  with its ``FrequencyLoss()`` defaults (``models/frequency_loss.py``: loss_gamma 1, no
  weight matrix), the network replaced by the fixed prediction, and the masks of
  ``FreqMaskGenerator(224, mask_radius1=16, mask_radius2=999)`` (``data/data_mfm.py``):
  sample 0 gets the low-pass input (its high band removed), sample 1 the high-pass one.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from medtune.config import from_dict, to_dict
from medtune.models import BackboneConfig, create_backbone
from medtune.pretrain import MFMConfig, band_mask, build_objective
from medtune.pretrain.config import load_pretrain_config
from medtune.pretrain.masking import pixel_masking
from tests import REPO

CONFIGS = REPO / "configs"
FREMAE_RECIPE = CONFIGS / "fremae_swinunetr2d_brats.yaml"

# FreMIM's FocalFrequencyLoss_2D_pooling on fremae_recipe() (float64)
OFFICIAL_FREMAE_HIGH = 0.0009275767611571583
OFFICIAL_FREMAE_LOW = 0.14509037842280292
OFFICIAL_FREMAE_TOTAL = 0.18954506871080096
# MFM's masked frequency loss on mfm_recipe() (float64)
OFFICIAL_MFM_LOSS = 0.004074100261820428


def fremae_recipe() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Target ``(2, 4, 128, 128)`` (zero outside a disc), high-band prediction ``(2, 4, 128, 128)``,
    low-band prediction ``(2, 4, 32, 32)``."""
    b = torch.arange(2, dtype=torch.float64).view(2, 1, 1, 1)
    m = torch.arange(4, dtype=torch.float64).view(1, 4, 1, 1)
    y = torch.arange(128, dtype=torch.float64).view(1, 1, 128, 1)
    x = torch.arange(128, dtype=torch.float64).view(1, 1, 1, 128)
    target = torch.sin(0.05 * (x + 1) * (m + 1) + 0.3 * b) * torch.cos(0.07 * y * (m + 2)) + 0.1 * m
    target = target * (((x - 64) ** 2 + (y - 64) ** 2) <= 50**2)
    pred_high = 0.8 * target + 0.05 * torch.sin(1.3 * x + 0.7 * y + m + b)
    ys, xs = y[..., :32, :], x[..., :32]
    pred_low = 0.5 * torch.cos(0.2 * xs * (m + 1)) * torch.sin(0.15 * ys + b) + 0.02 * m
    return target, pred_high, pred_low


def mfm_recipe() -> tuple[torch.Tensor, torch.Tensor]:
    """Target and prediction ``(2, 3, 224, 224)``."""
    b = torch.arange(2, dtype=torch.float64).view(2, 1, 1, 1)
    c = torch.arange(3, dtype=torch.float64).view(1, 3, 1, 1)
    y = torch.arange(224, dtype=torch.float64).view(1, 1, 224, 1)
    x = torch.arange(224, dtype=torch.float64).view(1, 1, 1, 224)
    target = 0.5 + 0.4 * torch.sin(0.03 * (x + 1) * (c + 1) + 0.5 * b) * torch.cos(0.045 * y * (c + 2))
    pred = 0.9 * target + 0.1 * torch.cos(0.9 * x - 0.4 * y + c + 2 * b)
    return target, pred


def tiny_recipe_objective(tiny_options: dict, recipe: Path = FREMAE_RECIPE, **backbone_changes):
    """The recipe's objective around its backbone with widths and depths cut down to
    ``tiny_options`` (the ``tiny_swinunetr_options`` fixture)."""
    cfg = load_pretrain_config(recipe)
    options = {**cfg.backbone.options, **tiny_options}
    options.pop("use_checkpoint", None)
    backbone = create_backbone(dataclasses.replace(cfg.backbone, options=options, **backbone_changes))
    return cfg, build_objective(cfg.objective, backbone)


def test_fremae_official_recipe_reproduces_the_official_loss(tiny_swinunetr_options):
    cfg, fremae = tiny_recipe_objective(tiny_swinunetr_options)
    objective = cfg.objective
    assert (objective.filter_kind, objective.radius, objective.low_pool) == ("square_official", 10, 4)
    assert (objective.high_weight, objective.low_weight, objective.focal_alpha, objective.loss) == (1.0, 1.3, 1.0, "frequency")
    target, pred_high, pred_low = fremae_recipe()
    total, high, low = fremae.forward_loss(target, pred_high, pred_low)  # spectra in float32
    assert float(high) == pytest.approx(OFFICIAL_FREMAE_HIGH, rel=1e-6)
    assert float(low) == pytest.approx(OFFICIAL_FREMAE_LOW, rel=1e-6)
    assert float(total) == pytest.approx(OFFICIAL_FREMAE_TOTAL, rel=1e-6)
    # the official band is the 2r-bin slice: 20 x 20 low bins of the 32 x 32 pooled spectrum
    assert int(band_mask((32, 32), objective.radius, objective.filter_kind, "low").sum()) == 400


def test_fremae_official_recipe_masks_as_the_official_code(tiny_swinunetr_options):
    """Token starting at 1, the masked set drawn over the batch, jitter drawn per
    (slice, modality, column); medtune's own choices stay one key away."""
    cfg, fremae = tiny_recipe_objective(tiny_swinunetr_options)
    assert (cfg.objective.mask_scope, cfg.objective.jitter_shape, cfg.objective.mask_token_init) == ("batch", "column", 1.0)
    assert torch.equal(fremae.mask_token.detach(), torch.ones(4))

    target = fremae_recipe()[0].float()
    foreground = (target != 0).all(1)
    torch.manual_seed(0)
    masked = fremae.mask_input({"image": target})
    assert int(masked.mask.sum()) == int(0.25 * int(foreground.sum()))  # floor over the whole batch
    assert not (masked.mask & ~foreground).any()

    # an all-ones image with token 1: the masked input is scale + shift, one draw per column
    ones = torch.ones(3, 4, 16, 16)
    torch.manual_seed(0)
    jittered = fremae.mask_input({"image": ones}).image
    assert torch.allclose(jittered, jittered[:, :, :1].expand_as(jittered))  # constant along H
    assert jittered[0, 0, 0].unique().numel() == 16  # a draw per column
    per_sample, _ = pixel_masking(ones, ones[:, 0] > 0, 0.25, torch.ones(4), jitter=0.1)
    assert torch.allclose(per_sample, per_sample[:, :, :1, :1].expand_as(per_sample))  # medtune: per (sample, modality)
    assert from_dict(type(cfg.objective), {**to_dict(cfg.objective), "mask_token_init": 0.0}).mask_token_init == 0.0


def test_fremae_official_network_has_the_official_parameter_count():
    """encoder + UNETR blocks + frequency heads + mask token = 26,999,750 at 128 px, fs 48."""
    cfg = load_pretrain_config(FREMAE_RECIPE)
    fremae = build_objective(cfg.objective, create_backbone(cfg.backbone))

    def count(module: torch.nn.Module) -> int:
        return sum(p.numel() for p in module.parameters())

    blocks = fremae.transferable_decoder()
    assert count(fremae) == 26_999_750
    assert count(fremae.backbone) == 6_307_386  # swinViT
    assert count(blocks) == 18_330_240  # encoder1-4, encoder10, decoder5, decoder4
    assert count(fremae.decoder) - count(blocks) == 2_362_120  # the official frequency_decoder_fancy
    assert fremae.mask_token.numel() == 4
    assert sorted(name for name, _ in blocks.named_children()) == sorted(
        ["encoder1", "encoder2", "encoder3", "encoder4", "encoder10", "decoder5", "decoder4"]
    )


def test_unetr_segmenter_equals_monai_swinunetr(tiny_swinunetr_options):
    """Backbone ``swinunetr`` + decoder ``unetr`` is MONAI's SwinUNETR, tensor name for tensor name."""
    from monai.networks.nets import SwinUNETR

    from medtune.models.decoders import create_decoder

    torch.manual_seed(0)
    monai_net = SwinUNETR(in_channels=4, out_channels=3, spatial_dims=2, **tiny_swinunetr_options).eval()
    backbone = create_backbone(BackboneConfig("swinunetr", 4, 64, 2, options=dict(tiny_swinunetr_options)))
    decoder = create_decoder("unetr", backbone.feature_channels, backbone.feature_strides, 3, 2, image_channels=4)
    ours = torch.nn.ModuleDict({"backbone": backbone, "decoder": decoder}).eval()
    mapped = {
        (f"backbone.model.{k[len('swinViT.'):]}" if k.startswith("swinViT.") else f"decoder.{k}"): v
        for k, v in monai_net.state_dict().items()
    }
    assert set(mapped) == set(ours.state_dict())
    ours.load_state_dict(mapped)
    x = torch.randn(2, 4, 64, 64)
    with torch.no_grad():
        assert torch.allclose(decoder(backbone.forward_stages(x), x.shape[2:], x), monai_net(x), atol=1e-5)


@pytest.mark.parametrize("recipe, size", [("fremae_swinunetr2d_brats.yaml", 64), ("fremae_swinunetr3d_brats.yaml", 64)])
def test_segmenter_loads_every_non_head_tensor_of_the_pretrained_network(
    tiny_swinunetr_options, recipe, size, tmp_path
):
    from medtune.checkpoints.io import load_weights
    from medtune.checkpoints.runs import DECODER_FILE, PRETRAIN_FILE, PRETRAIN_TASK, RunConfig, write_run_config
    from medtune.finetune.segmentation.config import SegmentationConfig
    from medtune.finetune.segmentation.model import build_segmenter
    from medtune.models.weights import pretrained_section
    from medtune.pretrain.cli import save_outputs

    spatial = 3 if "3d" in recipe else 2
    data = {"img_size": size} if spatial == 2 else {"crop_size": [size] * 3}
    overrides = [f"backbone.img_size={size}", "figure=false", "backbone.options.use_checkpoint=false"]
    overrides += [f"data.{k}={v}" for k, v in data.items()] + [f"backbone.options.{k}={v}" for k, v in tiny_swinunetr_options.items()]
    cfg = load_pretrain_config(CONFIGS / recipe, overrides)
    torch.manual_seed(0)
    fremae = build_objective(cfg.objective, create_backbone(cfg.backbone))
    with torch.no_grad():  # values no fresh initialisation can have
        for param in fremae.parameters():
            param.add_(torch.rand_like(param) + 0.5)
    run = tmp_path / "pretrain"
    write_run_config(run, RunConfig(PRETRAIN_TASK, to_dict(cfg)))
    written = save_outputs(fremae, None, cfg, run)
    assert written["decoder"] == run / DECODER_FILE

    torch.manual_seed(1)
    seg_cfg = from_dict(SegmentationConfig, {
        "data": {"mode": "3d", "crop_size": [size, size, 2 if spatial == 2 else size]},
        "backbone": pretrained_section(run), "adapter": {"method": "full"}, "model": {"decoder": "unetr"},
    })
    segmenter = build_segmenter(seg_cfg, num_classes=4)
    own = segmenter.state_dict()
    heads = ("mask_token", "decoder.top_down.", "decoder.bottom_up.", "decoder.low_project.",
             "decoder.high_filter.", "decoder.low_filter.", "decoder.high_head.", "decoder.low_head.")
    loaded = 0
    for name, tensor in load_weights(run / PRETRAIN_FILE).items():
        if name.startswith(heads):
            continue  # the frequency heads and the mask token are pretraining-only
        target = f"decoder.{name[len('decoder.blocks.'):]}" if name.startswith("decoder.blocks.") else name
        assert name.startswith(("backbone.", "decoder.blocks.")), name
        assert torch.equal(own[target], tensor), name
        loaded += 1
    assert loaded == len(fremae.backbone.state_dict()) + len(fremae.transferable_decoder().state_dict())
    new = {name.split(".")[1] for name in own if name.startswith("decoder.") and f"decoder.blocks.{name[8:]}" not in
           {f"decoder.blocks.{k}" for k in fremae.transferable_decoder().state_dict()}}
    assert new == {"decoder3", "decoder2", "decoder1", "out"}
    assert all(p.requires_grad for p in segmenter.parameters())  # the whole network finetunes
    volume = torch.randn(1, 4, size, size, 2 if spatial == 2 else size)
    with torch.no_grad():
        assert segmenter.forward_logits(volume).shape == (1, 4, *volume.shape[2:])


def test_mfm_reproduces_the_official_loss():
    mfm_cfg = MFMConfig()
    assert (mfm_cfg.loss_gamma, mfm_cfg.focal_weight, mfm_cfg.filter_kind, mfm_cfg.radius) == (1.0, False, "circle", None)
    backbone = create_backbone(BackboneConfig("vit_tiny_patch16_224", 3, 224, 2, options={"depth": 4, "embed_dim": 48, "num_heads": 1}))
    mfm = build_objective(dataclasses.replace(mfm_cfg, band="low"), backbone)
    target, pred = mfm_recipe()
    low = mfm.removed_bins(target.float())[0]  # radius None: 16 bins at 224 px
    assert torch.equal(low, band_mask((224, 224), 16, "circle", "low"))
    assert int(low.sum()) == 793  # dx^2 + dy^2 < 16^2 (strict), centre 112
    removed = torch.stack([~low, low])  # sample 0: high band removed; sample 1: low band removed
    loss = mfm.forward_loss(target, pred, removed)
    assert float(loss) == pytest.approx(OFFICIAL_MFM_LOSS, rel=1e-6)
