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
(:mod:`medtune.finetune.cmmasksd`) and add a distillation loss. GroupNorm (not BatchNorm)
keeps the branches, and batch-1 prediction, independent of batch statistics.
CLIP's ``logit_scale`` and the parts only used for patch-word similarity (ViT
``ln_post``/``proj``, ResNet ``attnpool``) are frozen: they never receive a gradient.

Entry points: ``finetune_main(args)`` (``medtune finetune`` with ``task: referring``),
``predict_main(args, run_dir)`` (``medtune predict`` on a referring run), and
``self_distill_overhead(model_cfg)`` (``medtune params``).
"""

from __future__ import annotations

import argparse
import logging
import math
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from medtune.checkpoints.io import load_json, load_state, load_weights, save_json, save_safetensors
from medtune.config import from_dict, to_dict
from medtune.errors import CheckpointError, ConfigError, DataError
from medtune.finetune.cmmasksd import CMMaskSD, CMMaskSDConfig
from medtune.finetune.ris_metrics import ReferringMetrics, intersection_and_union, referring_metrics_from_counts
from medtune.models import clip as clip_lib
from medtune.trainer import TrainConfig

log = logging.getLogger(__name__)

TASK = "referring"
MODEL_FILE = "model.safetensors"


# --------------------------------------------------------------------------- configs


@dataclass
class ReferringModelConfig:
    """The CRIS-style model on CLIP."""

    clip_model: str = "ViT-B-16"  # open_clip architecture name (ignored when tiny_clip is set)
    clip_weights: str | None = None  # local CLIP checkpoint (OpenAI .pt or open_clip file); never downloaded
    tiny_clip: dict | None = None  # config dict of a small random CLIP (see medtune.models.clip.TINY_CLIP)
    quick_gelu: bool = False  # QuickGELU activations (OpenAI checkpoints were trained with them)
    image_size: int = 416  # square input side in pixels (CLIP position embeddings are resized)
    context_length: int = 22  # tokens per expression incl. start/end; longer ones are truncated
    letterbox: bool = False  # keep the aspect ratio (pad to square, as CRIS) instead of stretching
    num_levels: int = 3  # image feature levels fed to the fusion neck
    fusion_dim: int = 256  # channels D of the fused pixel features
    decoder_layers: int = 3  # pixel-word transformer decoder layers
    decoder_heads: int = 8  # attention heads in the decoder
    decoder_ffn_dim: int = 1024  # hidden width of the decoder MLP
    dropout: float = 0.1  # dropout in the decoder
    freeze_image_encoder: bool = False  # keep the CLIP image tower fixed
    freeze_text_encoder: bool = False  # keep the CLIP text tower fixed
    freeze_token_embedding: bool = False  # keep only CLIP's token table (vocab x C_t, most text params) fixed
    cmmasksd: CMMaskSDConfig = field(default_factory=CMMaskSDConfig)  # masked self-distillation

    def __post_init__(self) -> None:
        if self.num_levels < 1:
            raise ValueError(f"num_levels must be >= 1, got {self.num_levels}")
        if self.fusion_dim % self.decoder_heads or self.fusion_dim % 8:
            raise ValueError(f"fusion_dim {self.fusion_dim} must be divisible by decoder_heads and by 8")


@dataclass
class ReferringDataConfig:
    """Where the referring data is (``--data`` overrides ``root``)."""

    root: str | None = None  # a .jsonl file, a folder with one, or a refer-toolkit (RefCOCO) folder
    layout: str = "auto"  # "auto", "jsonl" or "refcoco"
    dataset: str = "refcoco"  # refcoco layout: refcoco, refcoco+ or refcocog
    train_split: str = "train"  # split trained on
    val_split: str = "val"  # split evaluated on (RefCOCO: val, testA, testB, test)
    synthetic_images: int = 0  # > 0: generate this many shapes images under <run>/data when root is null
    synthetic_image_size: int = 32  # side of the generated images
    cache: bool = True  # keep decoded images in memory (small datasets)
    max_val_samples: int = 0  # evaluate on at most this many records (0: all)


@dataclass
class ReferringEvalConfig:
    """Evaluation during and after training."""

    threshold: float = 0.5  # probability above which a pixel is foreground
    batch_size: int = 16  # samples per evaluation batch
    original_size: bool = True  # score at each image's own size (as RefCOCO tables do), not the input size


@dataclass
class ReferringConfig:
    """A referring-segmentation finetuning run (``task: referring``)."""

    task: str = TASK  # must be "referring"
    model: ReferringModelConfig = field(default_factory=ReferringModelConfig)  # the network
    data: ReferringDataConfig = field(default_factory=ReferringDataConfig)  # the dataset
    train: TrainConfig = field(default_factory=TrainConfig)  # the shared trainer's settings
    eval: ReferringEvalConfig = field(default_factory=ReferringEvalConfig)  # evaluation

    def __post_init__(self) -> None:
        if self.task != TASK:
            raise ValueError(f"task must be '{TASK}', got '{self.task}'")


# --------------------------------------------------------------------------- blocks


def conv_gn_relu(in_channels: int, out_channels: int, kernel_size: int = 3) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
        nn.GroupNorm(min(32, out_channels // 4), out_channels),
        nn.ReLU(inplace=True),
    )


def resize_to(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def coordinate_maps(batch: int, height: int, width: int, device, dtype) -> torch.Tensor:
    """Normalised (x, y) coordinates in [-1, 1]: ``(B, 2, H, W)``."""
    ys = torch.linspace(-1, 1, height, device=device, dtype=dtype)
    xs = torch.linspace(-1, 1, width, device=device, dtype=dtype)
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([grid_x, grid_y]).expand(batch, 2, height, width)


def sine_positions_1d(length: int, dim: int, device, dtype) -> torch.Tensor:
    """Fixed sine/cosine position codes ``(length, dim)``."""
    position = torch.arange(length, device=device, dtype=torch.float32).unsqueeze(1)
    frequency = torch.exp(torch.arange(0, dim, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / dim))
    codes = torch.zeros(length, dim, device=device)
    codes[:, 0::2] = torch.sin(position * frequency)
    codes[:, 1::2] = torch.cos(position * frequency)
    return codes.to(dtype)


def sine_positions_2d(height: int, width: int, dim: int, device, dtype) -> torch.Tensor:
    """Half the channels code y, half x: ``(height * width, dim)``."""
    codes_y = sine_positions_1d(height, dim // 2, device, dtype)  # [H, D/2]
    codes_x = sine_positions_1d(width, dim // 2, device, dtype)  # [W, D/2]
    return torch.cat(
        [codes_y[:, None, :].expand(height, width, -1), codes_x[None, :, :].expand(height, width, -1)], dim=-1
    ).reshape(height * width, dim)


class FPNFusion(nn.Module):
    """CRIS's neck: sentence-gated deepest level, top-down merge, gather at the middle level.

    Args:
        in_channels: channels of each level, shallow to deep.
        sentence_dim: E of the sentence feature.
        dim: output channels D.
    """

    def __init__(self, in_channels: list[int], sentence_dim: int, dim: int) -> None:
        super().__init__()
        self.lateral = nn.ModuleList(conv_gn_relu(c, dim, 1) for c in in_channels)
        self.sentence_gate = nn.Linear(sentence_dim, dim)
        self.gate_norm = nn.Sequential(nn.GroupNorm(min(32, dim // 4), dim), nn.ReLU(inplace=True))
        self.merge = nn.ModuleList(conv_gn_relu(2 * dim, dim) for _ in in_channels[:-1])
        self.gather = conv_gn_relu(len(in_channels) * dim, dim, 1)
        self.with_coords = conv_gn_relu(dim + 2, dim)

    def forward(self, levels: list[torch.Tensor], sentence: torch.Tensor) -> torch.Tensor:
        """levels: ``[(B, C_i, H_i, W_i)]`` shallow to deep; sentence ``(B, E)`` -> ``(B, D, h, w)``."""
        deepest = self.lateral[-1](levels[-1])
        gate = self.sentence_gate(sentence)[:, :, None, None]  # [B, D, 1, 1]
        merged = [self.gate_norm(deepest * gate)]
        for index in range(len(levels) - 2, -1, -1):  # top-down: deep -> shallow
            lateral = self.lateral[index](levels[index])
            above = resize_to(merged[0], lateral.shape[-2:])
            merged.insert(0, self.merge[index](torch.cat([lateral, above], dim=1)))
        middle = merged[len(merged) // 2].shape[-2:]
        fused = self.gather(torch.cat([resize_to(m, middle) for m in merged], dim=1))  # [B, D, h, w]
        coords = coordinate_maps(fused.shape[0], *middle, fused.device, fused.dtype)
        return self.with_coords(torch.cat([fused, coords], dim=1))


class PixelWordLayer(nn.Module):
    """Pixel self-attention, pixel-to-word cross-attention, MLP (pre-norm, residual)."""

    def __init__(self, dim: int, heads: int, ffn_dim: int, dropout: float) -> None:
        super().__init__()
        self.norm_self = nn.LayerNorm(dim)
        self.self_attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.norm_cross = nn.LayerNorm(dim)
        self.cross_attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.norm_mlp = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, ffn_dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(ffn_dim, dim))
        self.dropout = nn.Dropout(dropout)

    def forward(
        self,
        pixels: torch.Tensor,
        pixel_pos: torch.Tensor,
        words: torch.Tensor,
        word_pos: torch.Tensor,
        word_padding: torch.Tensor,
    ) -> torch.Tensor:
        """pixels ``(B, N, D)``, words ``(B, L, D)``, word_padding ``(B, L)`` True = ignore."""
        normed = self.norm_self(pixels)
        query = normed + pixel_pos
        pixels = pixels + self.dropout(self.self_attn(query, query, normed, need_weights=False)[0])
        normed = self.norm_cross(pixels)
        attended = self.cross_attn(
            normed + pixel_pos, words + word_pos, words, key_padding_mask=word_padding, need_weights=False
        )[0]
        pixels = pixels + self.dropout(attended)
        return pixels + self.dropout(self.mlp(self.norm_mlp(pixels)))


class PixelWordDecoder(nn.Module):
    """A stack of :class:`PixelWordLayer` over the fused map; words projected to D first."""

    def __init__(self, dim: int, word_dim: int, layers: int, heads: int, ffn_dim: int, dropout: float) -> None:
        super().__init__()
        self.word_proj = nn.Linear(word_dim, dim)
        self.layers = nn.ModuleList(PixelWordLayer(dim, heads, ffn_dim, dropout) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)

    def forward(self, fused: torch.Tensor, words: torch.Tensor, word_padding: torch.Tensor) -> torch.Tensor:
        """fused ``(B, D, h, w)``, words ``(B, L, C_t)`` -> ``(B, D, h, w)``."""
        batch, dim, height, width = fused.shape
        pixels = fused.flatten(2).transpose(1, 2)  # [B, h*w, D]
        words = self.word_proj(words)  # [B, L, D]
        pixel_pos = sine_positions_2d(height, width, dim, fused.device, fused.dtype).unsqueeze(0)
        word_pos = sine_positions_1d(words.shape[1], dim, fused.device, fused.dtype).unsqueeze(0)
        for layer in self.layers:
            pixels = layer(pixels, pixel_pos, words, word_pos, word_padding)
        return self.norm(pixels).transpose(1, 2).reshape(batch, dim, height, width)


class DynamicKernelProjector(nn.Module):
    """Upsample the pixel map 4x; the sentence becomes a per-sample 3x3 conv kernel + bias."""

    def __init__(self, dim: int, sentence_dim: int, kernel_size: int = 3) -> None:
        super().__init__()
        hidden = dim // 2
        self.upsample = nn.Sequential(
            nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
            conv_gn_relu(dim, dim),
            nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
            conv_gn_relu(dim, hidden),
            nn.Conv2d(hidden, hidden, 1),
        )
        self.kernel_size = kernel_size
        self.hidden = hidden
        self.text_to_kernel = nn.Linear(sentence_dim, hidden * kernel_size * kernel_size + 1)
        # Start from a small foreground prior (sigmoid(-2) ~ 0.12), as RetinaNet does, so early
        # steps do not go into unlearning a 50% foreground guess.
        nn.init.constant_(self.text_to_kernel.bias[-1:], -2.0)

    def forward(self, pixels: torch.Tensor, sentence: torch.Tensor) -> torch.Tensor:
        """pixels ``(B, D, h, w)``, sentence ``(B, E)`` -> logits ``(B, 1, 4h, 4w)``."""
        features = self.upsample(pixels)  # [B, D/2, 4h, 4w]
        batch, channels, height, width = features.shape
        params = self.text_to_kernel(sentence)  # [B, D/2*k*k + 1]
        weight = params[:, :-1].reshape(batch, channels, self.kernel_size, self.kernel_size)
        bias = params[:, -1]
        # One group per sample: sample b is convolved with its own kernel only.
        logits = F.conv2d(
            features.reshape(1, batch * channels, height, width), weight, bias,
            padding=self.kernel_size // 2, groups=batch,
        )
        return logits.reshape(batch, 1, height, width)


# --------------------------------------------------------------------------- the model


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


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


# --------------------------------------------------------------------------- overhead


def example_batch(cfg: ReferringModelConfig, tokenizer: clip_lib.ClipTokenizer, batch_size: int) -> dict:
    """A fixed random batch of the model's input size (for FLOP counts and benchmarks)."""
    generator = torch.Generator().manual_seed(0)
    size = cfg.image_size
    return {
        "image": torch.randn(batch_size, 3, size, size, generator=generator),
        "tokens": tokenizer(["the red circle left of the blue square"] * batch_size),
        "mask": (torch.rand(batch_size, size, size, generator=generator) > 0.5).float(),
    }


