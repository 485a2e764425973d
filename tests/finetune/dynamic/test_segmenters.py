"""Any medtune 2D segmenter on the dynamic paths: a backbone + decoder (here a tiny timm ViT
or ResNet) trains through the three phases, its backbone runs at the selected bits, its
costs are what it counts, a bank of backbones makes a V1 model, pretrained weights load,
and sizes or tuning methods it cannot take are refused with the key to change."""

from __future__ import annotations

import pytest
import torch

from medtune.checkpoints.counting import flop_counter
from medtune.config import from_dict
from medtune.errors import ConfigError
from medtune.finetune.dynamic.config import DynamicConfig
from medtune.finetune.dynamic.inference import predict_volume
from medtune.finetune.dynamic.layers import quantized_parameters
from medtune.finetune.dynamic.model import DynamicSegmenter
from medtune.models.losses import LossContext, build_criterion

VIT = {"name": "vit_tiny_patch16_224", "options": {"depth": 4, "dynamic_img_size": True}}
UPERNET = {"decoder": "upernet", "decoder_options": {"channels": 16}}


def config(**model) -> DynamicConfig:
    options = {"segmenter": "backbone", "backbones": [VIT], "crop_size": 32, **UPERNET, **model}
    return from_dict(DynamicConfig, {"data": {"mode": "2d", "img_size": 64}, "model": options})


def build(cfg: DynamicConfig, phase_ends=(1, 2)) -> DynamicSegmenter:
    torch.manual_seed(0)
    criterion = build_criterion(cfg.loss, LossContext(3, 2))
    return DynamicSegmenter(cfg.model, 4, 3, cfg.slice_size, criterion, phase_ends)


def test_a_backbone_segmenter_trains_through_the_three_phases():
    model = build(config()).train()
    batch = {"image": torch.randn(4, 4, 64, 64), "label": torch.randint(0, 3, (4, 64, 64))}

    def step() -> tuple[dict, set[str]]:
        model.zero_grad(set_to_none=True)
        out = model(batch)
        out["loss"].backward()
        return out, {name for name, p in model.named_parameters() if p.grad is not None}

    out, trained = step()
    # the whole segmenter (backbone, decoder), both paths' heads and the crop network learn
    segmenter = {name for name, p in model.named_parameters() if name.startswith(("segmenters.", "heads."))}
    assert out["phase"] == 1 and segmenter <= trained and any(name.startswith("locator.") for name in trained)
    assert not any(name.startswith(("decision.", "selectors.")) for name in trained)
    assert not any(name.startswith("segmenters.0.decoder.classifier") for name in segmenter)  # its own head: dropped
    out, trained = step()
    assert out["phase"] == 2 and {"selectors.0.linear.weight", "selectors.0.linear.bias"} <= trained
    assert 0 < out["relative_flops"] <= 1 and len(model.selectors) == 1  # the backbone is one unit
    out, trained = step()
    assert out["phase"] == 3 and {name.split(".")[0] for name in trained} == {"decision"}


def test_the_backbone_runs_at_the_selected_bits_and_costs_what_it_counts():
    model = build(config(bits=[8, 16])).eval()
    segmenter, x = model.segmenters[0], torch.randn(2, 4, 64, 64)
    with torch.no_grad():
        model.selectors[0].linear.bias.copy_(torch.tensor([1e6, 0.0]))  # every slice picks 8 bits
        full, _ = model.path_logits("whole", x, quantize=False)
        quantized, bits = model.path_logits("whole", x, quantize=True)
        # the same backbone with every weight matrix at the chosen 8 bits, by hand
        weights = quantized_parameters(segmenter.backbone, 8)
        saved = {name: p.detach().clone() for name, p in segmenter.backbone.named_parameters() if name in weights}
        for name, p in segmenter.backbone.named_parameters():
            if name in weights:
                p.copy_(weights[name])
        by_hand, _ = model.path_logits("whole", x, quantize=False)
        for name, p in segmenter.backbone.named_parameters():
            if name in saved:
                p.copy_(saved[name])
    assert bits.tolist() == [[8.0], [8.0]]
    # equal to the hand-quantized backbone up to float rounding, and 8 bits do change the logits
    assert (quantized - by_hand).abs().max() < 1e-7 and (quantized - full).abs().max() > 1e-4

    stages, rest, static = model.cost_table()
    one = torch.zeros(1, 4, 64, 64)
    with torch.no_grad(), flop_counter() as backbone:
        segmenter.backbone(one)
    with torch.no_grad(), flop_counter() as whole:
        model.heads["whole"](segmenter.forward_stages(one), (64, 64))
    p = model.paths.index("whole")
    assert stages[p].tolist() == [backbone.get_total_flops()]
    assert stages[p, 0] + rest[p] == static == whole.get_total_flops()
    assert model.cost_model_flops("whole", torch.tensor([[8.0]])).item() == pytest.approx(
        stages[p, 0].item() / 4 + rest[p].item())


