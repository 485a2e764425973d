"""Decoder ``multistage``: FreMAE's light-decoder trunk as a segmentation decoder, which
takes over a FreMAE run's trunk (its ``decoder.safetensors``) for every backbone."""

from __future__ import annotations

import dataclasses
import logging

import pytest
import torch

from medtune.checkpoints.io import load_weights
from medtune.checkpoints.runs import DECODER_FILE, PRETRAIN_TASK, RunConfig, write_run_config
from medtune.config import from_dict, to_dict
from medtune.errors import CheckpointError, ConfigError
from medtune.models import BackboneConfig, create_backbone
from medtune.models.decoders import create_decoder
from medtune.models.multistage import MultiStageSegmentationDecoder
from medtune.pretrain import build_objective


def fremae_run(tmp_path, backbone_cfg: BackboneConfig, **objective):
    """A FreMAE pretraining run folder whose weights no fresh initialisation can have."""
    from medtune.pretrain.cli import save_outputs
    from medtune.pretrain.config import PretrainConfig

    cfg = from_dict(PretrainConfig, {"backbone": to_dict(backbone_cfg), "figure": False,
                                     "data": {"img_size": backbone_cfg.img_size},
                                     "objective": {"name": "fremae", "radius": 2, **objective}})
    torch.manual_seed(0)
    fremae = build_objective(cfg.objective, create_backbone(cfg.backbone))
    with torch.no_grad():
        for param in fremae.parameters():
            param.add_(torch.rand_like(param) + 0.5)
        for name, buffer in fremae.named_buffers():
            if "running" in name:
                buffer.add_(torch.rand_like(buffer))
    run = tmp_path / "pretrain"
    write_run_config(run, RunConfig(PRETRAIN_TASK, to_dict(cfg)))
    written = save_outputs(fremae, None, cfg, run)
    return fremae, run, written


def segmenter(run, decoder: str, **options):
    from medtune.finetune.segmentation.config import SegmentationConfig
    from medtune.finetune.segmentation.model import build_segmenter
    from medtune.models.weights import pretrained_section

    torch.manual_seed(1)
    cfg = from_dict(SegmentationConfig, {
        "data": {"mode": "3d", "crop_size": [32, 32, 2]}, "backbone": pretrained_section(run),
        "adapter": {"method": "full"}, "model": {"decoder": decoder, "decoder_options": options},
    })
    return build_segmenter(cfg, num_classes=3)


def test_segmenter_takes_over_the_trunk_of_a_fremae_run(tmp_path, tiny_vit_config):
    vit = dataclasses.replace(tiny_vit_config, in_chans=2)
    fremae, run, written = fremae_run(tmp_path, vit, decoder_width=8, full_resolution_width=4)
    assert written["decoder"] == run / DECODER_FILE
    blocks = load_weights(run / DECODER_FILE)
    heads = ("high_filter.", "high_head.", "bottom_up.", "low_filter.", "low_head.")
    assert set(blocks) == {k for k in fremae.decoder.state_dict() if not k.startswith(heads)}
    assert {k.split(".")[0] for k in blocks} == {"lateral", "input_path", "top_down"}

    model = segmenter(run, "multistage", width=8, full_resolution_width=4)
    own = model.decoder.state_dict()
    for name, tensor in blocks.items():  # every trunk tensor, buffers included
        assert torch.equal(own[name], tensor), name
        assert torch.equal(own[name], fremae.decoder.state_dict()[name]), name
    assert {k for k in own if k not in blocks} == {"classifier.weight", "classifier.bias"}
    for name, tensor in fremae.backbone.state_dict().items():
        assert torch.equal(model.backbone.state_dict()[name], tensor), name

    # the segmenter's map before the classifier is the pretraining decoder's before its high-band head
    fremae.eval(), model.eval()
    image = torch.randn(3, 2, 32, 32)
    with torch.no_grad():
        stages = fremae.backbone.forward_stages(image)
        high, _ = fremae.decoder(stages, (32, 32), image)
        decoded = model.decoder.forward_decoder(stages, image)  # (3, 4, 32, 32)
        assert decoded.shape == (3, 4, 32, 32) and model.decoder.embedding_channels == 4
        torch.testing.assert_close(fremae.decoder.high_head(fremae.decoder.high_filter(decoded)), high)
        logits = model.forward_logits(torch.randn(1, 2, 32, 32, 2))
    assert logits.shape == (1, 3, 32, 32, 2)


def test_other_decoders_and_other_widths(tmp_path, tiny_vit_config, caplog):
    vit = dataclasses.replace(tiny_vit_config, in_chans=2)
    _, run, _ = fremae_run(tmp_path, vit, decoder_width=8)
    with caplog.at_level(logging.INFO, logger="medtune"):
        model = segmenter(run, "upernet", channels=8)  # loads the backbone, leaves the trunk
    assert "set model.decoder: multistage" in caplog.text
    assert model.decoder.__class__.__name__ == "UperNetDecoder"
    with pytest.raises(CheckpointError, match="decoder_width 8.*model.decoder_options"):
        segmenter(run, "multistage", width=16)
    with pytest.raises(CheckpointError, match="image_path True"):
        segmenter(run, "multistage", width=8, image_path=False)  # the run's input path has no home


@pytest.mark.parametrize("which", ["vit_no_image", "swin", "swinunetr3d"])
def test_multistage_decoder_shapes(which, tiny_vit_config, tiny_swin_config):
    torch.manual_seed(0)
    if which == "swin":  # timm Swin: stages of strides 4 to 32
        backbone = create_backbone(dataclasses.replace(tiny_swin_config, in_chans=2, img_size=32))
    elif which == "swinunetr3d":  # stages of strides 2 to 32
        options = {"feature_size": 12, "depths": [1, 1, 1, 1], "num_heads": [1, 1, 1, 1], "window_size": 4}
        backbone = create_backbone(BackboneConfig("swinunetr", 2, 32, 3, options=options))
    else:
        backbone = create_backbone(dataclasses.replace(tiny_vit_config, in_chans=2))
    size = (32,) * backbone.spatial_dims
    decoder = create_decoder("multistage", backbone.feature_channels, backbone.feature_strides, 3,
                             backbone.spatial_dims, image_channels=2, width=8, image_path=which != "vit_no_image")
    assert isinstance(decoder, MultiStageSegmentationDecoder)
    assert decoder.takes_image == (which != "vit_no_image")
    # with an input path the shallowest level has stride 1; without, a ViT's pyramid starts at 4
    assert decoder.level_strides[0] == (4 if which == "vit_no_image" else 1)
    image = torch.randn(2, 2, *size)
    logits = decoder(backbone.forward_stages(image), size, image if decoder.takes_image else None)
    assert logits.shape == (2, 3, *size)
    logits.sum().backward()
    assert all(p.grad is not None for p in decoder.parameters())
    if decoder.takes_image:
        with pytest.raises(ConfigError, match="input path"):
            decoder(backbone.forward_stages(image), size)
