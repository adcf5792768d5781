"""Lightning strategies: one device, DDP, or FSDP for LLMs too large to copy on every GPU.

`trainer.strategy` is `auto` (one process), `ddp` (data parallel: every rank holds the whole
model) or `fsdp` (Fully Sharded Data Parallel: every rank holds 1/N of each weight). FSDP
is what lets a 7B+ LLM, the SDXL UNet and their optimizer states share GPUs; how it is set
up here (`fsdp_setup`):

- wrap units: every block class a Hugging Face / diffusers model lists in `_no_split_modules`
  (LLM decoder layers, CLIP encoder layers, UNet transformer and resnet blocks), the
  adapter's transformer layers, and each part of the stage module (LLM, adapter, UNet,
  teacher) for the weights outside those blocks. The frozen VAE stays whole on every rank
  (`ignored_parts`): small, and called through `encode`, which FSDP does not gather for. A unit is then either all frozen
  or all trained (`check_units` asserts it), so no frozen weight takes gradient or
  optimizer memory, and the stage module itself holds no weight;
- mixed precision stated explicitly: bf16 compute, fp32 gradient reduction, fp32 master
  weights for what trains; the frozen LLM is loaded in bf16 (llm.dtype) and stays so,
  buffers keep their dtype (rotary frequencies lose precision in bf16);
- activation checkpointing on the trained blocks only (`fsdp.activation_checkpointing`):
  a frozen block keeps no activations for a backward pass anyway;
- sharded checkpoints: a folder with one file per rank, written in parallel under its own
  name in checkpoints/.shards/ and holding the trained weights only; last.ckpt and
  step*.ckpt are symlinks to such folders, moved atomically once a folder is complete
  (`ShardedFSDPStrategy.save_checkpoint`; `load_checkpoint` reads the trained weights back,
  the frozen ones are loaded from their source as always);
- gradient clipping by norm over all shards (`StageModule.configure_gradient_clipping`).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy, Strategy
from omegaconf import DictConfig
from torch import nn

from linguadiff.config import ConfigError
from linguadiff.distributed import local_rank

log = logging.getLogger(__name__)

STRATEGIES = ("auto", "ddp", "fsdp")
# The adapter's block types (PyTorch's transformer layers), wrapped like an LLM's layers.
ADAPTER_BLOCKS = (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)


def llm_device(cfg: DictConfig) -> torch.device | None:
    """Where to load the frozen LLM: under FSDP on a GPU, directly onto this rank's GPU (no
    full copy in CPU memory per rank; FSDP then keeps 1/N of it); otherwise None (CPU)."""
    if cfg.trainer.strategy == "fsdp" and torch.cuda.is_available():
        return torch.device("cuda", local_rank())
    return None


# ---------------------------------------------------------------------- FSDP units


def block_class_names(module: nn.Module) -> set[str]:
    """Block classes the Hugging Face / diffusers models inside `module` say must stay whole."""
    names: set[str] = set()
    for sub in module.modules():
        names.update(getattr(sub, "_no_split_modules", None) or ())
    return names


@dataclass(frozen=True)
class FSDPUnits:
    """Which modules become FSDP units, and which of them recompute activations."""

    wrap: frozenset[int]  # id() of the modules to wrap
    checkpoint: frozenset[int]  # id() of the trained blocks to checkpoint
    names: dict[int, str]  # id() -> qualified name, for messages

    def wrap_policy(self):
        from torch.distributed.fsdp.wrap import CustomPolicy

        return CustomPolicy(lambda module: id(module) in self.wrap)

    def checkpoint_policy(self):
        from torch.distributed.fsdp.wrap import CustomPolicy

        return CustomPolicy(lambda module: id(module) in self.checkpoint)


def ignored_parts(stage_module: nn.Module) -> dict[str, nn.Module]:
    """Frozen parts left whole on every rank: those the stage calls through a method other
    than forward (the VAE's encode), which FSDP would not gather the weights for. Small."""
    names = getattr(stage_module, "fsdp_ignored", ())
    return {name: part for name in names if (part := getattr(stage_module, name, None)) is not None}


def fsdp_units(stage_module: nn.Module, activation_checkpointing: bool = True) -> FSDPUnits:
    """Choose the units: blocks, then each direct part of the stage module (the rest of its weights)."""
    blocks = block_class_names(stage_module)
    ignored = tuple(f"{name}." for name in ignored_parts(stage_module))
    wrap, checkpoint, names = set(), set(), {}
    checkpointed_names: list[str] = []
    for name, module in stage_module.named_modules():
        if module is stage_module or f"{name}.".startswith(ignored) or not any(True for _ in module.parameters()):
            continue  # (str.startswith of an empty tuple is False)
        is_block = type(module).__name__ in blocks or isinstance(module, ADAPTER_BLOCKS)
        is_part = "." not in name
        if is_block or is_part:
            wrap.add(id(module))
            names[id(module)] = name
        inside_checkpointed = any(name.startswith(f"{outer}.") for outer in checkpointed_names)
        if is_block and activation_checkpointing and not inside_checkpointed and all(p.requires_grad for p in module.parameters()):
            # Outermost trained blocks only: a checkpointed block inside another would be recomputed twice.
            checkpoint.add(id(module))
            checkpointed_names.append(name)
    return FSDPUnits(frozenset(wrap), frozenset(checkpoint), names)


def unit_of_parameters(stage_module: nn.Module, units: FSDPUnits) -> dict[str, str]:
    """Parameter name -> the unit (innermost wrapped ancestor) that would own it; "" = the root.
    A weight tied between modules (mT5's shared embedding, reached as `shared` and as
    `encoder.embed_tokens`) appears once, under the first name met in module order, as in
    `named_parameters()`."""
    owner: dict[str, str] = {}
    seen: set[int] = set()

    def visit(module: nn.Module, prefix: str, unit: str) -> None:
        if id(module) in units.wrap:
            unit = units.names[id(module)]
        for pname, p in module.named_parameters(recurse=False):
            if id(p) not in seen:
                seen.add(id(p))
                owner[f"{prefix}{pname}"] = unit
        for cname, child in module.named_children():
            visit(child, f"{prefix}{cname}.", unit)

    visit(stage_module, "", "")
    ignored = tuple(f"{name}." for name in ignored_parts(stage_module))
    return {name: unit for name, unit in owner.items() if not name.startswith(ignored)}


def check_units(stage_module: nn.Module, units: FSDPUnits) -> dict[str, dict[str, Any]]:
    """Per unit: its parameter count, dtypes and whether it trains. Raises when a unit mixes
    frozen and trained weights or dtypes (one flat tensor per unit), or the root owns weights."""
    params = dict(stage_module.named_parameters())
    summary: dict[str, dict[str, Any]] = {}
    for pname, unit in unit_of_parameters(stage_module, units).items():
        p = params[pname]
        entry = summary.setdefault(unit, {"parameters": 0, "dtypes": set(), "trains": set()})
        entry["parameters"] += p.numel()
        entry["dtypes"].add(p.dtype)
        entry["trains"].add(p.requires_grad)
    problems = []
    if "" in summary:
        problems.append(f"the stage module itself would own {summary[''].get('parameters')} weights")
    problems += [f"unit {u!r} mixes frozen and trained weights" for u, e in summary.items() if len(e["trains"]) > 1]
    problems += [f"unit {u!r} mixes dtypes {sorted(map(str, e['dtypes']))}" for u, e in summary.items() if len(e["dtypes"]) > 1]
    if problems:
        raise ConfigError("FSDP units are not uniform: " + "; ".join(problems))
    return {u: {"parameters": e["parameters"], "dtype": str(next(iter(e["dtypes"]))), "trains": next(iter(e["trains"]))}
            for u, e in summary.items()}


def mixed_precision(precision: str):
    """bf16 compute and fp32 gradient reduction for `bf16-mixed`; None (all fp32) for `32-true`."""
    from torch.distributed.fsdp import MixedPrecision

    if precision == "bf16-mixed":
        # buffer_dtype=None: buffers keep theirs (an LLM's rotary inv_freq must stay fp32).
        # cast_forward_inputs: every unit casts its float inputs to bf16, so the parts also
        # work when called directly (sample grids call the adapter and UNet, not the module).
        return MixedPrecision(param_dtype=torch.bfloat16, reduce_dtype=torch.float32, buffer_dtype=None,
                              cast_forward_inputs=True)
    if precision in ("32-true", "32"):
        return None
    raise ConfigError(f"strategy=fsdp supports trainer.precision bf16-mixed or 32-true, got {precision!r}")


class ShardedFSDPStrategy(FSDPStrategy):
    """FSDPStrategy whose sharded checkpoints hold the trained weights only.

    The stage module drops frozen weights from every checkpoint (a frozen 7B LLM is loaded
    from its source again); Lightning's sharded loader would ask the checkpoint for every
    weight of the model, frozen ones included, and fail. This one asks for the weights the
    checkpoint holds. Otherwise Lightning's FSDPStrategy, and its loading of optimizer states.
    """

    strategy_name = "linguadiff_fsdp"
    _last_shard_folder: tuple[int, Path] | None = None  # (step, folder) of rank 0's latest sharded save

    def _setup_model(self, model: nn.Module) -> nn.Module:
        """As Lightning's, plus CPUs (gloo): FSDP accepts the CPU only as an explicit device_id.
        Runs the same sharding, checkpoints and clipping on a laptop or in CI, slowly."""
        for part in self.kwargs.get("ignored_modules") or ():
            part.to(self.root_device)  # FSDP leaves ignored modules where they are
        if self.root_device.type != "cpu":
            return super()._setup_model(model)
        from lightning.pytorch.strategies.fsdp import _setup_activation_checkpointing
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        model = FSDP(module=model, cpu_offload=self.cpu_offload, mixed_precision=self.mixed_precision_config,
                     sharding_strategy=self.sharding_strategy, device_id=torch.device("cpu"), **self.kwargs)
        _setup_activation_checkpointing(model, self._activation_checkpointing_kwargs)
        return model

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath, storage_options=None) -> None:
        """A sharded checkpoint is written whole into a folder of its own
        (checkpoints/.shards/stepNNNNNNNN-XXXXXXXX), synced, and only then does its name
        (last.ckpt, step*.ckpt) become a symlink to it, by one atomic rename: a kill at any
        instant leaves every name pointing at a complete checkpoint (`run.point_checkpoint`).

        last.ckpt saved at the step a periodic checkpoint was just written at points to that
        same folder instead of writing it twice (Lightning's save_last="link" does the same)."""
        if self._state_dict_type != "sharded":
            return super().save_checkpoint(checkpoint, filepath, storage_options)
        from linguadiff.run import fsync_dir, new_shard_folder, point_checkpoint

        path = Path(self.broadcast(str(filepath)))
        step = int(checkpoint["global_step"])
        folder, fresh = None, True
        if self.global_rank == 0:
            if self._last_shard_folder is not None and self._last_shard_folder[0] == step \
                    and self._last_shard_folder[1].is_dir():
                folder, fresh = self._last_shard_folder[1], False
            else:
                folder = new_shard_folder(path.parent, step)
        folder, fresh = self.broadcast((folder, fresh))
        if fresh:
            super().save_checkpoint(checkpoint, folder, storage_options)
            self.barrier("sharded_save_written")  # every rank's shards are on disk (synced by torch)
        if self.global_rank == 0:
            if fresh:
                from lightning.fabric.utilities.load import _METADATA_FILENAME

                with open(folder / _METADATA_FILENAME, "rb+") as f:  # Lightning's torch.save does not sync
                    os.fsync(f.fileno())
                fsync_dir(folder)
                fsync_dir(folder.parent)
            point_checkpoint(path, folder)
            self._last_shard_folder = (step, folder)
        self.barrier("sharded_save_done")

    def remove_checkpoint(self, filepath) -> None:
        """A sharded checkpoint's name is a symlink: remove it, and its folder only when no
        other name (last.ckpt) still points to it. (Lightning's would refuse the symlink.)"""
        from linguadiff.run import remove_pointer

        path = Path(filepath)
        if self.is_global_zero and path.is_symlink():
            remove_pointer(path)
        elif not path.is_symlink():
            super().remove_checkpoint(filepath)

    def load_checkpoint(self, checkpoint_path, weights_only=None) -> dict[str, Any]:
        from lightning.fabric.strategies.fsdp import _distributed_checkpoint_load, _get_sharded_state_dict_context
        from lightning.fabric.utilities.load import _METADATA_FILENAME
        from torch.distributed.checkpoint import FileSystemReader
        from torch.distributed.checkpoint.optimizer import load_sharded_optimizer_state_dict
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        path = Path(self.broadcast(checkpoint_path))
        if not (path.is_dir() and (path / _METADATA_FILENAME).is_file()):  # a single-file checkpoint
            return super().load_checkpoint(checkpoint_path, weights_only)
        frozen = self.lightning_module.frozen_prefixes()
        with _get_sharded_state_dict_context(self.model):
            trained = {"model": {k: v for k, v in self.model.state_dict().items() if not k.startswith(frozen)}}
            _distributed_checkpoint_load(trained, path)
            self.model.load_state_dict(trained["model"], strict=False)  # frozen weights: from their source
            if self.lightning_module.trainer.state.fn == "fit":
                reader = FileSystemReader(path=path)
                for index, optimizer in enumerate(self.optimizers):
                    key = f"optimizer_{index}"
                    state = load_sharded_optimizer_state_dict(model_state_dict=trained["model"], optimizer_key=key,
                                                              storage_reader=reader)
                    optimizer.load_state_dict(FSDP.optim_state_dict_to_load(model=self.model, optim=optimizer,
                                                                            optim_state_dict=state[key]))
        return torch.load(path / _METADATA_FILENAME, weights_only=True)  # data, never code: see run.read_checkpoint


