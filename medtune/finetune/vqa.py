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

Entry points for the CLI: :func:`finetune_main` (``medtune finetune --task vqa``) and
:func:`predict_main` (``medtune predict --model RUN ...`` on a VQA run). Python users
call :func:`build_vqa_model`, :func:`evaluate_vqa` and :func:`load_vqa_run`.

A run folder holds ``config.json`` (the resolved :class:`VQAConfig` plus the answer
vocabulary), ``model.safetensors`` (final weights), ``best/model.safetensors`` (best
evaluation, as segmentation runs keep it), ``eval_metrics.json``, ``metrics.jsonl`` and
``state/`` (resume).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Subset

from medtune.config import apply_overrides, from_dict, read_yaml, to_dict
from medtune.errors import CheckpointError, ConfigError, DataError
from medtune.models.backbones import Backbone, BackboneConfig, create_backbone
from medtune.models.text import TextConfig, TextEncoder, build_text_encoder
from medtune.trainer import TrainConfig, build_loader, higher_is_better, train

log = logging.getLogger(__name__)

TASK = "vqa"
FUSIONS = ("stagewise", "mmbert")


# --------------------------------------------------------------------------- configs


@dataclass
class VQADataConfig:
    """Which VQA dataset to read and how."""

    format: str = "vqa_rad"  # "vqa_rad", "slake", "vqa_med_2019", or "generated" (written into root once)
    root: str | None = None  # dataset folder; the CLI's --data fills it
    train_split: str = "train"  # split the model trains on and the answer vocabulary comes from
    eval_split: str = "test"  # split evaluated every train.eval_every steps and at the end
    image_dir: str | None = None  # image folder if not the layout's default (see medtune.data.vqa)
    languages: list[str] = field(default_factory=lambda: ["en"])  # SLAKE: question languages kept
    min_answer_count: int = 1  # training answers seen fewer times are left out of the vocabulary
    generated_images: int = 200  # format "generated": number of slices drawn
    generated_img_size: int = 64  # format "generated": side of the drawn slices in pixels
    generated_seed: int = 0  # format "generated": seed of the drawing


@dataclass
class VQAModelConfig:
    """The fusion network on top of the backbone and the text encoder."""

    fusion: str = "stagewise"  # "stagewise" (MF2-MVQA) or "mmbert" (pooled stage tokens + transformer)
    stages: list[int] | None = None  # backbone stages used, shallow to deep (None = all)
    heads: int = 8  # attention heads of the fusion blocks (must divide the text width)
    mlp_ratio: float = 4.0  # hidden width of the fusion MLPs, as a multiple of the text width
    mmbert_layers: int = 2  # "mmbert": transformer layers over [stage tokens; question tokens]
    dropout: float = 0.1  # dropout in the fusion blocks and the answer head
    freeze_backbone: bool = False  # keep the image backbone's weights fixed
    freeze_text: bool = False  # keep the text encoder's weights fixed

    def __post_init__(self) -> None:
        if self.fusion not in FUSIONS:
            raise ValueError(f"model.fusion must be one of {', '.join(FUSIONS)}, got '{self.fusion}'")


@dataclass
class VQAConfig:
    """A whole VQA run: ``medtune finetune --task vqa --config configs/mf2mvqa_*.yaml``."""

    task: str = TASK  # always "vqa" (lets `medtune finetune` dispatch on the config)
    data: VQADataConfig = field(default_factory=VQADataConfig)  # the dataset
    backbone: BackboneConfig = field(  # the image backbone (in_chans 3 reads RGB, else grey repeated)
        default_factory=lambda: BackboneConfig(name="vit_base_patch16_224", in_chans=3, img_size=224)
    )
    text: TextConfig = field(default_factory=TextConfig)  # the question encoder
    model: VQAModelConfig = field(default_factory=VQAModelConfig)  # the fusion and answer head
    # parameter-efficient tuning of the backbone, {"method": <medtune.adapters name>, **options}
    # (lora, med-tuning, adaptformer, ...); then the method decides which backbone tensors
    # train. None: the whole backbone trains unless model.freeze_backbone.
    adapter: dict | None = None
    train: TrainConfig = field(default_factory=TrainConfig)  # the shared trainer's settings
    eval_batch_size: int = 64  # questions per evaluation/prediction batch

    def __post_init__(self) -> None:
        if self.task != TASK:
            raise ValueError(f"task must be '{TASK}' for a VQA config, got '{self.task}'")


