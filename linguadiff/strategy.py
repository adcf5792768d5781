"""Lightning strategies: one device, DDP, or FSDP for LLMs too large to copy on every GPU.

`trainer.strategy` is `auto` (one process), `ddp` (data parallel: every rank holds the whole
model) or `fsdp` (Fully Sharded Data Parallel: every rank holds 1/N of each weight). FSDP
is what lets a 7B+ LLM, the SDXL UNet and their optimizer states share GPUs. `fsdp.version`
picks the implementation: 2 (default), torch's `fully_shard` (per-weight DTensor shards,
`FSDP2Strategy`), or 1, `FullyShardedDataParallel` (flat units, `ShardedFSDPStrategy`),
kept until GPU figures show FSDP2 at least as fast. Both set it up alike:

- units (`fsdp_units`): every block class a Hugging Face / diffusers model lists in
  `_no_split_modules` (LLM decoder layers, CLIP encoder layers, UNet transformer and resnet
  blocks), the adapter's transformer layers, and each part of the stage module (LLM, adapter,
  UNet, teacher) for the weights outside those blocks; FSDP2 shards them innermost first,
  each part its own root. The frozen VAE stays whole on every rank (`ignored_parts`): small,
  and called through `encode`, which FSDP does not gather for. A unit is either all frozen
  or all trained (`check_units` asserts it), so no frozen weight takes gradient or
  optimizer memory, and the stage module itself holds no weight;
- mixed precision stated explicitly: bf16 compute, fp32 gradient reduction, fp32 master
  weights for what trains (FSDP2: `MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)`);
  the frozen LLM is loaded in bf16 (llm.dtype) and stays so, buffers keep their dtype
  (rotary frequencies lose precision in bf16);
- `fsdp.sharding` (FSDP2: `FSDP2_SHARDING`): FULL_SHARD gathers a unit's weights for forward
  and again for backward; SHARD_GRAD_OP keeps the trained units gathered from forward to
  backward (ZeRO-2-like); HYBRID_SHARD shards within a node and replicates across nodes
  (a 2-D mesh); NO_SHARD replicates. Frozen units always free their gathered weights after
  forward; `fsdp.frozen=replicate` (FSDP2) instead leaves them unwrapped, a whole bf16 copy
  per rank, no gathers;
- activation checkpointing on the trained blocks only (`fsdp.activation_checkpointing`):
  a frozen block keeps no activations for a backward pass anyway. FSDP2 uses the
  composable `checkpoint`, which keeps the weight names;
- `speed.compile` (FSDP2 only): each block of the named parts is compiled in place before
  it is sharded (FSDP1 breaks the graph at every unit and is refused);
- sharded checkpoints: a folder with one file per rank, written in parallel under its own
  name in checkpoints/.shards/ and holding the trained weights and optimizer states (the
  EMA among them) only; last.ckpt and step*.ckpt are symlinks to such folders, moved
  atomically once a folder is complete (`AtomicShardedSaves`); loading reads the trained
  weights back (FSDP2: torch.distributed.checkpoint reshards them if the number of ranks
  changed), the frozen ones are loaded from their source as always;
- gradient clipping by norm over all shards (`clip_grad_norm`, called by
  `StageModule.configure_gradient_clipping`); export gathers full fp32 weights to rank 0
  (`StageModule.full_weights`; FSDP2: `gathered_fsdp2`).
"""
from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy, ModelParallelStrategy, Strategy
from omegaconf import DictConfig, OmegaConf
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


