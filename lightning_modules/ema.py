"""Exponential moving average of the trained weights (stages 2-3): used for samples and export.

The averaged copy of each trained weight lives in the optimizer's state, beside AdamW's
moments (`optimizer.state[p]["ema"]`). That is where every strategy already keeps
per-weight state and saves it correctly: one file for a single device or DDP, one shard per
rank under FSDP (each rank averages only its own shard of each weight, and a resumed run
may even use another number of ranks). It is not a module, so it is never trained, never
counted in the trainable-set check and never wrapped by FSDP.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

STATE_KEY = "ema"


def trained_parameters(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]


class EMA:
    def __init__(self, decay: float, update_every: int = 1) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"config key 'ema.decay' must be in (0, 1), got {decay}")
        if update_every < 1:
            raise ValueError(f"config key 'ema.update_every' must be >= 1, got {update_every}")
        self.decay = decay
        self.update_every = update_every
        self.steps = 0  # optimizer steps seen
        self.updates = 0  # averaging updates made

    @torch.no_grad()
    def before_step(self, optimizer: torch.optim.Optimizer) -> list[torch.Tensor] | None:
        """The weights before the very first step, which the average starts from (the
        optimizer creates its per-weight state in that step, so the shadow is added after)."""
        params = trained_parameters(optimizer)
        if all(STATE_KEY in optimizer.state.get(p, {}) for p in params):
            return None
        return [p.detach().float().clone() for p in params]

    @torch.no_grad()
    def after_step(self, optimizer: torch.optim.Optimizer, initial: list[torch.Tensor] | None) -> None:
        """Call after every optimizer step: averages every `update_every` steps."""
        params = trained_parameters(optimizer)
        if initial is not None:
            for p, start in zip(params, initial):
                optimizer.state[p].setdefault(STATE_KEY, start)
        self.steps += 1
        if self.steps % self.update_every:
            return
        # shadow <- decay * shadow + (1 - decay) * weights, with the usual warm-up of the decay
        # (early on, the average must not be dominated by the initial weights).
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        shadows = [optimizer.state[p][STATE_KEY] for p in params]
        torch._foreach_lerp_(shadows, [p.detach().float() for p in params], 1.0 - decay)

    @staticmethod
    def shadows(optimizer: torch.optim.Optimizer) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """(weight, its average or None before the first step) for every trained weight."""
        return [(p, optimizer.state.get(p, {}).get(STATE_KEY)) for p in trained_parameters(optimizer)]

    @contextmanager
    def applied(self, optimizer: torch.optim.Optimizer | None) -> Iterator[None]:
        """Temporarily put the averaged weights in place of the trained ones (sampling, export).

        Before the first step (or without an optimizer) the weights are their own average.
        """
        pairs = [(p, s) for p, s in self.shadows(optimizer) if s is not None] if optimizer is not None else []
        backup = [p.detach().clone() for p, _ in pairs]
        with torch.no_grad():
            for p, s in pairs:
                p.copy_(s)
        try:
            yield
        finally:
            with torch.no_grad():
                for (p, _), b in zip(pairs, backup):
                    p.copy_(b)

    def state_dict(self) -> dict:
        """The counters; the averages themselves are in the optimizer's state."""
        return {"decay": self.decay, "updates": self.updates, "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        self.updates = int(state["updates"])
        self.steps = int(state.get("steps", self.updates))
