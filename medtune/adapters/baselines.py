"""The two whole-model baselines: full finetuning and decoder-only (linear probe).

Neither injects anything; they differ only in what :func:`apply_adapter` leaves
trainable: every backbone tensor (``full``) or none (``decoder-only``, the decoder
trains alone).
"""

from __future__ import annotations

from medtune.adapters.core import ADAPTERS, AdapterMethod


@ADAPTERS.register("full")
class FullFinetuning(AdapterMethod):
    """Every backbone parameter trains; ``adapter.safetensors`` is the whole backbone."""

    trains_everything = True


@ADAPTERS.register("decoder-only")
class DecoderOnly(AdapterMethod):
    """The backbone is frozen entirely (``trainable_extras`` may still name tensors to train)."""