class AtomicShardedSaves:
    """Mixin: a sharded checkpoint is written whole into a folder of its own
    (checkpoints/.shards/stepNNNNNNNN-XXXXXXXX), synced, and only then does its name
    (last.ckpt, step*.ckpt) become a symlink to it, by one atomic rename: a kill at any
    instant leaves every name pointing at a complete checkpoint (`run.point_checkpoint`).

    last.ckpt saved at the step a periodic checkpoint was just written at points to that
    same folder instead of writing it twice (Lightning's save_last="link" does the same).
    The strategy writes the shards with `_write_shards(checkpoint, folder)`."""

    _last_shard_folder: tuple[int, Path] | None = None  # (step, folder) of rank 0's latest sharded save

    def _write_shards(self, checkpoint: dict[str, Any], folder: Path, storage_options=None) -> None:
        raise NotImplementedError

    def _save_into_folder(self, checkpoint: dict[str, Any], filepath, storage_options=None) -> None:
        from lightning.fabric.utilities.load import _METADATA_FILENAME

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
            self._write_shards(checkpoint, folder, storage_options)
            self.barrier("sharded_save_written")  # every rank's shards are on disk (synced by torch)
        if self.global_rank == 0:
            if fresh:
                with open(folder / _METADATA_FILENAME, "rb+") as f:  # Lightning's torch.save does not sync
                    os.fsync(f.fileno())
                fsync_dir(folder)
                fsync_dir(folder.parent)
            point_checkpoint(path, folder)
            self._last_shard_folder = (step, folder)
        self.barrier("sharded_save_done")

    def _remove_pointer_or_file(self, filepath) -> bool:
        """A sharded checkpoint's name is a symlink: remove it, and its folder only when no
        other name (last.ckpt) still points to it. False: not a symlink (the caller's job)."""
        from linguadiff.run import remove_pointer

        path = Path(filepath)
        if not path.is_symlink():
            return False
        if self.is_global_zero:
            remove_pointer(path)
        return True


class ShardedFSDPStrategy(AtomicShardedSaves, FSDPStrategy):
    """FSDPStrategy whose sharded checkpoints hold the trained weights only.

    The stage module drops frozen weights from every checkpoint (a frozen 7B LLM is loaded
    from its source again); Lightning's sharded loader would ask the checkpoint for every
    weight of the model, frozen ones included, and fail. This one asks for the weights the
    checkpoint holds. Otherwise Lightning's FSDPStrategy, and its loading of optimizer states.
    """

    strategy_name = "linguadiff_fsdp"

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
        if self._state_dict_type != "sharded":
            return super().save_checkpoint(checkpoint, filepath, storage_options)
        self._save_into_folder(checkpoint, filepath, storage_options)

    def _write_shards(self, checkpoint: dict[str, Any], folder: Path, storage_options=None) -> None:
        FSDPStrategy.save_checkpoint(self, checkpoint, folder, storage_options)

    def remove_checkpoint(self, filepath) -> None:
        if not self._remove_pointer_or_file(filepath):
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


# ---------------------------------------------------------------------- FSDP2 (fully_shard)

# fsdp.sharding under FSDP2 -> whether trained units reshard after forward (the mesh for each
# is `fsdp2_mesh`'s). Frozen units always reshard after forward: no backward pass ever runs
# through them to free their gathered weights (keeping a frozen model whole on every rank is
# fsdp.frozen=replicate's job).
FSDP2_SHARDING = {
    "FULL_SHARD": True,  # ZeRO-3: weights gathered for forward, again for backward
    "SHARD_GRAD_OP": False,  # ZeRO-2-like: gathered once, kept through backward
    "HYBRID_SHARD": True,  # shard in a node, replicate across nodes (a 2-D mesh)
    "NO_SHARD": True,  # replicate everywhere (a mesh of world x 1): DDP through FSDP
}
FROZEN_MODES = ("shard", "replicate")