def training_step_flops(model: ReferringSegmenter, batch: dict) -> int:
    """FLOPs of one forward + backward of ``model(batch)["loss"]`` (torch flop counter)."""
    from torch.utils.flop_counter import FlopCounterMode

    model.train()
    counter = FlopCounterMode(display=False)
    with counter:
        model(batch)["loss"].backward()
    model.zero_grad(set_to_none=True)
    return int(counter.get_total_flops())


def self_distill_overhead(model_cfg: ReferringModelConfig | dict, batch_size: int = 1) -> dict[str, int]:
    """Parameters and training-step FLOPs without and with the CM-MaskSD branches.

    ``model_cfg`` is a :class:`ReferringModelConfig` or its mapping (a run's
    ``config.json["model"]``). Returns ``{"params_plain", "params_sd", "flops_plain",
    "flops_sd"}`` for a batch of ``batch_size`` at ``model_cfg.image_size`` (CLIP weights
    are not loaded: shapes only).
    """
    if isinstance(model_cfg, dict):
        model_cfg = from_dict(ReferringModelConfig, model_cfg, "model")
    results: dict[str, int] = {}
    for suffix, enabled in (("plain", False), ("sd", True)):
        cfg = replace(model_cfg, cmmasksd=replace(model_cfg.cmmasksd, enabled=enabled), dropout=0.0)
        torch.manual_seed(0)
        model = build_referring_model(cfg, load_clip_weights=False)
        results[f"params_{suffix}"] = count_parameters(model)
        results[f"flops_{suffix}"] = training_step_flops(model, example_batch(cfg, model.tokenizer, batch_size))
    return results


