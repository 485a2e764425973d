"""The config of a referring-segmentation run (``task: referring``)."""

from __future__ import annotations

from dataclasses import dataclass, field

from medtune.finetune.referring.cmmasksd import CMMaskSDConfig
from medtune.trainer import TrainConfig


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
    # (medtune data synth --kind referring writes a generated one)
    layout: str = "auto"  # "auto", "jsonl" or "refcoco"
    dataset: str = "refcoco"  # refcoco layout: refcoco, refcoco+ or refcocog
    train_split: str = "train"  # split trained on
    val_split: str = "val"  # split evaluated on (RefCOCO: val, testA, testB, test)
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

    model: ReferringModelConfig = field(default_factory=ReferringModelConfig)  # the network
    data: ReferringDataConfig = field(default_factory=ReferringDataConfig)  # the dataset
    train: TrainConfig = field(default_factory=TrainConfig)  # the shared trainer's settings
    eval: ReferringEvalConfig = field(default_factory=ReferringEvalConfig)  # evaluation
