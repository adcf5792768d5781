"""The backbone every stage shares: prompts -> the base's text conditioning, through the
frozen LLM and the trained adapter (OmniDiffusion's "LLM + adapter" that replaces CLIP).

One class for every caller, so training, sample grids, generation, evaluation, feature
caching and the benchmarks encode a prompt the same way:

- tokenizing (``BOS + prompt``, right-padded; the tokenizer holds no model, so data
  workers can run it);
- running the LLM and the adapter per group of similar prompt lengths (`length_groups`):
  the same output as one padded pass, for less work when one caption is much longer;
- the cached path: LLM features stored by ``scripts/cache_features.py`` go to the adapter
  alone (`from_features`);
- the output: ``{"context": [B, N, D], "pooled": [B, P] or None}``, the UNet's
  cross-attention context and, for SDXL, the pooled vector that replaces CLIP's
  ``text_embeds``; the empty prompt (classifier-free guidance's unconditional input) is
  tokenized like any other.

A stage module registers the LLM and the adapter as its own parts (``text_encoder``,
``adapter``: what trains, what is checkpointed and what FSDP wraps is named after them) and
sees them through a PromptEncoder made over those parts (``StageModule.prompt_encoder``).
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from linguadiff.models.adapter import QueryAdapter
from linguadiff.models.text_encoder import LLMTextEncoder, PromptTokenizer

Conditioning = dict[str, torch.Tensor | None]


def length_groups(lengths: torch.Tensor, min_saving: float = 0.25) -> list[torch.Tensor]:
    """Split a batch into two groups of similar prompt length when that saves padded work.

    A batch is padded to its longest prompt, so one long caption makes every row pay for
    its length (a 700-byte caption among 40-byte ones costs ~15x). Splitting the sorted
    lengths at the point that minimises padded tokens, and encoding each group trimmed to
    its own longest, gives the same features (masks make rows independent) for less work.
    Returns index tensors into the batch; one group when the split saves < `min_saving`.
    """
    order = torch.argsort(lengths, stable=True)  # ties in one order on every device (encode-ahead runs it on the CPU)
    ordered = lengths[order].tolist()
    n = len(ordered)
    full = n * ordered[-1] if n else 0
    best_k, best = n, full
    for k in range(1, n):
        cost = k * ordered[k - 1] + (n - k) * ordered[-1]
        if cost < best:
            best_k, best = k, cost
    if n == 0 or best > (1 - min_saving) * full:
        return [torch.arange(n, device=lengths.device)]
    return [order[:best_k], order[best_k:]]


class PromptEncoder(nn.Module):
    """Frozen LLM + adapter: ``forward(input_ids, attention_mask) -> {"context", "pooled"}``."""

    def __init__(self, text_encoder: LLMTextEncoder, adapter: QueryAdapter) -> None:
        super().__init__()
        self.text_encoder = text_encoder
        self.adapter = adapter

    # ------------------------------------------------------------------ building

    @classmethod
    def with_new_adapter(cls, text_encoder: LLMTextEncoder, settings: Mapping[str, Any]) -> "PromptEncoder":
        """A fresh adapter (stage 1) reading `text_encoder`'s features; `settings` holds the
        config's `adapter` keys (dim, num_queries, encoder_layers, decoder_layers, heads,
        ffn_dim, pooled_dim)."""
        adapter = QueryAdapter(llm_dim=text_encoder.hidden_size, **{k: settings[k] for k in QUERY_ADAPTER_KEYS})
        return cls(text_encoder, adapter)

    @classmethod
    def from_export(
        cls,
        adapter_path: str | Path,
        llm_path: str | None = None,
        dtype: str | None = None,
        device: torch.device | None = None,
        trust_remote_code: bool = False,
    ) -> tuple["PromptEncoder", dict[str, Any]]:
        """Rebuild from an exported adapter file alone: its metadata names the LLM, its layers
        and its tokenizer settings. Returns ``(encoder, metadata)``, in eval mode, nothing
        trainable. `llm_path` points at a local copy of the LLM, `dtype` overrides its dtype.

        An export is a file from elsewhere: when its metadata says the LLM needs remote code,
        that code runs only if the caller allows it (`trust_remote_code`, from the user's own
        command line); otherwise `RemoteCodeRefused` says so and how to allow it."""
        adapter, meta = QueryAdapter.from_file(adapter_path)
        wants_code = bool(meta["llm"].get("trust_remote_code"))
        if wants_code and not trust_remote_code:
            raise RemoteCodeRefused(
                f"{adapter_path}: its LLM {meta['llm'].get('path')!r} needs the remote code of its model repository "
                "(trust_remote_code), which is not run on an export's say-so: if you trust it, allow it on the "
                "command line with llm.trust_remote_code=true"
            )
        text_encoder = LLMTextEncoder.from_settings(meta["llm"], path=llm_path, dtype=dtype, device=device,
                                                    trust_remote_code=wants_code and trust_remote_code)
        encoder = cls(text_encoder, adapter.requires_grad_(False))
        return encoder.eval(), meta

    # ------------------------------------------------------------------ properties

    @property
    def tokenizer(self) -> PromptTokenizer:
        """Picklable and model-free: the data workers tokenize with it."""
        return self.text_encoder.tokenizer

    @property
    def device(self) -> torch.device:
        return next(self.adapter.parameters()).device

    def tokenize(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        return self.tokenizer(prompts)

    # ------------------------------------------------------------------ encoding

    def from_features(self, features: torch.Tensor, mask: torch.Tensor) -> Conditioning:
        """The adapter alone, on LLM features computed elsewhere (cached, or computed once).
        Features arrive in float32 (LLMTextEncoder's output); the adapter may hold another dtype
        at inference (bf16 on a GPU), so they are cast to its own."""
        return self.adapter(features.to(self.adapter_dtype), mask)

    @property
    def adapter_dtype(self) -> torch.dtype:
        return next(self.adapter.parameters()).dtype

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, grouped: bool = True) -> Conditioning:
        """LLM + adapter over a batch, run per `length_groups` group and put back in batch order.

        The adapter's outputs have a fixed size (N queries), so groups of different padded
        lengths concatenate; the result equals one padded pass, for less work. `grouped=False`
        makes it one pass: under FSDP every rank must make the same number of forward calls."""
        return self.adapt(*self.llm_features(input_ids, attention_mask, grouped))

    def llm_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, grouped: bool = True,
                     lengths: torch.Tensor | None = None) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], list[torch.Tensor]]:
        """The frozen LLM's part of `forward`: (features, mask) per length group, each trimmed
        to its own longest prompt, and the groups' row indexes. `lengths`: the rows' token
        counts on the CPU, when the caller has them (the groups then need no device sync)."""
        if lengths is None:
            lengths = attention_mask.sum(1)
        device = input_ids.device
        groups = length_groups(lengths) if grouped else [torch.arange(len(input_ids), device=lengths.device)]
        if len(groups) == 1:
            return [self.text_encoder(input_ids, attention_mask)], [groups[0].to(device, non_blocking=True)]
        parts = []
        for index in groups:
            width = int(lengths[index].max())
            index = index.to(device, non_blocking=True)
            parts.append(self.text_encoder(input_ids[index, :width], attention_mask[index, :width]))
        return parts, [index.to(device, non_blocking=True) for index in groups]

    def adapt(self, parts: list[tuple[torch.Tensor, torch.Tensor]], groups: list[torch.Tensor]) -> Conditioning:
        """The adapter's part of `forward`: each group's features through the adapter, back in batch order."""
        outs = [self.from_features(*part) for part in parts]
        if len(outs) == 1:
            return outs[0]
        inverse = torch.argsort(torch.cat(groups))
        return {key: None if outs[0][key] is None else torch.cat([o[key] for o in outs])[inverse] for key in outs[0]}

    def condition(self, batch: Mapping[str, Any], device: torch.device | None = None, grouped: bool = True,
                  text_field: str = "caption") -> Conditioning:
        """A training batch's conditioning: from cached LLM features when the batch carries them
        (``llm_states`` / ``llm_mask``), else from the tokens the data workers made
        (``student_tokens``), else from tokenizing ``batch[text_field]`` here. `device`: where
        the stage computes (the adapter's own device by default)."""
        device = device or self.device
        if "llm_states" in batch:
            return self.from_features(batch["llm_states"].to(device), batch["llm_mask"].to(device))
        tokens = batch.get("student_tokens") or self.tokenize(list(batch[text_field]))
        return self(tokens["input_ids"].to(device), tokens["attention_mask"].to(device), grouped=grouped)

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> Conditioning:
        """Prompts of any language and length -> conditioning, on the adapter's device (inference)."""
        tokens = self.tokenize(prompts)
        return self(tokens["input_ids"].to(self.device), tokens["attention_mask"].to(self.device))


class RemoteCodeRefused(ValueError):
    """An export asks to run its LLM's remote code and the user has not allowed it."""


#: The config's `adapter` keys that size a QueryAdapter (its LLM width comes from the LLM).
QUERY_ADAPTER_KEYS = ("dim", "num_queries", "encoder_layers", "decoder_layers", "heads", "ffn_dim", "pooled_dim")
