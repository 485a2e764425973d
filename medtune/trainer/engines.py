"""How the training loop holds a model: whole on every process, or sharded.

:func:`engine_for` picks one of four engines; the loop asks it to prepare the model and
optimizer, clip gradients, save and load resumable state, make the model whole for
evaluation, and gather the full weights that are written once:

- ``plain``: one process, or DDP (Accelerate): every process holds the whole model.
- ``fsdp``: Accelerate's FSDP (``accelerate launch --use_fsdp``, FSDP2 with
  ``--fsdp_version 2``): the model is prepared first and the optimizer built from its
  sharded parameters; Accelerate saves and loads the sharded state.
- ``deepspeed``: Accelerate's DeepSpeed (ZeRO-2/3): model and optimizer are prepared
  together; full weights come from ``accelerator.get_state_dict``.
- ``fsdp2``: a model the caller sharded itself with ``torch.distributed.fsdp.fully_shard``
  (how FSDP2 runs on CPU process groups, where Accelerate does not engage FSDP): it is not
  wrapped again; its sharded weights and optimizer state are saved with
  ``torch.distributed.checkpoint`` beside Accelerate's state; gradients are clipped with
  DTensor-aware (non-foreach) kernels.

Sharded engines make the model whole for evaluation (each process may then run a
different number of forwards: evaluation is split over processes) and gather the full
weights with the engine's own API (``get_model_state_dict(full_state_dict=True)`` /
``accelerator.get_state_dict``): every process calls it, the main process gets them.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import nn

from medtune.errors import ConfigError

log = logging.getLogger(__name__)

SHARDED_STATE_DIR = "sharded"  # inside a state/step_N folder: the fsdp2 engine's DCP checkpoint


def _fsdp2_modules(model: nn.Module) -> list[nn.Module]:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch without FSDP2
        return []
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


class Engine:
    """The plain engine; the sharded ones override what differs."""

    kind = "plain"
    sharded = False

    def prepare(self, accelerator, model: nn.Module, build_optimizer: Callable, loader, build_scheduler: Callable):
        """``(model, optimizer, loader, scheduler)`` ready for the loop."""
        optimizer = build_optimizer(_trainable(model))
        scheduler = build_scheduler(optimizer)
        return accelerator.prepare(model, optimizer, loader, scheduler)

    def clip_grad_norm(self, accelerator, model: nn.Module, max_norm: float) -> torch.Tensor:
        return accelerator.clip_grad_norm_(_trainable(model), max_norm)

    def save(self, accelerator, model, optimizer, folder: Path) -> None:
        accelerator.save_state(str(folder), safe_serialization=True)

    def load(self, accelerator, model, optimizer, folder: Path) -> None:
        accelerator.load_state(str(folder))

    @contextlib.contextmanager
    def whole(self, accelerator, model: nn.Module) -> Iterator[nn.Module]:
        """The model whole on every process (for evaluation), unwrapped."""
        yield accelerator.unwrap_model(model)

    def full_state_dict(self, accelerator, model: nn.Module) -> dict[str, torch.Tensor] | None:
        """Every weight, on the main process (None elsewhere); every process calls it."""
        if not accelerator.is_main_process:
            return None
        return {k: v.detach() for k, v in accelerator.unwrap_model(model).state_dict().items()}


class AccelerateFSDP(Engine):
    kind, sharded = "fsdp", True

    def prepare(self, accelerator, model, build_optimizer, loader, build_scheduler):
        check_fsdp_wrap(accelerator, model)
        model = accelerator.prepare(model)  # FSDP wraps and shards first: the optimizer sees the shards
        optimizer = build_optimizer(_trainable(model))
        scheduler = build_scheduler(optimizer)
        optimizer, loader, scheduler = accelerator.prepare(optimizer, loader, scheduler)
        return model, optimizer, loader, scheduler

    @contextlib.contextmanager
    def whole(self, accelerator, model):
        with _unsharded(_fsdp2_modules(model)):
            yield accelerator.unwrap_model(model)

    def full_state_dict(self, accelerator, model):
        state = accelerator.get_state_dict(model)
        return dict(state) if accelerator.is_main_process else None


class AccelerateDeepSpeed(Engine):
    kind, sharded = "deepspeed", True

    @contextlib.contextmanager
    def whole(self, accelerator, model):
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
            yield accelerator.unwrap_model(model)

    full_state_dict = AccelerateFSDP.full_state_dict  # Accelerate gathers either engine's shards


class PreshardedFSDP2(Engine):
    kind, sharded = "fsdp2", True

    def prepare(self, accelerator, model, build_optimizer, loader, build_scheduler):
        optimizer = build_optimizer(_trainable(model))  # over the DTensor shards
        scheduler = build_scheduler(optimizer)
        loader, scheduler = accelerator.prepare(loader, scheduler)  # the model is not wrapped again (no DDP)
        return model, optimizer, loader, scheduler

    def clip_grad_norm(self, accelerator, model, max_norm):
        norm = torch.nn.utils.clip_grad_norm_(_trainable(model), max_norm, foreach=False)
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm

    def save(self, accelerator, model, optimizer, folder):
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        accelerator.save_state(str(folder), safe_serialization=True)  # scheduler, sampler, RNG states
        model_state, optim_state = get_state_dict(model, optimizer)
        dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=str(folder / SHARDED_STATE_DIR))

    def load(self, accelerator, model, optimizer, folder):
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        accelerator.load_state(str(folder))
        model_state, optim_state = get_state_dict(model, optimizer)
        state = {"model": model_state, "optimizer": optim_state}
        dcp.load(state, checkpoint_id=str(folder / SHARDED_STATE_DIR))
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])

    @contextlib.contextmanager
    def whole(self, accelerator, model):
        with _unsharded(_fsdp2_modules(model)):
            yield model

    def full_state_dict(self, accelerator, model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return dict(state) if accelerator.is_main_process else None


@contextlib.contextmanager
def _unsharded(modules: list[nn.Module]) -> Iterator[None]:
    """Parameters all-gathered once and kept whole: forwards then need no collective, so
    processes may run different numbers of them (evaluation split over processes)."""
    for module in modules:
        module.set_reshard_after_forward(False)
        module.unshard()
    try:
        yield
    finally:
        for module in modules:
            module.reshard()
            module.set_reshard_after_forward(True)


def _trainable(model: nn.Module) -> list[nn.Parameter]:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ConfigError("train(): the model has no trainable parameters (all requires_grad=False)")
    return params


def engine_for(accelerator, model: nn.Module) -> Engine:
    """The engine of this launch and model (see the module docstring)."""
    from accelerate.utils import DistributedType

    kind = accelerator.distributed_type
    if kind == DistributedType.FSDP:
        return AccelerateFSDP()
    if kind == DistributedType.DEEPSPEED:
        check_deepspeed(accelerator, model)
        return AccelerateDeepSpeed()
    if _fsdp2_modules(model):
        return PreshardedFSDP2()
    return Engine()


def check_deepspeed(accelerator, model: nn.Module) -> None:
    """Refuse ZeRO-3 for an adapter injected by forward hooks (Med-Tuning, AdaptFormer,
    ST-Adapter, VPT run their modules from hooks on the frozen blocks): ZeRO-3 gathers a
    module's partitioned weights around that module's own forward, which a hook-run
    adapter inside a frozen block does not get. LoRA (peft layers) is not hook-based."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    stage = getattr(plugin, "zero_stage", None) if plugin is not None else None
    hooked = [name for name, m in model.named_modules() if m._forward_hooks or m._forward_pre_hooks]
    frozen = any(not p.requires_grad for p in model.parameters())
    if stage == 3 and hooked and frozen:
        raise ConfigError(
            f"DeepSpeed zero_stage 3 cannot shard an adapter run from forward hooks ({hooked[0]}, ...): "
            "use zero_stage 2 (configs/accelerate/zero2.yaml), FSDP2 (configs/accelerate/fsdp2_vit.yaml) or LoRA"
        )


def check_fsdp_wrap(accelerator, model: nn.Module) -> None:
    """Refuse an FSDP auto-wrap policy naming block classes the model does not have (it
    would wrap nothing but the root: no sharding benefit, all memory on every rank)."""
    plugin = getattr(accelerator.state, "fsdp_plugin", None)
    names = getattr(plugin, "transformer_cls_names_to_wrap", None) if plugin is not None else None
    if not names:
        return
    names = [names] if isinstance(names, str) else list(names)
    present = {type(m).__name__ for m in model.modules()}
    if not set(names) & present:
        blocks = sorted(n for n in present if n.endswith("Block") or n.endswith("Layer"))
        raise ConfigError(
            f"fsdp_transformer_layer_cls_to_wrap {names} names no module of this model; "
            f"its block classes: {', '.join(blocks) or 'none'}"
        )


__all__ = ["Engine", "SHARDED_STATE_DIR", "engine_for"]
