"""MF2-MVQA: medical visual question answering with stage-wise vision-question fusion.

medtune's reading of MF2-MVQA (DESIGN section 7). The question is encoded into word
tokens ``(B, L, D)``; the backbone gives a pyramid of stage maps. For each stage, from
shallow to deep, the question tokens cross-attend to that stage's map (flattened to
tokens, projected to the text width ``D``, with a fixed sin-cos position code) and are
updated; the fused question tokens are pooled and classified over the answer
vocabulary (closed and open answers are classes alike)::

    q_0 = text(question)                                  # (B, L, D)
    q_i = q_{i-1} + CrossAttn(q_{i-1}, Proj_i(stage_i))    # stage_i (B, C_i, *S_i) -> (B, N_i, D)
    logits = Head(masked_mean(q_S))                        # (B, A)

``fusion: "mmbert"`` is the baseline MF2-MVQA improves on (MMBERT): every stage is
average-pooled into ONE token of width ``D``; those tokens and the question tokens go
through a small transformer together, mixing the stages.
"""

from __future__ import annotations

import functools
import math
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from medtune.errors import ConfigError
from medtune.finetune.vqa.config import VQAConfig, VQAModelConfig
from medtune.models.backbones import Backbone, create_backbone
from medtune.models.text import TextEncoder, build_text_encoder


@functools.lru_cache(maxsize=32)
def sincos_position_code(grid: tuple[int, ...], dim: int) -> torch.Tensor:
    """Fixed position code of a ``grid`` of any rank: ``(prod(grid), dim)``.

    Each spatial axis gets ``dim // (2 * len(grid))`` sin/cos frequency pairs of its
    normalised coordinate; left-over channels are zero. Tells the question which side
    of the image a visual token comes from, for CNN stages as well as ViT ones.
    """
    pairs = dim // (2 * len(grid))
    code = torch.zeros(math.prod(grid), dim)
    if pairs == 0:
        return code
    coords = torch.meshgrid(*[torch.linspace(-1, 1, n) for n in grid], indexing="ij")
    freqs = torch.pi * 2.0 ** torch.arange(pairs, dtype=torch.float32) / 2  # (P,)
    for axis, coord in enumerate(coords):
        angles = coord.reshape(-1, 1) * freqs  # (N, P)
        start = axis * 2 * pairs
        code[:, start : start + pairs] = angles.sin()
        code[:, start + pairs : start + 2 * pairs] = angles.cos()
    return code


def stage_tokens(feature_map: torch.Tensor) -> torch.Tensor:
    """``(B, C, *S)`` -> ``(B, prod(S), C)``, for any number of spatial dims."""
    return feature_map.flatten(2).transpose(1, 2)