def build_strategy(cfg: DictConfig, module: nn.Module, precision: str) -> str | Strategy:
    """The Lightning strategy for `trainer.strategy` (module: the stage module, not yet wrapped)."""
    name = cfg.trainer.strategy
    if name not in STRATEGIES:
        raise ConfigError(f"config key 'trainer.strategy' must be one of {list(STRATEGIES)}, got {name!r}")
    if name == "auto":
        return "auto"
    if name == "ddp":
        # Frozen parts take no gradient, so every trained weight gets one each step: no
        # search for unused parameters (a full graph walk per step).
        return DDPStrategy(find_unused_parameters=False, gradient_as_bucket_view=True)
    f = cfg.fsdp
    if cfg.speed.compile:
        raise ConfigError("speed.compile does not combine with strategy=fsdp here (FSDP1 breaks the graph at "
                          "every unit): drop one of them")
    units = fsdp_units(module, f.activation_checkpointing)
    summary = check_units(module, units)
    trained = sum(e["parameters"] for e in summary.values() if e["trains"])
    frozen = sum(e["parameters"] for e in summary.values() if not e["trains"])
    log.info("FSDP: %d units (%.1fM trained, %.1fM frozen weights), %d trained blocks recompute activations, %s",
             len(summary), trained / 1e6, frozen / 1e6, len(units.checkpoint), f.sharding)
    return ShardedFSDPStrategy(
        auto_wrap_policy=units.wrap_policy(),
        activation_checkpointing_policy=units.checkpoint_policy() if units.checkpoint else None,
        mixed_precision=mixed_precision(precision),
        sharding_strategy=f.sharding,
        state_dict_type="sharded",
        cpu_offload=bool(f.cpu_offload),
        limit_all_gathers=True,
        ignored_modules=list(ignored_parts(module).values()) or None,
        use_orig_params=True,  # parameter groups, frozen parts and the EMA see the original weights
    )


def is_fsdp(strategy: Any) -> bool:
    return isinstance(strategy, FSDPStrategy)
