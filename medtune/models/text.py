"""Text encoders for vision-language tasks (VQA): question -> word tokens.

A :class:`TextEncoder` tokenizes questions once (``tokenize``) and turns the ids into
one feature vector per token (``forward``)::

    encoder = build_text_encoder(TextConfig(kind="open_clip", name="ViT-B-16", weights="clip.pt"))
    ids, mask = encoder.tokenize(["is there a lesion?"])   # (B, L) long, (B, L) bool
    tokens = encoder(ids, mask)                            # (B, L, encoder.width)

Kinds (registry ``TEXT_ENCODERS``):

- ``open_clip``: the text tower of an open_clip model config (``name``), with width,
  layers and heads overridable for a small randomly initialised tower (tests, demo).
  Weights only from a local file: a full open_clip/OpenAI CLIP checkpoint or a text
  tower's own state dict; :func:`clip_text_state` keeps the text tower's tensors.
  open_clip ships its BPE vocabulary, so tokenizing never downloads anything.
- ``hf``: a local Hugging Face BERT-style folder (``config.json``, weights, tokenizer
  files) through ``transformers``, which is optional: without it this kind is a
  :class:`~medtune.errors.ConfigError` naming the missing package.

A question longer than ``context_length`` tokens is truncated (its end token kept) with
a logged warning, never an error.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch
from torch import nn

from medtune.errors import ConfigError
from medtune.registry import Registry

log = logging.getLogger(__name__)


@dataclass
class TextConfig:
    """Which text encoder a VQA model uses."""

    kind: str = "open_clip"  # registry name: "open_clip" or "hf"
    name: str = "ViT-B-16"  # open_clip: the model config whose text tower is built
    width: int | None = None  # open_clip: override the tower's width (None = the config's)
    layers: int | None = None  # open_clip: override the number of transformer layers
    heads: int | None = None  # open_clip: override the number of attention heads
    weights: str | None = None  # open_clip: local CLIP or text-tower checkpoint (.safetensors/.pt/.bin), or hf-hub:ORG/NAME
    path: str | None = None  # hf: local folder of a BERT-style model and its tokenizer
    context_length: int = 32  # tokens per question, start/end tokens included; longer ones are truncated


Tokenize = Callable[[Sequence[str]], "tuple[torch.Tensor, torch.Tensor]"]


class TextEncoder(nn.Module):
    """Base class: ``tokenize`` questions, then ``forward(ids, mask) -> (B, L, width)``.

    Each kind also builds its tokenizer alone (:meth:`build_tokenizer`), so datasets can
    tokenize without the encoder's weights.
    """

    width: int
    context_length: int
    tokenize: Tokenize  # questions -> ids (N, L) long, mask (N, L) bool (True = a real token)

    @classmethod
    def build_tokenizer(cls, cfg: TextConfig) -> Tokenize:
        raise NotImplementedError

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


def pad_token_lists(
    token_lists: Sequence[Sequence[int]], context_length: int, pad_id: int, questions: Sequence[str]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad/truncate token id lists (each with its start and end token) to ``context_length``.

    A truncated list keeps its last (end) token. Returns ``ids (N, L)``, ``mask (N, L)``
    and logs one warning naming how many questions were cut and the first of them.
    """
    ids = torch.full((len(token_lists), context_length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(token_lists), context_length), dtype=torch.bool)
    truncated = []
    for row, tokens in enumerate(token_lists):
        if len(tokens) > context_length:
            truncated.append(row)
            tokens = list(tokens[: context_length - 1]) + [tokens[-1]]
        ids[row, : len(tokens)] = torch.as_tensor(tokens, dtype=torch.long)
        mask[row, : len(tokens)] = True
    if truncated:
        first = questions[truncated[0]]
        log.warning(
            "%d question(s) longer than the context of %d tokens were truncated, e.g. %r",
            len(truncated),
            context_length,
            first if len(first) <= 120 else first[:117] + "...",
        )
    return ids, mask


