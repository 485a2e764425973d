"""The dynamic segmenter: a Decision Network picks, per slice, how (or whether) to segment it.

Paths (``model.form``):

- ``v2`` (Med-DANet V2): ``skip`` (an empty prediction, no cost), ``crop`` (the Crop
  Position Network places a ``crop_size`` crop, the segmenter predicts it, the prediction
  is pasted back on a background canvas) and ``whole`` (the segmenter on the whole
  slice). One segmenter serves both non-empty paths, each with its own head; before
  each of its quantization units a :class:`~.layers.BitSelector` picks the unit's weight
  bits (the residual U-Net's 4 encoder stages; a backbone segmenter's whole backbone).
- ``v1`` (Med-DANet): ``skip`` and a model bank of segmenters (residual U-Nets of different
  widths, or backbones).

The segmenter (``model.segmenter``, :mod:`.segmenters`) is the official residual U-Net or
any medtune 2D backbone + decoder (e.g. a FreMAE-pretrained ViT).

Training runs in three phases within one run (``model.phases``, fractions of the
run's steps; the clock is a buffer counted in training batches, so a resumed run
continues in its phase):

1. the segmenter(s) (and the crop network) learn every path: the mean of the paths' losses
   (with ``locator_loss`` > 0 the Crop Position Network is also told where the slice's
   foreground is: a smooth-L1 to the position centring the crop on it; 0: it learns only
   through the crop and paste, as the official);
2. (V2) the bit selectors join: the paths run at the selected bits (straight-through),
   plus ``bits_cost`` x the paths' relative FLOPs;
3. only the Decision Network learns: a Gumbel-softmax choice (hard one-hot forward,
   straight-through backward) mixes the paths' class probabilities, and the loss is
   the criterion of the mixture + ``decision_cost`` x the chosen paths' relative FLOPs
   (``decision_loss: gumbel``, the official); or (``decision_loss: oracle``) each slice's
   target is its cheapest good path (least cross-entropy + ``decision_cost`` x relative
   FLOPs, from the frozen paths) and the Decision Network learns it by cross-entropy.

Costs are counted (:func:`medtune.checkpoints.counting.flop_counter`) per path and per
encoder stage at the training slice size, and scaled by ``bits / 32`` where a stage is
quantized: the paper's cost model, relative to the whole-slice path at full precision.
Eval mode decides by argmax (:mod:`.inference` predicts volumes and counts what ran).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from medtune.errors import ConfigError, DataError
from medtune.finetune.dynamic.layers import (
    CROP,
    SKIP,
    WHOLE,
    BitSelector,
    background_probabilities,
    crop_slices,
    image_gradient_stats,
    paste_probabilities,
    run_at_bits,
    straight_through_choice,
)
from medtune.finetune.dynamic.inference import predict_slices
from medtune.finetune.dynamic.segmenters import build_path_segmenters
from medtune.finetune.segmentation.model import VolumeSegmenter
from medtune.models.losses import Criterion


PROBABILITY_FLOOR = 1e-6  # log(probabilities) as logits: pasted background is exactly 0 elsewhere


def create_slice_classifier(name: str, in_chans: int, outputs: int) -> nn.Module:
    """A small CNN ``(N, M, H, W) -> (N, outputs)``: ``shufflenet_v2_x0_5`` (torchvision's
    ShuffleNetV2 0.5x, as the official Decision Network, its first conv taking ``M``
    channels) or any timm model name (``timm.create_model(name, in_chans=M, num_classes=outputs)``)."""
    if name.startswith("shufflenet_v2_"):
        import torchvision

        try:
            net = getattr(torchvision.models, name)(weights=None, num_classes=outputs)
        except AttributeError:
            raise ConfigError(f"torchvision has no '{name}' (shufflenet_v2_x0_5, _x1_0, _x1_5, _x2_0)") from None
        first = net.conv1[0]
        net.conv1[0] = nn.Conv2d(in_chans, first.out_channels, 3, stride=2, padding=1, bias=False)
        return net
    import timm

    try:
        return timm.create_model(name, pretrained=False, in_chans=in_chans, num_classes=outputs)
    except RuntimeError as exc:
        raise ConfigError(f"unknown slice classifier '{name}': {exc}") from None


class DynamicSegmenter(VolumeSegmenter):
    """Per-slice dynamic segmentation (see the module docstring).

    Args:
        model_cfg: a :class:`~medtune.finetune.dynamic.config.DynamicModelConfig`.
        in_chans: M input channels.
        num_classes: K.
        slice_size: the training slice size ``(H, W)`` (what the costs are counted at).
        criterion: the loss terms (on ``{"logits": (N, K, H, W)}`` and labels ``(N, H, W)``).
        phase_ends: training batches (micro-batches) at which phases 1 and 2 end.
        grad_accum: micro-batches per optimizer step (the Decision Network's lr restarts
            at the optimizer step where phase 3 begins).
        load_pretrained: load backbone segmenters' ``pretrained`` weights (False when a
            checkpoint brings them anyway).

    ``forward(batch)``: ``batch["image"] (N, M, H, W)`` slices and ``batch["label"] (N, H, W)``
    -> ``{"loss", ...}``. ``forward_logits(volume (B, M, H, W, T))``: eval-mode decisions,
    ``log`` of the decided paths' probabilities ``(B, K, H, W, T)``.
    """

    def __init__(self, model_cfg, in_chans: int, num_classes: int, slice_size: Sequence[int],
                 criterion: Criterion, phase_ends: Sequence[int] = (0, 0), grad_accum: int = 1,
                 load_pretrained: bool = True) -> None:
        super().__init__()
        self.config = model_cfg
        self.paths: tuple[str, ...] = tuple(model_cfg.paths)
        self.num_classes, self._in_chans = num_classes, in_chans
        self.slice_size = tuple(int(s) for s in slice_size)
        self.criterion = criterion
        self.phase_ends = tuple(int(s) for s in phase_ends)
        self.grad_accum = int(grad_accum)
        self.crop_size = int(model_cfg.crop_size)
        self.bits = tuple(int(b) for b in model_cfg.bits) if model_cfg.form == "v2" else ()
        self.tau = float(model_cfg.tau)
        self.decision = create_slice_classifier(model_cfg.decision, in_chans, len(self.paths))
        self.segmenters = nn.ModuleList(build_path_segmenters(model_cfg, in_chans, self.slice_size[0], load_pretrained))
        self.check_sizes()
        self.heads = nn.ModuleDict({
            path: self.segmenter_of(path).make_head(num_classes) for path in self.paths if path != SKIP
        })
        self.locator = create_slice_classifier(model_cfg.locator, in_chans, 2) if CROP in self.paths else None
        if self.bits:
            channels = self.segmenters[0].stage_channels
            self.selectors = nn.ModuleList(BitSelector(c, in_chans, self.bits) for c in channels)
        else:
            self.selectors = None
        # training batches seen: the phase clock (a buffer, so a resumed run keeps its phase)
        self.register_buffer("batches_seen", torch.zeros((), dtype=torch.long))
        self._costs: dict[tuple, tuple[torch.Tensor, float]] = {}

    @property
    def in_chans(self) -> int:
        return self._in_chans

    @property
    def stride(self) -> int:
        """Slice sides must be multiples of it (the segmenters' largest stride)."""
        return max(int(s.stride) for s in self.segmenters)

    def check_sizes(self) -> None:
        """Refuse a training slice or crop size a segmenter cannot take (a backbone built
        for one input size, a side that is not a multiple of the stride)."""
        sides = [("data.img_size", self.slice_size[0])]
        if CROP in self.paths:
            sides.append(("model.crop_size", self.crop_size))
        for i, segmenter in enumerate(self.segmenters):
            fixed = getattr(segmenter, "fixed_size", None)
            for key, side in sides:
                if side % segmenter.stride:
                    raise ConfigError(f"{key} {side} must be a multiple of the segmenter's stride {segmenter.stride}")
                if fixed is not None and side != fixed:
                    raise ConfigError(
                        f"{getattr(segmenter, 'where', 'the segmenter')} takes only {fixed} px slices but {key} is "
                        f"{side}: set its options.dynamic_img_size: true (ViT, Swin) or use a convolutional backbone"
                    )

    def segmenter_of(self, path: str) -> nn.Module:
        if path in (CROP, WHOLE):
            return self.segmenters[0]
        return self.segmenters[self.paths.index(path) - 1]

    # ------------------------------------------------------------------ the paths

    def phase(self) -> int:
        """1, 2 or 3 (see the module docstring) at the current training batch."""
        seen = int(self.batches_seen)
        if seen < self.phase_ends[0]:
            return 1
        return 2 if seen < self.phase_ends[1] else 3

    def quantized(self, phase: int | None = None) -> bool:
        """Whether stages run at selected bits: V2 with bits, from phase 2 on (and in eval)."""
        if not self.bits:
            return False
        return True if phase is None else phase >= 2

    def crop_position(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, M, H, W) -> (N, 2)`` normalised crop position (y, x) in ``[0, 1]``."""
        return torch.sigmoid(self.locator(x))

    def path_logits(self, path: str, x: torch.Tensor, quantize: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The segmenter of ``path`` on ``x (N, M, h, w)`` -> ``(logits (N, K, h, w), bits (N, S) or None)``."""
        segmenter = self.segmenter_of(path)
        chosen: list[torch.Tensor] = []
        if quantize:
            gradient_stats = image_gradient_stats(x)

            def run_stage(i: int, stage: nn.Module, inp: torch.Tensor):
                choice, bits = self.selectors[i](inp, gradient_stats)
                chosen.append(bits)
                return run_at_bits(stage, inp, choice, self.bits, self.training)
        else:
            run_stage = None
        features = segmenter.forward_stages(x, run_stage)
        return self.heads[path](features, x.shape[-2:]), (torch.stack(chosen, 1) if chosen else None)

    def path_probabilities(self, path: str, x: torch.Tensor, quantize: bool):
        """Class probabilities of ``path`` on whole slices ``x (N, M, H, W)``:
        ``(probs (N, K, H, W), bits (N, S) or None, crop position (N, 2) or None)``."""
        if path == SKIP:
            return background_probabilities(x.shape[0], self.num_classes, x.shape[-2:], x), None, None
        if path != CROP:
            logits, bits = self.path_logits(path, x, quantize)
            return logits.softmax(1), bits, None
        position = self.crop_position(x)
        crops = crop_slices(x, position, self.crop_size)
        logits, bits = self.path_logits(path, crops, quantize)
        return paste_probabilities(logits.softmax(1), position, x.shape[-2:]), bits, position

    # ------------------------------------------------------------------ costs

    def path_cost_parts(self, path: str, size: Sequence[int]) -> tuple[list[int], int]:
        """Counted FLOPs of ``path`` on one slice of ``size`` at full precision:
        ``(per encoder stage, the rest)`` (the rest holds the stem, decoder, head, and for
        the crop path the Crop Position Network). Skip: ``([], 0)``."""
        from medtune.checkpoints.counting import flop_counter

        if path == SKIP:
            return [], 0
        segmenter = self.segmenter_of(path)
        param = next(self.parameters())
        x = torch.zeros(1, self.in_chans, *size, device=param.device, dtype=param.dtype)
        stage_flops: list[int] = []

        def run_stage(i: int, stage: nn.Module, inp: torch.Tensor):
            with flop_counter() as counter:
                out = stage(inp)
            stage_flops.append(int(counter.get_total_flops()))
            return out

        was_training = self.training
        self.eval()
        try:
            with torch.no_grad(), flop_counter() as total:
                if path == CROP:
                    self.locator(x)
                    x = x[..., : self.crop_size, : self.crop_size]
                self.heads[path](segmenter.forward_stages(x, run_stage), x.shape[-2:])
        finally:
            self.train(was_training)
        return stage_flops, int(total.get_total_flops()) - sum(stage_flops)

    def cost_table(self, size: Sequence[int] | None = None) -> tuple[torch.Tensor, torch.Tensor, float]:
        """At slice ``size`` (default: the training size): ``(stage FLOPs (P, S), rest
        FLOPs (P,), the whole-slice path's full-precision FLOPs)`` per path, counted once
        and cached (stage rows are zero for paths without stages)."""
        size = tuple(int(s) for s in (size or self.slice_size))
        if size not in self._costs:
            parts = [self.path_cost_parts(path, size) for path in self.paths]
            stages = max(len(stage) for stage, _ in parts)
            stage_table = torch.zeros(len(self.paths), stages, dtype=torch.float64)
            for p, (stage, _) in enumerate(parts):
                stage_table[p, : len(stage)] = torch.tensor(stage, dtype=torch.float64)
            rest = torch.tensor([r for _, r in parts], dtype=torch.float64)
            static = self.paths.index(WHOLE) if WHOLE in self.paths else len(self.paths) - 1
            self._costs[size] = (stage_table, rest, float(stage_table[static].sum() + rest[static]))
        return self._costs[size]

    def cost_model_flops(self, path: str, bits: torch.Tensor | None, size: Sequence[int] | None = None) -> torch.Tensor:
        """The cost model's FLOPs of ``path`` per slice: each stage's counted FLOPs x
        ``bits / 32`` (``bits (N, S)``; None: full precision), plus the rest; ``(N,)``."""
        stage_table, rest, _ = self.cost_table(size)
        p = self.paths.index(path)
        if bits is None:
            return (stage_table[p].sum() + rest[p]).reshape(1)
        scale = bits.double() / 32.0
        return scale @ stage_table[p].to(scale.device) + rest[p].item()

    def relative_cost(self, path: str, bits: torch.Tensor | None, n: int) -> torch.Tensor:
        """Cost-model FLOPs of ``path`` per slice relative to the whole-slice path at full
        precision, ``(n,)`` float32, differentiable in ``bits``."""
        _, _, static = self.cost_table()
        flops = self.cost_model_flops(path, bits)
        return (flops / static).float().expand(n) if flops.numel() == 1 else (flops / static).float()

    # ------------------------------------------------------------------ training

    def lr_groups(self) -> list:
        """The Decision Network at ``decision_lr_scale`` x the lr, its warmup and decay
        restarted when phase 3 begins (the official schedule); read by the trainer."""
        from medtune.trainer import LrGroup

        return [LrGroup("decision.", self.config.decision_lr_scale, self.phase_ends[1] // self.grad_accum)]

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        x, label = batch["image"], batch["label"]
        if x.ndim != 4:
            raise DataError(f"dynamic segmenter input has shape {tuple(x.shape)}; expected slices (N, M, H, W)")
        phase = self.phase()
        if self.training and torch.is_grad_enabled():
            self.batches_seen += 1
        if phase < 3:
            return self._train_paths(x, label, phase)
        return self._train_decision(x, label)

    def _path_logits_on_slice(self, path: str, x: torch.Tensor, quantize: bool):
        if path != CROP:
            return self.path_logits(path, x, quantize)
        probs, bits, _ = self.path_probabilities(path, x, quantize)
        return probs.clamp_min(PROBABILITY_FLOOR).log(), bits

    def locator_target(self, label: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Where the crop should go: ``(positions (N, 2), has_foreground (N,))``, the
        normalised position whose crop is centred on the slice's foreground (its centre of
        mass, the crop kept inside the slice)."""
        foreground = (label > 0).to(torch.float32)  # (N, H, W)
        size = label.shape[-2:]
        mass = foreground.sum((1, 2))
        ys = torch.arange(size[0], dtype=torch.float32, device=label.device)
        xs = torch.arange(size[1], dtype=torch.float32, device=label.device)
        centre = torch.stack([(foreground.sum(2) * ys).sum(1), (foreground.sum(1) * xs).sum(1)], 1)
        centre = centre / mass.clamp_min(1)[:, None] + 0.5  # pixel centres
        room = torch.tensor([size[0] - self.crop_size, size[1] - self.crop_size], dtype=torch.float32,
                            device=label.device)
        target = ((centre - self.crop_size / 2) / room.clamp_min(1)).clamp(0, 1)
        return target, mass > 0

    def _train_paths(self, x: torch.Tensor, label: torch.Tensor, phase: int) -> dict[str, torch.Tensor]:
        quantize = self.quantized(phase)
        losses, costs, logs = [], [], {}
        for path in self.paths:
            if path == SKIP:
                continue
            logits, bits = self._path_logits_on_slice(path, x, quantize)
            loss = self.criterion({"logits": logits}, label)["loss"]
            if path == CROP and self.config.locator_loss > 0:
                target, has = self.locator_target(label)
                if bool(has.any()):
                    located = F.smooth_l1_loss(self.crop_position(x)[has], target[has], beta=0.05)
                    loss = loss + self.config.locator_loss * located
                    logs["loss_locator"] = located.detach()
            losses.append(loss)
            logs[f"loss_{path}"] = loss.detach()
            if quantize:
                costs.append(self.relative_cost(path, bits, x.shape[0]).mean())
                logs[f"bits_{path}"] = bits.detach().mean()
        total = torch.stack(losses).mean()
        if costs:
            cost = torch.stack(costs).mean()
            total = total + self.config.bits_cost * cost
            logs["relative_flops"] = cost.detach()
        return {"loss": total, "phase": torch.tensor(float(phase)), **logs}

    def _train_decision(self, x: torch.Tensor, label: torch.Tensor) -> dict[str, torch.Tensor]:
        frozen = [m for m in (self.segmenters, self.heads, self.locator, self.selectors) if m is not None]
        for module in frozen:  # only the Decision Network learns: no dropout, no BatchNorm updates
            module.eval()
        quantize = self.quantized(3)
        with torch.no_grad():
            probs, costs = [], []
            for path in self.paths:
                path_probs, bits, _ = self.path_probabilities(path, x, quantize)
                probs.append(path_probs)
                costs.append(self.relative_cost(path, bits, x.shape[0]) if path != SKIP else x.new_zeros(x.shape[0]))
        costs = torch.stack(costs, 1)  # (N, P) relative FLOPs of each path on each slice
        logits = self.decision(x)
        if self.config.decision_loss == "oracle":
            return self._train_decision_on_targets(logits, probs, costs, label)
        choice = straight_through_choice(logits, self.tau, sample=True)  # (N, P)
        mixed = sum(choice[:, p, None, None, None] * probs[p] for p in range(len(self.paths)))
        out = self.criterion({"logits": mixed.clamp_min(PROBABILITY_FLOOR).log()}, label)
        cost = (choice * costs.to(choice.dtype)).sum(1).mean()
        logs = {f"chose_{path}": choice[:, p].detach().mean() for p, path in enumerate(self.paths)}
        return {"loss": out["loss"] + self.config.decision_cost * cost, "loss_decision": out["loss"].detach(),
                "relative_flops": cost.detach(), "phase": torch.tensor(3.0), **logs}

    def _train_decision_on_targets(self, logits: torch.Tensor, probs: list[torch.Tensor], costs: torch.Tensor,
                                   label: torch.Tensor) -> dict[str, torch.Tensor]:
        """``decision_loss: oracle``: each slice's target is the path with the least
        per-slice cross-entropy + ``decision_cost`` x relative FLOPs (computed from the
        frozen paths), and the Decision Network learns it by cross-entropy."""
        per_slice = torch.stack([
            F.nll_loss(p.clamp_min(PROBABILITY_FLOOR).log(), label, reduction="none").flatten(1).mean(1) for p in probs
        ], 1)  # (N, P)
        target = (per_slice + self.config.decision_cost * costs.to(per_slice.dtype)).argmin(1)
        loss = F.cross_entropy(logits, target)
        picked = F.one_hot(target, len(self.paths)).float()
        logs = {f"chose_{path}": picked[:, p].mean() for p, path in enumerate(self.paths)}
        return {"loss": loss, "loss_decision": loss.detach(), "decision_accuracy": (logits.argmax(1) == target).float().mean(),
                "relative_flops": (picked * costs.float()).sum(1).mean(), "phase": torch.tensor(3.0), **logs}

    # ------------------------------------------------------------------ inference

    def decide(self, x: torch.Tensor) -> torch.Tensor:
        """Eval-mode decisions: ``(N, M, H, W) -> (N,)`` path indices (argmax)."""
        return self.decision(x).argmax(-1)

    def forward_logits(self, volume: torch.Tensor) -> torch.Tensor:
        """``(B, M, H, W, T) -> (B, K, H, W, T)``: every slice through its decided path
        (log-probabilities; argmax decisions)."""
        b, t = volume.shape[0], volume.shape[-1]
        slices = volume.permute(0, 4, 1, 2, 3).reshape(b * t, *volume.shape[1:4])
        probs = predict_slices(self, slices).probabilities
        probs = probs.reshape(b, t, *probs.shape[1:]).permute(0, 2, 3, 4, 1)
        return probs.clamp_min(PROBABILITY_FLOOR).log()


__all__ = ["DynamicSegmenter", "create_slice_classifier"]
