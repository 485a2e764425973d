"""The training loop's config: ``train:`` sections of every run config."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclass
class OptimConfig:
    """The optimizer, built over the model's ``requires_grad`` parameters."""

    name: str = "adamw"  # "adam" (L2 penalty in the gradient) or "adamw" (decoupled decay)
    lr: float = 1e-4  # peak learning rate, reached at the end of warmup
    weight_decay: float = 0.0  # applied to every trainable parameter
    betas: tuple[float, float] = (0.9, 0.999)  # Adam moment decay rates
    amsgrad: bool = False  # AMSGrad variant (Med-Tuning's recipe uses it)
    # PyTorch's fused Adam/AdamW kernel: the same update in one pass over all tensors
    # (about 5x faster than the per-tensor loop on CPU for a 27M-parameter model)
    fused: bool = True
    # layer-wise lr decay (BEiT, MAE finetuning): the backbone's last layer trains at
    # layer_decay x the lr, the one below at layer_decay^2 ..., its stem at
    # layer_decay^(K+1); everything outside the backbone (decoder, heads) at the lr.
    # null (or 1.0): one lr for all. Layers: see Backbone.layer_ids.
    layer_decay: float | None = None
    # linear probing, then finetuning (LP-FT, Kumar et al., ICLR 2022): the backbone's
    # parameters stay at lr 0 for the first N optimizer steps, so that a new decoder or head
    # learns on the pretrained features before their gradients reach the backbone; from
    # step N the backbone trains on the schedule started again (its own warmup and decay to
    # the run's last step). The frozen steps still compute the backbone's gradients (Adam's
    # moments gather them). 0: no freezing. Combines with layer_decay.
    freeze_backbone_steps: int = 0
    # L2-SP (Li et al., ICML 2018), decoupled as AdamW's weight decay: after each optimizer
    # step every trainable backbone parameter moves lr x anchor_decay of the way back to its
    # value when training began (the pretrained weights, when finetuning starts from them),
    # so that finetuning on few labels stays near what pretraining learned. At a constant
    # push of Adam's size the weight settles about 1 / anchor_decay from its start. 0: off.
    anchor_decay: float = 0.0

    def __post_init__(self) -> None:
        if self.name not in ("adam", "adamw"):
            raise ValueError(f"optim.name must be 'adam' or 'adamw', got '{self.name}'")
        if self.lr <= 0:
            raise ValueError(f"optim.lr must be > 0, got {self.lr}")
        if len(self.betas) != 2:
            raise ValueError(f"optim.betas must have two values, got {self.betas}")
        if self.layer_decay is not None and not 0.0 < self.layer_decay <= 1.0:
            raise ValueError(f"optim.layer_decay must be in (0, 1] or null, got {self.layer_decay}")
        if self.freeze_backbone_steps < 0:
            raise ValueError(f"optim.freeze_backbone_steps must be >= 0, got {self.freeze_backbone_steps}")
        if self.anchor_decay < 0 or self.lr * self.anchor_decay > 1.0:
            raise ValueError(f"optim.anchor_decay must be >= 0 with lr x anchor_decay <= 1 (a pull past the start), "
                             f"got {self.anchor_decay} at lr {self.lr}")


