"""CM-MaskSD: cross-modality masked self-distillation for referring segmentation.

DESIGN section 6 (partly reconstructed; medtune's reading, all configurable). Next to
the main branch (full image, full expression), two *masked branches* run through the
very same network, every weight shared:

1. ``similarity``      S = cos(patch_embeds, word_embeds)            # [B, N, L]
   from the main branch's CLIP features (last-level patch tokens and words, both
   projected into CLIP's joint space), detached: the masks are picked, not learned.
2. ``patch_relevance`` mean of S over the expression's words           # [B, N]
   ``word_relevance``  max of S over the patches                         # [B, L]
3. ``mask_top_ratio``  the ``visual_mask_ratio`` most relevant patches and the
   ``word_mask_ratio`` most relevant words (start/end/padding tokens never masked).
4. image branch: masked patch embeddings -> ``visual_mask_token``; full expression.
   word branch:  masked word embeddings -> ``word_mask_token``; full image.
   Each branch re-encodes only the modality it masks and reuses the main branch's
   features of the other (identical values, gradients into the same weights); the
   fusion neck, decoder and projector run once on both branches as a 2B batch. So a
   step costs one extra pass of each CLIP tower and two of the head.
5. :func:`medtune.finetune.self_distill.distill_loss` (``activation="sigmoid"``): the
   masked branches' mask probabilities are pulled towards the stop-gradient main
   prediction with the Bernoulli KL(main || masked) (= the entropy-corrected binary
   cross-entropy, exactly 0 when they agree), or "mse".

    loss = BCE(main, gt) + lambda_v * D(image branch, sg(main)) + lambda_l * D(word branch, sg(main))

The coordinating parameters CM-MaskSD adds are exactly the two mask tokens:
``visual_mask_token`` (ViT: the image tower width C_v, replacing a patch embedding
before the position embedding; ModifiedResNet: 3 values, a colour that fills the masked
32x32 input cells) and ``word_mask_token`` (the text width C_t, replacing a token
embedding before the position embedding). Nothing else: no gate, no extra head.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from medtune.finetune.self_distill import DISTILL_KINDS, distill_loss


@dataclass
class CMMaskSDConfig:
    """The two masked self-distillation branches of CM-MaskSD."""

    enabled: bool = False  # add the two masked branches (training only)
    visual_mask_ratio: float = 0.25  # fraction of image patches masked, in [0, 1)
    word_mask_ratio: float = 0.25  # fraction of the expression's words masked, in [0, 1)
    lambda_v: float = 1.0  # weight of the image-masked branch's distillation loss
    lambda_l: float = 1.0  # weight of the word-masked branch's distillation loss
    loss: str = "kl"  # "kl", "bce" (entropy-corrected: the same value as kl) or "mse" (medtune.finetune.self_distill)
    guidance: str = "similarity"  # "similarity" (CLIP patch-word) or "random" masking

    def __post_init__(self) -> None:
        for name in ("visual_mask_ratio", "word_mask_ratio"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.loss not in DISTILL_KINDS:
            raise ValueError(f"loss must be one of {DISTILL_KINDS}, got '{self.loss}'")
        if self.guidance not in ("similarity", "random"):
            raise ValueError(f"guidance must be similarity or random, got '{self.guidance}'")


def patch_word_similarity(patch_embeds: torch.Tensor, word_embeds: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of every patch with every word: (B, N, E), (B, L, E) -> (B, N, L)."""
    return F.normalize(patch_embeds, dim=-1) @ F.normalize(word_embeds, dim=-1).transpose(1, 2)


def patch_relevance(similarity: torch.Tensor, word_valid: torch.Tensor) -> torch.Tensor:
    """How related each patch is to the expression: mean over its real words. -> (B, N)."""
    weights = word_valid.to(similarity.dtype).unsqueeze(1)  # [B, 1, L]
    return (similarity * weights).sum(-1) / weights.sum(-1).clamp_min(1.0)


def word_relevance(similarity: torch.Tensor, word_valid: torch.Tensor) -> torch.Tensor:
    """How related each word is to the image: max over patches; -inf at non-words. -> (B, L)."""
    scores = similarity.amax(dim=1)  # [B, L]
    return scores.masked_fill(~word_valid, float("-inf"))