@functools.lru_cache(maxsize=1)
def _bpe_tokenizer():
    """open_clip's BPE tokenizer (its vocabulary ships with open_clip), read once per process."""
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer()


TEXT_ENCODERS: Registry[Callable[[TextConfig], TextEncoder]] = Registry("text encoder")

# top-level names of the text tower inside an open_clip CLIP model's state dict
_CLIP_TEXT_KEYS = ("token_embedding", "positional_embedding", "transformer", "ln_final")


def clip_text_state(state: Mapping[str, torch.Tensor], context_length: int) -> dict[str, torch.Tensor]:
    """Keep the text tower of a CLIP checkpoint, in :class:`OpenCLIPText`'s key names.

    Accepts open_clip's ``CLIP`` (text tensors at the top level), ``CustomTextCLIP``
    (under ``text.``) and a bare text tower; drops the image tower, the text projection
    and ``logit_scale``; cuts the position table to ``context_length`` rows.
    """
    state = {k.removeprefix("module."): v for k, v in state.items()}
    if any(k.startswith("text.") for k in state):
        state = {k.removeprefix("text."): v for k, v in state.items() if k.startswith("text.")}
    kept = {k: v for k, v in state.items() if k.split(".")[0] in _CLIP_TEXT_KEYS}
    if "positional_embedding" in kept:
        table = kept["positional_embedding"]
        if table.shape[0] < context_length:
            raise ConfigError(
                f"text.context_length {context_length} exceeds the checkpoint's {table.shape[0]} positions"
            )
        kept["positional_embedding"] = table[:context_length]
    return {"tower." + k: v for k, v in kept.items()}


