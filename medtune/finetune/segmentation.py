"""Slice-wise volumetric segmentation: a 2D backbone (+ adapters) and a decoder per slice.

Med-Tuning's model (DESIGN section 5): a volume ``(B, M, H, W, T)`` becomes ``B*T``
slices ``(B*T, M, H, W)``; the frozen backbone (with adapters that mix the ``T`` slices)
gives stage features; a decoder (UperNet for plain ViT, U-Net style for hierarchical
backbones) gives per-slice logits, stacked back to ``(B, K, H, W, T)``. The loss is
softmax Dice + cross-entropy (MONAI ``DiceCELoss``).

Backbones with ``spatial_dims=3`` (MONAI SwinUNETR encoder) are run on the volume as
is, with a 3D decoder; the same class serves both.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Callable, ContextManager

import torch
from monai.losses import DiceCELoss
from torch import nn

from medtune.adapters.context import slices_to_volume, volume_to_slices
from medtune.errors import CheckpointError, ConfigError, DataError

log = logging.getLogger(__name__)


class SliceSegmenter(nn.Module):
    """Backbone (+ adapters) + decoder, applied slice-wise to volumes.

    Args:
        backbone: a :class:`medtune.models.Backbone`, possibly with adapters injected.
        decoder: maps ``backbone.forward_stages`` output and an output size to logits.
        num_classes: K, class indices ``0..K-1`` (background 0).
        lambda_dice, lambda_ce: weights of the Dice and cross-entropy terms.
        dice_include_background: whether the background class counts in Dice.
        slice_context: ``slice_context(backbone, T)`` -> a context manager during which
            the adapters know that consecutive groups of ``T`` images are one volume.
        self_distill: optional ``fn(model_fn, volume, logits) -> loss`` regulariser
            (:class:`medtune.finetune.self_distill.SelfDistillation`).

    ``forward_logits(volume (B, M, H, W, T)) -> (B, K, H, W, T)``;
    ``forward(batch)`` with ``batch["image"] (B, M, H, W, T)`` and ``batch["label"]
    (B, H, W, T)`` class indices -> ``{"loss", "dice_ce", ...}``.
    """

    def __init__(
        self,
        backbone: nn.Module,
        decoder: nn.Module,
        num_classes: int,
        *,
        lambda_dice: float = 1.0,
        lambda_ce: float = 1.0,
        dice_include_background: bool = False,
        slice_context: Callable[[nn.Module, int], ContextManager] | None = None,
        self_distill: Callable | None = None,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.decoder = decoder
        self.num_classes = num_classes
        self.spatial_dims = int(getattr(backbone, "spatial_dims", 2))
        self.loss_fn = DiceCELoss(
            include_background=dice_include_background,
            to_onehot_y=True,
            softmax=True,
            lambda_dice=lambda_dice,
            lambda_ce=lambda_ce,
        )
        self._slice_context = slice_context
        self.self_distill = self_distill
        self.gradient_checkpointing = False
        # set by load_segmenter / finetune_segmentation for whole-volume prediction
        self.label_spec = None
        self.roi_size: tuple[int, ...] | None = None

    def set_gradient_checkpointing(self, enable: bool = True) -> None:
        """Recompute backbone block activations in backward instead of storing them.

        Uses the wrapped timm/MONAI network's own switch (``set_grad_checkpointing`` or
        MONAI's ``use_checkpoint``); trades one extra backbone forward for memory.
        """
        model = getattr(self.backbone, "model", self.backbone)
        if hasattr(model, "set_grad_checkpointing"):
            model.set_grad_checkpointing(enable)
        elif hasattr(model, "use_checkpoint"):
            for module in model.modules():
                if hasattr(module, "use_checkpoint"):
                    module.use_checkpoint = enable
        else:
            raise ConfigError(f"backbone {type(model).__name__} has no gradient checkpointing switch")
        self.gradient_checkpointing = enable

    def slice_context(self, num_slices: int) -> ContextManager:
        if self._slice_context is None:
            return contextlib.nullcontext()
        return self._slice_context(self.backbone, num_slices)

    def forward_logits(self, volume: torch.Tensor) -> torch.Tensor:
        """``(B, M, H, W, T) -> (B, K, H, W, T)`` logits."""
        if volume.ndim != 5:
            raise DataError(f"segmenter input has shape {tuple(volume.shape)}; expected (B, M, H, W, T)")
        if self.spatial_dims == 3:
            return self.decoder(self.backbone.forward_stages(volume), volume.shape[2:])
        num_slices = volume.shape[-1]
        slices = volume_to_slices(volume)  # (B*T, M, H, W)
        with self.slice_context(num_slices):
            features = self.backbone.forward_stages(slices)  # [(B*T, C_i, H/s_i, W/s_i)]
        logits = self.decoder(features, slices.shape[2:])  # (B*T, K, H, W)
        return slices_to_volume(logits, num_slices)

    def compute_loss(self, logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        """Softmax Dice + CE of ``logits (B, K, *S)`` against class indices ``(B, *S)``."""
        return self.loss_fn(logits, label[:, None].long())

    def predict_volume(self, image, *, overlap: float = 0.25, tta: bool = False, sw_batch_size: int = 1):
        """Raw image ``(M, H, W, D)`` (numpy) -> label map ``(H, W, D)`` uint8 in the
        dataset's values; needs a model from :func:`medtune.finetune.load_segmenter`."""
        from medtune.finetune.inference import predict_label_map

        if getattr(self, "label_spec", None) is None or getattr(self, "roi_size", None) is None:
            raise ConfigError("predict_volume needs a model loaded with medtune.finetune.load_segmenter")
        return predict_label_map(
            self, image, self.label_spec.values, self.roi_size, overlap=overlap, sw_batch_size=sw_batch_size, tta=tta
        )

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        image, label = batch["image"], batch["label"]
        logits = self.forward_logits(image)
        seg_loss = self.compute_loss(logits, label)
        out = {"loss": seg_loss, "dice_ce": seg_loss.detach()}
        if self.self_distill is not None and self.training:
            distill = self.self_distill(self.forward_logits, image, logits)
            out["loss"] = seg_loss + distill
            out["self_distill"] = distill.detach()
        return out


