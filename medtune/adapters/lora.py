"""LoRA through the peft library, and merging it back into the base weights.

peft wraps each target ``nn.Linear`` in a LoRA layer (the frozen weight moves to
``<name>.base_layer.weight``; ``lora_A``/``lora_B`` are the trained tensors).
:func:`merge_lora` folds ``B @ A * alpha / r`` into the base weights and puts the plain
``nn.Linear`` back, so the merged backbone has the original timm names again.

Targets (peft matches a name that equals a target or ends with ``"." + target``):
for timm ViT and Swin ``qkv``, ``attn.proj``, ``fc1``, ``fc2``; for MONAI's SwinUNETR
``qkv``, ``attn.proj``, ``mlp.linear1``, ``mlp.linear2``. A bare ``proj`` would also hit
``patch_embed.proj`` (the stem conv), which LoRA must not touch: it is refused.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from torch import nn

from medtune.adapters.context import SliceContext
from medtune.adapters.core import ADAPTERS, INFO_ATTR, AdapterConfig, AdapterMethod, find_adapted
from medtune.adapters.targets import AdapterTarget
from medtune.errors import ConfigError

log = logging.getLogger(__name__)

# the attention and MLP linears of timm ViT/Swin (fc1, fc2) and MONAI's Swin (linear1, linear2)
CANDIDATE_TARGETS = ("qkv", "attn.proj", "fc1", "fc2", "mlp.linear1", "mlp.linear2")


@dataclass
class LoraAdapterConfig(AdapterConfig):
    """LoRA (Hu et al. 2022) on the attention and MLP linears, through peft."""

    method: str = "lora"
    # rank of each low-rank update
    r: int = 8
    # scaling numerator: the update is B @ A * alpha / r
    alpha: float = 16.0
    # dropout on the LoRA branch's input
    dropout: float = 0.0
    # module-name suffixes to adapt (peft matching); None: those of qkv, attn.proj,
    # fc1, fc2 (timm) and mlp.linear1, mlp.linear2 (MONAI Swin) the backbone has
    target_modules: list[str] | None = None

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ValueError(f"r must be >= 1, got {self.r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    def peft_config(self, target_modules: list[str]):
        """The equivalent ``peft.LoraConfig`` for ``target_modules``."""
        from peft import LoraConfig

        return LoraConfig(
            r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout, target_modules=target_modules, bias="none"
        )


def _matches(name: str, target: str) -> bool:
    """peft's rule for a string target: the module name equals it or ends with ``.target``."""
    return name == target or name.endswith("." + target)


def default_lora_targets(model: nn.Module) -> list[str]:
    """The :data:`CANDIDATE_TARGETS` that name at least one ``nn.Linear`` of ``model``."""
    linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    return [t for t in CANDIDATE_TARGETS if any(_matches(n, t) for n in linears)]


@ADAPTERS.register("lora")
class Lora(AdapterMethod):
    """Inject peft LoRA layers into the target linears."""

    config_class = LoraAdapterConfig
    own_patterns = ("*lora_*",)

    @classmethod
    def inject(cls, target: AdapterTarget, cfg: LoraAdapterConfig, ctx: SliceContext) -> None:
        from peft import inject_adapter_in_model

        targets = list(cfg.target_modules) if cfg.target_modules else default_lora_targets(target.model)
        if not targets:
            raise ConfigError(f"LoRA on '{target.name}': no default target linears; set target_modules")
        stem = [t for t in targets if any(_matches(n, t) for n in _stem_names(target.model))]
        if stem:
            raise ConfigError(
                f"LoRA target(s) {stem} would hit the patch-embedding stem; use 'attn.proj' instead of 'proj'"
            )
        try:
            inject_adapter_in_model(cfg.peft_config(targets), target.model)
        except ValueError as exc:  # peft: target modules not found
            raise ConfigError(f"LoRA on '{target.name}': {str(exc).splitlines()[0]}") from None

    @classmethod
    def base_name(cls, name: str) -> str:
        return name.replace(".base_layer.", ".")  # peft keeps the wrapped linear as base_layer


def _stem_names(model: nn.Module) -> list[str]:
    return [name for name, _ in model.named_modules() if "patch_embed" in name.split(".")]


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRA update in ``model`` into its base weight and unwrap it, in place.

    The result has the original module names (``blocks.0.attn.qkv.weight``) and no
    adapter attached: a plain backbone ready for ``backbone.safetensors``.
    """
    from peft.tuners.lora import LoraLayer

    found = find_adapted(model)
    if found is None or found[2].config.method != "lora":
        raise ConfigError("merge_lora needs a model with a LoRA adapter (apply_adapter with method 'lora')")
    _, backbone, _ = found
    merged = 0
    for name, module in list(backbone.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge()
            parent_name, _, child = name.rpartition(".")
            parent = backbone.get_submodule(parent_name) if parent_name else backbone
            setattr(parent, child, module.get_base_layer())
            merged += 1
    delattr(backbone, INFO_ATTR)
    log.info("merged %d LoRA layers into their base weights", merged)
    return model
