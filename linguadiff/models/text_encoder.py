"""The frozen LLM used as the text encoder, and the tokenizer that feeds it.

OmniDiffusion (ECCV 2024) feeds ``BOS + prompt`` (no chat template) to a frozen LLM and
takes the last hidden state of those tokens as the text feature; other layers or a mix of
layers are an option here (``layers``, ``layer_mix``).

- :class:`PromptTokenizer` is picklable and holds no model, so DataLoader workers can
  tokenize; it right-pads, so with a causal LLM the features of real tokens never see the
  padding.
- :class:`LLMTextEncoder` loads any Hugging Face model with ``from_pretrained``: decoder-only
  models through ``AutoModel`` (the base model, no LM head), encoder-decoder ones (T5, mT5,
  UMT5) through ``AutoModelForTextEncoding`` (their encoder only, so the decoder weights
  are never loaded). It is frozen with :func:`~linguadiff.models.frozen.freeze`.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, Literal

import torch
from torch import nn
from transformers import __version__ as transformers_version
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForTextEncoding,
    AutoTokenizer,
    PretrainedConfig,
)

from linguadiff.models.frozen import freeze

log = logging.getLogger(__name__)

LayerMix = Literal["mean", "concat"]

# Tokenizers without a known limit report a huge sentinel (int(1e30)) as model_max_length.
_SANE_LENGTH_LIMIT = 1_000_000


def torch_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """``"bfloat16"`` / ``"bf16"`` / ``torch.bfloat16`` -> ``torch.bfloat16`` (and so on)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    aliases = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "half": "float16", "float": "float32"}
    resolved = getattr(torch, aliases.get(dtype, dtype), None)
    if not isinstance(resolved, torch.dtype) or not resolved.is_floating_point:
        raise ValueError(f"unknown floating dtype {dtype!r}; use e.g. 'float32', 'bfloat16', 'float16'")
    return resolved


def _config_bos(config: PretrainedConfig | None) -> int | None:
    """A decoder-only model config's BOS id inside its vocabulary, or None (encoders: their
    config's ids are for the decoder)."""
    if config is None or getattr(config, "is_encoder_decoder", False):
        return None
    bos = getattr(config, "bos_token_id", None)
    if isinstance(bos, (list, tuple)):
        bos = bos[0] if len(bos) == 1 else None
    vocab = getattr(config, "vocab_size", None)
    if not isinstance(bos, int) or bos < 0 or (isinstance(vocab, int) and bos >= vocab):
        return None
    return bos


BosSetting = Literal["auto", "none"]
BOS_SETTINGS = ("auto", "none")


def bos_setting(settings: Mapping[str, Any]) -> BosSetting:
    """The `llm.bos` setting of a config's `llm` section or an export's `llm` metadata.

    Exports and run configs written before `bos` replaced `add_bos` (a bool) carry
    `add_bos`: true meant "BOS when the tokenizer knows one" (now `auto`), false `none`.
    Where both are present (an old run config merged over today's defaults) the old
    run's own `add_bos` is what it trained with.
    """
    if settings.get("add_bos") is not None:
        return "auto" if settings["add_bos"] else "none"
    value = settings.get("bos", "auto")
    if value not in BOS_SETTINGS:
        raise ValueError(f"llm.bos must be one of {BOS_SETTINGS}, got {value!r}")
    return value


