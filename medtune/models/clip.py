"""CLIP through open_clip, with the dense features referring segmentation needs.

``build_clip(model_name, weights, tiny_config)`` returns ``(model, tokenizer)``:

- ``model_name`` is an open_clip built-in architecture ("ViT-B-16", "ViT-B-32",
  "RN50", "RN101", ...; OpenAI's weights need the "-quickgelu" variants or
  ``quick_gelu=True``).
- ``weights`` is a local file only (an OpenAI ``.pt`` TorchScript archive, whose tensors
  are read with ``torch.jit.load`` without running its code, or an open_clip
  ``.pt``/``.bin``/``.safetensors`` checkpoint, read with ``weights_only=True``). It is resolved to an absolute path
  before open_clip sees it, so it can never be mistaken for a download tag such as
  "openai"; a path that is not a file is a :class:`CheckpointError`. ``None`` gives a
  randomly initialised model; nothing is ever downloaded.
- ``model_name`` or ``weights`` may be ``hf-hub:ORG/NAME``, an open_clip repository in the
  local Hugging Face cache (:mod:`medtune.models.hub`): as ``model_name`` its
  ``open_clip_config.json`` gives the architecture, as ``weights`` its weight file the
  weights (name it in both for the repository's model). Only standard CLIP: a repository whose
  text tower is a Hugging Face model (BiomedCLIP) is refused; its image tower loads as a
  backbone (``backbone.pretrained: hf-hub:...``).
- ``tiny_config`` (a dict, see :data:`TINY_CLIP`) builds a small random CLIP for tests
  and demos without any file.

The tokenizer is open_clip's BPE ``SimpleTokenizer`` (its vocabulary ships inside the
package). :func:`tokenize` wraps it and logs a warning when an expression is longer
than the context and gets truncated.

Dense features, written against open_clip's standard ``CLIP`` (ViT or ModifiedResNet
image tower, transformer text tower):

- :func:`encode_image_levels` -> multi-level maps. ViT: tokens of several blocks,
  reshaped to ``(B, C, H/p, W/p)``; ModifiedResNet: layer2/3/4 outputs (strides
  8/16/32). Also the last block's patch tokens projected into the joint embedding
  space (ViT; ResNet: the layer4 map through the attention pool's value/out
  projections), for patch-word similarity.
- :func:`encode_text_words` -> word features ``(B, L, C_t)`` after ``ln_final`` and the
  sentence feature ``(B, E)`` (end-of-text token, projected), plus the projected word
  features ``(B, L, E)``.

Both accept a masking hook (``patch_mask`` + ``mask_token``; ``word_mask`` +
``mask_token``) so CM-MaskSD's masked branches run through exactly the same weights.
"""

from __future__ import annotations

import copy
import logging
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from medtune.errors import CheckpointError, ConfigError

log = logging.getLogger(__name__)

#: A small CLIP for tests and the demo: 32 px images, 4 px patches, width 64, 2 layers.
TINY_CLIP: dict[str, Any] = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 32, "patch_size": 4, "width": 64, "layers": 2, "head_width": 32},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