# --------------------------------------------------------------------------- building


def _persistent_slice_context(backbone: nn.Module, num_slices: int) -> ContextManager:
    """Leave ``T`` set after the forward: checkpointed blocks recompute during backward."""
    from medtune.adapters import set_num_slices

    set_num_slices(backbone, num_slices)
    return contextlib.nullcontext()


def build_segmenter(
    cfg,
    num_classes: int,
    *,
    load_pretrained: bool = True,
    base_state: dict[str, torch.Tensor] | None = None,
) -> tuple[SliceSegmenter, dict[str, torch.Tensor]]:
    """Backbone -> (base weights) -> adapter -> decoder -> :class:`SliceSegmenter`.

    Args:
        cfg: a :class:`medtune.finetune.config.FinetuneConfig`.
        num_classes: K (the dataset's label values, background included).
        load_pretrained: load ``cfg.backbone.pretrained`` (False when the weights come
            from a finetuned checkpoint anyway).
        base_state: backbone weights (``backbone.state_dict()`` names) loaded before
            the adapter is injected (an adapter export's base weights).

    Returns:
        ``(segmenter, base backbone state)``; the base state is the backbone as it was
        before the adapter, i.e. what ``backbone.safetensors`` of the run holds.
    """
    import dataclasses

    from medtune.adapters import adapter_config_from_dict, apply_adapter, slice_context
    from medtune.checkpoints.io import load_state
    from medtune.models.backbones import create_backbone
    from medtune.models.decoders import create_decoder

    backbone_cfg = cfg.backbone if load_pretrained else dataclasses.replace(cfg.backbone, pretrained=None)
    backbone = create_backbone(backbone_cfg)
    roi = cfg.roi_size
    if backbone.img_size is not None and tuple(roi[:2]) != (backbone.img_size,) * 2:
        raise ConfigError(
            f"data.crop_size {list(roi)} must start with the backbone's img_size "
            f"{backbone.img_size} (crops are (img_size, img_size, slices))"
        )
    if base_state is not None:
        load_state(backbone, base_state, strict=True, source="base backbone weights")
    base = {k: v.detach().clone() for k, v in backbone.state_dict().items()}
    apply_adapter(backbone, adapter_config_from_dict(cfg.adapter))
    decoder = create_decoder(
        cfg.model.decoder,
        backbone.feature_channels,
        backbone.feature_strides,
        num_classes,
        backbone.spatial_dims,
        **cfg.model.decoder_options,
    )
    self_distill = None
    if cfg.self_distill is not None:
        from medtune.finetune.self_distill import SelfDistillation

        self_distill = SelfDistillation(cfg.self_distill)
    model = SliceSegmenter(
        backbone,
        decoder,
        num_classes,
        lambda_dice=cfg.model.lambda_dice,
        lambda_ce=cfg.model.lambda_ce,
        dice_include_background=cfg.model.dice_include_background,
        slice_context=_persistent_slice_context if cfg.model.gradient_checkpointing else slice_context,
        self_distill=self_distill,
    )
    if cfg.model.gradient_checkpointing:
        model.set_gradient_checkpointing(True)
    return model, base