class PromptTokenizer:
    """Tokenize prompts for an LLM text encoder: ``BOS + prompt``, right-padded, no chat template.

    ``__call__(texts) -> {"input_ids": LongTensor[B, T], "attention_mask": LongTensor[B, T]}``
    with ``T`` the longest prompt in the batch (at most ``max_length``).

    BOS (``bos``): the paper feeds ``BOS + prompt``. With ``"auto"``, a tokenizer that adds
    BOS itself (Llama, Gemma) is used as is; one that has a BOS token but does not add it
    (Baichuan2) gets it prepended; one with no BOS token whose model config names one
    (Qwen2/2.5: ``bos_token_id`` = ``<|endoftext|>``, the token that starts every document
    in its pre-training stream) gets the config's; otherwise (T5, an encoder) none. Without
    a BOS the first word of the prompt becomes the attention sink and its features go
    strange. With ``"none"`` there is never a BOS. ``bos_id`` is the id put first, or None.
    Other special tokens the tokenizer adds (T5's trailing ``</s>``) are kept, since that
    is how the model saw text in training. The empty prompt is then exactly ``[bos_id]``:
    stage 1 aligns it and generation feeds it as the default negative prompt.

    Padding uses the pad token, else eos, else unk (the vocabulary is never changed; the
    id only has to exist, as padded positions are masked). A prompt that yields no token
    at all (an empty caption, no BOS) gets one pad token marked as real, so every row has
    something to attend to downstream.
    """

    def __init__(
        self,
        path_or_name: str,
        max_length: int = 256,
        bos: BosSetting | bool = "auto",
        trust_remote_code: bool = False,
        revision: str | None = None,
    ) -> None:
        if isinstance(bos, bool):  # the former add_bos
            bos = "auto" if bos else "none"
        if bos not in BOS_SETTINGS:
            raise ValueError(f"bos must be one of {BOS_SETTINGS}, got {bos!r}")
        self.path_or_name = str(path_or_name)
        check_llm_supported(self.path_or_name, revision)
        self.bos: BosSetting = bos
        self.tokenizer = AutoTokenizer.from_pretrained(
            self.path_or_name, trust_remote_code=trust_remote_code, revision=revision
        )
        tok = self.tokenizer
        config = self._model_config(trust_remote_code, revision)
        tokenizer_bos = tok.bos_token_id
        probe = tok("a", add_special_tokens=True)["input_ids"]
        adds_bos = tokenizer_bos is not None and len(probe) > 0 and probe[0] == tokenizer_bos
        #: where the BOS comes from: "tokenizer" (added by it), "prepended" (its token, added
        #: here), "config" (the model config's bos_token_id), or None
        self.bos_source: str | None = None
        if bos == "auto":
            if adds_bos:
                self.bos_source = "tokenizer"
            elif tokenizer_bos is not None:
                self.bos_source = "prepended"
            elif _config_bos(config) is not None:
                self.bos_source = "config"
        self.bos_id: int | None = {"tokenizer": tokenizer_bos, "prepended": tokenizer_bos, "config": _config_bos(config)}.get(
            self.bos_source
        )
        # Exactly one of these can be true: prepend when wanted but missing, strip when unwanted.
        self.prepend_bos = self.bos_source in ("prepended", "config")
        self.strip_bos = bos == "none" and adds_bos
        pad_candidates = (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id)
        self.pad_id: int = next((i for i in pad_candidates if i is not None), 0)
        limits = [tok.model_max_length, getattr(config, "max_position_embeddings", None)]
        self.max_length = min(max_length, *[n for n in limits if isinstance(n, int) and 0 < n < _SANE_LENGTH_LIMIT])
        if self.max_length < 1:
            raise ValueError(f"max_length must be at least 1, got {self.max_length}")

    def _model_config(self, trust_remote_code: bool, revision: str | None) -> PretrainedConfig | None:
        try:
            return AutoConfig.from_pretrained(self.path_or_name, trust_remote_code=trust_remote_code, revision=revision)
        except (OSError, ValueError):  # a tokenizer-only folder (transformers 5 raises ValueError): no model config
            return None

    def __call__(self, texts: list[str]) -> dict[str, torch.Tensor]:
        if isinstance(texts, str):
            raise TypeError("PromptTokenizer takes a list of prompts, not a single string")
        # Leave room for the BOS we add (or take off); the tokenizer's truncation already
        # counts the special tokens it adds itself.
        budget = self.max_length - int(self.prepend_bos) + int(self.strip_bos)
        rows = self.tokenizer(list(texts), add_special_tokens=True, truncation=True, max_length=budget)["input_ids"]
        if self.prepend_bos:
            rows = [[self.bos_id, *row] for row in rows]
        elif self.strip_bos:
            rows = [row[1:] for row in rows]
        lengths = [max(len(row), 1) for row in rows]
        width = max(lengths, default=1)
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, (row, n) in enumerate(zip(rows, lengths)):
            input_ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
            attention_mask[i, :n] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask}


