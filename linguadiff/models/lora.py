"""LoRA on the UNet (stages 2-3, `train.unet=lora`), through peft as diffusers wires it.

A full UNet fine-tune next to an LLM needs several large GPUs; LoRA trains small low-rank
updates beside the frozen UNet's weights (LaVi-Bridge trains UNet LoRA with its connector).
The UNet gets a peft adapter named "default" (`UNet2DConditionModel.add_adapter`): each
targeted layer keeps its weight as `<layer>.base_layer.weight` and gains
`<layer>.lora_A.default.weight` / `lora_B`. Only those train; checkpoints keep only them.

The export is diffusers' own LoRA format, written by the pipeline class's `save_lora_weights`
from peft's state dict (`get_peft_model_state_dict` -> `convert_state_dict_to_diffusers`),
with the LoRA config in the file's metadata (so alpha != rank loads right): any user loads it
with `pipeline.load_lora_weights(export_dir / "lora")` into a plain pipeline of the base.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from linguadiff.config import ConfigError

LORA_DIR = "lora"  # in an export: the UNet LoRA in diffusers' format
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"  # diffusers' default weight name
ADAPTER_NAME = "default"
UNET_PREFIX = "unet"  # the key prefix of UNet LoRA weights in diffusers' files
MARKER = ".lora_"  # in every LoRA weight's name (lora_A, lora_B), in no base weight's


@dataclass(frozen=True)
class LoraSettings:
    """`lora.*` of the config: what the UNet's LoRA looks like and how fast it learns."""

    rank: int = 16
    alpha: float = 16.0
    target_modules: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")
    dropout: float = 0.0
    lr: float | None = None  # null: optim.lr

    def peft_config(self):
        from peft import LoraConfig

        # Gaussian A, zero B: the UNet starts exactly as the base (diffusers' LoRA examples).
        return LoraConfig(r=self.rank, lora_alpha=self.alpha, target_modules=list(self.target_modules),
                          lora_dropout=self.dropout, init_lora_weights="gaussian")


def is_lora_name(name: str) -> bool:
    return MARKER in f".{name}"


def add_lora(unet, settings: LoraSettings) -> None:
    """Give `unet` a fresh LoRA (the UNet's output is unchanged until it trains). A target list
    that matches no layer is a ConfigError naming `lora.target_modules`."""
    try:
        unet.add_adapter(settings.peft_config(), adapter_name=ADAPTER_NAME)
    except ValueError as err:  # peft: "Target modules {...} not found in the base model"
        raise ConfigError(f"config key 'lora.target_modules'={list(settings.target_modules)} matches no layer of the "
                         f"UNet ({err}); diffusers UNets name attention projections to_q, to_k, to_v, to_out.0, "
                         f"feed-forward ff.net.0.proj, ff.net.2, convolutions conv1, conv2, conv_shortcut") from None
    lora_to_float32(unet)


def lora_to_float32(module: torch.nn.Module) -> None:
    """LoRA weights train in fp32 whatever the frozen weights' dtype (mixed precision casts on the fly)."""
    for name, p in module.named_parameters():
        if is_lora_name(name) and p.dtype != torch.float32:
            p.data = p.data.float()


def load_lora(unet, directory: str | Path) -> None:
    """Put the LoRA of an export folder (`export/lora`) on `unet` as adapter "default", with
    the rank, alpha and targets its file records."""
    unet.load_lora_adapter(str(directory), prefix=UNET_PREFIX, adapter_name=ADAPTER_NAME, weight_name=LORA_WEIGHTS)
    lora_to_float32(unet)


def lora_config_of(unet) -> dict[str, Any]:
    """The LoRA's settings as the export metadata records them (rank, alpha, targets, dropout)."""
    cfg = unet.peft_config[ADAPTER_NAME]
    return {"rank": int(cfg.r), "alpha": float(cfg.lora_alpha), "target_modules": sorted(cfg.target_modules),
            "dropout": float(cfg.lora_dropout)}


def save_lora(unet, directory: str | Path, kind: str) -> Path:
    """Write the UNet's LoRA (its current weights: call it under the EMA) in diffusers' format."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    state = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet, adapter_name=ADAPTER_NAME))
    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state.items()}
    # The demo's pixel-space base has no pipeline of its own in diffusers: SD1.5's file layout.
    pipeline = StableDiffusionXLPipeline if kind == "sdxl" else StableDiffusionPipeline
    metadata = unet.peft_config[ADAPTER_NAME].to_dict()
    metadata = {k: (sorted(v) if isinstance(v, set) else v) for k, v in metadata.items()}
    pipeline.save_lora_weights(str(directory), unet_lora_layers=state, unet_lora_adapter_metadata=metadata,
                               weight_name=LORA_WEIGHTS)
    return Path(directory) / LORA_WEIGHTS


def merged_copy(unet):
    """A plain UNet (no peft layers) whose weights are base + LoRA: what the full export writes."""
    merged = copy.deepcopy(unet)
    merged.fuse_lora(adapter_names=[ADAPTER_NAME])
    merged.unload_lora()
    return merged


def merge_into(unet) -> None:
    """Fold the LoRA into `unet`'s own weights and remove the peft layers (a full fine-tune
    starting from a LoRA export)."""
    unet.fuse_lora(adapter_names=[ADAPTER_NAME])
    unet.unload_lora()


def apply_export_lora(pipeline, directory: str | Path) -> None:
    """Put an export's LoRA on a generation pipeline: diffusers' `load_lora_weights` for SD1.5
    and SDXL pipelines, the UNet's own loader for the demo's pixel pipeline (it has none)."""
    if hasattr(pipeline, "load_lora_weights"):
        pipeline.load_lora_weights(str(directory), weight_name=LORA_WEIGHTS)
    else:
        pipeline.unet.load_lora_adapter(str(directory), prefix=UNET_PREFIX, weight_name=LORA_WEIGHTS)
