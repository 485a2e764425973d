"""CM-MaskSD: similarity-guided masking, distillation loss, weight sharing, overhead."""

from __future__ import annotations

import copy

import pytest
import torch

from medtune.checkpoints.counting import count_parameters
from medtune.finetune.referring import ReferringModelConfig, build_referring_model
from medtune.finetune.referring.cmmasksd import (
    CMMaskSDConfig,
    mask_top_ratio,
    patch_relevance,
    patch_word_similarity,
    similarity_guided_masks,
    word_relevance,
)
from medtune.finetune.referring.overhead import self_distill_overhead
from medtune.finetune.self_distill import distill_loss


@pytest.fixture
def tiny_model_config(tiny_clip_config):
    """``tiny_model_config(enabled, **cmmasksd)``: a referring model on the tiny CLIP (32 px
    images as 4 x 4 patches of width 32, 12 tokens of width 48), fusion width 32, one
    decoder layer of 4 heads, no dropout; CM-MaskSD on or off."""

    def make(enabled: bool, **cmmasksd) -> ReferringModelConfig:
        return ReferringModelConfig(
            tiny_clip=copy.deepcopy(tiny_clip_config), image_size=32, context_length=12, fusion_dim=32,
            decoder_layers=1, decoder_heads=4, decoder_ffn_dim=64, dropout=0.0,
            cmmasksd=CMMaskSDConfig(enabled=enabled, **cmmasksd),
        )

    return make


def test_masks_pick_the_most_related_patches_and_words():
    # 4 patches x 5 tokens; tokens 0 and 4 are start/end (not words).
    similarity = torch.tensor(
        [[
            [0.9, 0.1, 0.2, 0.3, 0.9],
            [0.9, 0.8, 0.7, 0.6, 0.9],
            [0.9, 0.0, 0.0, 0.9, 0.9],
            [0.9, 0.5, 0.4, 0.3, 0.9],
        ]]
    )
    word_valid = torch.tensor([[False, True, True, True, False]])
    relevance = patch_relevance(similarity, word_valid)  # mean over words 1..3
    assert torch.allclose(relevance, torch.tensor([[0.2, 0.7, 0.3, 0.4]]))
    assert mask_top_ratio(relevance, 0.5).tolist() == [[False, True, False, True]]  # 2 of 4
    assert mask_top_ratio(relevance, 0.25).tolist() == [[False, True, False, False]]  # 1 of 4
    words = word_relevance(similarity, word_valid)  # max over patches: 0.8, 0.7, 0.9
    assert torch.allclose(words[0, 1:4], torch.tensor([0.8, 0.7, 0.9]))
    # 0.34 of 3 words -> 1 word: the one most related to the image (token 3), never start/end
    assert mask_top_ratio(words, 0.34, word_valid).tolist() == [[False, False, False, True, False]]
    assert mask_top_ratio(words, 0.67, word_valid).tolist() == [[False, True, False, True, False]]
    assert not mask_top_ratio(words, 0.0, word_valid).any()


def test_similarity_guided_masks_from_embeddings_and_per_row_counts():
    # patch p has embedding e_p; words are e_0 (x2) and e_2: patches 0 and 2 relate to the text.
    eye = torch.eye(4)
    patch_embeds = eye.unsqueeze(0).repeat(2, 1, 1)  # [2, 4, 4]
    word_embeds = torch.stack([eye[[3, 0, 0, 2, 3]], eye[[3, 1, 2, 3, 3]]])  # [2, 5, 4]
    word_valid = torch.tensor([[False, True, True, True, False], [False, True, True, False, False]])
    similarity = patch_word_similarity(patch_embeds * 3.0, word_embeds)  # cosine: scale-free
    assert torch.allclose(similarity[0, 0], torch.tensor([0.0, 1.0, 1.0, 0.0, 0.0]))
    patch_mask, word_mask = similarity_guided_masks(patch_embeds, word_embeds, word_valid, 0.5, 0.5)
    assert patch_mask[0].tolist() == [True, False, True, False]
    assert patch_mask[1].tolist() == [False, True, True, False]
    assert patch_mask.sum(1).tolist() == [2, 2]
    assert word_mask.sum(1).tolist() == [2, 1]  # round(0.5 * 3) = 2, round(0.5 * 2) = 1
    assert not (word_mask & ~word_valid).any()


