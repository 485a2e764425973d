"""Parameter-efficient finetuning: Med-Tuning and the PETL baselines, one registry.

Usage::

    from medtune.adapters import apply_adapter, adapter_config_from_dict, set_num_slices

    backbone = create_backbone(BackboneConfig(name="vit_base_patch16_224", in_chans=4))
    cfg = adapter_config_from_dict({"method": "med-tuning", "ratio": 6})
    apply_adapter(backbone, cfg)           # in place; freezes all but the method's tensors
    set_num_slices(backbone, T)            # before a forward over B*T slices
    stages = backbone.forward_stages(volume_to_slices(volume))   # (B, M, H, W, T) -> B*T slices
    save_adapter(backbone, run_dir)        # adapter.json + adapter.safetensors

Methods (``ADAPTERS`` names): ``med-tuning`` (:mod:`.med_tuning`), ``lora`` (peft,
:mod:`.lora`, with :func:`merge_lora`), ``adaptformer``, ``st-adapter``, ``vpt``
(ViT only), ``full`` and ``decoder-only`` (:mod:`.baselines`). Each has a config
dataclass deriving from :class:`AdapterConfig`; :func:`adapter_config_from_dict` picks it
by ``method``.

Adapters are child modules of the timm blocks they adapt (``blocks.3.med_adapter``,
``layers.1.blocks.0.st_adapter``) run by forward hooks; timm's classes and the frozen
tensors' names are unchanged (LoRA is the exception peft imposes: ``qkv.base_layer``,
until :func:`merge_lora`).

Slice contract (see :mod:`.context`): a volume ``(B, M, H, W, T)`` reaches the 2D
backbone as ``B*T`` slices ordered volume-major (image ``b*T + t`` = slice t of volume
b, :func:`volume_to_slices`). Slice-mixing adapters (``med-tuning``, ``st-adapter``)
read T from a :class:`SliceContext` shared by all adapters of a backbone; whoever lays
out the slices (the segmentation model) calls :func:`set_num_slices` or uses
``with slice_context(model, T):``. Calling it on a model without slice-aware adapters
does nothing, so callers need not know the method. A slice-aware forward with T unset
is a :class:`~medtune.errors.ConfigError` (use T=1 for 2D images).

Which tensors train is decided once, in :func:`apply_adapter`: the method's own
parameters plus ``trainable_extras`` (fnmatch patterns on the timm network's names;
Med-Tuning's default: ``pos_embed`` and the final ``norm``). :func:`describe` reports
total/trainable counts per group, :func:`adapter_state_dict` holds exactly the trained
tensors (plus the adapters' BatchNorm statistics).
"""

from medtune.adapters.core import (
    ADAPTERS,
    AdapterConfig,
    AdapterInfo,
    AdapterMethod,
    apply_adapter,
    count_parameters,
    describe,
    find_adapted,
    trainable_parameters,
)
from medtune.adapters.context import (
    SliceContext,
    set_num_slices,
    slice_context,
    slices_to_volume,
    volume_to_slices,
)

# method modules register themselves in ADAPTERS on import
from medtune.adapters.baselines import DecoderOnly, FullFinetuning
from medtune.adapters.med_tuning import MedAdapter, MedTuningConfig, slice_axis_filter
from medtune.adapters.lora import LoraAdapterConfig, merge_lora
from medtune.adapters.adaptformer import AdaptFormerConfig
from medtune.adapters.st_adapter import STAdapterConfig
from medtune.adapters.vpt import VPTConfig
from medtune.adapters.state import (
    ADAPTER_CONFIG_FILE,
    ADAPTER_WEIGHTS_FILE,
    adapter_config_dict,
    adapter_config_from_dict,
    adapter_state_dict,
    base_state_dict,
    load_adapter,
    load_adapter_state,
    load_base_state,
    read_adapter_config,
    save_adapter,
)

__all__ = [
    "ADAPTERS",
    "ADAPTER_CONFIG_FILE",
    "ADAPTER_WEIGHTS_FILE",
    "AdaptFormerConfig",
    "AdapterConfig",
    "AdapterInfo",
    "AdapterMethod",
    "DecoderOnly",
    "FullFinetuning",
    "LoraAdapterConfig",
    "MedAdapter",
    "MedTuningConfig",
    "STAdapterConfig",
    "SliceContext",
    "VPTConfig",
    "adapter_config_dict",
    "adapter_config_from_dict",
    "adapter_state_dict",
    "apply_adapter",
    "base_state_dict",
    "count_parameters",
    "describe",
    "find_adapted",
    "load_adapter",
    "load_adapter_state",
    "load_base_state",
    "merge_lora",
    "read_adapter_config",
    "save_adapter",
    "set_num_slices",
    "slice_axis_filter",
    "slice_context",
    "slices_to_volume",
    "trainable_parameters",
    "volume_to_slices",
]
