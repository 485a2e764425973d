"""Decoders, the slice-wise segmenter and sliding-window inference, on tiny models."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medtune.errors import ConfigError
from medtune.finetune.segmentation.inference import flip_axes_for_tta, predict_label_map, sliding_window_probs
from medtune.adapters import slices_to_volume, volume_to_slices
from medtune.finetune.segmentation import SliceSegmenter
from medtune.models.decoders import UNetDecoder, UperNetDecoder, create_decoder


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_upernet_on_plain_vit_features_gives_input_resolution(spatial_dims):
    size = (32,) * spatial_dims
    features = [torch.randn(2, 24, *(s // 16 for s in size)) for _ in range(4)]
    decoder = create_decoder("auto", (24,) * 4, (16,) * 4, num_classes=5, spatial_dims=spatial_dims, channels=16)
    assert isinstance(decoder, UperNetDecoder)
    assert decoder.strides == (4.0, 8.0, 16.0, 32.0)  # plain ViT maps become a pyramid
    assert decoder(features, size).shape == (2, 5) + size


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_unet_decoder_on_hierarchical_features(spatial_dims):
    channels, strides = (8, 16, 32, 64), (4, 8, 16, 32)
    size = (64,) * spatial_dims
    features = [torch.randn(1, c, *(n // s for n in size)) for c, s in zip(channels, strides)]
    decoder = create_decoder("auto", channels, strides, num_classes=3, spatial_dims=spatial_dims)
    assert isinstance(decoder, UNetDecoder)
    out = decoder(features, size)
    assert out.shape == (1, 3) + size
    out.sum().backward()  # every level receives gradient
    assert all(p.grad is not None for p in decoder.parameters())


def test_upernet_on_hierarchical_features_and_bad_options():
    channels, strides = (8, 16, 32, 64), (4, 8, 16, 32)
    features = [torch.randn(1, c, 64 // s, 64 // s) for c, s in zip(channels, strides)]
    decoder = create_decoder("upernet", channels, strides, num_classes=2, channels=8)
    assert decoder(features, (64, 64)).shape == (1, 2, 64, 64)
    with pytest.raises(ConfigError, match="unknown decoder"):
        create_decoder("fpn-nope", channels, strides, 2)
    with pytest.raises(ConfigError, match="bad option"):
        create_decoder("unet", channels, strides, 2, widths=3)


def test_volume_slice_round_trip_keeps_slices_of_a_volume_together():
    volume = torch.arange(2 * 3 * 4 * 5 * 6, dtype=torch.float32).reshape(2, 3, 4, 5, 6)
    slices = volume_to_slices(volume)
    assert slices.shape == (12, 3, 4, 5)
    assert torch.equal(slices[6 + 2], volume[1, :, :, :, 2])  # image b*T + t = slice t of volume b
    assert torch.equal(slices_to_volume(slices, 6), volume)


@pytest.fixture
def tiny_segmenter(tiny_vit_config) -> SliceSegmenter:
    """The tiny ViT (4 blocks, width 192, 4-channel 32 px slices) with an auto decoder of 16
    channels and 4 classes, no adapter; seeded."""
    from medtune.models.backbones import create_backbone

    num_classes = 4
    torch.manual_seed(0)
    backbone = create_backbone(tiny_vit_config)
    decoder = create_decoder("auto", backbone.feature_channels, backbone.feature_strides, num_classes, channels=16)
    return SliceSegmenter(backbone, decoder, num_classes)


def test_slice_segmenter_shapes_loss_and_slice_independence(tiny_segmenter):
    model = tiny_segmenter
    volume = torch.randn(2, 4, 32, 32, 3)
    label = torch.randint(0, 4, (2, 32, 32, 3))
    out = model({"image": volume, "label": label})
    assert out["loss"].ndim == 0 and torch.isfinite(out["loss"])
    out["loss"].backward()
    assert model.decoder.classifier.weight.grad is not None
    model.eval()
    logits = model.forward_logits(volume)
    assert logits.shape == (2, 4, 32, 32, 3)
    # Without slice-mixing adapters each slice is segmented on its own.
    alone = model.forward_logits(volume[1:2, ..., 2:3])
    assert torch.allclose(alone[0, ..., 0], logits[1, ..., 2], atol=1e-5)


def test_loss_matches_monai_dice_ce_by_hand(tiny_segmenter):
    from monai.losses import DiceCELoss

    model = tiny_segmenter
    logits = torch.randn(1, 4, 8, 8, 2)
    label = torch.randint(0, 4, (1, 8, 8, 2))
    reference = DiceCELoss(include_background=False, to_onehot_y=True, softmax=True)(logits, label[:, None])
    assert torch.allclose(model.compute_loss(logits, label), reference)


def test_gradient_checkpointing_gives_the_same_gradients(tiny_segmenter):
    model = tiny_segmenter
    batch = {"image": torch.randn(1, 4, 32, 32, 2), "label": torch.randint(0, 4, (1, 32, 32, 2))}
    model.eval()  # no dropout / batch-norm updates between the two passes
    model(batch)["loss"].backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    model.set_gradient_checkpointing(True)
    model(batch)["loss"].backward()
    for name, grad in plain.items():
        assert torch.allclose(grad, dict(model.named_parameters())[name].grad, atol=1e-5), name


def test_sliding_window_covers_any_volume_and_tta_averages_flips(tiny_segmenter):
    assert len(flip_axes_for_tta(3)) == 8 and flip_axes_for_tta(3)[0] == ()
    model = tiny_segmenter.eval()
    volume = torch.randn(4, 40, 35, 5)
    probs = sliding_window_probs(model, volume, (32, 32, 3), overlap=0.5)
    assert probs.shape == (4, 40, 35, 5)
    assert torch.allclose(probs.sum(0), torch.ones(40, 35, 5), atol=1e-5)
    tta = sliding_window_probs(model, volume, (32, 32, 3), tta=True)
    assert tta.shape == probs.shape and not torch.allclose(tta, probs)
    # Label map: background outside the nonzero box, values from the dataset's set.
    image = np.zeros((4, 40, 36, 6), dtype=np.float32)
    image[:, 4:30, 5:33, 1:5] = np.random.default_rng(0).normal(size=(4, 26, 28, 4)) + 3
    labels = predict_label_map(model, image, (0, 1, 2, 4), (32, 32, 3))
    assert labels.shape == (40, 36, 6) and labels.dtype == np.uint8
    assert set(np.unique(labels)) <= {0, 1, 2, 4}
    assert not labels[:4].any() and not labels[..., 0].any()


@pytest.fixture
def adapted_segmenter(tiny_segmenter_args):
    """``adapted_segmenter(method, gradient_checkpointing=False)``: the tiny segmenter (crops
    of 4 slices, decoder of 8 channels) with ``method``'s adapter, its trained tensors
    randomised away from their zero initialisation."""
    from medtune.checkpoints.params import segmentation_config
    from medtune.finetune.segmentation import build_segmenter

    def build(method: str, gradient_checkpointing: bool = False) -> SliceSegmenter:
        cfg = segmentation_config(**tiny_segmenter_args, method=method)
        cfg.model.gradient_checkpointing = gradient_checkpointing
        torch.manual_seed(0)
        model = build_segmenter(cfg, 4, load_pretrained=False)
        with torch.no_grad():  # leave the zero-initialised up-projections
            for param in model.parameters():
                if param.requires_grad:
                    param.add_(0.02 * torch.randn(param.shape, generator=torch.Generator().manual_seed(param.numel())))
        return model

    return build


def test_med_tuning_segmenter_mixes_slices_of_one_volume_only(adapted_segmenter):
    model = adapted_segmenter("med-tuning").eval()
    volume = torch.randn(2, 4, 32, 32, 4)
    changed = volume.clone()
    changed[0, ..., 0] += 1.0  # perturb slice 0 of volume 0
    with torch.no_grad():
        before, after = model.forward_logits(volume), model.forward_logits(changed)
    assert before.shape == (2, 4, 32, 32, 4)
    assert not torch.allclose(before[0, ..., 1], after[0, ..., 1])  # other slices of volume 0 see it
    assert torch.equal(before[1], after[1])  # volume 1 does not


@pytest.mark.parametrize("method", ["med-tuning", "lora"])
def test_checkpointed_adapters_give_the_same_gradients(method, adapted_segmenter):
    batch = {"image": torch.randn(2, 4, 32, 32, 4), "label": torch.randint(0, 4, (2, 32, 32, 4))}
    grads = []
    for checkpointing in (False, True):
        model = adapted_segmenter(method, checkpointing).train()
        assert model.gradient_checkpointing is checkpointing
        torch.manual_seed(1)  # same dropout masks in the decoder
        model(batch)["loss"].backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 0
    for name, grad in grads[0].items():
        assert torch.allclose(grad, grads[1][name], rtol=1e-4, atol=1e-6), name


def test_loss_terms_from_the_config_reach_the_slice_segmenter(tiny_segmenter_args):
    """``loss: {dice_ce: 1.0, pne: 0.1}``: the PNE term reads the decoder's last map, stacked
    back into volumes, and its projection head is trained with the model."""
    from medtune.checkpoints.params import segmentation_config
    from medtune.finetune.segmentation import build_segmenter

    cfg = segmentation_config(**tiny_segmenter_args, method="decoder-only")
    cfg.loss = {"dice_ce": 1.0, "pne": {"weight": 0.1, "embed_dim": 8, "anchors_per_class": 4, "pairs": 8}}
    torch.manual_seed(0)
    model = build_segmenter(cfg, 4, load_pretrained=False).train()
    batch = {"image": torch.randn(2, 4, 32, 32, 4), "label": torch.randint(0, 4, (2, 32, 32, 4))}
    outputs = model.forward_outputs(batch["image"])
    assert outputs["embedding"].shape == (2, 8, 8, 8, 4)  # UperNet's fused map at stride 4, per slice
    out = model(batch)
    assert set(out) == {"loss", "dice_ce", "pne"}
    assert torch.allclose(out["loss"], out["dice_ce"] + 0.1 * out["pne"])
    out["loss"].backward()
    assert model.criterion.terms["pne"].head[0].weight.grad is not None


def test_agln_decodes_a_hierarchical_backbone_slice_wise():
    from medtune.checkpoints.params import segmentation_config
    from medtune.finetune.segmentation import build_segmenter

    cfg = segmentation_config("convnext_atto", 4, 32, 2, "decoder-only", decoder="agln",
                              decoder_options={"channels": 8})
    torch.manual_seed(0)
    model = build_segmenter(cfg, 3, load_pretrained=False)
    out = model({"image": torch.randn(2, 4, 32, 32, 2), "label": torch.randint(0, 3, (2, 32, 32, 2))})
    out["loss"].backward()
    assert type(model.decoder).__name__ == "AGLNDecoder"
    assert model.decoder.fusion[0][0].gamma.grad is not None
    assert model.eval().forward_logits(torch.randn(1, 4, 32, 32, 2)).shape == (1, 3, 32, 32, 2)