def test_mask_distill_loss_is_zero_on_agreement_and_stops_gradient():
    """CM-MaskSD's term is the shared distill_loss on sigmoid mask probabilities."""
    torch.manual_seed(0)
    teacher = torch.randn(2, 1, 8, 8, requires_grad=True)
    for kind in ("bce", "kl", "mse"):
        agree = distill_loss(teacher.detach().clone().requires_grad_(True), teacher, kind, "sigmoid")
        assert abs(agree.item()) < 1e-7
        student = torch.randn(2, 1, 8, 8, requires_grad=True)
        loss = distill_loss(student, teacher, kind, "sigmoid")
        assert loss.item() > 0
        loss.backward()
        assert teacher.grad is None and student.grad.abs().sum() > 0
    # hand-worked: p_t = 0.5 and p_s = 0.75 -> KL = 0.5 ln(2/3) + 0.5 ln 2
    value = distill_loss(torch.full((1, 1, 1, 1), torch.log(torch.tensor(3.0)).item()), torch.zeros(1, 1, 1, 1),
                         CMMaskSDConfig().loss, "sigmoid")
    assert value.item() == pytest.approx(0.5 * torch.log(torch.tensor(2 / 3)).item() + 0.5 * torch.log(torch.tensor(2.0)).item(), abs=1e-6)


def test_masked_branches_share_every_weight(tiny_model_config):
    torch.manual_seed(0)
    plain = build_referring_model(tiny_model_config(False))
    torch.manual_seed(0)
    with_sd = build_referring_model(tiny_model_config(True))
    plain_shapes = {k: tuple(v.shape) for k, v in plain.state_dict().items()}
    sd_shapes = {k: tuple(v.shape) for k, v in with_sd.state_dict().items()}
    extra = set(sd_shapes) - set(plain_shapes)
    assert extra == {"masksd.visual_mask_token", "masksd.word_mask_token"}
    assert all(sd_shapes[k] == s for k, s in plain_shapes.items())
    # the coordinating parameters alone: one ViT-width token (32) + one text-width token (48)
    assert count_parameters(with_sd)[0] - count_parameters(plain)[0] == 32 + 48
    assert count_parameters(with_sd)[1] - count_parameters(plain)[1] == 32 + 48


def test_distillation_gradient_reaches_shared_weights_through_masked_branches(tiny_model_config):
    torch.manual_seed(0)
    model = build_referring_model(tiny_model_config(True, lambda_v=1.0, lambda_l=1.0))
    model.train()
    tokens = model.tokenizer(["the red circle left of the square", "blue square"])
    batch = {"image": torch.randn(2, 3, 32, 32), "tokens": tokens, "mask": torch.zeros(2, 32, 32)}
    out = model(batch)
    assert {"loss", "loss_mask", "loss_sd", "loss_sd_v", "loss_sd_l"} <= set(out)
    assert out["loss_sd_v"] > 0 and out["loss_sd_l"] > 0
    assert out["loss"].item() == pytest.approx((out["loss_mask"] + out["loss_sd"]).item(), rel=1e-6)
    # Only the distillation term: main logits are detached, so every gradient comes from
    # the masked branches, which run the shared CLIP, neck, decoder and projector.
    main = model.forward_branch(batch["image"], tokens, with_embeds=True)
    word_valid = model.tokenizer.word_positions(tokens)
    patch_mask, word_mask = model.masksd.select_masks(main.patch_embeds, main.word_embeds, word_valid)
    assert patch_mask.sum(1).tolist() == [4, 4]  # 25% of the 4 x 4 patches
    assert word_mask.sum(1).tolist() == [2, 1]  # round(0.25 * 7) = 2; max(1, round(0.25 * 2)) = 1
    model.zero_grad()
    image_branch = model.forward_branch(batch["image"], tokens, patch_mask=patch_mask).logits
    word_branch = model.forward_branch(batch["image"], tokens, word_mask=word_mask).logits
    manual = model.masksd.losses(image_branch, word_branch, main.logits)["loss_sd"]
    # forward() reuses the main branch's features of the unmasked modality: same value
    assert manual.item() == pytest.approx(out["loss_sd"].item(), rel=1e-5)
    manual.backward()
    for name in ("clip.visual.conv1.weight", "clip.transformer.resblocks.0.attn.in_proj_weight",
                 "neck.sentence_gate.weight", "decoder.layers.0.cross_attn.in_proj_weight",
                 "projector.text_to_kernel.weight", "masksd.visual_mask_token", "masksd.word_mask_token"):
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name
    # in eval mode the branches are off: forward is the plain model
    model.eval()
    assert set(model(batch)) == {"loss", "loss_mask"}


