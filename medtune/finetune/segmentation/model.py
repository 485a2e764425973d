"""Slice-wise volumetric segmentation: a 2D backbone (+ adapters) and a decoder per slice.

Med-Tuning's model (DESIGN section 5): a volume ``(B, M, H, W, T)`` becomes ``B*T``
slices ``(B*T, M, H, W)``; the frozen backbone (with adapters that mix the ``T`` slices)
gives stage features; a decoder (UperNet for plain ViT, U-Net style or AGLN for
hierarchical backbones) gives per-slice logits, stacked back to ``(B, K, H, W, T)``.
The loss is the run's ``loss:`` section (:mod:`medtune.models.losses`; default softmax
Dice + cross-entropy, MONAI ``DiceCELoss``; ``softmax_dice`` is the official Med-Tuning/FreMIM
loss); terms that read a pixel embedding (PNE) get the decoder's last map
(``decoder.forward_decoder``), stacked the same way.

Backbones with ``spatial_dims=3`` (MONAI SwinUNETR encoder) are run on the volume as
is, with a 3D decoder; the same class serves both. Decoder ``unetr`` (MONAI SwinUNETR's
own decoder) also reads the input image, and takes over the UNETR blocks of a FreMAE run
pretrained with ``objective.decoder: unetr`` (``--backbone RUN``): with ``adapter.method:
full`` that finetunes the whole pretrained SwinUNETR, as the FreMAE paper does.

:class:`VolumeSegmenter` is what every volumetric segmenter shares (the whole-volume
networks of the ``segment3d`` task too): ``forward_outputs`` -> the criterion, and
whole-volume prediction.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Callable, ContextManager

import torch
from torch import nn

from medtune.adapters import slices_to_volume, volume_to_slices
from medtune.errors import ConfigError, DataError
from medtune.models.losses import Criterion, LossContext, build_criterion

log = logging.getLogger(__name__)


class VolumeSegmenter(nn.Module):
    """A segmenter of volumes trained by a :class:`~medtune.models.losses.Criterion`.

    Subclasses give ``forward_outputs(volume (B, M, *S)) -> {"logits": (B, K, *S), ...}``
    and ``in_chans``; ``forward(batch)`` with ``batch["image"] (B, M, *S)`` and
    ``batch["label"] (B, *S)`` class indices -> ``{"loss", <each loss term>, ...}``.
    ``label_spec`` and ``roi_size`` are set by the task for whole-volume prediction.
    """

    criterion: Criterion
    in_chans: int

    def __init__(self) -> None:
        super().__init__()
        self.label_spec = None
        self.roi_size: tuple[int, ...] | None = None
        self.data_plan = None  # medtune.data.config.DataPlan: training grid and intensities

    def forward_outputs(self, volume: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def forward_logits(self, volume: torch.Tensor) -> torch.Tensor:
        """``(B, M, *S) -> (B, K, *S)`` logits."""
        return self.forward_outputs(volume)["logits"]

    def compute_loss(self, logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        """The criterion of ``logits (B, K, *S)`` against class indices ``(B, *S)`` (for
        criteria that read the logits only, e.g. the default Dice + CE)."""
        return self.criterion({"logits": logits}, label)["loss"]

    def predict_volume(self, image, affine=None, *, overlap: float = 0.5, tta: bool = False, sw_batch_size: int = 1):
        """Raw image ``(M, H, W, D)`` (numpy, as read) -> label map ``(H, W, D)`` uint8 in
        the dataset's values, on the image's own grid. With its ``affine`` the image is
        reoriented and resampled as the run's training data were (``data_plan``) and the
        labels mapped back; without, it is taken to be on the training grid already.
        Needs a model from :func:`medtune.finetune.load_segmenter`."""
        from medtune.finetune.segmentation.inference import predict_label_map

        if getattr(self, "label_spec", None) is None or getattr(self, "roi_size", None) is None:
            raise ConfigError("predict_volume needs a model loaded with medtune.finetune.load_segmenter")
        return predict_label_map(
            self, image, self.label_spec.values, self.roi_size, overlap=overlap, sw_batch_size=sw_batch_size,
            tta=tta, affine=affine, plan=self.data_plan,
        )

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        return self.criterion(self.forward_outputs(batch["image"]), batch["label"])


def default_criterion(num_classes: int, lambda_dice: float = 1.0, lambda_ce: float = 1.0,
                      dice_include_background: bool = False) -> Criterion:
    """Softmax Dice + cross-entropy (the ``dice_ce`` term alone)."""
    options = {"lambda_dice": lambda_dice, "lambda_ce": lambda_ce, "include_background": dice_include_background}
    return build_criterion({"dice_ce": {"weight": 1.0, **options}}, LossContext(num_classes, 3))


class SliceSegmenter(VolumeSegmenter):
    """Backbone (+ adapters) + decoder, applied slice-wise to volumes.

    Args:
        backbone: a :class:`medtune.models.Backbone`, possibly with adapters injected.
        decoder: maps ``backbone.forward_stages`` output and an output size to logits.
        num_classes: K, class indices ``0..K-1`` (background 0).
        lambda_dice, lambda_ce: weights of the Dice and cross-entropy terms (of the
            default criterion, when ``criterion`` is None).
        dice_include_background: whether the background class counts in Dice (same).
        slice_context: ``slice_context(backbone, T)`` -> a context manager during which
            the adapters know that consecutive groups of ``T`` images are one volume.
        self_distill: optional ``fn(model_fn, volume, logits) -> loss`` regulariser
            (:class:`medtune.finetune.self_distill.SelfDistillation`).
        criterion: the loss terms (:func:`medtune.models.losses.build_criterion`);
            None: softmax Dice + CE with the weights above.

    ``forward_logits(volume (B, M, H, W, T)) -> (B, K, H, W, T)``;
    ``forward(batch)`` with ``batch["image"] (B, M, H, W, T)`` and ``batch["label"]
    (B, H, W, T)`` class indices -> ``{"loss", "dice_ce", ...}`` (one entry per term).
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
        criterion: Criterion | None = None,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.decoder = decoder
        self.num_classes = num_classes
        self.spatial_dims = int(getattr(backbone, "spatial_dims", 2))
        self.criterion = criterion or default_criterion(num_classes, lambda_dice, lambda_ce, dice_include_background)
        self._slice_context = slice_context
        self.self_distill = self_distill
        self.gradient_checkpointing = False

    @property
    def in_chans(self) -> int:
        return self.backbone.in_chans

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

    def forward_outputs(self, volume: torch.Tensor, embedding: bool | None = None) -> dict[str, torch.Tensor]:
        """``(B, M, H, W, T)`` -> ``{"logits": (B, K, H, W, T)}``, plus ``"embedding"``
        ``(B, C, h, w, T)`` (the decoder's last map) when ``embedding`` (default: when a
        loss term reads it)."""
        if volume.ndim != 5:
            raise DataError(f"segmenter input has shape {tuple(volume.shape)}; expected (B, M, H, W, T)")
        if embedding is None:
            embedding = "embedding" in self.criterion.requires
        num_slices = None if self.spatial_dims == 3 else volume.shape[-1]
        if num_slices is None:  # a 3D backbone reads the volume
            inputs = volume
            features = self.backbone.forward_stages(volume)
        else:
            inputs = volume_to_slices(volume)  # (B*T, M, H, W)
            with self.slice_context(num_slices):
                features = self.backbone.forward_stages(inputs)  # [(B*T, C_i, H/s_i, W/s_i)]
        size = inputs.shape[2:]
        image = (inputs,) if getattr(self.decoder, "takes_image", False) else ()  # unetr reads the input

        def restack(x: torch.Tensor) -> torch.Tensor:  # (B*T, C, h, w) -> (B, C, h, w, T)
            return x if num_slices is None else slices_to_volume(x, num_slices)

        if not embedding:
            return {"logits": restack(self.decoder(features, size, *image))}
        decoded = self.decoder.forward_decoder(features, *image)
        return {"logits": restack(self.decoder.forward_head(decoded, size)), "embedding": restack(decoded)}

    def forward_logits(self, volume: torch.Tensor) -> torch.Tensor:
        """``(B, M, H, W, T) -> (B, K, H, W, T)`` logits."""
        return self.forward_outputs(volume, embedding=False)["logits"]

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        image, label = batch["image"], batch["label"]
        outputs = self.forward_outputs(image)
        out = self.criterion(outputs, label)
        if self.self_distill is not None and self.training:
            distill = self.self_distill(self.forward_logits, image, outputs["logits"])
            out["loss"] = out["loss"] + distill
            out["self_distill"] = distill.detach()
        return out