def mask_top_ratio(scores: torch.Tensor, ratio: float, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Mark the ``round(ratio * n)`` highest scores of each row among its ``n`` valid entries.

    At least one entry is marked when ``ratio > 0`` and the row has a valid entry.
    Ties are broken by position (earlier first). Invalid entries are never marked.

    Args:
        scores: ``(B, T)``.
        ratio: in [0, 1).
        valid: ``(B, T)`` bool, or None (all valid).

    Returns:
        ``(B, T)`` bool.
    """
    if valid is None:
        valid = torch.ones_like(scores, dtype=torch.bool)
    num_valid = valid.sum(dim=1)  # [B]
    num_masked = torch.round(num_valid.double() * ratio).long()
    if ratio > 0:
        num_masked = torch.maximum(num_masked, (num_valid > 0).long())
    ranked = scores.masked_fill(~valid, float("-inf"))
    order = ranked.argsort(dim=1, descending=True, stable=True)
    rank = order.argsort(dim=1)  # rank of each entry, 0 = highest score
    return (rank < num_masked.unsqueeze(1)) & valid


def similarity_guided_masks(
    patch_embeds: torch.Tensor,
    word_embeds: torch.Tensor,
    word_valid: torch.Tensor,
    visual_ratio: float,
    word_ratio: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Patches most related to the expression and words most related to the image.

    Args:
        patch_embeds: ``(B, N, E)``; word_embeds: ``(B, L, E)``; word_valid: ``(B, L)``.

    Returns:
        ``(patch_mask (B, N), word_mask (B, L))`` bool, computed without gradients.
    """
    with torch.no_grad():
        similarity = patch_word_similarity(patch_embeds.float(), word_embeds.float())  # [B, N, L]
        patch_mask = mask_top_ratio(patch_relevance(similarity, word_valid), visual_ratio)
        word_mask = mask_top_ratio(word_relevance(similarity, word_valid), word_ratio, word_valid)
    return patch_mask, word_mask


def random_masks(
    batch: int, num_patches: int, word_valid: torch.Tensor, visual_ratio: float, word_ratio: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Uniformly random masks at the same ratios (the unguided ablation)."""
    device = word_valid.device
    patch_mask = mask_top_ratio(torch.rand(batch, num_patches, device=device), visual_ratio)
    word_mask = mask_top_ratio(torch.rand(word_valid.shape, device=device), word_ratio, word_valid)
    return patch_mask, word_mask


class CMMaskSD(nn.Module):
    """The coordinating parameters and the mask selection of CM-MaskSD.

    Args:
        cfg: :class:`CMMaskSDConfig`.
        visual_token_shape: ``(C_v,)`` for a ViT image tower, ``(3,)`` for a ResNet.
        text_width: ``C_t`` of the text tower's token embeddings.
    """

    def __init__(self, cfg: CMMaskSDConfig, visual_token_shape: tuple[int, ...], text_width: int) -> None:
        super().__init__()
        self.cfg = cfg
        # Small init, like MAE/SimMIM mask tokens.
        self.visual_mask_token = nn.Parameter(torch.zeros(visual_token_shape))
        self.word_mask_token = nn.Parameter(torch.zeros(text_width))
        nn.init.normal_(self.visual_mask_token, std=0.02)
        nn.init.normal_(self.word_mask_token, std=0.02)

    def select_masks(
        self, patch_embeds: torch.Tensor, word_embeds: torch.Tensor, word_valid: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(patch_mask (B, N), word_mask (B, L))`` as configured (guided or random)."""
        cfg = self.cfg
        if cfg.guidance == "random":
            return random_masks(patch_embeds.shape[0], patch_embeds.shape[1], word_valid,
                                cfg.visual_mask_ratio, cfg.word_mask_ratio)
        return similarity_guided_masks(patch_embeds, word_embeds, word_valid,
                                       cfg.visual_mask_ratio, cfg.word_mask_ratio)

    def losses(
        self, image_branch_logits: torch.Tensor, word_branch_logits: torch.Tensor, main_logits: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """``{"loss_sd", "loss_sd_v", "loss_sd_l"}``; ``loss_sd`` is the weighted sum."""
        loss_v = distill_loss(image_branch_logits, main_logits, self.cfg.loss, activation="sigmoid")
        loss_l = distill_loss(word_branch_logits, main_logits, self.cfg.loss, activation="sigmoid")
        return {
            "loss_sd": self.cfg.lambda_v * loss_v + self.cfg.lambda_l * loss_l,
            "loss_sd_v": loss_v,
            "loss_sd_l": loss_l,
        }