def build_clip(
    model_name: str = "ViT-B-16",
    weights: str | Path | None = None,
    tiny_config: dict | None = None,
    image_size: int | None = None,
    context_length: int | None = None,
    quick_gelu: bool = False,
) -> tuple[nn.Module, "ClipTokenizer"]:
    """Build an open_clip ``CLIP`` and its tokenizer; weights only from a local file.

    Args:
        model_name: open_clip built-in architecture name (ignored with ``tiny_config``).
        weights: local checkpoint path, or None for random weights.
        tiny_config: ``{"embed_dim", "vision_cfg", "text_cfg", ["quick_gelu"]}`` for a
            small random CLIP (see :data:`TINY_CLIP`); ``weights`` may still load into it.
        image_size: override the vision tower's input size (position embeddings of a
            loaded ViT checkpoint are resized by open_clip).
        context_length: override the text context length (positional embeddings of a
            checkpoint are resized by open_clip).
        quick_gelu: use QuickGELU (what OpenAI's checkpoints were trained with).
    """
    from medtune.models.hub import hub_weight_file, is_hub_spec

    if is_hub_spec(model_name) and tiny_config is None:
        tiny_config = hub_clip_config(model_name)  # the architecture; the weights are ``weights``'s, as always
    checkpoint = None
    if is_hub_spec(weights):
        checkpoint = hub_weight_file(weights)
    elif weights is not None:
        checkpoint = Path(weights).expanduser().resolve()
        if not checkpoint.is_file():
            raise CheckpointError(f"CLIP weight file not found: {weights} (weights are never downloaded)")
    converted = None
    if checkpoint is not None and is_torchscript_archive(checkpoint):
        checkpoint = converted = _torchscript_weights_as_safetensors(checkpoint)
    try:
        model = _build_open_clip(model_name, checkpoint, tiny_config, image_size, context_length, quick_gelu)
    finally:
        if converted is not None:
            shutil.rmtree(converted.parent, ignore_errors=True)
    if not hasattr(model, "token_embedding"):
        raise ConfigError(f"CLIP model '{model_name}' has a custom text tower; only standard CLIP is supported")
    return model, ClipTokenizer(model.context_length)


def hub_clip_config(spec: str) -> dict:
    """The architecture of a cached open_clip repository (its ``open_clip_config.json``'s
    ``model_cfg``), standard CLIP only."""
    from medtune.models.hub import OPEN_CLIP_CONFIG_FILE, hub_json

    model_cfg = (hub_json(spec, OPEN_CLIP_CONFIG_FILE, required=True) or {}).get("model_cfg")
    if not isinstance(model_cfg, dict):
        raise CheckpointError(f"{spec}: {OPEN_CLIP_CONFIG_FILE} has no 'model_cfg'")
    text_cfg = model_cfg.get("text_cfg") or {}
    if model_cfg.get("custom_text") or text_cfg.get("hf_model_name"):
        raise ConfigError(
            f"{spec}: its text tower is a Hugging Face model ({text_cfg.get('hf_model_name', 'custom')}); only "
            "standard CLIP is supported (its image tower loads as a backbone: backbone.pretrained: " + spec + ")"
        )
    return {k: v for k, v in model_cfg.items() if k in ("embed_dim", "vision_cfg", "text_cfg", "quick_gelu")}


def _build_open_clip(
    model_name: str,
    checkpoint: Path | None,
    tiny_config: dict | None,
    image_size: int | None,
    context_length: int | None,
    quick_gelu: bool,
) -> nn.Module:
    import open_clip
    from open_clip.model import CLIP

    if tiny_config is not None:
        cfg = copy.deepcopy(dict(tiny_config))
        unknown = set(cfg) - {"embed_dim", "vision_cfg", "text_cfg", "quick_gelu"}
        if unknown:
            raise ConfigError(f"tiny CLIP config: unknown keys {sorted(unknown)}")
        if image_size is not None:
            cfg["vision_cfg"]["image_size"] = image_size
        if context_length is not None:
            cfg["text_cfg"]["context_length"] = context_length
        cfg["quick_gelu"] = bool(cfg.get("quick_gelu", quick_gelu))
        model = CLIP(**cfg)
        if checkpoint is not None:
            try:
                open_clip.load_checkpoint(model, str(checkpoint), strict=True, weights_only=True)
            except RuntimeError as exc:
                raise CheckpointError(f"{checkpoint}: {str(exc).splitlines()[0]}") from None
    else:
        if model_name not in open_clip.list_models():
            raise ConfigError(f"unknown CLIP model '{model_name}'; known: {', '.join(open_clip.list_models()[:20])} ...")
        try:
            model = open_clip.create_model(
                model_name,
                pretrained=str(checkpoint) if checkpoint is not None else None,
                force_image_size=image_size,
                force_context_length=context_length,
                force_quick_gelu=quick_gelu,
                pretrained_image=False,
                pretrained_text=False,
                weights_only=True,
            )
        except RuntimeError as exc:
            raise CheckpointError(f"{checkpoint or model_name}: {str(exc).splitlines()[0]}") from None
    return model


