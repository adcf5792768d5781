"""Freezing a module so that it stays frozen.

Lightning calls ``LightningModule.train()`` at the start of every fit / validation loop,
and ``nn.Module.train`` recurses into every child: a frozen LLM or CLIP teacher held by
the stage module would be flipped back to train mode (dropout on, for T5 among others),
silently changing the features it gives. Following Stability's generative-models
(``disabled_train``), ``freeze`` replaces ``train`` on the *instance* with a version that
always puts the module in eval mode, so any recursive ``.train()`` from a parent is a
no-op for it. (Lightning also restores modes around validation by assigning
``module.training`` directly; it restores what it captured, which for a frozen module is
eval, so that path keeps it frozen too.)
"""
from __future__ import annotations

import functools
from typing import TypeVar

from torch import nn

ModuleT = TypeVar("ModuleT", bound=nn.Module)


def _stay_in_eval(module: nn.Module, mode: bool = True) -> nn.Module:
    """Stand-in for ``module.train(mode)`` on a frozen module: ignore ``mode``, stay in eval."""
    return nn.Module.train(module, False)


def freeze(module: ModuleT) -> ModuleT:
    """Make ``module`` frozen for good: no gradients, eval mode, and ``.train()`` keeps eval.

    Returns the same module (not a copy). The override is a ``functools.partial`` of a
    module-level function rather than a bound method, so the frozen module survives
    ``pickle`` and ``copy.deepcopy`` (DataLoader workers, ``ddp_spawn``, EMA copies) still
    frozen.
    """
    module.requires_grad_(False)
    nn.Module.train(module, False)
    # nn.Module.__setattr__ stores a plain callable in the instance __dict__, which attribute
    # lookup (and the recursion in a parent's nn.Module.train) finds before the class method.
    module.train = functools.partial(_stay_in_eval, module)
    return module


def is_frozen(module: nn.Module) -> bool:
    """True when ``module`` went through :func:`freeze` (its ``train`` keeps eval mode)."""
    train = module.__dict__.get("train")
    return isinstance(train, functools.partial) and train.func is _stay_in_eval