@TEXT_ENCODERS.register("open_clip")
class OpenCLIPText(TextEncoder):
    """open_clip's text transformer (causal, as CLIP was trained), all token outputs."""

    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        import open_clip
        from open_clip.transformer import TextTransformer

        model_cfg = open_clip.get_model_config(cfg.name)
        if model_cfg is None:
            raise ConfigError(f"text.name '{cfg.name}' is not an open_clip model config (see open_clip.list_models())")
        text_cfg = dict(model_cfg.get("text_cfg", {}))
        if text_cfg.get("hf_model_name") or text_cfg.get("hf_tokenizer_name"):
            raise ConfigError(
                f"text.name '{cfg.name}': its text tower comes from the Hugging Face hub; "
                "use text.kind 'hf' with a local folder instead"
            )
        self.width = cfg.width or text_cfg.get("width", 512)
        self.context_length = cfg.context_length
        self.tower = TextTransformer(
            context_length=cfg.context_length,
            vocab_size=text_cfg.get("vocab_size", 49408),
            width=self.width,
            heads=cfg.heads or text_cfg.get("heads", 8),
            layers=cfg.layers or text_cfg.get("layers", 12),
            mlp_ratio=text_cfg.get("mlp_ratio", 4.0),
            ls_init_value=text_cfg.get("ls_init_value"),
            output_dim=None,  # VQA reads the tokens, not CLIP's projected sentence vector
            output_tokens=True,
        )
        self.tokenize = self.build_tokenizer(cfg)
        if cfg.weights:
            self.load_clip_weights(cfg.weights, cfg.name)

    @classmethod
    def build_tokenizer(cls, cfg: TextConfig) -> Tokenize:
        """open_clip's BPE: start token, BPE ids, end token, padded with 0."""
        bpe = _bpe_tokenizer()
        context_length = cfg.context_length

        def tokenize(questions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
            token_lists = [[bpe.sot_token_id] + bpe.encode(q) + [bpe.eot_token_id] for q in questions]
            return pad_token_lists(token_lists, context_length, 0, questions)

        return tokenize

    def load_clip_weights(self, path: str | Path, model_name: str) -> None:
        """Load the text tower from a local CLIP checkpoint or a text tower's state dict.

        safetensors/.pt/.bin/.npz state dicts are read with
        :func:`medtune.checkpoints.io.load_weights` (pickles with ``weights_only``); an
        OpenAI TorchScript archive, which is no state dict, goes through
        :func:`medtune.models.clip.build_clip` (``model_name``'s architecture).
        """
        from medtune.checkpoints.io import load_state, load_weights
        from medtune.errors import CheckpointError
        from medtune.models.hub import hub_weight_file, is_hub_spec

        if is_hub_spec(path):  # an open_clip repository in the local Hugging Face cache
            path = hub_weight_file(path)
        try:
            state = load_weights(path)
        except CheckpointError:
            if Path(path).suffix.lower() != ".pt":
                raise
            from medtune.models.clip import build_clip

            log.info("%s: not a plain state dict; reading it as an OpenAI CLIP archive", path)
            state = build_clip(model_name, weights=path, context_length=self.context_length)[0].state_dict()
        state = clip_text_state(state, self.context_length)
        report = load_state(self, state, strict=False, source=path)
        if not report.loaded:
            raise CheckpointError(f"{path}: holds no open_clip text tower tensors")
        if report.missing:
            log.warning("%s: %d text tower tensors missing (first: %s)", path, len(report.missing), report.missing[0])

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``ids (B, L)`` -> ``(B, L, width)``; causal attention, so padding never leaks back."""
        _, tokens = self.tower(ids)
        return tokens


@TEXT_ENCODERS.register("hf")
class HFText(TextEncoder):
    """A local BERT-style Hugging Face model (``transformers`` must be installed)."""

    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        transformers = _transformers(cfg)
        self.tokenize = self.build_tokenizer(cfg)
        try:
            self.model = transformers.AutoModel.from_pretrained(cfg.path, local_files_only=True)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{cfg.path}: cannot load a Hugging Face model ({str(exc).splitlines()[0]})") from None
        self.width = int(self.model.config.hidden_size)
        self.context_length = cfg.context_length

    @classmethod
    def build_tokenizer(cls, cfg: TextConfig) -> Tokenize:
        """The folder's own tokenizer (its start/end tokens), padded with its pad id."""
        transformers = _transformers(cfg)
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(cfg.path, local_files_only=True)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{cfg.path}: cannot load a Hugging Face tokenizer ({str(exc).splitlines()[0]})") from None
        context_length, pad_id = cfg.context_length, tokenizer.pad_token_id or 0

        def tokenize(questions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
            token_lists = tokenizer(list(questions), truncation=False, padding=False)["input_ids"]
            return pad_token_lists(token_lists, context_length, pad_id, questions)

        return tokenize

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=ids, attention_mask=mask.long()).last_hidden_state


def _transformers(cfg: TextConfig):
    """The ``transformers`` module for ``text.kind: hf`` (a clear error when it or the folder is missing)."""
    try:
        import transformers
    except ImportError:
        raise ConfigError(
            "text.kind 'hf' needs the 'transformers' package, which is not installed (pip install transformers)"
        ) from None
    if not cfg.path or not Path(cfg.path).is_dir():
        raise ConfigError(f"text.path must be a local Hugging Face model folder, got {cfg.path!r}")
    return transformers


def _check(cfg: TextConfig) -> None:
    if cfg.context_length < 2:
        raise ConfigError(f"text.context_length must be at least 2, got {cfg.context_length}")


def build_text_encoder(cfg: TextConfig) -> TextEncoder:
    """The text encoder named by ``cfg.kind``."""
    _check(cfg)
    return TEXT_ENCODERS.get(cfg.kind)(cfg)


def build_tokenizer(cfg: TextConfig) -> Tokenize:
    """The tokenizer of ``cfg``'s encoder alone (no weights): ``questions -> (ids, mask)``."""
    _check(cfg)
    return TEXT_ENCODERS.get(cfg.kind).build_tokenizer(cfg)