def is_torchscript_archive(path: Path) -> bool:
    """True for a TorchScript zip (how OpenAI ships CLIP: ``ViT-B-16.pt``)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("constants.pkl") for name in archive.namelist())


def _torchscript_weights_as_safetensors(path: Path) -> Path:
    """OpenAI's TorchScript CLIP -> its tensors in a temporary ``.safetensors`` file.

    ``torch.load(weights_only=True)`` refuses TorchScript archives, so the archive is read
    with ``torch.jit.load`` (TorchScript, not arbitrary pickled Python) and only its
    tensors are kept; its code is never run. The tensors go to a temporary safetensors
    file that open_clip's loader (key conversion, position-embedding resizing) then reads;
    :func:`build_clip` deletes it afterwards.
    """
    from safetensors.torch import save_file

    try:
        scripted = torch.jit.load(str(path), map_location="cpu")
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: cannot read TorchScript CLIP ({str(exc).splitlines()[0]})") from None
    state = {
        name: tensor.detach().clone().contiguous()
        for name, tensor in scripted.state_dict().items()
        if name not in ("input_resolution", "context_length", "vocab_size", "attn_mask")  # not weights
    }
    target = Path(tempfile.mkdtemp(prefix="medtune_clip_")) / f"{path.stem}.safetensors"
    save_file(state, str(target))
    log.info("%s: TorchScript CLIP archive, %d tensors read", path, len(state))
    return target


class ClipTokenizer:
    """open_clip's BPE tokenizer with a logged warning (never an error) on truncation.

    ``tokenizer(texts) -> (N, context_length) long``: start token, BPE ids, end token,
    zero padding. Token ids: 0 = padding, ``sot_id`` = start, ``eot_id`` = end.
    """

    def __init__(self, context_length: int) -> None:
        from open_clip.tokenizer import SimpleTokenizer

        self._bpe = SimpleTokenizer(context_length=context_length)
        self.context_length = context_length
        self.sot_id: int = self._bpe.sot_token_id
        self.eot_id: int = self._bpe.eot_token_id

    def __call__(self, texts: str | Sequence[str]) -> torch.Tensor:
        if isinstance(texts, str):
            texts = [texts]
        rows = torch.zeros(len(texts), self.context_length, dtype=torch.long)
        for i, text in enumerate(texts):
            ids = [self.sot_id, *self._bpe.encode(text), self.eot_id]
            if len(ids) > self.context_length:
                log.warning(
                    "expression of %d tokens truncated to the context length %d: '%s'",
                    len(ids), self.context_length, text if len(text) < 80 else text[:77] + "...",
                )
                ids = ids[: self.context_length - 1] + [self.eot_id]
            rows[i, : len(ids)] = torch.tensor(ids)
        return rows

    def word_positions(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, L) bool: True at real word tokens (not padding, start or end)."""
        return (tokens != 0) & (tokens != self.sot_id) & (tokens != self.eot_id)


def is_vit(model: nn.Module) -> bool:
    return hasattr(model.visual, "conv1") and hasattr(model.visual, "class_embedding")


@dataclass
class ImageLevels:
    """Dense image features of one forward pass.

    levels: per chosen level ``(B, C_i, H_i, W_i)``.
    patch_embeds: ``(B, N, E)`` last-level patch tokens in the joint embedding space.
    grid: ``(H_g, W_g)`` of ``patch_embeds`` (N = H_g * W_g).
    """

    levels: list[torch.Tensor]
    patch_embeds: torch.Tensor | None
    grid: tuple[int, int]


def image_level_channels(model: nn.Module, num_levels: int = 3) -> list[int]:
    """Channel count of each level :func:`encode_image_levels` returns."""
    visual = model.visual
    if is_vit(model):
        return [visual.conv1.out_channels] * num_levels
    width = visual.layer1[0].conv1.in_channels  # stem width
    return [width * 4 * 2, width * 4 * 4, width * 4 * 8][-num_levels:]