def mixed_precision_policy(precision: str):
    """FSDP2's policy: bf16 compute and fp32 gradient reduction under `bf16-mixed`; the
    sharded weights (what the optimizer steps) stay in their own dtype (fp32 for what trains).
    Every unit casts its float inputs (the default), so parts called directly work too."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if precision == "bf16-mixed":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    if precision in ("32-true", "32"):
        return MixedPrecisionPolicy()
    raise ConfigError(f"strategy=fsdp supports trainer.precision bf16-mixed or 32-true, got {precision!r}")


def fsdp2_mesh(device_type: str, world: int, num_nodes: int, sharding: str):
    """The device mesh for `sharding`: 1-D over every rank, or (replicate, shard) for
    HYBRID_SHARD (nodes x ranks per node) and NO_SHARD (ranks x 1)."""
    from torch.distributed.device_mesh import init_device_mesh

    if sharding == "HYBRID_SHARD":
        if world % num_nodes:
            raise ConfigError(f"fsdp.sharding=HYBRID_SHARD needs as many ranks on every node: {world} ranks on "
                              f"{num_nodes} nodes")
        return init_device_mesh(device_type, (num_nodes, world // num_nodes), mesh_dim_names=("replicate", "shard"))
    if sharding == "NO_SHARD":
        return init_device_mesh(device_type, (world, 1), mesh_dim_names=("replicate", "shard"))
    return init_device_mesh(device_type, (world,), mesh_dim_names=("shard",))


def apply_fully_shard(stage_module: nn.Module, units: FSDPUnits, mesh, *, precision: str, sharding: str = "FULL_SHARD",
                      frozen: str = "shard", cpu_offload: bool = False, compile_parts: tuple[str, ...] = (),
                      compile_mode: str | None = None) -> dict[str, int]:
    """Shard the stage module in place with FSDP2: every unit of `units` (innermost first, so a
    part's own unit holds only the weights outside its blocks) becomes a `fully_shard` unit;
    the trained blocks chosen for it recompute their activations (composable checkpoint: the
    weight names stay the same); blocks of the parts in `compile_parts` are compiled in place
    before sharding (the FSDP hooks stay outside the graphs). frozen=replicate leaves the
    frozen units unwrapped (whole, bf16, on every rank). Returns counts for the log."""
    from torch.distributed._composable import checkpoint
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard

    if sharding not in FSDP2_SHARDING:
        raise ConfigError(f"config key 'fsdp.sharding' must be one of {list(FSDP2_SHARDING)}, got {sharding!r}")
    if frozen not in FROZEN_MODES:
        raise ConfigError(f"config key 'fsdp.frozen' must be one of {list(FROZEN_MODES)}, got {frozen!r}")
    reshard_trained = FSDP2_SHARDING[sharding]
    mp = mixed_precision_policy(precision)
    offload = CPUOffloadPolicy() if cpu_offload and mesh.device_type != "cpu" else OffloadPolicy()
    modules = dict(stage_module.named_modules())
    names = sorted((units.names[i] for i in units.wrap), key=lambda n: -n.count("."))  # innermost first
    counts = {"sharded": 0, "replicated": 0, "compiled": 0, "checkpointed": 0}
    for name in names:
        module = modules[name]
        trains = any(p.requires_grad for p in module.parameters())
        if not trains and frozen == "replicate":
            counts["replicated"] += 1
            continue
        if id(module) in units.checkpoint:
            checkpoint(module)
            counts["checkpointed"] += 1
        innermost = not any(other.startswith(f"{name}.") for other in names)
        if "." in name and innermost and name.split(".", 1)[0] in compile_parts:
            # Innermost blocks only (a UNet's up block holds resnet and transformer blocks that are
            # units of their own): FSDP2's hooks are dynamo-disabled, each a graph break.
            module.compile(mode=compile_mode)
            counts["compiled"] += 1
        fully_shard(module, mesh=mesh, reshard_after_forward=reshard_trained if trains else True, mp_policy=mp,
                    offload_policy=offload)
        counts["sharded"] += 1
    return counts


def fsdp2_modules(module: nn.Module) -> list[nn.Module]:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in module.modules() if isinstance(m, FSDPModule)]


def reshard(module: nn.Module) -> None:
    """Free every FSDP2 unit's gathered weights, so the next forward gathers the sharded ones
    again: needed around anything that writes the sharded weights outside an optimizer step
    (the EMA swapped in for samples and export), since a unit left gathered by a forward
    without backward (SHARD_GRAD_OP, the roots) would otherwise compute with stale weights."""
    for unit in fsdp2_modules(module):
        unit.reshard()


@contextmanager
def resharded(module: nn.Module) -> Iterator[None]:
    """Context: FSDP2 units resharded on entry and on exit (nothing to do elsewhere)."""
    reshard(module)
    try:
        yield
    finally:
        reshard(module)


@contextmanager
def gathered_fsdp2(parts: list[nn.Module], rank0_only: bool = True, to_cpu: bool = True) -> Iterator[None]:
    """Context in which `parts` (FSDP2-sharded) hold their full weights on rank 0 (every rank
    when not `rank0_only`): each sharded weight is gathered (`full_tensor`, in its stored
    dtype: fp32 for what trains), one at a time, to CPU memory, and set in the module in place
    of the shard; their classes are the models' own again (FSDP2 gives each sharded module a
    subclass, whose name save_pretrained would write into config.json). Called on every rank."""
    import torch.distributed as dist
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    keep = not rank0_only or not dist.is_initialized() or dist.get_rank() == 0
    swapped: list[tuple[nn.Module, str, nn.Parameter]] = []
    classes: list[tuple[nn.Module, type]] = []
    for part in parts:
        reshard(part)
        for module in part.modules():
            for pname, p in list(module._parameters.items()):
                if isinstance(p, DTensor):
                    full = p.detach().full_tensor()
                    if keep:
                        module._parameters[pname] = nn.Parameter(full.cpu() if to_cpu else full, requires_grad=False)
                        swapped.append((module, pname, p))
            if keep and isinstance(module, FSDPModule):
                classes.append((module, type(module)))
                # FSDP<Model>(FSDPModule, <Model>) -> <Model>
                module.__class__ = next(c for c in type(module).__mro__ if not issubclass(c, FSDPModule))
    try:
        yield
    finally:
        for module, cls in classes:
            module.__class__ = cls
        for module, pname, p in swapped:
            module._parameters[pname] = p


def clip_grad_norm(strategy: Strategy, optimizer: torch.optim.Optimizer, max_norm: float) -> None:
    """Clip by the norm of the gradients over all shards: FSDP1's root knows them all; under
    FSDP2 every gradient is a DTensor, whose norm torch computes over the whole mesh."""
    if isinstance(strategy, FSDPStrategy):
        strategy.model.clip_grad_norm_(max_norm)
        return
    params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    torch.nn.utils.clip_grad_norm_(params, max_norm)


class FSDP2Strategy(AtomicShardedSaves, ModelParallelStrategy):
    """FSDP2 (`fully_shard`, per-parameter DTensor sharding) through Lightning's
    ModelParallelStrategy, applied by the strategy itself (`setup`) to the units chosen by
    `fsdp_units`, so the stage modules need no `configure_model`.

    Checkpoints hold the trained weights and the optimizer states (the EMA among them) as
    torch.distributed.checkpoint shards, in folders pointed to atomically (AtomicShardedSaves);
    loading reads exactly those, resharded to this run's ranks if their number changed."""

    strategy_name = "linguadiff_fsdp2"

    def __init__(self, units: FSDPUnits, precision: str, sharding: str = "FULL_SHARD", frozen: str = "shard",
                 cpu_offload: bool = False, compile_parts: tuple[str, ...] = (), compile_mode: str | None = None,
                 process_group_backend: str | None = None) -> None:
        super().__init__(save_distributed_checkpoint=True, process_group_backend=process_group_backend)
        self.units, self.fsdp_precision, self.sharding, self.frozen = units, precision, sharding, frozen
        self.cpu_offload, self.compile_parts, self.compile_mode = cpu_offload, tuple(compile_parts), compile_mode

    def setup_environment(self) -> None:
        super(ModelParallelStrategy, self).setup_environment()
        self._setup_distributed()
        self._device_mesh = fsdp2_mesh(self.root_device.type, self.world_size, self.num_nodes, self.sharding)
        self.lightning_module._device_mesh = self._device_mesh

    @property
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        return {"num_replicas": self.world_size, "rank": self.global_rank}

    def setup(self, trainer) -> None:
        """ModelParallelStrategy's setup, with the sharding applied here rather than in a
        `configure_model` hook of every stage module."""
        from lightning.fabric.utilities.optimizer import _optimizers_to_device
        from lightning.pytorch.trainer.states import TrainerFn

        self.accelerator.setup(trainer)
        module = self.lightning_module
        if not fsdp2_modules(module):  # (a second fit/validate on the same module: already sharded)
            counts = apply_fully_shard(module, self.units, self.device_mesh, precision=self.fsdp_precision,
                                       sharding=self.sharding, frozen=self.frozen, cpu_offload=self.cpu_offload,
                                       compile_parts=self.compile_parts, compile_mode=self.compile_mode)
            log.info("FSDP2 on a %s mesh %s: %d units sharded, %d frozen units replicated, %d blocks compiled, "
                     "%d recompute activations", self.sharding, tuple(self.device_mesh.shape), counts["sharded"],
                     counts["replicated"], counts["compiled"], counts["checkpointed"])
        self.model = self.precision_plugin.convert_module(self.model)
        self.model_to_device()  # what FSDP2 does not own: the VAE, replicated frozen parts, buffers
        self.barrier()
        if trainer.state.fn == TrainerFn.FITTING:
            self.setup_optimizers(trainer)
        self.setup_precision_plugin()
        if trainer.state.fn == TrainerFn.FITTING:
            _optimizers_to_device(self.optimizers, self.root_device)

    # ------------------------------------------------------------------ checkpoints

    def _trained_state(self) -> dict[str, Any]:
        """The trained weights of this rank (DTensor shards, no copy): what checkpoints hold."""
        module = self.lightning_module
        frozen = module.frozen_prefixes()
        reshard(module)
        return {k: v for k, v in module.state_dict().items() if module.checkpointed(k, frozen)}

    def lightning_module_state_dict(self) -> dict[str, Any]:
        return self._trained_state()

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath, storage_options=None) -> None:
        self._save_into_folder(checkpoint, filepath, storage_options)

    def _write_shards(self, checkpoint: dict[str, Any], folder: Path, storage_options=None) -> None:
        from lightning.fabric.utilities.load import _METADATA_FILENAME

        folder.mkdir(parents=True, exist_ok=True)
        shards = {"model": checkpoint.pop("state_dict")}
        shards.update({f"optimizer_{i}": state for i, state in enumerate(checkpoint.pop("optimizer_states", []))})
        write_distributed_checkpoint(shards, folder)
        if self.global_rank == 0:
            torch.save(checkpoint, folder / _METADATA_FILENAME)

    def remove_checkpoint(self, filepath) -> None:
        if not self._remove_pointer_or_file(filepath):
            super().remove_checkpoint(filepath)

    def load_checkpoint(self, checkpoint_path, weights_only=None) -> dict[str, Any]:
        """The trained weights and (when fitting) the optimizer states the checkpoint holds;
        the frozen weights come from their source as always. Optimizer states the optimizer
        has not made yet (before its first step: AdamW's moments, the EMA) are created first,
        so torch.distributed.checkpoint has somewhere to read them into."""
        import torch.distributed.checkpoint as dcp
        from lightning.fabric.utilities.load import _METADATA_FILENAME
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_optimizer_state_dict,
                                                             set_model_state_dict, set_optimizer_state_dict)

        path = Path(self.broadcast(str(checkpoint_path)))
        if not (path.is_dir() and (path / _METADATA_FILENAME).is_file() and (path / ".metadata").is_file()):
            raise RuntimeError(f"{path} is not a sharded checkpoint (a folder with .metadata and {_METADATA_FILENAME}): "
                               "strategy=fsdp resumes only its own checkpoints")
        stored = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
        trained = self._trained_state()
        missing = [k for k in trained if f"model.{k}" not in stored]
        if missing:
            raise RuntimeError(f"checkpoint {path} lacks {len(missing)} trained weights, e.g. {missing[:3]}: "
                               "it is not from this stage")
        state: dict[str, Any] = {"model": trained}
        fitting = self.lightning_module.trainer.state.fn == "fit"
        options = StateDictOptions(full_state_dict=False, cpu_offload=False)
        if fitting:
            for i, optimizer in enumerate(self.optimizers):
                get_optimizer_state_dict(self.model, optimizer, options=options)  # creates AdamW's states
                _create_stored_states(self.model, optimizer, stored, f"optimizer_{i}")
                state[f"optimizer_{i}"] = get_optimizer_state_dict(self.model, optimizer, options=options)
        dcp.load(state, checkpoint_id=str(path))
        set_model_state_dict(self.model, state["model"], options=StateDictOptions(strict=False))
        if fitting:
            for i, optimizer in enumerate(self.optimizers):
                set_optimizer_state_dict(self.model, optimizer, state[f"optimizer_{i}"], options=options)
        return torch.load(path / _METADATA_FILENAME, weights_only=True)  # data, never code: see run.read_checkpoint