# --------------------------------------------------------------------------- model


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


# --------------------------------------------------------------------------- evaluation


def vqa_accuracy(pred: torch.Tensor, target: torch.Tensor, closed: torch.Tensor) -> dict[str, float]:
    """Accuracy over all, closed and open questions.

    ``pred (N,)`` answer indices, ``target (N,)`` (-1 = answer not in the vocabulary:
    always wrong), ``closed (N,)`` bool. An empty subset's accuracy is NaN. Also returns
    the counts ``n_all``, ``n_closed``, ``n_open`` and ``n_unknown``.
    """
    correct = (pred == target) & (target >= 0)
    closed = closed.bool()

    def mean(selected: torch.Tensor) -> float:
        count = int(selected.sum())
        return float(correct[selected].sum()) / count if count else float("nan")

    everything = torch.ones_like(closed)
    return {
        "accuracy": mean(everything),
        "accuracy_closed": mean(closed),
        "accuracy_open": mean(~closed),
        "n_all": float(len(target)),
        "n_closed": float(closed.sum()),
        "n_open": float((~closed).sum()),
        "n_unknown": float((target < 0).sum()),
    }


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def predict_dataset(model: VQAModel, dataset, batch_size: int = 64, num_workers: int = 0) -> dict[str, torch.Tensor]:
    """Answers for every item of a :class:`~medtune.data.vqa.VQADataset`, in order.

    Returns ``pred (N,)``, ``prob (N,)`` (softmax of the chosen answer), ``target (N,)``
    and ``closed (N,)``.
    """
    was_training = model.training
    model.eval()
    device = _model_device(model)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    preds, probs, targets, closed = [], [], [], []
    for batch in loader:
        logits = model.answer_logits(
            batch["image"].to(device), batch["question_ids"].to(device), batch["question_mask"].to(device)
        )
        prob, pred = logits.float().softmax(-1).max(-1)
        preds.append(pred.cpu())
        probs.append(prob.cpu())
        targets.append(batch["answer"])
        closed.append(batch["closed"])
    model.train(was_training)
    return {"pred": torch.cat(preds), "prob": torch.cat(probs), "target": torch.cat(targets), "closed": torch.cat(closed)}


def report_unknown_answers(dataset, max_examples: int = 3) -> int:
    """Log how many evaluation answers are not in the vocabulary (counted wrong), with examples."""
    unknown = (dataset.answers < 0).nonzero().flatten().tolist()
    if unknown:
        examples = "; ".join(
            f"{dataset.records[i].question!r} -> {dataset.records[i].answer!r}" for i in unknown[:max_examples]
        )
        log.warning(
            "%d of %d evaluation answers are not in the training answer vocabulary and count as wrong, e.g. %s",
            len(unknown), len(dataset), examples,
        )
    return len(unknown)


VQARow = tuple[int, int, int, bool]  # (question index, predicted answer, true answer or -1, closed)


def predict_shard(
    model: VQAModel, dataset, rank: int = 0, world: int = 1, batch_size: int = 64, num_workers: int = 0
) -> list[VQARow]:
    """Per-question results for this process's share of ``dataset``.

    Process ``rank`` of ``world`` answers questions ``rank, rank + world, ...``; the
    shares of all ranks cover every question once. Returns one ``(index, pred, target,
    closed)`` row per question (target -1: answer not in the vocabulary).
    """
    indices = list(range(rank, len(dataset), world))
    if not indices:
        return []
    shard = dataset if world == 1 else Subset(dataset, indices)
    out = predict_dataset(model, shard, batch_size, num_workers)
    return list(zip(indices, out["pred"].tolist(), out["target"].tolist(), out["closed"].bool().tolist()))