# --------------------------------------------------------------------------- training


def _collect_records(cfg: ReferringConfig, run_dir: Path) -> tuple[list, list]:
    from medtune.data.referring import load_referring_records

    data = cfg.data
    root = data.root
    if root is None:
        if data.synthetic_images <= 0:
            raise ConfigError("referring data: set data.root (or --data), or data.synthetic_images > 0")
        from medtune.data.synth import synthesize_referring

        root = str(synthesize_referring(run_dir / "data", data.synthetic_images, data.synthetic_image_size, cfg.train.seed))
        log.info("generated %d shapes images under %s", data.synthetic_images, run_dir / "data")
    train_records = load_referring_records(root, data.train_split, data.layout, data.dataset)
    val_records = load_referring_records(root, data.val_split, data.layout, data.dataset)
    if data.max_val_samples:
        val_records = val_records[: data.max_val_samples]
    return train_records, val_records


ReferringRow = tuple[int, int, int]  # (sample index, intersection, union) in pixels


@torch.no_grad()
def referring_shard_counts(
    model: ReferringSegmenter,
    dataset,
    rank: int = 0,
    world: int = 1,
    batch_size: int = 16,
    threshold: float = 0.5,
    original_size: bool = False,
) -> list[ReferringRow]:
    """Per-sample intersection and union for this process's share of a :class:`ReferringDataset`.

    Process ``rank`` of ``world`` scores samples ``rank, rank + world, ...``; the shares
    of all ranks cover every sample once. With ``original_size`` each prediction is
    upsampled to its image's size and scored against the full-resolution mask;
    otherwise both are at the model's input size.
    """
    from torch.utils.data import DataLoader, Subset

    indices = list(range(rank, len(dataset), world))
    shard = dataset if world == 1 else Subset(dataset, indices)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    rows: list[ReferringRow] = []
    for batch in DataLoader(shard, batch_size=batch_size, shuffle=False):
        tokens = batch["tokens"].to(device)
        index = batch["index"].tolist()  # positions in the whole dataset
        if not original_size:
            probs = model.predict(batch["image"].to(device), tokens)
            intersection, union = intersection_and_union(probs > threshold, batch["mask"].to(device) > 0.5)
            rows += zip(index, intersection.tolist(), union.tolist())
            continue
        logits = model.forward_branch(batch["image"].to(device), tokens).logits  # [B, 1, h, w]
        for logit, sample in zip(logits, index):
            truth = torch.from_numpy(dataset.load_mask(sample)).to(device)  # [H, W]
            prob = torch.sigmoid(model.logits_on_image(logit[None], tuple(truth.shape)))  # [1, 1, H, W]
            intersection, union = intersection_and_union(prob[0] > threshold, truth[None])
            rows.append((sample, int(intersection), int(union)))
    model.train(was_training)
    return rows