def write_distributed_checkpoint(state: dict[str, Any], folder: Path) -> None:
    """Every rank writes its shards (torch.distributed.checkpoint; synced), rank 0 the .metadata."""
    from lightning.fabric.strategies.model_parallel import _distributed_checkpoint_save

    _distributed_checkpoint_save(state, folder)


def _create_stored_states(model: nn.Module, optimizer: torch.optim.Optimizer, stored: dict, key: str) -> None:
    """Per-weight optimizer states the checkpoint holds (`<key>.state.<weight>.<name>`) but the
    optimizer does not have yet (the EMA's average before the first step), made as zeros of
    the weight's shape and sharding, to be read into."""
    from torch.distributed.tensor import DTensor

    names = {id(p): n for n, p in model.named_parameters()}
    for group in optimizer.param_groups:
        for p in group["params"]:
            prefix = f"{key}.state.{names[id(p)]}."
            for stored_key, meta in stored.items():
                if not stored_key.startswith(prefix) or "." in stored_key[len(prefix):]:
                    continue
                name = stored_key[len(prefix):]
                size = getattr(meta, "size", None)
                if name in optimizer.state[p] or size is None or tuple(size) != tuple(p.shape):
                    continue
                dtype = meta.properties.dtype
                optimizer.state[p][name] = torch.zeros_like(p.detach(), dtype=dtype) if isinstance(p, DTensor) \
                    else torch.zeros(p.shape, dtype=dtype, device=p.device)


