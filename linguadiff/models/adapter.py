"""The trained adapter: frozen-LLM token features -> the UNet's cross-attention context.

Architecture from OmniDiffusion (ECCV 2024): an input MLP (Linear(d_llm -> D), GELU,
Linear(D -> D)); a Transformer encoder over the LLM tokens; a Transformer decoder whose
input is N learnable query tokens attending to the encoder output (both pre-norm, no
dropout); then a LayerNorm and a Linear(D -> D) projection. The N x D output replaces
CLIP's token features whatever the prompt length. For SDXL a pooled vector (mean of the
output tokens -> MLP -> pooled_dim) replaces bigG's pooled ``text_embeds``. Paper sizes
for SDXL (d_llm 4096, D 2048, 4 + 4 layers, 8 heads, ffn 8192, N 227) give 487M
parameters without the pooled head (494M with it).

Exports are a single safetensors file whose metadata holds the constructor arguments and
the run's metadata (LLM name, layers, stage...), so a stranger can rebuild the adapter
without the training config (DESIGN.md).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

ADAPTER_FORMAT = "linguadiff-adapter"
MetadataValue = str | int | float | list


class QueryAdapter(nn.Module):
    """LLM features ``[B, T, llm_dim]`` + mask ``[B, T]`` -> ``{"context": [B, N, dim], "pooled": [B, P] or None}``.

    Initialisation: PyTorch's defaults for the Linear / attention layers; the queries are
    drawn from N(0, 0.02^2), the usual transformer embedding scale (the decoder's pre-norm
    rescales them before the first attention, so only their directions matter at start).
    """

    def __init__(
        self,
        llm_dim: int,
        dim: int,
        num_queries: int,
        encoder_layers: int,
        decoder_layers: int,
        heads: int,
        ffn_dim: int,
        pooled_dim: int | None = None,
    ) -> None:
        super().__init__()
        # Kept to rebuild the adapter from its file alone (see save / from_file).
        self.config: dict[str, int | None] = {
            "llm_dim": llm_dim,
            "dim": dim,
            "num_queries": num_queries,
            "encoder_layers": encoder_layers,
            "decoder_layers": decoder_layers,
            "heads": heads,
            "ffn_dim": ffn_dim,
            "pooled_dim": pooled_dim,
        }
        self.input_proj = nn.Sequential(nn.Linear(llm_dim, dim), nn.GELU(), nn.Linear(dim, dim))
        layer_args = {"d_model": dim, "nhead": heads, "dim_feedforward": ffn_dim, "dropout": 0.0,
                      "activation": "gelu", "batch_first": True, "norm_first": True}
        # A pre-norm stack leaves its residual stream un-normalised, so each stack ends in a
        # LayerNorm: the encoder's normalises the memory the queries read, the decoder's is
        # the paper's final LayerNorm before the output projection.
        # enable_nested_tensor=False: PyTorch's nested-tensor fast path (eval, no grad) does
        # not support pre-norm layers; asking for it only makes PyTorch warn and fall back.
        self.encoder = nn.TransformerEncoder(
            nn.TransformerEncoderLayer(**layer_args), encoder_layers, norm=nn.LayerNorm(dim), enable_nested_tensor=False
        )
        self.queries = nn.Parameter(torch.randn(num_queries, dim) * 0.02)
        self.decoder = nn.TransformerDecoder(nn.TransformerDecoderLayer(**layer_args), decoder_layers, norm=nn.LayerNorm(dim))
        self.output_proj = nn.Linear(dim, dim)
        self.pooled_head = (
            nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, pooled_dim)) if pooled_dim is not None else None
        )

    def forward(self, features: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor | None]:
        if features.dim() != 3 or mask.shape != features.shape[:2]:
            raise ValueError(f"expected features [B, T, D] and mask [B, T], got {tuple(features.shape)} and {tuple(mask.shape)}")
        mask = mask.bool()
        # A row with no real token would make every attention over it softmax(-inf...) = NaN.
        # Let such rows attend to their first position instead (zeros from LLMTextEncoder).
        empty = ~mask.any(dim=1)
        if empty.any():
            mask = mask.clone()
            mask[empty, 0] = True
        padding = ~mask  # PyTorch key-padding masks are True where a token is to be ignored.
        memory = self.encoder(self.input_proj(features), src_key_padding_mask=padding)
        queries = self.queries.unsqueeze(0).expand(features.shape[0], -1, -1)
        tokens = self.decoder(queries, memory, memory_key_padding_mask=padding)
        context = self.output_proj(tokens)
        pooled = self.pooled_head(context.mean(dim=1)) if self.pooled_head is not None else None
        return {"context": context, "pooled": pooled}

    def save(self, path: str | Path, metadata: dict[str, MetadataValue] | None = None) -> Path:
        """Write the weights and a self-describing header to a safetensors file; return its path.

        safetensors metadata is str -> str, so every entry is JSON-encoded; ``format`` and
        ``adapter_config`` are reserved. The file is written under a temporary name and then
        renamed, so a job preempted mid-export never leaves a truncated adapter behind.
        """
        path = Path(path)
        metadata = dict(metadata or {})
        reserved = {"format", "adapter_config"} & metadata.keys()
        if reserved:
            raise ValueError(f"metadata keys {sorted(reserved)} are reserved by the adapter file format")
        header = {"format": ADAPTER_FORMAT, "adapter_config": json.dumps(self.config)}
        header.update({key: json.dumps(value) for key, value in metadata.items()})
        tensors = {name: t.detach().to("cpu").contiguous() for name, t in self.state_dict().items()}
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        save_file(tensors, str(tmp), metadata=header)
        os.replace(tmp, path)
        return path

    @classmethod
    def from_file(cls, path: str | Path, map_location: str | torch.device = "cpu") -> tuple[QueryAdapter, dict[str, Any]]:
        """Rebuild an adapter from a file written by :meth:`save`: ``(adapter, metadata)``.

        ``metadata`` is what was given to ``save`` (decoded). Weights load strictly.
        """
        header = read_adapter_metadata(path)
        config = header.pop("adapter_config")
        # The file is from elsewhere: its header could describe a terabyte adapter. Build it
        # on the meta device first (no memory) and compare with the tensors the file really
        # holds, so nothing is allocated beyond what is on disk.
        expected = _shapes_for(config, path)
        with safe_open(str(path), framework="pt") as f:
            stored = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
        if stored != expected:
            wrong = sorted(set(stored) ^ set(expected)) or [n for n in expected if stored[n] != expected[n]]
            raise ValueError(f"{path}: weights do not match the adapter its metadata describes (e.g. {wrong[:3]})")
        adapter = cls(**config)
        state = load_file(str(path), device=str(map_location))
        try:
            adapter.load_state_dict(state, strict=True)
        except RuntimeError as err:
            raise ValueError(f"{path}: weights do not match the adapter its metadata describes: {err}") from err
        return adapter.to(map_location), header


def _shapes_for(config: Any, path: str | Path) -> dict[str, tuple[int, ...]]:
    """Parameter shapes of the adapter `config` describes, computed on the meta device."""
    keys = ("llm_dim", "dim", "num_queries", "encoder_layers", "decoder_layers", "heads", "ffn_dim", "pooled_dim")
    if not isinstance(config, dict) or set(config) != set(keys) or not all(
            (isinstance(config[k], int) and not isinstance(config[k], bool) and config[k] >= (0 if "layers" in k else 1))
            or (k == "pooled_dim" and config[k] is None) for k in keys):
        raise ValueError(f"{path}: adapter_config must give {', '.join(keys)} as positive integers, got {config!r}")
    try:
        with torch.device("meta"):
            return {name: tuple(t.shape) for name, t in QueryAdapter(**config).state_dict().items()}
    except (ValueError, RuntimeError, AssertionError) as err:  # e.g. heads not dividing dim
        raise ValueError(f"{path}: adapter_config {config} does not describe a valid adapter: {err}") from None


def read_adapter_metadata(path: str | Path) -> dict[str, Any]:
    """The decoded metadata of an adapter file: ``adapter_config`` (a dict) plus the saved entries.

    Raises ``ValueError`` naming the file when it is not a safetensors file or not a
    LinguaDiff adapter.
    """
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = f.metadata() or {}
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{path} is not a readable safetensors file: {err}") from err
    if raw.get("format") != ADAPTER_FORMAT or "adapter_config" not in raw:
        raise ValueError(
            f"{path} is not a LinguaDiff adapter (metadata format={raw.get('format')!r}, expected {ADAPTER_FORMAT!r})"
        )
    try:
        return {key: json.loads(value) for key, value in raw.items() if key != "format"}
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: adapter metadata is not valid JSON: {err}") from err
