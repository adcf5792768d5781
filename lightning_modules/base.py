"""The thin base every stage module stands on.

What it owns, so the stages don't repeat it:
- which parts train: ``settings.trainable`` names child modules; everything else
  is frozen, and the set is logged and asserted when fitting starts (a wrong trainable set
  is the classic silent bug of this field);
- checkpoints that hold only what trains (a frozen 7B LLM is loaded again from its source,
  never copied into every checkpoint);
- AdamW with warm-up then cosine decay, on the trainable parameters only;
- the prompt backbone (`prompt_encoder`): the LLM and adapter are the stage's own parts
  ``text_encoder`` and ``adapter`` (their names are what trains, what checkpoints hold and
  what FSDP wraps), seen together through a PromptEncoder;
- the bad-sample counts the data workers attach to each batch, summed and logged;
- what differs under FSDP: clipping over all shards, gathering shards for export,
  checkpoints read back by the strategy (linguadiff/strategy.py).
"""
from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning_modules.settings import StageSettings
from linguadiff.config import ConfigError
from linguadiff.distributed import gather_objects, unwrap
from linguadiff.models.float8 import check_float8_device, convert_to_float8
from linguadiff.models.frozen import freeze
from linguadiff.models.lora import is_lora_name
from linguadiff.models.prompt_encoder import PromptEncoder
from linguadiff.strategy import FSDP2Strategy, clip_grad_norm, gathered_fsdp2, is_fsdp

log = logging.getLogger(__name__)