def image_level_strides(model: nn.Module, num_levels: int = 3) -> list[int]:
    """Stride of each level w.r.t. the input (ViT: all equal to the patch size)."""
    if is_vit(model):
        patch = model.visual.patch_size
        return [patch[0] if isinstance(patch, tuple) else patch] * num_levels
    return [8, 16, 32][-num_levels:]


def vit_level_indices(num_blocks: int, num_levels: int = 3) -> list[int]:
    """Evenly spaced block indices ending at the last block, e.g. 12 blocks -> [3, 7, 11]."""
    return [round((i + 1) * num_blocks / num_levels) - 1 for i in range(num_levels)]


def encode_image_levels(
    model: nn.Module,
    images: torch.Tensor,
    num_levels: int = 3,
    patch_mask: torch.Tensor | None = None,
    mask_token: torch.Tensor | None = None,
    with_patch_embeds: bool = True,
) -> ImageLevels:
    """Multi-level image features, optionally with masked patches.

    Args:
        images: ``(B, 3, H, W)`` normalised with CLIP's mean/std.
        patch_mask: ``(B, N)`` bool over the patch grid (ViT: the token grid; ResNet:
            the stride-32 grid), True = replace by ``mask_token``.
        mask_token: ViT ``(C,)`` token replacing patch embeddings; ResNet ``(3,)``
            colour filling the masked cells of the input image.
        with_patch_embeds: also compute ``patch_embeds`` (detached: they only guide
            masking); otherwise it is None.
    """
    visual = model.visual
    if is_vit(model):
        x = visual.conv1(images)  # [B, C, Hg, Wg]
        batch, width, grid_h, grid_w = x.shape
        x = x.flatten(2).transpose(1, 2)  # [B, N, C]
        if patch_mask is not None:
            x = torch.where(patch_mask.unsqueeze(-1), mask_token.to(x.dtype), x)
        cls = visual.class_embedding.to(x.dtype).expand(batch, 1, width)
        x = torch.cat([cls, x], dim=1) + _vit_pos_embed(visual, grid_h, grid_w).to(x.dtype)  # [B, 1+N, C]
        x = visual.ln_pre(x)
        indices = vit_level_indices(len(visual.transformer.resblocks), num_levels)
        block_outputs = _run_blocks(visual.transformer, x)
        x = block_outputs[-1]
        levels = [
            block_outputs[i][:, 1:].transpose(1, 2).reshape(batch, width, grid_h, grid_w) for i in indices
        ]  # each [B, C, Hg, Wg]
        patch_embeds = None
        if with_patch_embeds:  # detached, not no_grad: FlopCounterMode's module hooks break under no_grad
            tokens = visual.ln_post(x[:, 1:].detach())  # [B, N, C]
            patch_embeds = (tokens @ visual.proj if visual.proj is not None else tokens).detach()  # [B, N, E]
        return ImageLevels(levels, patch_embeds, (grid_h, grid_w))
    if patch_mask is not None:
        images = _fill_masked_cells(images, patch_mask, mask_token, cell=32)
    x = visual.stem(images)
    x = visual.layer1(x)
    c3 = visual.layer2(x)  # stride 8
    c4 = visual.layer3(c3)  # stride 16
    c5 = visual.layer4(c4)  # stride 32
    levels = [c3, c4, c5][-num_levels:]
    patch_embeds = None
    if with_patch_embeds:
        pool = visual.attnpool
        dense = c5.detach().flatten(2).transpose(1, 2)  # [B, N, C5]
        patch_embeds = pool.c_proj(pool.v_proj(dense)).detach()  # [B, N, E]: MaskCLIP-style dense embedding
    return ImageLevels(levels, patch_embeds, (c5.shape[2], c5.shape[3]))