def test_mask_tokens_replace_embeddings_before_the_position_embedding(tiny_model_config):
    """A masked patch (word) whose mask token equals its own patch (token) embedding gives
    exactly the unmasked features: the token replaces the embedding before positions are
    added, and nothing else changes; another token value changes the features."""
    from medtune.models.clip import encode_image_levels, encode_text_words

    torch.manual_seed(0)
    clip = build_referring_model(tiny_model_config(True)).clip.eval()
    images = torch.randn(1, 3, 32, 32)
    tokens = build_referring_model(tiny_model_config(False)).tokenizer(["the red circle"])
    with torch.no_grad():
        patches = clip.visual.conv1(images).flatten(2).transpose(1, 2)  # [1, 16, 32]
        patch_mask = torch.zeros(1, 16, dtype=torch.bool)
        patch_mask[0, 5] = True
        plain = encode_image_levels(clip, images, 3).levels
        same = encode_image_levels(clip, images, 3, patch_mask, patches[0, 5]).levels
        other = encode_image_levels(clip, images, 3, patch_mask, patches[0, 5] + torch.randn(32)).levels
        assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(plain, same))
        assert not torch.allclose(plain[0], other[0], atol=1e-3)
        words = clip.token_embedding(tokens)  # [1, L, C_t]
        word_mask = torch.zeros_like(tokens, dtype=torch.bool)
        word_mask[0, 2] = True
        text_plain = encode_text_words(clip, tokens)
        text_same = encode_text_words(clip, tokens, word_mask, words[0, 2])
        text_other = encode_text_words(clip, tokens, word_mask, words[0, 2] + torch.randn(words.shape[-1]))
        assert torch.allclose(text_plain.sentence, text_same.sentence, atol=1e-5)
        assert not torch.allclose(text_plain.sentence, text_other.sentence, atol=1e-3)


def test_self_distill_overhead_reports_params_and_flops(tiny_model_config):
    report = self_distill_overhead(tiny_model_config(False), batch_size=2)
    assert set(report) == {"params_plain", "params_sd", "flops_plain", "flops_sd"}
    assert report["params_sd"] - report["params_plain"] == 32 + 48
    ratio = report["flops_sd"] / report["flops_plain"]
    # two extra decoder passes but only one extra pass per CLIP tower (the unmasked
    # modality's features are reused): more than 2x, less than 3 full steps
    assert 2.0 < ratio < 3.0, ratio
    # counted with medtune's one FLOP counter, as `medtune params` counts: the projector's
    # per-sample kernels are a grouped convolution, which torch's own formula overcounts
    from torch.utils.flop_counter import FlopCounterMode

    from medtune.checkpoints.counting import count_flops
    from medtune.finetune.referring.overhead import example_batch

    torch.manual_seed(0)
    model = build_referring_model(tiny_model_config(False), load_clip_weights=False)
    batch = example_batch(model.cfg, model.tokenizer, 2)
    model.train()
    assert count_flops(lambda: model(batch)["loss"], backward=True) == report["flops_plain"]
    model.zero_grad()
    plain_counter = FlopCounterMode(display=False)
    with plain_counter:
        model(batch)["loss"].backward()
    assert plain_counter.get_total_flops() > report["flops_plain"]


def test_resnet_clip_mask_token_is_a_colour(tiny_model_config, tiny_resnet_clip_config):
    cfg = tiny_model_config(True)
    cfg.tiny_clip, cfg.image_size = tiny_resnet_clip_config, 64
    torch.manual_seed(0)
    model = build_referring_model(cfg)
    assert tuple(model.masksd.visual_mask_token.shape) == (3,)
    batch = {"image": torch.randn(2, 3, 64, 64), "tokens": model.tokenizer(["a", "the green one"]),
             "mask": torch.zeros(2, 64, 64)}
    out = model(batch)
    assert torch.isfinite(out["loss"]) and out["loss_sd_v"] >= 0
