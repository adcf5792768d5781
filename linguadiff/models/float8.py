"""`speed.float8`: float8 training of the UNet's and the adapter's linear layers (torchao).

torchao's float8 training (`convert_to_float8_training`) swaps each chosen `nn.Linear` for
its `Float8Linear`: inputs, weights and output gradients are cast to float8 per tensor
(dynamic scaling) for the matmuls, which run as `torch._scaled_mm`; the weights themselves
stay the same fp32 parameters under the same names. So optimizer, EMA, checkpoints and
exports see plain weights: a diffusers `save_pretrained` writes ordinary tensors that
`UNet2DConditionModel.from_pretrained` and our loaders read with plain `nn.Linear` layers.

Which layers: exactly `nn.Linear` (not subclasses such as `nn.MultiheadAttention`'s
`out_proj`, whose weight that attention uses without calling the layer), with both
dimensions multiples of 16, as `torch._scaled_mm` requires; the others stay as they are and
are counted. Float8 matmuls need a GPU of compute capability 8.9 or more (H100, H200, L40S,
RTX 4090); torch's CPU build has them too (slow: for tests). Speed comes with
`speed.compile`, which fuses the casts; eager float8 casts cost more than they save.
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from linguadiff.config import ConfigError

log = logging.getLogger(__name__)

#: the parts `speed.float8` may name (the trained ones with large linear layers)
FLOAT8_PARTS = ("unet", "adapter")
#: what `pip install -e '.[float8]'` installs (setup.cfg): the range tested here
TORCHAO_REQUIREMENT = "torchao>=0.18,<0.19"
MIN_CAPABILITY = (8, 9)


def torchao_missing() -> str | None:
    """None when torchao's float8 training imports, else why not (for the settings check)."""
    try:
        from torchao.float8 import convert_to_float8_training  # noqa: F401
    except Exception as error:  # noqa: BLE001 - ImportError, or a torchao built for another torch
        return f"{type(error).__name__}: {str(error)[:200]}"
    return None


def convertible(module: nn.Module) -> bool:
    return type(module) is nn.Linear and module.in_features % 16 == 0 and module.out_features % 16 == 0


def convert_to_float8(module: nn.Module, name: str) -> tuple[int, int]:
    """Swap `module`'s convertible linear layers for torchao's Float8Linear, in place.
    Returns (converted, linear layers in all); `name` is the part's name for messages."""
    problem = torchao_missing()
    if problem is not None:
        raise ConfigError(f"config key 'speed.float8' names {name}, but torchao's float8 training does not import "
                          f"({problem}): pip install -e '.[float8]' ({TORCHAO_REQUIREMENT}), or set speed.float8=[]")
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    linear = [m for m in module.modules() if isinstance(m, nn.Linear)]
    wanted = sum(convertible(m) for m in linear)
    convert_to_float8_training(module, config=Float8LinearConfig(), module_filter_fn=lambda m, fqn: convertible(m))
    converted = sum(type(m).__name__ == "Float8Linear" for m in module.modules())
    if converted != wanted:
        raise RuntimeError(f"speed.float8: {converted} of {name}'s linear layers were converted, expected {wanted}")
    log.info("speed.float8: %s: %d of %d linear layers train in float8 (%d left as they are: a dimension that is "
             "not a multiple of 16, or not a plain nn.Linear)", name, converted, len(linear), len(linear) - converted)
    return converted, len(linear)


def check_float8_device(device: torch.device) -> None:
    """Refuse a GPU without float8 matmuls, before the first step fails inside a kernel."""
    if device.type != "cuda":
        return
    capability = torch.cuda.get_device_capability(device)
    if capability < MIN_CAPABILITY:
        raise ConfigError(f"config key 'speed.float8' needs float8 matmuls (a GPU of compute capability 8.9 or "
                          f"more: H100, H200, L40S, RTX 4090); {torch.cuda.get_device_name(device)} has "
                          f"{capability[0]}.{capability[1]}: set speed.float8=[]")