def _run_blocks(transformer: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """Outputs ``(B, T, C)`` of every block of an open_clip ``Transformer``."""
    batch_first = getattr(transformer, "batch_first", True)
    if not batch_first:
        x = x.transpose(0, 1)
    outputs = []
    for block in transformer.resblocks:
        x = block(x)
        outputs.append(x if batch_first else x.transpose(0, 1))
    return outputs


def _vit_pos_embed(visual: nn.Module, grid_h: int, grid_w: int) -> torch.Tensor:
    """Position embedding (1+N, C), bicubically resized when the grid differs."""
    pos = visual.positional_embedding
    old_h, old_w = visual.grid_size
    if (old_h, old_w) == (grid_h, grid_w):
        return pos
    cls_pos, patch_pos = pos[:1], pos[1:]
    patch_pos = patch_pos.reshape(1, old_h, old_w, -1).permute(0, 3, 1, 2)
    patch_pos = F.interpolate(patch_pos, size=(grid_h, grid_w), mode="bicubic", align_corners=False)
    return torch.cat([cls_pos, patch_pos.permute(0, 2, 3, 1).reshape(grid_h * grid_w, -1)], dim=0)


def _fill_masked_cells(images: torch.Tensor, cell_mask: torch.Tensor, colour: torch.Tensor, cell: int) -> torch.Tensor:
    """Fill masked ``cell x cell`` regions of ``images (B, 3, H, W)`` with ``colour (3,)``."""
    batch, _, height, width = images.shape
    grid_h, grid_w = -(-height // cell), -(-width // cell)
    pixel_mask = cell_mask.view(batch, 1, grid_h, grid_w).repeat_interleave(cell, 2).repeat_interleave(cell, 3)
    pixel_mask = pixel_mask[:, :, :height, :width]
    return torch.where(pixel_mask, colour.view(1, 3, 1, 1).to(images.dtype), images)


def image_mask_token_shape(model: nn.Module) -> tuple[int]:
    """Shape of the learnable token that replaces masked patches (ViT: (C,); ResNet: (3,))."""
    return (model.visual.conv1.out_channels,) if is_vit(model) else (3,)


@dataclass
class TextFeatures:
    """Text features of one forward pass.

    words: ``(B, L, C_t)`` per-token features after ``ln_final``.
    word_embeds: ``(B, L, E)`` the same projected into the joint embedding space.
    sentence: ``(B, E)`` the end-of-text token's projected feature (CLIP's text embedding).
    """

    words: torch.Tensor
    word_embeds: torch.Tensor
    sentence: torch.Tensor


def encode_text_words(
    model: nn.Module,
    tokens: torch.Tensor,
    word_mask: torch.Tensor | None = None,
    mask_token: torch.Tensor | None = None,
) -> TextFeatures:
    """Word and sentence features of ``tokens (B, L)``; masked words get ``mask_token (C_t,)``."""
    x = model.token_embedding(tokens)  # [B, L, C_t]
    if word_mask is not None:
        x = torch.where(word_mask.unsqueeze(-1), mask_token.to(x.dtype), x)
    x = x + model.positional_embedding.to(x.dtype)
    x = model.transformer(x, attn_mask=model.attn_mask)
    words = model.ln_final(x)  # [B, L, C_t]
    projection = model.text_projection
    if projection is None:
        word_embeds = words
    elif isinstance(projection, nn.Linear):
        word_embeds = projection(words)
    else:
        word_embeds = words @ projection  # [B, L, E]
    eot_index = tokens.argmax(dim=-1)  # the end token has the largest id
    sentence = word_embeds[torch.arange(tokens.shape[0], device=tokens.device), eot_index]  # [B, E]
    return TextFeatures(words, word_embeds, sentence)


def text_width(model: nn.Module) -> int:
    return model.token_embedding.embedding_dim


def embed_dim(model: nn.Module) -> int:
    projection = model.text_projection
    if projection is None:
        return text_width(model)
    return projection.out_features if isinstance(projection, nn.Linear) else projection.shape[1]