def merge_vqa_rows(rows: Sequence[VQARow]) -> dict[str, float]:
    """:func:`vqa_accuracy` of the rows of every shard, in question order (empty subsets left out)."""
    rows = sorted(rows)
    pred = torch.tensor([row[1] for row in rows], dtype=torch.long)
    target = torch.tensor([row[2] for row in rows], dtype=torch.long)
    closed = torch.tensor([row[3] for row in rows], dtype=torch.bool)
    metrics = vqa_accuracy(pred, target, closed)
    return {k: v for k, v in metrics.items() if not math.isnan(v)}


def evaluate_vqa(
    model: VQAModel, dataset, batch_size: int = 64, num_workers: int = 0, state: Any = None
) -> dict[str, float]:
    """:func:`vqa_accuracy` of ``model`` on ``dataset`` (empty subsets left out).

    ``state`` (an ``Accelerator`` or ``PartialState``, None: one process): with several
    processes each one answers every ``num_processes``-th question and the rows are
    gathered, so every process returns the single-process metrics and no question is
    answered twice. Then every process must call this.
    """
    rank, world = (state.process_index, state.num_processes) if state is not None else (0, 1)
    rows = predict_shard(model, dataset, rank, world, batch_size, num_workers)
    if world > 1:
        from accelerate.utils import gather_object

        rows = gather_object(rows)
    return merge_vqa_rows(rows)


def majority_baseline(dataset) -> dict[str, float]:
    """Accuracy of always giving the most frequent training answer (vocabulary index 0)."""
    pred = torch.zeros_like(dataset.answers)
    return vqa_accuracy(pred, dataset.answers, dataset.closed)


# --------------------------------------------------------------------------- data


def resolve_dataset_root(cfg: VQADataConfig) -> Path:
    """The dataset folder; for format ``generated``, draws the set there on first use."""
    from medtune.data.synth import synthesize_vqa

    if not cfg.root:
        raise ConfigError("data.root is not set (pass --data DIR)")
    root = Path(cfg.root)
    if cfg.format != "generated":
        return root
    params = {"images": cfg.generated_images, "img_size": cfg.generated_img_size, "seed": cfg.generated_seed}
    marker = root / "generated.json"
    if marker.is_file():
        if json.loads(marker.read_text()) != params:
            raise DataError(f"{root} holds a generated VQA set made with other settings ({marker}); choose another --data")
        return root
    if root.is_dir() and any(root.iterdir()):
        raise DataError(f"{root} is not empty and holds no generated VQA set; choose another --data")
    synthesize_vqa(root, **params)
    marker.write_text(json.dumps(params) + "\n")
    return root


def load_split(cfg: VQADataConfig, split: str):
    from medtune.data.vqa import load_vqa_records

    fmt = "vqa_rad" if cfg.format == "generated" else cfg.format
    options: dict[str, Any] = {"image_dir": cfg.image_dir}
    if fmt == "slake":
        options["languages"] = tuple(cfg.languages)
    return load_vqa_records(fmt, resolve_dataset_root(cfg), split, **options)


def build_datasets(cfg: VQAConfig, text: TextEncoder):
    """Training and evaluation :class:`~medtune.data.vqa.VQADataset` plus the vocabulary."""
    from medtune.data.vqa import AnswerVocab, VQADataset

    train_records = load_split(cfg.data, cfg.data.train_split)
    eval_records = load_split(cfg.data, cfg.data.eval_split)
    vocab = AnswerVocab.from_records(train_records, cfg.data.min_answer_count)
    size, chans = cfg.backbone.img_size, cfg.backbone.in_chans
    train_set = VQADataset(train_records, vocab, text.tokenize, size, chans)
    eval_set = VQADataset(eval_records, vocab, text.tokenize, size, chans)
    return train_set, eval_set, vocab


