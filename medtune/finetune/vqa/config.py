"""The config of a VQA run (``task: vqa``)."""

from __future__ import annotations

from dataclasses import dataclass, field

from medtune.models.backbones import BackboneConfig
from medtune.models.text import TextConfig
from medtune.trainer import TrainConfig

FUSIONS = ("stagewise", "mmbert")
DATA_FORMATS = ("vqa_rad", "slake", "vqa_med_2019")


@dataclass
class VQADataConfig:
    """Which VQA dataset to read and how."""

    format: str = "vqa_rad"  # "vqa_rad", "slake" or "vqa_med_2019" (medtune data synth --kind vqa writes vqa_rad)
    root: str | None = None  # dataset folder; the CLI's --data fills it
    train_split: str = "train"  # split the model trains on and the answer vocabulary comes from
    eval_split: str = "test"  # split evaluated every train.eval_every steps and at the end
    image_dir: str | None = None  # image folder if not the layout's default (see medtune.data.vqa)
    languages: list[str] = field(default_factory=lambda: ["en"])  # SLAKE: question languages kept
    min_answer_count: int = 1  # training answers seen fewer times are left out of the vocabulary


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