def merge_referring_counts(rows: list[ReferringRow]) -> dict[str, float]:
    """oIoU (total I / total U), mIoU and prec@X from the rows of every shard, in sample order.

    Per-sample IoU is a function of that sample's (I, U) alone, so the merged metrics
    are those of one process scoring every sample.
    """
    if not rows:
        raise ValueError("no referring samples were scored")
    rows = sorted(rows)
    intersection = torch.tensor([row[1] for row in rows], dtype=torch.long)
    union = torch.tensor([row[2] for row in rows], dtype=torch.long)
    return referring_metrics_from_counts(intersection, union)


def evaluate_referring(
    model: ReferringSegmenter,
    dataset,
    batch_size: int = 16,
    threshold: float = 0.5,
    original_size: bool = False,
    accelerator=None,
) -> dict[str, float]:
    """oIoU, mIoU, prec@X of ``model`` on a :class:`ReferringDataset`.

    With ``original_size`` each prediction is upsampled to its image's size and scored
    against the full-resolution mask; otherwise both are at the model's input size.
    With an ``accelerator`` of several processes each one scores every
    ``num_processes``-th sample and the per-sample counts are gathered, so every process
    returns the single-process metrics and no sample is scored twice (then every
    process must call this).
    """
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    rows = referring_shard_counts(model, dataset, rank, world, batch_size, threshold, original_size)
    if world > 1:
        from accelerate.utils import gather_object

        rows = gather_object(rows)
    return merge_referring_counts(rows)


