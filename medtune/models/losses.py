"""Segmentation losses by name: a run's ``loss:`` section and the criterion built from it.

::

    loss: {dice_ce: 1.0, pne: 0.1}                          # name: weight
    loss: {dice_ce: 1.0, pne: {weight: 0.1, temperature: 0.07}}   # name: {weight, **options}

Each name picks a :class:`LossTerm` from :data:`LOSSES`; the criterion is the weighted
sum. A term reads the model's outputs and the label::

    term(outputs, label) -> scalar
    # outputs: {"logits": (B, K, *S), "embedding": (B, C, *S') if the model has one,
    #           ...the network's auxiliary outputs (CGA U-Net's "sam_logits", "class_centres")}
    # label:   (B, *S) class indices

Terms: ``dice_ce`` (softmax Dice + cross-entropy, MONAI ``DiceCELoss``), ``softmax_dice``
(the official Med-Tuning/FreMIM Dice: over the batch, summed over classes, no CE), ``pne``
(:mod:`medtune.models.pne`, pixel-embedding contrastive, any model with an embedding),
``cga_sam`` and ``cga_inter_class`` (:mod:`medtune.models.cga_unet`).

The model's own terms: a network names the terms it needs in ``auxiliary_losses``
(``{name: default weight}``); :func:`build_criterion` adds them to the configured ones
(a configured weight wins, 0 switches a term off). A term that needs an output the model
does not give is refused when the model is built, naming the term.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

import torch
from torch import nn

from medtune.config import from_dict, to_dict
from medtune.errors import ConfigError
from medtune.registry import Registry

LOSSES: Registry[type["LossTerm"]] = Registry("loss")


@dataclass
class LossContext:
    """What a term may need to know about the model it trains."""

    num_classes: int  # K
    spatial_dims: int  # of the logits (3 for volumes)
    embedding_channels: int | None = None  # channels of outputs["embedding"], None: no embedding
    outputs: tuple[str, ...] = ("logits",)  # the keys of the model's outputs


class LossTerm(nn.Module):
    """One registered loss: built from a :class:`LossContext` and its options dataclass;
    ``forward(outputs, label) -> scalar``. ``requires`` names the outputs it reads."""

    options_class: ClassVar[type]
    requires: ClassVar[tuple[str, ...]] = ("logits",)

    def forward(self, outputs: Mapping[str, torch.Tensor], label: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


@dataclass
class LossSpec:
    """One entry of a ``loss:`` section: the term, its weight and its options."""

    name: str
    weight: float
    options: Any  # the term's options dataclass


def _weight(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"config key '{where}' must be a weight (a number >= 0), got {value!r}")
    if not math.isfinite(value) or value < 0:
        raise ConfigError(f"config key '{where}' must be a finite weight >= 0, got {value!r}")
    return float(value)


def parse_loss_section(section: Any, defaults: Mapping[str, Mapping] | None = None) -> list[LossSpec]:
    """Check a ``loss:`` section and read it into :class:`LossSpec` (the order kept).

    ``defaults`` gives option defaults per term that the section's options override
    (the segmentation task's ``model.lambda_dice`` ... for ``dice_ce``).
    Raises :class:`ConfigError` naming ``loss.<name>[.<key>]`` for an unknown term or
    option, or a weight that is not a finite number >= 0.
    """
    if not isinstance(section, Mapping) or not section:
        raise ConfigError(f"config key 'loss' must map loss names to weights (e.g. {{dice_ce: 1.0}}), got {section!r}")
    specs = []
    for name, value in section.items():
        where = f"loss.{name}"
        if str(name) not in LOSSES:
            raise ConfigError(f"unknown loss '{name}' in 'loss' (known: {', '.join(LOSSES.names())})")
        term = LOSSES.get(str(name))
        if isinstance(value, Mapping):
            options = dict(value)
            weight = _weight(options.pop("weight", 1.0), f"{where}.weight")
        else:
            weight, options = _weight(value, where), {}
        merged = {**dict((defaults or {}).get(str(name), {})), **options}
        specs.append(LossSpec(str(name), weight, from_dict(term.options_class, merged, where)))
    return specs


def loss_section(specs: list[LossSpec]) -> dict[str, dict]:
    """:class:`LossSpec` back to a ``loss:`` section (every option written out)."""
    return {spec.name: {"weight": spec.weight, **to_dict(spec.options)} for spec in specs}


class Criterion(nn.Module):
    """The weighted sum of loss terms: ``criterion(outputs, label) -> {"loss": total,
    <term>: its unweighted value (detached), ...}``."""

    def __init__(self, terms: Mapping[str, LossTerm], weights: Mapping[str, float]) -> None:
        super().__init__()
        self.terms = nn.ModuleDict(dict(terms))
        self.weights = dict(weights)

    @property
    def requires(self) -> set[str]:
        return {key for term in self.terms.values() for key in term.requires}

    def forward(self, outputs: Mapping[str, torch.Tensor], label: torch.Tensor) -> dict[str, torch.Tensor]:
        logs: dict[str, torch.Tensor] = {}
        total = None
        for name, term in self.terms.items():
            value = term(outputs, label)
            logs[name] = value.detach()
            weighted = self.weights[name] * value
            total = weighted if total is None else total + weighted
        return {"loss": total, **logs}


def build_criterion(
    section: Mapping[str, Any],
    context: LossContext,
    *,
    defaults: Mapping[str, Mapping] | None = None,
    auxiliary: Mapping[str, float] | None = None,
) -> Criterion:
    """The :class:`Criterion` of a ``loss:`` section for a model described by ``context``.

    Args:
        section: ``{name: weight | {weight, **options}}``.
        defaults: option defaults per term (see :func:`parse_loss_section`).
        auxiliary: the model's own terms with their default weights (a network's
            ``auxiliary_losses``); added unless the section names them.
    Terms of weight 0 are left out (they build nothing, e.g. no projection head).
    """
    specs = parse_loss_section(section, defaults)
    named = {spec.name for spec in specs}
    extra = {name: weight for name, weight in (auxiliary or {}).items() if name not in named}
    if extra:
        specs += parse_loss_section(extra, defaults)
    terms, weights = {}, {}
    for spec in specs:
        if spec.weight == 0:
            continue
        term_class = LOSSES.get(spec.name)
        missing = [key for key in term_class.requires if key not in context.outputs]
        if missing:
            raise ConfigError(
                f"loss '{spec.name}' needs the model output(s) {', '.join(missing)}, which this model does not give "
                f"(it gives: {', '.join(context.outputs)})"
            )
        terms[spec.name] = term_class(context, spec.options)
        weights[spec.name] = spec.weight
    if not terms:
        raise ConfigError("config key 'loss': every weight is 0; nothing to train")
    return Criterion(terms, weights)


# --------------------------------------------------------------------------- dice_ce


@dataclass
class DiceCEOptions:
    """Options of ``dice_ce``."""

    lambda_dice: float = 1.0  # weight of the softmax Dice part
    lambda_ce: float = 1.0  # weight of the cross-entropy part
    include_background: bool = False  # whether class 0 counts in the Dice part


@LOSSES.register("dice_ce")
class DiceCELossTerm(LossTerm):
    """Softmax Dice + cross-entropy of the logits (MONAI ``DiceCELoss``)."""

    options_class = DiceCEOptions

    def __init__(self, context: LossContext, options: DiceCEOptions) -> None:
        super().__init__()
        from monai.losses import DiceCELoss

        self.loss = DiceCELoss(
            include_background=options.include_background, to_onehot_y=True, softmax=True,
            lambda_dice=options.lambda_dice, lambda_ce=options.lambda_ce,
        )

    def forward(self, outputs: Mapping[str, torch.Tensor], label: torch.Tensor) -> torch.Tensor:
        return self.loss(outputs["logits"], label[:, None].long())


# --------------------------------------------------------------------------- softmax_dice


@dataclass
class SoftmaxDiceOptions:
    """Options of ``softmax_dice`` (none: the official loss has no knobs)."""


@LOSSES.register("softmax_dice")
class SoftmaxDiceLossTerm(LossTerm):
    """The official Med-Tuning (and FreMIM finetuning) loss, ``loss: {softmax_dice: 1.0}``.

    ``sum_{k >= 1} 1 - 2 sum(p_k t_k) / (sum(p_k) + sum(t_k) + 1e-5)``: softmax
    probabilities ``p``, one-hot labels ``t``, sums over the whole batch (not per sample),
    no numerator smoothing, summed (not averaged) over the foreground classes, no
    cross-entropy (MONAI ``DiceLoss`` with those settings).
    """

    options_class = SoftmaxDiceOptions

    def __init__(self, context: LossContext, options: SoftmaxDiceOptions) -> None:
        super().__init__()
        from monai.losses import DiceLoss

        self.loss = DiceLoss(
            include_background=False, to_onehot_y=True, softmax=True, batch=True,
            smooth_nr=0.0, smooth_dr=1e-5, reduction="sum",
        )

    def forward(self, outputs: Mapping[str, torch.Tensor], label: torch.Tensor) -> torch.Tensor:
        return self.loss(outputs["logits"], label[:, None].long())


LOSSES.register_path("pne", "medtune.models.pne:PNELoss")
LOSSES.register_path("cga_sam", "medtune.models.cga_unet:SupervisedAttentionLoss")
LOSSES.register_path("cga_inter_class", "medtune.models.cga_unet:InterClassLoss")


__all__ = [
    "Criterion", "DiceCELossTerm", "DiceCEOptions", "LOSSES", "SoftmaxDiceLossTerm", "SoftmaxDiceOptions", "LossContext", "LossSpec", "LossTerm",
    "build_criterion", "loss_section", "parse_loss_section",
]
