"""Exponential moving average of the trained weights (stages 2-3): used for samples and export.

Kept outside the module tree on purpose: it is not trained, must not be counted in the
trainable-set check, and is saved in the checkpoint by the stage module, so a resumed run
continues the same average.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


class EMA:
    def __init__(self, module: nn.Module, decay: float, update_every: int = 1) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"config key 'ema.decay' must be in (0, 1), got {decay}")
        if update_every < 1:
            raise ValueError(f"config key 'ema.update_every' must be >= 1, got {update_every}")
        self.decay = decay
        self.update_every = update_every
        self.steps = 0  # optimizer steps seen
        self.names = [n for n, p in module.named_parameters() if p.requires_grad]
        params = dict(module.named_parameters())
        self.shadow = [params[n].detach().clone().float() for n in self.names]
        self.updates = 0

    def _params(self, module: nn.Module) -> list[torch.Tensor]:
        params = dict(module.named_parameters())
        return [params[n] for n in self.names]

    def step(self, module: nn.Module) -> None:
        """Call after every optimizer step: averages every `update_every` steps."""
        self.steps += 1
        if self.steps % self.update_every == 0:
            self.update(module)

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        """shadow <- decay * shadow + (1 - decay) * weights, with the usual warm-up of the decay
        (early on, the average must not be dominated by the initial weights)."""
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        params = self._params(module)
        if self.shadow[0].device != params[0].device:
            self.shadow = [s.to(params[0].device) for s in self.shadow]
        torch._foreach_lerp_(self.shadow, [p.detach().float() for p in params], 1.0 - decay)

    @contextmanager
    def applied(self, module: nn.Module) -> Iterator[None]:
        """Temporarily put the averaged weights into `module` (for sampling or export)."""
        params = self._params(module)
        backup = [p.detach().clone() for p in params]
        with torch.no_grad():
            for p, s in zip(params, self.shadow):
                p.copy_(s.to(p.device, p.dtype))
        try:
            yield
        finally:
            with torch.no_grad():
                for p, b in zip(params, backup):
                    p.copy_(b)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "names": self.names, "shadow": [s.cpu() for s in self.shadow],
                "updates": self.updates, "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        if state["names"] != self.names:
            raise RuntimeError("the checkpoint's EMA covers other parameters than this run trains")
        self.shadow = [s.float() for s in state["shadow"]]
        self.updates = int(state["updates"])
        self.steps = int(state.get("steps", self.updates))