# --------------------------------------------------------------------------- run folders

CONFIG_FILE = "config.json"
MODEL_FILE = "model.safetensors"
BEST_DIR = "best"


def save_vqa_model(model: VQAModel, path: Path) -> None:
    from medtune.checkpoints.io import save_safetensors

    save_safetensors(model.state_dict(), path, metadata={"task": TASK})


def load_vqa_run(run_dir: str | Path, which: str = "last") -> tuple[VQAModel, VQAConfig, list[str]]:
    """Rebuild a VQA run's model (in eval mode) from its folder: model, config, answers.

    ``which``: ``"last"`` (``model.safetensors``) or ``"best"`` (``best/model.safetensors``,
    the best evaluation; the final weights if the run kept none).
    """
    from medtune.checkpoints.io import load_json, load_state, load_weights

    run_dir = Path(run_dir)
    data = load_json(run_dir / CONFIG_FILE)
    answers = data.pop("answers", None)
    if data.get("task") != TASK or not isinstance(answers, list):
        raise CheckpointError(f"{run_dir / CONFIG_FILE}: not a VQA run (task '{data.get('task')}')")
    cfg = from_dict(VQAConfig, data)
    # every weight comes from the run's own file, never from the original sources again
    cfg.backbone = dataclasses.replace(cfg.backbone, pretrained=None)
    cfg.text = dataclasses.replace(cfg.text, weights=None)
    model = build_vqa_model(cfg, len(answers))
    if which not in ("best", "last"):
        raise ConfigError(f"checkpoint must be 'best' or 'last', got '{which}'")
    weight_path = run_dir / MODEL_FILE
    if which == "best" and (run_dir / BEST_DIR / MODEL_FILE).is_file():
        weight_path = run_dir / BEST_DIR / MODEL_FILE
    load_state(model, load_weights(weight_path), strict=True, source=weight_path)
    return model.eval(), cfg, answers


# --------------------------------------------------------------------------- CLI entries


def _apply_cli_flags(cfg: VQAConfig, args: Any) -> VQAConfig:
    """Fold the CLI flags into the config.

    ``--backbone``: a medtune pretrain run folder (its backbone architecture and
    ``backbone.safetensors``; the VQA config keeps its ``img_size``), a local weight file
    for the configured backbone, or a backbone name. ``--text-weights``/``--clip-weights``:
    a local CLIP checkpoint (``text.kind: open_clip``) or Hugging Face folder (``hf``).
    """
    from medtune.checkpoints.io import load_json

    if getattr(args, "self_distill", None):
        raise ConfigError("--self-distill is not available for task 'vqa'")
    if getattr(args, "data", None):
        cfg.data.root = str(args.data)
    backbone = getattr(args, "backbone", None)
    if backbone:
        if Path(backbone).is_dir():  # a medtune pretrain run: its architecture and weights
            section = load_json(Path(backbone) / CONFIG_FILE).get("backbone")
            if not isinstance(section, dict):
                raise CheckpointError(f"{Path(backbone) / CONFIG_FILE}: has no 'backbone' section")
            run_cfg = from_dict(BackboneConfig, section)
            cfg.backbone = dataclasses.replace(run_cfg, img_size=cfg.backbone.img_size, pretrained=str(backbone))
        elif Path(backbone).is_file():  # local weights for the configured architecture
            cfg.backbone = dataclasses.replace(cfg.backbone, pretrained=str(backbone))
        else:  # a backbone name (timm-style), randomly initialised
            cfg.backbone = dataclasses.replace(cfg.backbone, name=str(backbone))
    text_weights = getattr(args, "text_weights", None) or getattr(args, "clip_weights", None)
    if text_weights:
        if cfg.text.kind == "hf":
            cfg.text = dataclasses.replace(cfg.text, path=str(text_weights))
        else:
            cfg.text = dataclasses.replace(cfg.text, weights=str(text_weights))
    return cfg