def fsdp_version(cfg: DictConfig) -> int:
    """`fsdp.version`: 2 (fully_shard, the default) or 1 (FullyShardedDataParallel)."""
    return int(OmegaConf.select(cfg, "fsdp.version", default=2))



def build_strategy(cfg: DictConfig, module: nn.Module, precision: str) -> str | Strategy:
    """The Lightning strategy for `trainer.strategy` (module: the stage module, not yet wrapped)."""
    name = cfg.trainer.strategy
    if name not in STRATEGIES:
        raise ConfigError(f"config key 'trainer.strategy' must be one of {list(STRATEGIES)}, got {name!r}")
    if name == "auto":
        return "auto"
    if name == "ddp":
        # Frozen parts take no gradient, so every trained weight gets one each step: no
        # search for unused parameters (a full graph walk per step). No buffer broadcast from
        # rank 0 before every forward: no part keeps running statistics (GroupNorm, LayerNorm;
        # the rest are constants every rank loads alike), and the broadcast is a collective in
        # every validation forward too, which hung a rank that had validation batches left
        # while its peer had none.
        return DDPStrategy(find_unused_parameters=False, gradient_as_bucket_view=True, broadcast_buffers=False)
    f = cfg.fsdp
    version = fsdp_version(cfg)
    if version not in (1, 2):
        raise ConfigError(f"config key 'fsdp.version' must be 1 or 2, got {version!r}")
    frozen_mode = str(OmegaConf.select(cfg, "fsdp.frozen", default="shard"))
    if version == 1 and cfg.speed.compile:
        raise ConfigError("speed.compile does not combine with fsdp.version=1 (FSDP1 breaks the graph at every "
                          "unit): use fsdp.version=2, or drop one of them")
    if version == 1 and frozen_mode != "shard":
        raise ConfigError(f"fsdp.frozen={frozen_mode} needs fsdp.version=2 (FSDP1 shards every unit)")
    if version == 1 and f.sharding == "HYBRID_SHARD":
        from linguadiff.settings_check import FSDP1_HYBRID

        raise ConfigError(FSDP1_HYBRID)
    units = fsdp_units(module, f.activation_checkpointing)
    summary = check_units(module, units)
    trained = sum(e["parameters"] for e in summary.values() if e["trains"])
    frozen = sum(e["parameters"] for e in summary.values() if not e["trains"])
    log.info("FSDP%d: %d units (%.1fM trained, %.1fM frozen weights), %d trained blocks recompute activations, %s",
             version, len(summary), trained / 1e6, frozen / 1e6, len(units.checkpoint), f.sharding)
    if version == 2:
        mode = str(cfg.speed.compile_mode)
        return FSDP2Strategy(units, precision, sharding=str(f.sharding), frozen=frozen_mode,
                             cpu_offload=bool(f.cpu_offload), compile_parts=tuple(cfg.speed.compile),
                             compile_mode=None if mode == "default" else mode)
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
    """FSDP of either version: every rank must make the same forward calls."""
    return isinstance(strategy, (FSDPStrategy, FSDP2Strategy))