def trained_state_dict(model: SliceSegmenter) -> dict[str, torch.Tensor]:
    """What finetuning changed: the adapter's tensors (incl. trained backbone extras and
    the adapter's buffers) and the whole decoder, by ``model.state_dict()`` name."""
    from medtune.adapters import adapter_state_dict

    state = {f"backbone.{k}": v for k, v in adapter_state_dict(model.backbone).items()}
    state.update({f"decoder.{k}": v.detach() for k, v in model.decoder.state_dict().items()})
    return state


# --------------------------------------------------------------------------- training


@torch.no_grad()
def validate_segmenter(model: SliceSegmenter, val_set, label_spec, roi_size, cfg, accelerator=None) -> dict[str, float]:
    """Mean Dice per region over held-out whole volumes (sliding window, BraTS rules).

    ``val_set`` is a :class:`medtune.data.VolumeDataset` with labels (cropped volumes);
    ``cfg`` a :class:`ValidationConfig`. With several processes each one scores every
    ``num_processes``-th case and the scores are gathered, so no case is done twice.
    Returns ``{"Dice_<region>": .., "Dice_mean": ..}``.
    """
    from medtune.finetune.inference import sliding_window_probs
    from medtune.finetune.metrics import dice_scores

    count = len(val_set) if cfg.max_cases is None else min(cfg.max_cases, len(val_set))
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    rows = []
    for index in range(rank, count, world):
        item = val_set[index]
        probs = sliding_window_probs(
            model, item["image"], roi_size, overlap=cfg.overlap, sw_batch_size=cfg.sw_batch_size,
            tta=cfg.tta, mode=cfg.mode,
        )  # (K, h, w, d)
        pred_masks = label_spec.index_region_masks(probs.argmax(0))
        true_masks = label_spec.index_region_masks(item["label"])
        rows.append(dice_scores(pred_masks, true_masks).tolist())
    if world > 1:
        from accelerate.utils import gather_object

        rows = gather_object(rows)
    scores = torch.tensor(rows, dtype=torch.float64).mean(0).tolist()
    metrics = {f"Dice_{name}": value for name, value in zip(label_spec.region_names, scores)}
    metrics["Dice_mean"] = sum(scores) / len(scores)
    return metrics