def load_vqa_config(path: str | Path | None, overrides: Sequence[str] = ()) -> VQAConfig:
    """Read a VQA YAML config with ``--set`` overrides (strict keys); ``task`` may be left out."""
    data = read_yaml(path) if path is not None else {}
    apply_overrides(data, list(overrides))
    data.setdefault("task", TASK)
    try:
        return from_dict(VQAConfig, data)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}" if path is not None else str(exc)) from None


def _run_dir(args: Any) -> Path:
    output = getattr(args, "output", None)
    if output:
        return Path(output)
    stem = Path(args.config).stem if getattr(args, "config", None) else "vqa"
    return Path("checkpoints") / f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"


def finetune_main(args: Any) -> int:
    """``medtune finetune --task vqa --config CFG [--data DIR] [--output RUN] [--set k=v ...]``.

    Trains with the shared trainer, evaluates on the eval split every
    ``train.eval_every`` steps (best weights kept), writes the run folder.
    """
    overrides = getattr(args, "set", None) or []
    cfg = load_vqa_config(getattr(args, "config", None), overrides)
    cfg = _apply_cli_flags(cfg, args)
    run_dir = _run_dir(args)
    resume = getattr(args, "resume", None)
    if (run_dir / MODEL_FILE).is_file() and not resume:
        raise ConfigError(f"{run_dir} already holds a finished run; choose another --output or pass --resume")

    from accelerate.state import PartialState

    state = PartialState()
    text = build_text_encoder(cfg.text)
    with state.main_process_first():  # a generated set is drawn once, by the main process
        train_set, eval_set, vocab = build_datasets(cfg, text)
    report_unknown_answers(eval_set)
    baseline = majority_baseline(eval_set)
    log.info(
        "%d training / %d evaluation questions, %d answers; majority answer '%s' scores %.3f",
        len(train_set), len(eval_set), len(vocab), vocab.decode(0), baseline["accuracy"],
    )
    model = build_vqa_model(cfg, len(vocab), text)

    is_main = state.is_main_process
    config_data = {**to_dict(cfg), "answers": vocab.answers}
    if is_main:
        from medtune.checkpoints.io import save_json

        run_dir.mkdir(parents=True, exist_ok=True)
        save_json(config_data, run_dir / CONFIG_FILE)

    def evaluate(bare: nn.Module) -> dict[str, float]:
        return evaluate_vqa(bare, eval_set, cfg.eval_batch_size, state=state)

    def on_best(bare: nn.Module, metrics: Mapping[str, float]) -> None:
        save_vqa_model(bare, run_dir / BEST_DIR / MODEL_FILE)

    result = train(
        model, build_loader(train_set, cfg.train), cfg.train, run_dir, resume=resume,
        evaluate=evaluate, is_better=higher_is_better("accuracy"), on_best=on_best, unit="questions",
    )
    if is_main:
        from medtune.checkpoints.io import save_json

        save_vqa_model(model, run_dir / MODEL_FILE)
        summary = {
            "final": result.eval_metrics, "best": result.best_metrics, "best_step": result.best_step,
            "majority_baseline": {k: v for k, v in baseline.items() if not math.isnan(v)},
        }
        save_json(summary, run_dir / "eval_metrics.json")
        final = result.eval_metrics
        print(
            f"VQA run written to {run_dir}: accuracy {final.get('accuracy', float('nan')):.3f} "
            f"(closed {final.get('accuracy_closed', float('nan')):.3f}, open {final.get('accuracy_open', float('nan')):.3f}; "
            f"majority answer {baseline['accuracy']:.3f})"
        )
    return 0