def apply_cli_flags(cfg_dict: dict, args: argparse.Namespace) -> dict:
    """Fold the common ``medtune finetune`` flags into the raw config mapping."""
    model = cfg_dict.setdefault("model", {})
    if getattr(args, "data", None):
        cfg_dict.setdefault("data", {})["root"] = str(args.data)
    if getattr(args, "backbone", None):
        model["clip_model"] = args.backbone
    if getattr(args, "clip_weights", None):
        model["clip_weights"] = str(args.clip_weights)
    if getattr(args, "self_distill", False):
        model.setdefault("cmmasksd", {})["enabled"] = True
    if getattr(args, "text_weights", None):
        raise ConfigError("--text-weights does not apply to referring segmentation: CLIP holds both towers (use --clip-weights)")
    return cfg_dict


def load_referring_config(args: argparse.Namespace) -> ReferringConfig:
    from medtune.config import apply_overrides, read_yaml

    raw = read_yaml(args.config) if getattr(args, "config", None) else {}
    apply_overrides(raw, list(getattr(args, "set", None) or []))
    apply_cli_flags(raw, args)
    try:
        return from_dict(ReferringConfig, raw)
    except ConfigError as exc:
        raise ConfigError(f"{args.config}: {exc}" if getattr(args, "config", None) else str(exc)) from None