# LLMs whose published loading code is known not to work with the transformers this project
# installs (5.x), by the `model_type` of their config.json: what fails, and what to use instead.
UNSUPPORTED_LLMS = {
    "baichuan": (
        "Baichuan2 (the paper's LLM) loads only through the remote code in its model repository, "
        "written for transformers 4.33: its tokenizer fails from transformers 4.34 on ('BaichuanTokenizer' "
        "object has no attribute 'sp_model', baichuan-inc/Baichuan2#204, #226), and transformers 5 loads "
        "4.x-era remote models differently (weights initialised after loading, non-persistent RoPE "
        "buffers), which can give wrong features without any error. This project needs transformers 5, "
        "so it refuses it rather than train on features it cannot check. Use llm=qwen2.5-7b (multilingual, "
        "Chinese and English included, loaded by transformers' own code) or another LLM preset"
    ),
}


def check_llm_supported(path_or_name: str, revision: str | None = None) -> None:
    """Refuse an LLM from `UNSUPPORTED_LLMS` before any of its code runs, saying what to use instead.

    Reads only config.json (no remote code executes). A folder or name without one is left
    to `from_pretrained`, whose own error is clearer.
    """
    from linguadiff.config import ConfigError

    try:
        raw, _ = PretrainedConfig.get_config_dict(str(path_or_name), revision=revision)
    except (OSError, ValueError):
        return
    model_type = str(raw.get("model_type", "")).lower()
    if model_type in UNSUPPORTED_LLMS:
        raise ConfigError(f"llm.path={path_or_name} (model_type {model_type!r}) does not load with transformers "
                          f"{transformers_version}: {UNSUPPORTED_LLMS[model_type]}.")


def _load_backbone(
    config: PretrainedConfig, path_or_name: str, dtype: torch.dtype, trust_remote_code: bool, revision: str | None,
    device: torch.device | None = None,
) -> nn.Module:
    """The part of the model that makes token features: the encoder, or the LM-head-less decoder.

    With `device`, the weights go from the files straight to that device (FSDP ranks load
    onto their own GPU instead of each holding a full copy in CPU memory).
    """
    kwargs = {"dtype": dtype, "trust_remote_code": trust_remote_code, "revision": revision}
    if device is not None:
        kwargs["device_map"] = {"": str(device)}
    if getattr(config, "is_encoder_decoder", False):
        return AutoModelForTextEncoding.from_pretrained(path_or_name, **kwargs)
    auto_map = getattr(config, "auto_map", None) or {}
    if trust_remote_code and auto_map and "AutoModel" not in auto_map and "AutoModelForCausalLM" in auto_map:
        # Remote-code repos such as Baichuan2 register only their causal-LM class; its base
        # model (``base_model_prefix``) is the LM-head-less decoder.
        return AutoModelForCausalLM.from_pretrained(path_or_name, **kwargs).base_model
    return AutoModel.from_pretrained(path_or_name, **kwargs)