def answer_questions(model: VQAModel, answers: Sequence[str], cfg: VQAConfig, images: Sequence[Path], question: str) -> list[dict]:
    """Answer ``question`` about each image: ``[{"image", "question", "answer", "probability"}]``."""
    from medtune.data.preprocess import zscore_nonzero
    from medtune.data.vqa import load_image

    ids, mask = model.text.tokenize([question])
    device = _model_device(model)
    results = []
    with torch.no_grad():
        for start in range(0, len(images), cfg.eval_batch_size):
            chunk = images[start : start + cfg.eval_batch_size]
            pixels = torch.stack([
                zscore_nonzero(torch.from_numpy(load_image(p, cfg.backbone.img_size, cfg.backbone.in_chans)))
                for p in chunk
            ]).to(device)
            logits = model.answer_logits(pixels, ids.expand(len(chunk), -1).to(device), mask.expand(len(chunk), -1).to(device))
            prob, pred = logits.float().softmax(-1).max(-1)
            results += [
                {"image": str(p), "question": question, "answer": answers[int(i)], "probability": round(float(q), 4)}
                for p, i, q in zip(chunk, pred, prob)
            ]
    return results


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


def predict_main(args: Any, run_dir: str | Path | None = None) -> int:
    """``medtune predict --model RUN --input IMAGE_OR_FOLDER --question "..." [--output OUT]``.

    With ``--question``: answers it about the image (or every image of a folder) and
    prints one line per image (image, answer, probability). Without: ``--input`` is a
    dataset folder in the run's format; every question of its eval split is answered
    and accuracy is printed. ``--output`` (optional) receives the answers as JSON lines:
    a ``.jsonl``/``.json`` path is the file itself, anything else a folder that gets
    ``answers.jsonl``. ``--checkpoint best|last`` and ``--device`` are honoured.
    """
    run_dir = Path(run_dir if run_dir is not None else args.model)
    model, cfg, answers = load_vqa_run(run_dir, getattr(args, "checkpoint", None) or "last")
    device = getattr(args, "device", None)
    if device:
        model.to(device)
    source = Path(args.input)
    question = getattr(args, "question", None)
    if question:
        if source.is_dir():
            images = sorted(p for p in source.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            if not images:
                raise DataError(f"{source}: no images ({', '.join(IMAGE_SUFFIXES)})")
        elif source.is_file():
            images = [source]
        else:
            raise DataError(f"image not found: {source}")
        rows = answer_questions(model, answers, cfg, images, question)
        for row in rows:
            print(f"{row['image']}\t{row['answer']}\t{row['probability']:.3f}")
    else:
        from medtune.data.vqa import AnswerVocab, VQADataset

        if not source.is_dir():
            raise DataError(f"{source}: without --question, --input must be a {cfg.data.format} dataset folder")
        data_cfg = dataclasses.replace(cfg.data, root=str(source))
        records = load_split(data_cfg, data_cfg.eval_split)
        dataset = VQADataset(records, AnswerVocab(answers), model.text.tokenize, cfg.backbone.img_size, cfg.backbone.in_chans)
        report_unknown_answers(dataset)
        out = predict_dataset(model, dataset, cfg.eval_batch_size)
        metrics = vqa_accuracy(out["pred"], out["target"], out["closed"])
        rows = [
            {"image": str(r.image), "question": r.question, "answer": answers[int(p)], "probability": round(float(q), 4),
             "truth": r.answer, "answer_type": r.answer_type}
            for r, p, q in zip(records, out["pred"], out["prob"])
        ]
        print(
            f"{len(rows)} questions: accuracy {metrics['accuracy']:.3f} (closed {metrics['accuracy_closed']:.3f}, "
            f"open {metrics['accuracy_open']:.3f}, {int(metrics['n_unknown'])} answers not in the vocabulary)"
        )
    output = getattr(args, "output", None)
    if output:
        from medtune.checkpoints.io import atomic_write

        path = Path(output)
        if path.suffix.lower() not in (".jsonl", ".json"):
            path = path / "answers.jsonl"
        text = "".join(json.dumps(row) + "\n" for row in rows)
        atomic_write(path, lambda tmp: tmp.write_text(text))
        print(f"answers written to {path}")
    return 0