def finetune_segmentation(cfg, run_dir: str | Path, resume: str | Path | None = None):
    """Finetune ``cfg`` (a FinetuneConfig) into ``run_dir``; returns the TrainResult.

    Writes ``config.json`` and ``backbone.safetensors`` first, validates every
    ``train.eval_every`` steps on the held-out cases (keeping ``best/``), and writes
    ``model.safetensors`` + ``adapter_config.json`` + ``adapter_model.safetensors`` at
    the end (main process only).
    """
    from medtune.checkpoints.export import (
        BACKBONE_FILE,
        BEST_DIR,
        CONFIG_FILE,
        MODEL_FILE,
        run_config_dict,
        save_trained_weights,
    )
    from medtune.checkpoints.io import load_weights, save_json, save_safetensors
    from medtune.data.cases import find_cases, resolve_modalities
    from medtune.data.config import build_labeled_dataset, label_spec_for, split_cases
    from medtune.trainer import higher_is_better, make_accelerator, train

    run_dir = Path(run_dir)
    held = [name for name in (MODEL_FILE, "state") if (run_dir / name).exists()]
    if resume is None and held:
        # a fresh run would overwrite the trained weights and the base that adapter exports point at
        raise CheckpointError(
            f"run folder {run_dir} already holds a run ({', '.join(held)}); "
            f"continue it with --resume latest or choose another --output"
        )
    accelerator = make_accelerator(cfg.train, run_dir)
    main = accelerator.is_main_process
    label_spec = label_spec_for(cfg.data)
    if cfg.data.modalities is None:
        # record the channel order this run trains on, so that prediction on a dataset of
        # another layout (a BraTS-trained model on an MSD folder) reads the same channels
        cfg.data.modalities = resolve_modalities(cfg.data.root, cfg.data.layout)
    cases = find_cases(cfg.data.root, cfg.data.layout, cfg.data.modalities, require_labels=True)
    if cases and cases[0].num_modalities != cfg.backbone.in_chans:
        raise ConfigError(
            f"{cfg.data.root}: cases have {cases[0].num_modalities} modalities but backbone.in_chans is "
            f"{cfg.backbone.in_chans} (set data.modalities or backbone.in_chans)"
        )
    validate = cfg.data.val_fraction > 0 and bool(split_cases(cases, cfg.data.val_fraction)[1])
    if cfg.data.val_fraction > 0 and not validate:
        log.warning("%d labeled case(s): none held out, training without validation", len(cases))
    with accelerator.main_process_first():  # the main process builds the shared cache
        train_set = build_labeled_dataset(cfg.data, "train", run_dir, show_progress=main)
        val_set = build_labeled_dataset(cfg.data, "val", run_dir, show_progress=main) if validate else None
    saved_base = run_dir / BACKBONE_FILE
    if resume is not None and saved_base.is_file():
        # the base the run started from (the training state restores the rest)
        model, base_state = build_segmenter(
            cfg, label_spec.num_classes, load_pretrained=False, base_state=load_weights(saved_base)
        )
    else:
        model, base_state = build_segmenter(cfg, label_spec.num_classes)
    model.label_spec, model.roi_size = label_spec, cfg.roi_size
    run_config = run_config_dict(cfg, label_spec)
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_json(run_config, run_dir / CONFIG_FILE)
        if not (resume is not None and saved_base.is_file()):
            save_safetensors(base_state, saved_base, metadata={"backbone": cfg.backbone.name})
    del base_state

    def save_weights(trained: SliceSegmenter, folder: Path) -> None:
        save_safetensors(trained.state_dict(), folder / MODEL_FILE, metadata={"task": "segmentation"})
        save_trained_weights(trained, folder, run_config, run_dir / BACKBONE_FILE)

    evaluate = is_better = on_best = None
    if val_set is not None:

        def evaluate(trained: SliceSegmenter) -> dict[str, float]:
            return validate_segmenter(trained, val_set, label_spec, cfg.roi_size, cfg.validation, accelerator)

        is_better = higher_is_better(cfg.validation.best_metric)

        def on_best(trained: SliceSegmenter, metrics) -> None:
            save_weights(trained, run_dir / BEST_DIR)
            save_json({k: float(v) for k, v in metrics.items()}, run_dir / BEST_DIR / "metrics.json")

    result = train(
        model, train_set, cfg.train, run_dir, resume=resume, evaluate=evaluate, is_better=is_better,
        on_best=on_best, accelerator=accelerator, unit="crops",
    )
    if main:
        save_weights(model, run_dir)
    accelerator.wait_for_everyone()
    return result