class LLMTextEncoder(nn.Module):
    """A frozen Hugging Face LLM giving per-token prompt features.

    ``forward(input_ids, attention_mask) -> (features [B, T, hidden_size] float32, mask [B, T] bool)``.

    ``layers`` index the model's hidden states like a Python sequence whose items are
    (embeddings, layer 1, ..., layer L): ``-1`` is the last layer, ``0`` the embeddings.
    Index ``-1`` (= ``L``) is always the model's own ``last_hidden_state``, i.e. *after*
    the final norm for Llama / Qwen2 / Gemma2 / T5, which is what the paper uses; the other
    indexes are the raw residual stream of that layer (no final norm), as
    ``output_hidden_states`` returns it. With ``layer_mix="mean"`` the chosen layers are
    averaged (width = model width), with ``"concat"`` concatenated (width x len(layers)).

    Features of padded positions are set to zero, so they are deterministic (e.g. when
    cached) and can never carry NaN/inf into an attention that masks them.
    """

    def __init__(
        self,
        path_or_name: str,
        dtype: str | torch.dtype = "float32",
        max_length: int = 256,
        layers: tuple[int, ...] | list[int] = (-1,),
        layer_mix: LayerMix = "mean",
        bos: BosSetting | bool = "auto",
        trust_remote_code: bool = False,
        revision: str | None = None,
        device: torch.device | None = None,
    ) -> None:
        super().__init__()
        if layer_mix not in ("mean", "concat"):
            raise ValueError(f"layer_mix must be 'mean' or 'concat', got {layer_mix!r}")
        if len(layers) == 0:
            raise ValueError("layers must name at least one hidden state, e.g. (-1,)")
        self._name = str(path_or_name)
        check_llm_supported(self._name, revision)
        config = AutoConfig.from_pretrained(self._name, trust_remote_code=trust_remote_code, revision=revision)
        self.model = freeze(_load_backbone(config, self._name, torch_dtype(dtype), trust_remote_code, revision, device))
        self._tokenizer = PromptTokenizer(self._name, max_length, bos, trust_remote_code, revision)

        # hidden_states holds the embeddings plus one entry per layer.
        self.num_hidden_states = self.model.config.num_hidden_layers + 1
        n = self.num_hidden_states
        bad = [i for i in layers if not -n <= i < n]
        if bad:
            raise ValueError(f"layers {bad} out of range for {self._name}: it has {n} hidden states (-{n}..{n - 1})")
        self.layers = tuple(int(i) % n for i in layers)
        self.layer_mix: LayerMix = layer_mix
        self.model_width = int(self.model.config.hidden_size)
        freeze(self)  # the wrapper too, so nothing added to it later can train by accident

    @classmethod
    def from_settings(
        cls, settings: Mapping[str, Any], path: str | None = None, dtype: str | None = None, device: torch.device | None = None,
        trust_remote_code: bool | None = None,
    ) -> "LLMTextEncoder":
        """Build from the config's `llm` section or an export's `llm` metadata (same keys;
        an older export's `add_bos` is read as `bos`, see `bos_setting`). `trust_remote_code`
        overrides the settings' own: a file's metadata must not decide to run code."""
        encoder = cls(
            path or settings["path"],
            dtype=dtype or settings["dtype"],
            max_length=settings["max_length"],
            layers=tuple(settings["layers"]),
            layer_mix=settings["layer_mix"],
            bos=bos_setting(settings),
            trust_remote_code=settings["trust_remote_code"] if trust_remote_code is None else trust_remote_code,
            revision=settings.get("revision"),
            device=device,
        )
        recorded = settings.get("bos_token_id", encoder.tokenizer.bos_id)
        if recorded != encoder.tokenizer.bos_id:
            log.warning("The adapter was trained with BOS id %s first, but %s's tokenizer now gives %s: its outputs "
                        "will differ from training's (another tokenizer version or llm path?)",
                        recorded, encoder.name, encoder.tokenizer.bos_id)
        return encoder

    @property
    def tokenizer(self) -> PromptTokenizer:
        return self._tokenizer

    @property
    def name(self) -> str:
        return self._name

    @property
    def hidden_size(self) -> int:
        """Width of the features ``forward`` returns."""
        return self.model_width * (len(self.layers) if self.layer_mix == "concat" else 1)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        last = self.num_hidden_states - 1
        # All hidden states of a 7B model for a batch cost GBs: only ask for them when a layer
        # other than the last is wanted. Passed per call, never through the config, which a
        # transformers-5 model loses when unpickled in a new process (DESIGN.md).
        need_hidden = any(i != last for i in self.layers)
        kwargs = {} if getattr(self.model.config, "is_encoder_decoder", False) else {"use_cache": False}
        with torch.no_grad():
            out = self.model(
                input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=need_hidden, **kwargs
            )
            if need_hidden and len(out.hidden_states) != self.num_hidden_states:
                raise RuntimeError(
                    f"{self._name} returned {len(out.hidden_states)} hidden states, expected {self.num_hidden_states}"
                )
            picked = [out.last_hidden_state if i == last else out.hidden_states[i] for i in self.layers]
            if self.layer_mix == "concat":
                features = torch.cat([p.float() for p in picked], dim=-1)
            else:
                features = torch.stack([p.float() for p in picked]).mean(0)
            mask = attention_mask.bool()
            features = features.masked_fill(~mask.unsqueeze(-1), 0.0)
        return features, mask

    def encode(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokenize and encode on the model's device: ``(features, mask)``."""
        device = next(self.model.parameters()).device
        tokens = self.tokenizer(texts)
        return self(tokens["input_ids"].to(device), tokens["attention_mask"].to(device))
