"""Referring image segmentation on CLIP (CRIS-style), optionally with CM-MaskSD.

Given an image and an expression ("the red circle left of the square"), predict the
mask of what the expression refers to. The model follows CRIS (DESIGN section 6):

1. ``encode``      CLIP image tower -> three feature maps (ViT: three blocks' tokens as
                   maps; ResNet: layer2/3/4); CLIP text tower -> word features
                   ``(B, L, C_t)`` and the sentence feature ``(B, E)``.
2. ``FPNFusion``   the sentence gates the deepest map (element-wise product with its
                   projection), a top-down path merges the levels, all are gathered at the
                   middle level's resolution with two coordinate channels.   # [B, D, h, w]
3. ``PixelWordDecoder``  transformer layers: pixel self-attention, pixel-to-word
                   cross-attention (padding words masked out), MLP.          # [B, h*w, D]
4. ``DynamicKernelProjector``  the pixel map is upsampled 4x; the sentence is projected to
                   a 3x3 conv kernel + bias, applied per sample.              # [B, 1, 4h, 4w]
5. loss: BCE between the logits and the mask resized (nearest) to the logits' size.

With ``model.cmmasksd.enabled`` two masked branches share every weight
(:mod:`medtune.finetune.referring.cmmasksd`) and add a distillation loss. GroupNorm (not BatchNorm)
keeps the branches, and batch-1 prediction, independent of batch statistics.
CLIP's ``logit_scale`` and the parts only used for patch-word similarity (ViT
``ln_post``/``proj``, ResNet ``attnpool``) are frozen: they never receive a gradient.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from medtune.finetune.referring.cmmasksd import CMMaskSD
from medtune.finetune.referring.config import ReferringModelConfig
from medtune.finetune.referring.layers import DynamicKernelProjector, FPNFusion, PixelWordDecoder
from medtune.models import clip as clip_lib


@dataclass
class BranchOutput:
    """One pass of the network: mask ``logits (B, 1, h, w)`` and, when asked, the CLIP
    ``patch_embeds (B, N, E)`` / ``word_embeds (B, L, E)`` used for masking guidance."""

    logits: torch.Tensor
    patch_embeds: torch.Tensor | None = None
    word_embeds: torch.Tensor | None = None


class ReferringSegmenter(nn.Module):
    """CRIS-style referring segmentation on an open_clip CLIP, with optional CM-MaskSD.

    ``forward(batch)`` takes ``{"image": (B, 3, S, S), "tokens": (B, L), "mask": (B, S, S)}``
    and returns ``{"loss", "loss_mask"[, "loss_sd", "loss_sd_v", "loss_sd_l"]}``;
    :meth:`predict` returns mask probabilities.
    """

    def __init__(self, cfg: ReferringModelConfig, clip: nn.Module, tokenizer: clip_lib.ClipTokenizer) -> None:
        super().__init__()
        self.cfg = cfg
        self.clip = clip
        self.tokenizer = tokenizer
        level_channels = clip_lib.image_level_channels(clip, cfg.num_levels)
        sentence_dim = clip_lib.embed_dim(clip)
        self.neck = FPNFusion(level_channels, sentence_dim, cfg.fusion_dim)
        self.decoder = PixelWordDecoder(
            cfg.fusion_dim, clip_lib.text_width(clip), cfg.decoder_layers, cfg.decoder_heads,
            cfg.decoder_ffn_dim, cfg.dropout,
        )
        self.projector = DynamicKernelProjector(cfg.fusion_dim, sentence_dim)
        self.masksd = (
            CMMaskSD(cfg.cmmasksd, clip_lib.image_mask_token_shape(clip), clip_lib.text_width(clip))
            if cfg.cmmasksd.enabled
            else None
        )
        self._freeze_clip_parts()

    def _freeze_clip_parts(self) -> None:
        visual = self.clip.visual
        frozen = [self.clip.logit_scale]
        if getattr(self.clip, "logit_bias", None) is not None:
            frozen.append(self.clip.logit_bias)
        for name in ("ln_post", "attnpool"):
            if hasattr(visual, name):
                frozen.extend(getattr(visual, name).parameters())
        if isinstance(getattr(visual, "proj", None), nn.Parameter):
            frozen.append(visual.proj)
        if self.cfg.freeze_image_encoder:
            frozen.extend(visual.parameters())
        if self.cfg.freeze_token_embedding:
            frozen.append(self.clip.token_embedding.weight)
        if self.cfg.freeze_text_encoder:
            for name in ("token_embedding", "transformer", "ln_final"):
                frozen.extend(getattr(self.clip, name).parameters())
            frozen.append(self.clip.positional_embedding)
            projection = self.clip.text_projection
            if projection is not None:
                frozen.extend(projection.parameters() if isinstance(projection, nn.Module) else [projection])
        for param in frozen:
            param.requires_grad_(False)

    def encode_image(self, images: torch.Tensor, patch_mask: torch.Tensor | None = None,
                     with_embeds: bool = False) -> clip_lib.ImageLevels:
        """CLIP image levels of ``(B, 3, S, S)``; masked patches get the visual mask token."""
        token = self.masksd.visual_mask_token if patch_mask is not None else None
        return clip_lib.encode_image_levels(self.clip, images, self.cfg.num_levels, patch_mask, token,
                                            with_patch_embeds=with_embeds)

    def encode_text(self, tokens: torch.Tensor, word_mask: torch.Tensor | None = None) -> clip_lib.TextFeatures:
        """CLIP word and sentence features of ``(B, L)``; masked words get the word mask token."""
        token = self.masksd.word_mask_token if word_mask is not None else None
        return clip_lib.encode_text_words(self.clip, tokens, word_mask, token)

    def decode(self, levels: list[torch.Tensor], text: clip_lib.TextFeatures, tokens: torch.Tensor) -> torch.Tensor:
        """Neck, pixel-word decoder and dynamic-kernel projector -> logits ``(B, 1, 4h, 4w)``."""
        fused = self.neck(levels, text.sentence)  # [B, D, h, w]
        decoded = self.decoder(fused, text.words, word_padding=tokens == 0)  # [B, D, h, w]
        return self.projector(decoded, text.sentence)  # [B, 1, 4h, 4w]

    def forward_branch(
        self,
        images: torch.Tensor,
        tokens: torch.Tensor,
        patch_mask: torch.Tensor | None = None,
        word_mask: torch.Tensor | None = None,
        with_embeds: bool = False,
    ) -> BranchOutput:
        """One pass: images ``(B, 3, S, S)``, tokens ``(B, L)``, optional masks -> logits."""
        image = self.encode_image(images, patch_mask, with_embeds)
        text = self.encode_text(tokens, word_mask)
        logits = self.decode(image.levels, text, tokens)
        if with_embeds:
            return BranchOutput(logits, image.patch_embeds, text.word_embeds)
        return BranchOutput(logits)

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        images, tokens = batch["image"], batch["tokens"]
        use_sd = self.masksd is not None and self.training
        image = self.encode_image(images, with_embeds=use_sd)
        text = self.encode_text(tokens)
        main_logits = self.decode(image.levels, text, tokens)  # [B, 1, h, w]
        target = F.interpolate(batch["mask"].unsqueeze(1).float(), size=main_logits.shape[-2:], mode="nearest")
        loss_mask = F.binary_cross_entropy_with_logits(main_logits, target)
        out = {"loss": loss_mask, "loss_mask": loss_mask.detach()}
        if use_sd:
            word_valid = self.tokenizer.word_positions(tokens)
            patch_mask, word_mask = self.masksd.select_masks(image.patch_embeds, text.word_embeds, word_valid)
            # Each masked branch re-encodes only the modality it masks and reuses the main
            # branch's features of the other (the same values recomputation would give, and
            # their gradients reach the same weights); both branches decode as one 2B batch.
            masked_image = self.encode_image(images, patch_mask)  # image branch: masked patches
            masked_text = self.encode_text(tokens, word_mask)  # word branch: masked words
            levels = [torch.cat([m, full]) for m, full in zip(masked_image.levels, image.levels)]
            both_text = clip_lib.TextFeatures(
                *(torch.cat([full, m]) for full, m in zip(
                    (text.words, text.word_embeds, text.sentence),
                    (masked_text.words, masked_text.word_embeds, masked_text.sentence),
                ))
            )
            image_branch, word_branch = self.decode(levels, both_text, torch.cat([tokens, tokens])).chunk(2)
            losses = self.masksd.losses(image_branch, word_branch, main_logits)
            out["loss"] = loss_mask + losses["loss_sd"]
            out.update({k: v.detach() for k, v in losses.items()})
        return out

    @torch.no_grad()
    def predict(self, images: torch.Tensor, tokens: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        """Mask probabilities ``(B, H, W)``: on an original image of ``size = (H, W)``
        (letterbox padding removed), or at the model input size when ``size`` is None."""
        logits = self.forward_branch(images, tokens).logits  # [B, 1, h, w]
        return torch.sigmoid(self.logits_on_image(logits, size)[:, 0])

    def logits_on_image(self, logits: torch.Tensor, size: tuple[int, int] | None) -> torch.Tensor:
        """``(B, 1, h, w)`` logits -> ``(B, 1, H, W)`` on the image (or the input if ``size`` is None)."""
        from medtune.data.referring import logits_to_image

        input_size = self.cfg.image_size
        if size is None:
            return F.interpolate(logits, size=(input_size, input_size), mode="bilinear", align_corners=False)
        return logits_to_image(logits, size[0], size[1], self.cfg.letterbox, input_size)


def build_referring_model(cfg: ReferringModelConfig, load_clip_weights: bool = True) -> ReferringSegmenter:
    """CLIP (local weights or tiny config) + the CRIS head (+ CM-MaskSD tokens)."""
    clip, tokenizer = clip_lib.build_clip(
        cfg.clip_model,
        weights=cfg.clip_weights if load_clip_weights else None,
        tiny_config=cfg.tiny_clip,
        image_size=cfg.image_size,
        context_length=cfg.context_length,
        quick_gelu=cfg.quick_gelu,
    )
    return ReferringSegmenter(cfg, clip, tokenizer)