def test_a_bank_of_backbones_is_a_v1_model_and_predicts_volumes():
    cfg = config(form="v1", bits=[], backbones=[VIT, {"name": "timm:resnet10t"}])
    model = build(cfg).eval()
    assert model.paths == ("skip", "whole_vit_tiny_patch16_224", "whole_timm_resnet10t")
    assert model.selectors is None and model.locator is None and model.stride == 32
    prediction = predict_volume(model, torch.randn(4, 64, 64, 3), count=True)
    totals = prediction.totals()
    assert prediction.probabilities.shape == (3, 64, 64, 3)
    assert totals["flops_counted"] == totals["decision_flops_counted"] + totals["path_flops_counted"] > 0


def test_pretrained_backbone_weights_load_into_the_segmenter(tmp_path):
    from safetensors.torch import save_file

    from medtune.models import BackboneConfig, create_backbone

    source = create_backbone(BackboneConfig(**VIT, in_chans=4, img_size=64))
    with torch.no_grad():
        source.model.pos_embed.fill_(0.25)
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(tmp_path / "backbone.safetensors"))
    model = build(config(backbones=[{**VIT, "pretrained": str(tmp_path / "backbone.safetensors")}]))
    loaded = model.segmenters[0].backbone.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in source.state_dict().items())


@pytest.mark.parametrize("model, message", [
    ({"backbones": [{"name": "vit_tiny_patch16_224", "options": {"depth": 4}}]},
     "model.backbones[0] takes only 64 px slices but model.crop_size is 32"),
    ({"backbones": [{**VIT, "img_size": 32}]}, "model.backbones[0].img_size is the run's"),
    ({"backbones": [{**VIT, "colour": 1}]}, "model.backbones[0]"),
    ({"adapter": {"method": "med-tuning"}}, "mixes the slices of a volume"),
    ({"crop_size": 48}, "model.crop_size 48 must be a multiple of the segmenter's stride 32"),  # UperNet's
    ({"crop_size": 40, "decoder": "unet", "decoder_options": {}}, "model.crop_size 40 must be a multiple of the segmenter's stride 16"),
])
def test_what_a_backbone_segmenter_cannot_take_is_refused_naming_the_key(model, message):
    with pytest.raises((ConfigError, ValueError), match=message.replace("[", r"\[").replace("]", r"\]")):
        build(config(**model))


def test_the_resunet_segmenter_refuses_backbone_sections():
    with pytest.raises((ConfigError, ValueError), match="model.backbones is for model.segmenter: backbone"):
        from_dict(DynamicConfig, {"data": {"mode": "2d", "img_size": 64}, "model": {"backbones": [VIT]}})


def test_the_fremae_vit_recipe_loads_with_its_backbone_run_set_on_the_command_line():
    import yaml

    from medtune.config import apply_overrides
    from medtune.finetune.dynamic.task import TASK

    from tests import REPO

    raw = yaml.safe_load((REPO / "configs" / "meddanet_v2_fremae_vit_b16.yaml").read_text())
    raw.pop("task")
    apply_overrides(raw, ["model.backbones.0.pretrained=runs/mine"])
    cfg = TASK.load_config(raw)  # builds the whole model on the meta device
    (backbone,) = cfg.model.backbone_configs(cfg.in_chans, cfg.data.img_size)
    assert (backbone.name, backbone.pretrained, backbone.img_size, backbone.in_chans) == (
        "vit_base_patch16_224", "runs/mine", 128, 4)
    assert cfg.model.segmenter == "backbone" and cfg.model.paths == ("skip", "crop", "whole")


def test_a_lora_backbone_trains_only_its_lora_tensors_at_the_selected_bits():
    cfg = config(adapter={"method": "lora", "r": 4}, decoder="unet", decoder_options={"channels": [8, 8, 8, 8]},
                 crop_size=16)
    model = build(cfg, phase_ends=(0, 1)).train()  # phase 2 at once: the backbone runs at both widths
    out = model({"image": torch.randn(2, 4, 64, 64), "label": torch.randint(0, 3, (2, 64, 64))})
    out["loss"].backward()
    backbone = {name: p for name, p in model.named_parameters() if ".backbone." in name}
    trained = {name for name, p in backbone.items() if p.grad is not None}
    assert out["phase"] == 2 and trained == {name for name, p in backbone.items() if p.requires_grad}
    assert trained and all(".lora_" in name for name in trained)