def finetune_main(args: argparse.Namespace) -> int:
    """``medtune finetune --config X.yaml`` for ``task: referring``; writes a run folder.

    Reads ``args.config``, ``args.set``, ``args.data``, ``args.output``, ``args.resume``,
    ``args.backbone`` (CLIP architecture), ``args.clip_weights``, ``args.self_distill``.
    The run folder gets ``config.json``, ``model.safetensors`` (best evaluation),
    ``metrics.jsonl`` and ``eval.json``.
    """
    from medtune.data.referring import ReferringDataset
    from medtune.trainer import build_loader, higher_is_better, make_accelerator, train

    cfg = load_referring_config(args)
    run_dir = Path(getattr(args, "output", None) or "checkpoints/referring")
    held = [name for name in (MODEL_FILE, "state") if (run_dir / name).exists()]
    if getattr(args, "resume", None) is None and held:
        raise CheckpointError(
            f"run folder {run_dir} already holds a run ({', '.join(held)}); "
            f"continue it with --resume latest or choose another --output"
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.train.seed)
    model = build_referring_model(cfg.model)
    accelerator = make_accelerator(cfg.train, run_dir)
    with accelerator.main_process_first():  # generated data is written once, then read by all
        train_records, val_records = _collect_records(cfg, run_dir)
    size = cfg.model.image_size
    letterbox = cfg.model.letterbox
    train_set = ReferringDataset(train_records, model.tokenizer, size, cache=cfg.data.cache, letterbox=letterbox)
    val_set = ReferringDataset(val_records, model.tokenizer, size, cache=cfg.data.cache, letterbox=letterbox)
    log.info(
        "referring: %d train / %d val expressions, %s trainable parameters (CM-MaskSD %s)",
        len(train_set), len(val_set), f"{count_parameters(model, True):,}",
        "on" if model.masksd is not None else "off",
    )
    saved_config = to_dict(cfg)
    saved_config["model"]["clip_weights"] = None  # model.safetensors holds CLIP too
    if accelerator.is_main_process:
        save_json(saved_config, run_dir / "config.json")

    def save_model(bare: nn.Module, metrics: dict) -> None:
        save_safetensors(bare.state_dict(), run_dir / MODEL_FILE, metadata={"task": TASK, "oIoU": metrics.get("oIoU", "")})

    result = train(
        model,
        build_loader(train_set, cfg.train),
        cfg.train,
        run_dir,
        resume=getattr(args, "resume", None),
        evaluate=lambda m: evaluate_referring(
            m, val_set, cfg.eval.batch_size, cfg.eval.threshold, cfg.eval.original_size, accelerator
        ),
        is_better=higher_is_better("oIoU"),
        on_best=save_model,
        accelerator=accelerator,
        unit="expressions",
    )
    if accelerator.is_main_process:
        save_json({"final": result.eval_metrics, "best": result.best_metrics, "best_step": result.best_step},
                  run_dir / "eval.json")
        log.info("best oIoU %.4f at step %s; run folder %s",
                 (result.best_metrics or {}).get("oIoU", float("nan")), result.best_step, run_dir)
    return 0