class StageModule(L.LightningModule):
    #: parts trained as a LoRA (train.unet=lora): only their LoRA weights train and are checkpointed
    lora_parts: tuple[str, ...] = ()

    def __init__(self, settings: StageSettings) -> None:
        super().__init__()
        self.settings = settings
        # Frozen weights are left out of checkpoints (see on_save_checkpoint), so loading one
        # must not demand them; on_load_checkpoint checks that every trained weight is there.
        self.strict_loading = False
        self.skipped: Counter[str] = Counter()
        self.val_skipped: Counter[str] = Counter()  # this validation pass, this rank
        self.val_sums: dict[str, list] = {}  # this validation pass, this rank: name -> [sum x size, size]

    # ------------------------------------------------------------------ what trains

    def apply_trainable(self) -> None:
        """Unfreeze the children named in ``train.trainable``; freeze every other child."""
        wanted = list(self.settings.trainable)
        children = dict(self.named_children())
        unknown = [n for n in wanted if n not in children]
        if unknown:
            raise ConfigError(
                f"config key 'train.trainable' names {unknown}, which stage {self.settings.stage} does not have; "
                f"its parts are {sorted(children)}"
            )
        for name, child in children.items():
            if name in wanted:
                child.requires_grad_(True)
            else:
                freeze(child)

    def apply_speed_options(self) -> None:
        """`speed.float8` (linear layers trained in float8, weights and their names unchanged),
        `speed.compile` (parts compiled in place: their weight names, and so checkpoints, stay
        the same; under FSDP2 the strategy compiles each of their blocks instead) and
        `speed.channels_last` (the UNet's convolutions)."""
        sp = self.settings
        children = dict(self.named_children())
        for name in sp.float8:  # before compiling: the compiled graph holds the float8 casts
            if children.get(name) is None:
                raise ConfigError(f"config key 'speed.float8' names {name!r}, which stage {sp.stage} does not have; "
                                  f"its parts are {sorted(n for n, c in children.items() if c is not None)}")
            convert_to_float8(children[name], name)
        for name in sp.compile:
            if name not in children:
                raise ConfigError(f"config key 'speed.compile' names {name!r}, which stage {sp.stage} does not have; "
                                  f"its parts are {sorted(children)}")
            if sp.compile_per_block:
                continue  # FSDP2 compiles each block of the part before sharding it (linguadiff/strategy.py)
            children[name].compile(mode=None if sp.compile_mode == "default" else sp.compile_mode)
        if sp.channels_last and "unet" in children:
            children["unet"].to(memory_format=torch.channels_last)

    def trainable_report(self) -> list[tuple[str, int, int]]:
        """(child, parameters, trainable parameters) for every child module."""
        return [
            (name, sum(p.numel() for p in child.parameters()), sum(p.numel() for p in child.parameters() if p.requires_grad))
            for name, child in self.named_children()
        ]

    @property
    def sharded(self) -> bool:
        """Under FSDP: every rank must run the same forward calls (no per-rank shortcuts)."""
        return self._trainer is not None and is_fsdp(self.trainer.strategy)

    def on_fit_start(self) -> None:
        if self.settings.float8:
            check_float8_device(self.device)
        report = self.trainable_report()
        lines = [f"  {name:<14} {total / 1e6:>10.2f}M  {'frozen' if not n else 'trains' if n == total else f'trains {n / 1e6:.3f}M (LoRA)'}"
                 for name, total, n in report]
        if self._trainer is None or self.trainer.is_global_zero:
            log.info("Stage %d parts (parameters%s, state):\n%s", self.settings.stage,
                     " of this rank's FSDP shards" if self.sharded else "", "\n".join(lines))
        training = {name for name, _, n in report if n}
        partly = [name for name, total, n in report if 0 < n < total and name not in self.lora_parts]
        # A LoRA'd part trains exactly its LoRA weights: not one base weight, not one LoRA weight missed.
        partly += [f"{name}.{p}" for name in self.lora_parts if name in training
                   for p, w in getattr(self, name).named_parameters() if w.requires_grad != is_lora_name(p)][:3]
        expected = set(self.settings.trainable)
        if training != expected or partly:
            raise RuntimeError(
                f"trainable set {sorted(training)} (partly trainable: {partly}) differs from "
                f"train.trainable={sorted(expected)}: refusing to train the wrong parameters"
            )

    @property
    def prompt_encoder(self) -> PromptEncoder:
        """The LLM + adapter backbone over this stage's own (possibly wrapped) parts."""
        return PromptEncoder(self.text_encoder, self.adapter)

    # ------------------------------------------------------------------ checkpoints

    def frozen_prefixes(self) -> tuple[str, ...]:
        """``"name."`` of every part with no trainable weight: left out of checkpoints."""
        return tuple(f"{name}." for name, child in self.named_children() if not any(p.requires_grad for p in child.parameters()))

    def checkpointed(self, key: str, frozen: tuple[str, ...]) -> bool:
        """Whether the state-dict entry `key` goes into checkpoints: what trains (a LoRA'd
        part's LoRA weights, never its frozen base weights)."""
        if key.startswith(frozen):
            return False
        part = key.split(".", 1)[0]
        return part not in self.lora_parts or is_lora_name(key)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        frozen = self.frozen_prefixes()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if self.checkpointed(k, frozen)}
        checkpoint["skipped_samples"] = dict(self.skipped)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.skipped = Counter(checkpoint.get("skipped_samples", {}))
        if "state_dict" not in checkpoint:  # sharded (FSDP): the strategy has read the weights it holds
            return
        frozen = self.frozen_prefixes()
        needed = {k for k in self.state_dict() if self.checkpointed(k, frozen)}
        missing = sorted(needed - set(checkpoint["state_dict"]))
        if missing:
            raise RuntimeError(f"checkpoint lacks {len(missing)} trained weights, e.g. {missing[:3]}: it is not from this stage")

    # ------------------------------------------------------------------ optimisation

    def param_groups(self) -> list[dict[str, Any]]:
        """Optimizer parameter groups (one by default; a stage may give parts their own lr)."""
        return [{"params": [p for p in self.parameters() if p.requires_grad], "name": "trainable"}]

    def configure_optimizers(self):
        o = self.settings.optim
        groups = self.param_groups()
        params = [p for group in groups for p in group["params"]]
        # Fused AdamW (one kernel for all parameters) on GPUs, except under fp16 mixed precision,
        # where its internal unscaling would come after gradient clipping.
        precision = str(self._trainer.precision) if self._trainer is not None else ""  # benchmarks run without one
        fp16 = "16" in precision and "bf16" not in precision
        fused = torch.cuda.is_available() and all(p.is_cuda for p in params) and not fp16
        optimizer = torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay, fused=fused or None)
        total, warmup = max(1, o.total_steps), max(0, o.warmup_steps)

        def lr_factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            if o.schedule == "constant":
                return 1.0
            progress = min(1.0, (step - warmup) / max(1, total - warmup))
            return o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)  # the same shape for every group
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        """Clip over all shards under FSDP (Lightning's FSDP plugin refuses norm clipping).

        Clip directly for fused optimizers: Lightning's mixed-precision plugin refuses them
        because, with an fp16 grad scaler, they unscale internally. Under bf16 and fp32 there
        is no scaler (and fp16 never gets a fused optimizer here), so gradients are true ones."""
        if gradient_clip_val and is_fsdp(self.trainer.strategy):
            # The norm over all shards (FSDP1: only the root knows them all; FSDP2: DTensors).
            if gradient_clip_algorithm == "value":
                params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
                torch.nn.utils.clip_grad_value_(params, gradient_clip_val)
            else:
                clip_grad_norm(self.trainer.strategy, optimizer, gradient_clip_val)
            return
        if gradient_clip_val and optimizer.defaults.get("fused"):
            params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
            if gradient_clip_algorithm == "value":
                torch.nn.utils.clip_grad_value_(params, gradient_clip_val)
            else:
                torch.nn.utils.clip_grad_norm_(params, gradient_clip_val)
            return
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    # ------------------------------------------------------------------ export

    def export(self, directory: Path, metadata: dict[str, Any]) -> None:
        """Write what the next stage and generate.py start from (stage 1: the adapter).
        Called on every rank (FSDP gathers the shards); rank 0 writes."""
        with self.full_weights() as write:
            if write:
                unwrap(self.adapter).save(directory / "adapter.safetensors", metadata)

    def exported_parts(self) -> list[str]:
        """The parts export writes: what trains, and the adapter (frozen in stage 3, still exported)."""
        children = dict(self.named_children())
        names = list(self.settings.trainable)
        return names + ["adapter"] if "adapter" not in names and children.get("adapter") is not None else names

    @contextmanager
    def full_weights(self) -> Iterator[bool]:
        """Context on every rank in which the exported parts (what trains, and stage 3's frozen
        adapter) hold their full weights; yields whether this rank should write them. Under
        FSDP the shards are gathered to rank 0's CPU memory, one part at a time; elsewhere the
        weights are already whole."""
        trainer = self._trainer
        if trainer is None:
            yield True
            return
        if not is_fsdp(trainer.strategy):
            yield trainer.is_global_zero
            return
        if isinstance(trainer.strategy, FSDP2Strategy):
            parts = [getattr(self, name) for name in self.exported_parts()]
            with gathered_fsdp2(parts, rank0_only=True, to_cpu=self.device.type != "cpu"):
                yield trainer.is_global_zero
            return
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        from torch.distributed.fsdp import ShardingStrategy

        # Gathered to CPU memory when the weights really are sharded on GPUs; FSDP on one
        # device runs unsharded (NO_SHARD), where it cannot offload (and need not).
        sharded = trainer.world_size > 1 and trainer.strategy.sharding_strategy != ShardingStrategy.NO_SHARD
        with ExitStack() as stack:
            for name in self.exported_parts():
                stack.enter_context(FSDP.summon_full_params(getattr(self, name), writeback=False, rank0_only=True,
                                                            offload_to_cpu=sharded and self.device.type != "cpu"))
            yield trainer.is_global_zero

    # ------------------------------------------------------------------ data health

    def count_skipped(self, batch: dict[str, Any]) -> None:
        """Add the workers' per-batch skip counts to the run's totals and log them."""
        new = batch.get("skipped") or {}
        if not new:
            return
        self.skipped.update({k: int(v) for k, v in new.items() if v})
        for reason, total in self.skipped.items():
            self.log(f"data/skipped_{reason}", float(total), reduce_fx="sum", sync_dist=False, on_step=True, on_epoch=False)

    def count_val_skipped(self, batch: dict[str, Any]) -> None:
        """Validation's skip counts, kept per rank until the pass ends (ranks see different
        numbers of validation batches, so a per-batch collective could hang)."""
        self.val_skipped.update({k: int(v) for k, v in (batch.get("skipped") or {}).items() if v})

    def record_val(self, metrics: dict[str, torch.Tensor], size: int) -> None:
        """One validation batch's metrics (batch means), kept per rank as sums weighted by the
        batch size until the pass ends: ranks see different numbers of validation batches (none
        at all where a small or filtered validation set leaves a rank nothing), so logging them
        with sync_dist, one collective per metric a rank happens to have logged, could hang."""
        for name, value in metrics.items():
            entry = self.val_sums.setdefault(name, [0.0, 0])
            entry[0] = entry[0] + torch.as_tensor(value).detach().float() * size
            entry[1] += size

    def on_validation_epoch_end(self) -> None:
        """Every rank calls this, the same number of times: the pass's metrics (weighted by the
        samples each rank saw) and skip counts are gathered from all ranks in one collective,
        and logged as the same values everywhere."""
        sums = {name: (float(total), count) for name, (total, count) in self.val_sums.items()}
        totals: Counter[str] = Counter()
        metrics: dict[str, list[float]] = {}
        for part in gather_objects({"skipped": dict(self.val_skipped), "metrics": sums}):
            totals.update(part["skipped"])
            for name, (total, count) in part["metrics"].items():
                entry = metrics.setdefault(name, [0.0, 0])
                entry[0] += total
                entry[1] += count
        self.val_skipped.clear()
        self.val_sums = {}
        if self._trainer is not None and self.trainer.sanity_checking:
            return
        for name, (total, count) in sorted(metrics.items()):
            if count:
                self.log(name, total / count, sync_dist=False, prog_bar=name == "val/loss")
        for reason, total in totals.items():
            self.log(f"data/val_skipped_{reason}", float(total), sync_dist=False, rank_zero_only=True)

    @staticmethod
    def batch_size_of(batch: dict[str, Any]) -> int:
        return len(batch["key"])