@dataclass
class ScheduleConfig:
    """Learning-rate schedule: linear warmup, then decay to ``min_lr_ratio * lr``."""

    name: str = "poly"  # "poly" (1 - t)^power, "cosine", or "constant" after warmup
    warmup_steps: int = 0  # optimizer steps of linear warmup from lr/warmup_steps to lr
    power: float = 0.9  # exponent of the poly decay
    min_lr_ratio: float = 0.0  # floor of the decay, as a fraction of the peak lr

    def __post_init__(self) -> None:
        if self.name not in ("poly", "cosine", "constant"):
            raise ValueError(f"schedule.name must be poly, cosine or constant, got '{self.name}'")
        if self.warmup_steps < 0:
            raise ValueError(f"schedule.warmup_steps must be >= 0, got {self.warmup_steps}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"schedule.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")


@dataclass
class TrainConfig:
    """How to train: steps, batches, precision, seeding, logging and saving."""

    max_steps: int = 1000  # optimizer steps (each of grad_accum micro-batches)
    batch_size: int = 8  # samples per micro-batch per process
    grad_accum: int = 1  # micro-batches accumulated into one optimizer step
    grad_clip: float | None = 1.0  # max global gradient norm; null disables clipping
    mixed_precision: str = "auto"  # "auto" (the launcher's --mixed_precision, else bf16 on CUDA with bf16, else fp32), "no", "bf16", "fp16"
    seed: int = 0  # seeds data order (seed + epoch) and per-micro-batch randomness
    log_every: int = 10  # optimizer steps between metrics.jsonl lines / progress updates
    save_every: int = 0  # optimizer steps between resumable states (and at the end); 0 never saves
    keep_last: int = 2  # how many saved states to keep under run_dir/state
    eval_every: int = 0  # optimizer steps between evaluate() calls (0: only at the end)
    num_workers: int | None = None  # DataLoader workers of build_loader; None: the run's data.num_workers (CLIs) or 0
    find_unused_parameters: bool = False  # DDP flag for models with parameters unused in forward
    # torch.compile the model in place (nn.Module.compile: its weights keep their names, so
    # states and weight files are those of an eager run); the first steps are slow while it compiles
    compile: bool = False
    compile_mode: str = "default"  # torch.compile mode: "default", "reduce-overhead", "max-autotune"
    # keep freed CPU tensors' memory in the process (glibc malloc, Linux): without it every
    # step maps and unmaps its large activations and pays the page faults again (FreMAE's
    # step on CPU, tiny ViT and ViT-B: 1.3x the slices/s, benchmarks/host_allocator.py); see
    # medtune.trainer.setup.tune_host_allocator. false: the C library's defaults
    tune_host_allocator: bool = True
    # the run folder and the cache lie on a file system every node sees (true); false: each
    # node has its own disk, and each node's first process writes its own resumable states
    # and builds its own cache (the run's weights and logs are written on the first node)
    shared_filesystem: bool = True
    trackers: list[str] = field(default_factory=list)  # extra loggers, e.g. ["tensorboard"]
    optim: OptimConfig = field(default_factory=OptimConfig)  # the optimizer
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)  # the lr schedule

    def __post_init__(self) -> None:
        for name in ("max_steps", "batch_size", "grad_accum", "log_every", "keep_last"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("save_every", "eval_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"train.{name} must be >= 0, got {getattr(self, name)}")
        if self.mixed_precision not in ("auto", "no", "bf16", "fp16"):
            raise ValueError(
                f"train.mixed_precision must be auto, no, bf16 or fp16, got '{self.mixed_precision}'"
            )
        if self.num_workers is not None and self.num_workers < 0:
            raise ValueError(f"train.num_workers must be >= 0 or null, got {self.num_workers}")
        if self.compile_mode not in COMPILE_MODES:
            raise ValueError(f"train.compile_mode must be one of {', '.join(COMPILE_MODES)}, got '{self.compile_mode}'")
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise ValueError(f"train.grad_clip must be > 0 or null, got {self.grad_clip}")


@dataclass
class TrainResult:
    """What :func:`train` returns (identical on every process)."""

    step: int  # optimizer steps done in total (including those before a resume)
    run_dir: Path
    metrics: dict[str, float] = field(default_factory=dict)  # last logged training metrics
    eval_metrics: dict[str, float] = field(default_factory=dict)  # last evaluation
    best_metrics: dict[str, float] | None = None  # best evaluation under is_better
    best_step: int | None = None  # the step of best_metrics
    state_dir: Path | None = None  # the last saved resumable state
    seconds: float = 0.0  # wall time of this call
    samples_per_s: float = 0.0  # global training throughput of this call
    # the final weights, whole (gathered from the shards of a sharded model), on the main
    # process; None on the others: what a caller writes as the run's weights
    state_dict: dict | None = None
    sharded: bool = False  # the model trained in shards (its modules do not hold whole weights)