# --------------------------------------------------------------------------- prediction


def load_referring_run(run_dir: str | Path) -> ReferringSegmenter:
    """Rebuild the model of a run folder and load ``model.safetensors`` (strict)."""
    run_dir = Path(run_dir)
    config = load_json(run_dir / "config.json")
    if config.get("task") != TASK:
        raise CheckpointError(f"{run_dir}: not a referring run (task '{config.get('task')}')")
    cfg = from_dict(ReferringModelConfig, config["model"], "model")
    model = build_referring_model(cfg, load_clip_weights=False)
    load_state(model, load_weights(run_dir / MODEL_FILE), strict=True, source=run_dir / MODEL_FILE)
    return model.eval()


def predict_main(args: argparse.Namespace, run_dir: str | Path) -> int:
    """``medtune predict --model RUN --input IMAGE --expression TEXT --output MASK.png``.

    ``args.input`` is an image (then ``args.expression`` is required) or a ``.jsonl`` of
    records (then every record is predicted into the ``args.output`` folder, and oIoU /
    mIoU are logged and written to ``metrics.json`` there). Masks are PNGs (0/255) at
    the input image's size; ``args.threshold`` (default 0.5) binarises probabilities.
    """
    from PIL import Image

    from medtune.data.referring import load_jsonl_records, preprocess_image

    model = load_referring_run(run_dir)
    device = torch.device(getattr(args, "device", None) or ("cuda" if torch.cuda.is_available() else "cpu"))
    model.to(device)
    threshold = float(getattr(args, "threshold", None) or 0.5)
    source = Path(args.input)
    output = Path(getattr(args, "output", None) or "prediction")
    size = model.cfg.image_size
    if source.suffix == ".jsonl":
        records = load_jsonl_records(source)
        output.mkdir(parents=True, exist_ok=True)
        metrics = ReferringMetrics()
        for number, record in enumerate(records):
            with Image.open(record.image) as image:
                pixels = preprocess_image(image, size, model.cfg.letterbox).unsqueeze(0)
                height, width = image.height, image.width
            tokens = model.tokenizer([record.expression]).to(device)
            prob = model.predict(pixels.to(device), tokens, size=(height, width))[0].cpu()
            pred = (prob > threshold).numpy()
            Image.fromarray(pred.astype(np.uint8) * 255).save(output / f"{number:05d}_{record.image.stem}.png")
            with Image.open(record.mask_path) as mask:
                truth = np.asarray(mask.convert("L")) > 0
            metrics.update(torch.from_numpy(pred)[None], torch.from_numpy(truth)[None])
        scores = metrics.compute()
        save_json(scores, output / "metrics.json")
        log.info("%d expressions: oIoU %.4f, mIoU %.4f", len(records), scores["oIoU"], scores["mIoU"])
        return 0
    expression = getattr(args, "expression", None)
    if not expression:
        raise ConfigError("referring prediction needs --expression TEXT (or an --input .jsonl of records)")
    if not source.is_file():
        raise DataError(f"input image not found: {source}")
    try:
        with Image.open(source) as image:
            pixels = preprocess_image(image, size, model.cfg.letterbox).unsqueeze(0)
            height, width = image.height, image.width
    except OSError as exc:
        raise DataError(f"{source}: cannot read image ({exc})") from None
    prob = model.predict(pixels.to(device), model.tokenizer([expression]).to(device), size=(height, width))[0].cpu()
    if output.suffix.lower() != ".png":
        output.mkdir(parents=True, exist_ok=True)
        output = output / f"{source.stem}_mask.png"
    output.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((prob > threshold).numpy().astype(np.uint8) * 255).save(output)
    log.info("'%s' -> %s (%d foreground pixels)", expression, output, int((prob > threshold).sum()))
    return 0
