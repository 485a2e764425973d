"""What CM-MaskSD costs: parameters and training FLOPs without and with its branches."""

from __future__ import annotations

from dataclasses import replace

import torch

from medtune.checkpoints.counting import count_flops, count_parameters
from medtune.config import from_dict
from medtune.finetune.referring.config import ReferringModelConfig
from medtune.finetune.referring.model import ReferringSegmenter, build_referring_model
from medtune.models import clip as clip_lib


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
    """FLOPs of one forward + backward of ``model(batch)["loss"]`` (medtune's FLOP counter)."""
    model.train()
    flops = count_flops(lambda: model(batch)["loss"], backward=True)
    model.zero_grad(set_to_none=True)
    return flops


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
        results[f"params_{suffix}"] = count_parameters(model)[0]
        results[f"flops_{suffix}"] = training_step_flops(model, example_batch(cfg, model.tokenizer, batch_size))
    return results