def masked_mean(tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``tokens (B, L, D)`` over positions where ``mask (B, L)`` is True -> ``(B, D)``."""
    weights = mask.unsqueeze(-1).to(tokens.dtype)
    return (tokens * weights).sum(1) / weights.sum(1).clamp_min(1.0)


class MLP(nn.Sequential):
    def __init__(self, width: int, hidden: int, dropout: float) -> None:
        super().__init__(nn.Linear(width, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, width))


class StageCrossAttention(nn.Module):
    """Question tokens attend to one stage's visual tokens (pre-norm, residual).

    ``forward(question (B, L, D), feature_map (B, C, *S)) -> (B, L, D)``.
    """

    def __init__(self, in_channels: int, width: int, heads: int, mlp_ratio: float, dropout: float) -> None:
        super().__init__()
        self.project = nn.Linear(in_channels, width)  # stage channels -> text width
        self.norm_visual = nn.LayerNorm(width)
        self.norm_question = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, dropout=dropout, batch_first=True)
        self.norm_mlp = nn.LayerNorm(width)
        self.mlp = MLP(width, int(width * mlp_ratio), dropout)

    def forward(self, question: torch.Tensor, feature_map: torch.Tensor) -> torch.Tensor:
        visual = self.project(stage_tokens(feature_map))  # (B, N, D)
        code = sincos_position_code(tuple(feature_map.shape[2:]), visual.shape[-1])
        visual = self.norm_visual(visual + code.to(visual))
        attended, _ = self.attn(self.norm_question(question), visual, visual, need_weights=False)
        question = question + attended  # (B, L, D)
        return question + self.mlp(self.norm_mlp(question))


class StagewiseFusion(nn.Module):
    """MF2-MVQA: one :class:`StageCrossAttention` per stage, applied shallow to deep."""

    def __init__(self, stage_channels: Sequence[int], width: int, cfg: VQAModelConfig) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            StageCrossAttention(c, width, cfg.heads, cfg.mlp_ratio, cfg.dropout) for c in stage_channels
        )
        self.norm = nn.LayerNorm(width)

    def forward(self, question: torch.Tensor, mask: torch.Tensor, stages: Sequence[torch.Tensor]) -> torch.Tensor:
        """``question (B, L, D)``, ``mask (B, L)``, stage maps -> pooled ``(B, D)``."""
        for block, feature_map in zip(self.blocks, stages):
            question = block(question, feature_map)
        return masked_mean(self.norm(question), mask)


class MMBERTFusion(nn.Module):
    """MMBERT-style baseline: each stage pooled to one token, a transformer over all tokens."""

    def __init__(self, stage_channels: Sequence[int], width: int, cfg: VQAModelConfig) -> None:
        super().__init__()
        self.project = nn.ModuleList(nn.Linear(c, width) for c in stage_channels)
        self.stage_embedding = nn.Parameter(torch.zeros(len(stage_channels), width))  # which stage
        self.type_embedding = nn.Parameter(torch.zeros(2, width))  # visual vs question token
        nn.init.normal_(self.stage_embedding, std=0.02)
        nn.init.normal_(self.type_embedding, std=0.02)
        layer = nn.TransformerEncoderLayer(
            width, cfg.heads, int(width * cfg.mlp_ratio), cfg.dropout,
            activation="gelu", batch_first=True, norm_first=True,
        )
        self.encoder = nn.TransformerEncoder(layer, cfg.mmbert_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)

    def forward(self, question: torch.Tensor, mask: torch.Tensor, stages: Sequence[torch.Tensor]) -> torch.Tensor:
        pooled = [proj(stage_tokens(m).mean(1)) for proj, m in zip(self.project, stages)]
        visual = torch.stack(pooled, 1) + self.stage_embedding + self.type_embedding[0]  # (B, S, D)
        tokens = torch.cat([visual, question + self.type_embedding[1]], 1)  # (B, S + L, D)
        valid = torch.cat([mask.new_ones(visual.shape[:2]), mask], 1)  # (B, S + L)
        tokens = self.encoder(tokens, src_key_padding_mask=~valid)
        return masked_mean(self.norm(tokens), valid)


class VQAModel(nn.Module):
    """Backbone + text encoder + fusion + answer classifier.

    ``forward(batch)`` (for :func:`medtune.trainer.train`) takes ``image (B, C, *S)``,
    ``question_ids (B, L)``, ``question_mask (B, L)``, ``answer (B,)`` (-1 = unknown,
    ignored by the loss) and returns ``{"loss", "accuracy"}``.
    """

    def __init__(self, backbone: Backbone, text: TextEncoder, num_answers: int, cfg: VQAModelConfig) -> None:
        super().__init__()
        num_stages = len(backbone.feature_channels)
        self.stage_indices = list(range(num_stages)) if cfg.stages is None else list(cfg.stages)
        bad = [i for i in self.stage_indices if not 0 <= i < num_stages]
        if bad or not self.stage_indices:
            raise ConfigError(f"model.stages {cfg.stages} must pick among the backbone's {num_stages} stages")
        if sorted(self.stage_indices) != self.stage_indices:
            raise ConfigError(f"model.stages {cfg.stages} must go from shallow to deep")
        if text.width % cfg.heads:
            raise ConfigError(f"model.heads {cfg.heads} must divide the text width {text.width}")
        self.backbone = backbone
        self.text = text
        channels = [backbone.feature_channels[i] for i in self.stage_indices]
        fusion_cls = StagewiseFusion if cfg.fusion == "stagewise" else MMBERTFusion
        self.fusion = fusion_cls(channels, text.width, cfg)
        self.head = nn.Sequential(
            nn.Linear(text.width, text.width), nn.GELU(), nn.Dropout(cfg.dropout), nn.Linear(text.width, num_answers)
        )
        backbone.requires_grad_(not cfg.freeze_backbone)
        text.requires_grad_(not cfg.freeze_text)

    def answer_logits(self, image: torch.Tensor, question_ids: torch.Tensor, question_mask: torch.Tensor) -> torch.Tensor:
        """``image (B, C, *S)``, ``question_ids/mask (B, L)`` -> answer logits ``(B, A)``."""
        stages = self.backbone.forward_stages(image)
        stages = [stages[i] for i in self.stage_indices]
        question = self.text(question_ids, question_mask)  # (B, L, D)
        return self.head(self.fusion(question, question_mask, stages))

    def forward(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        logits = self.answer_logits(batch["image"], batch["question_ids"], batch["question_mask"])
        target = batch["answer"]
        loss = F.cross_entropy(logits, target, ignore_index=-1)
        accuracy = (logits.argmax(-1) == target).float().mean()
        return {"loss": loss, "accuracy": accuracy.detach()}


def build_vqa_model(cfg: VQAConfig, num_answers: int, text: TextEncoder | None = None) -> VQAModel:
    """The model of ``cfg`` for ``num_answers`` answer classes (``text``: an already built encoder)."""
    model = VQAModel(create_backbone(cfg.backbone), text or build_text_encoder(cfg.text), num_answers, cfg.model)
    if cfg.adapter is not None:
        from medtune.adapters import adapter_config_from_dict, apply_adapter, set_num_slices

        if not isinstance(cfg.adapter, dict) or "method" not in cfg.adapter:
            raise ConfigError("adapter must be a section with a 'method' key (e.g. lora, med-tuning)")
        apply_adapter(model.backbone, adapter_config_from_dict(cfg.adapter))
        set_num_slices(model.backbone, 1)  # each 2D image is a one-slice volume for slice-mixing adapters
    return model
