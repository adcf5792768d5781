"""The LAION-style aesthetic score: a small head over L2-normalised CLIP image embeddings.

Two published layouts load from a state dict (``.pth``/``.pt`` via ``torch.load``, or
``.safetensors``):

- linear (LAION's first aesthetic predictor, e.g. ``sa_0_4_vit_l_14_linear.pth`` for
  CLIP ViT-L/14): keys ``weight`` [1, D] and ``bias`` [1];
- MLP (the "improved aesthetic predictor", ``sac+logos+ava1-l14-linearMSE.pth``): keys
  ``layers.<i>.weight`` / ``layers.<i>.bias`` of Linear layers applied in index order, the
  indices in between being dropout. That model has no activations between its layers (they
  are commented out in its training code), so none are applied here.

D must be the CLIP model's projection width (768 for ViT-L/14); scores are on the head's
own scale (about 1-10 for LAION's).
"""
from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

from linguadiff.config import ConfigError

_MLP_KEY = re.compile(r"^layers\.(\d+)\.(weight|bias)$")


class AestheticHead(nn.Module):
    """Linear layers (no activations) over the normalised embedding -> one score per image."""

    def __init__(self, layers: list[nn.Linear]) -> None:
        super().__init__()
        if not layers or layers[-1].out_features != 1:
            raise ValueError("an aesthetic head must end in a layer with one output")
        self.layers = nn.ModuleList(layers)

    @property
    def input_dim(self) -> int:
        return self.layers[0].in_features

    @torch.no_grad()
    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        """[N, D] CLIP image embeddings (normalised here) -> [N] scores."""
        x = nn.functional.normalize(embeddings.float(), dim=-1)
        for layer in self.layers:
            x = layer(x)
        return x.squeeze(-1)

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor]) -> "AestheticHead":
        if set(state) == {"weight", "bias"}:
            return cls([_linear(state["weight"], state["bias"])])
        indices = sorted({int(m.group(1)) for key in state if (m := _MLP_KEY.match(key))})
        unknown = [key for key in state if not _MLP_KEY.match(key)]
        if not indices or unknown:
            raise ValueError(f"expected keys weight/bias or layers.<i>.weight/bias, found {sorted(state)[:6]}")
        return cls([_linear(state[f"layers.{i}.weight"], state.get(f"layers.{i}.bias")) for i in indices])

    @classmethod
    def from_file(cls, path: str | Path) -> "AestheticHead":
        path = Path(path).expanduser()
        if not path.is_file():
            raise ConfigError(f"option 'aesthetic_head': no such file {path}")
        try:
            if path.suffix == ".safetensors":
                from safetensors.torch import load_file

                state = load_file(str(path))
            else:
                state = torch.load(path, map_location="cpu", weights_only=True)
                state = state.get("state_dict", state) if isinstance(state, dict) else state
            return cls.from_state_dict(dict(state)).eval()
        except Exception as err:  # unreadable file or another layout: say which and what is expected
            raise ConfigError(f"option 'aesthetic_head': cannot read {path} as an aesthetic head: {err}") from None


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    with torch.no_grad():
        layer.weight.copy_(weight.float())
        if bias is not None:
            layer.bias.copy_(bias.float())
    return layer.requires_grad_(False)