# --------------------------------------------------------------------------- building


def dice_ce_defaults(model_cfg) -> dict[str, dict]:
    """``dice_ce`` option defaults from the ``model:`` section's ``lambda_dice``,
    ``lambda_ce`` and ``dice_include_background`` (a ``loss.dice_ce`` option wins)."""
    return {"dice_ce": {"lambda_dice": model_cfg.lambda_dice, "lambda_ce": model_cfg.lambda_ce,
                        "include_background": model_cfg.dice_include_background}}


def _persistent_slice_context(backbone: nn.Module, num_slices: int) -> ContextManager:
    """Leave ``T`` set after the forward: checkpointed blocks recompute during backward."""
    from medtune.adapters import set_num_slices

    set_num_slices(backbone, num_slices)
    return contextlib.nullcontext()


def build_segmenter(cfg, num_classes: int, *, load_pretrained: bool = True) -> SliceSegmenter:
    """Backbone -> adapter -> decoder -> :class:`SliceSegmenter`.

    Args:
        cfg: a :class:`medtune.finetune.segmentation.SegmentationConfig`.
        num_classes: K (the dataset's label values, background included).
        load_pretrained: load ``cfg.backbone.pretrained`` (False when the weights come
            from a checkpoint anyway).
    """
    import dataclasses

    from medtune.adapters import adapter_config_from_dict, apply_adapter, slice_context
    from medtune.models.backbones import create_backbone
    from medtune.models.decoders import create_decoder
    from medtune.models.weights import load_pretrained_decoder

    backbone_cfg = cfg.backbone if load_pretrained else dataclasses.replace(cfg.backbone, pretrained=None)
    backbone = create_backbone(backbone_cfg)
    roi = cfg.roi_size
    if backbone.img_size is not None and tuple(roi[:2]) != (backbone.img_size,) * 2:
        raise ConfigError(
            f"data.crop_size {list(roi)} must start with the backbone's img_size "
            f"{backbone.img_size} (crops are (img_size, img_size, slices))"
        )
    apply_adapter(backbone, adapter_config_from_dict(cfg.adapter))
    decoder = create_decoder(
        cfg.model.decoder,
        backbone.feature_channels,
        backbone.feature_strides,
        num_classes,
        backbone.spatial_dims,
        image_channels=backbone.in_chans,
        **cfg.model.decoder_options,
    )
    if backbone_cfg.pretrained:  # a FreMAE run also brings its decoder blocks (into multistage or unetr)
        load_pretrained_decoder(decoder, backbone_cfg.pretrained)
    self_distill = None
    if cfg.self_distill is not None:
        from medtune.finetune.self_distill import SelfDistillation

        self_distill = SelfDistillation(cfg.self_distill)
    context = LossContext(num_classes, 3, getattr(decoder, "embedding_channels", None), ("logits", "embedding"))
    criterion = build_criterion(cfg.loss, context, defaults=dice_ce_defaults(cfg.model))
    model = SliceSegmenter(
        backbone,
        decoder,
        num_classes,
        slice_context=_persistent_slice_context if cfg.model.gradient_checkpointing else slice_context,
        self_distill=self_distill,
        criterion=criterion,
    )
    if cfg.model.gradient_checkpointing:
        model.set_gradient_checkpointing(True)
    counts = parameter_counts(model)
    log.info(
        "segmenter (%s): %s of %s parameters trainable (%.2f%%): adapter %s, backbone %s of %s, decoder %s",
        cfg.adapter.get("method"), f"{counts['trainable']:,}", f"{counts['total']:,}",
        100.0 * counts["trainable"] / max(counts["total"], 1), f"{counts['adapter']:,}",
        f"{counts['backbone_trained']:,}", f"{counts['backbone']:,}", f"{counts['decoder']:,}",
    )
    return model


def parameter_counts(model: SliceSegmenter) -> dict[str, int]:
    """The whole model's parameters: ``total``, ``trainable``, and trainable ones split into
    ``adapter`` (the method's own), ``backbone_trained`` (backbone tensors trained besides,
    e.g. the position embedding; all of them for full finetuning) and ``decoder``;
    ``backbone`` counts the backbone's own tensors, trained or frozen."""
    from medtune.adapters import describe

    described = describe(model)
    decoder = sum(p.numel() for p in model.decoder.parameters() if p.requires_grad)
    adapter = described["groups"]["adapter"]
    backbone_params = [p for p in model.backbone.parameters()]
    trained_backbone = sum(p.numel() for p in backbone_params if p.requires_grad) - adapter
    own_backbone = sum(p.numel() for p in backbone_params) - adapter
    return {"total": described["total"], "trainable": described["trainable"], "adapter": adapter,
            "backbone_trained": trained_backbone, "backbone": own_backbone, "decoder": decoder}
