"""What the stage modules are told, as typed settings read from the run's config in one place.

The modules never see the whole config: `StageSettings.from_config` and friends map its
sections onto these frozen dataclasses at one boundary (like `datamodules.build_datamodule`),
so what a module depends on is written in its constructor's signature, and a benchmark or an
evaluation can build a module without a config at all.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from omegaconf import DictConfig

from linguadiff.models.diffusion import DiffusionLossConfig
from linguadiff.models.lora import LoraSettings
from linguadiff.models.losses import AlignmentLoss, ContextPart, alignment_loss_from_config
from linguadiff.strategy import fsdp_version


@dataclass(frozen=True)
class OptimSettings:
    """AdamW with linear warm-up, then cosine decay to `lr * min_lr_ratio` (or constant)."""

    lr: float
    total_steps: int  # the schedule's length: trainer.max_steps
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 0
    schedule: str = "cosine"
    min_lr_ratio: float = 0.1
    adapter_lr: float | None = None  # stages 2-3: the adapter's own learning rate

    @classmethod
    def from_config(cls, cfg: DictConfig) -> "OptimSettings":
        o = cfg.optim
        return cls(lr=float(o.lr), total_steps=int(cfg.trainer.max_steps), weight_decay=float(o.weight_decay),
                   betas=(float(o.betas[0]), float(o.betas[1])), warmup_steps=int(o.warmup_steps),
                   schedule=str(o.schedule), min_lr_ratio=float(o.min_lr_ratio),
                   adapter_lr=None if o.adapter_lr is None else float(o.adapter_lr))


@dataclass(frozen=True)
class StageSettings:
    """What every stage module needs: which stage, what trains, how it is optimised and sped up."""

    stage: int
    trainable: tuple[str, ...]
    optim: OptimSettings
    compile: tuple[str, ...] = ()  # parts compiled in place
    compile_mode: str = "default"
    compile_per_block: bool = False  # FSDP2: the strategy compiles each block of those parts, not the part
    channels_last: bool = False  # the UNet's convolutions (and its inputs) in channels-last
    float8: tuple[str, ...] = ()  # parts whose linear layers train in float8 (torchao)

    @classmethod
    def from_config(cls, cfg: DictConfig) -> "StageSettings":
        return cls(stage=int(cfg.stage), trainable=tuple(cfg.train.trainable), optim=OptimSettings.from_config(cfg),
                   compile=tuple(cfg.speed.compile), compile_mode=str(cfg.speed.compile_mode),
                   compile_per_block=cfg.trainer.strategy == "fsdp" and fsdp_version(cfg) == 2,
                   channels_last=bool(cfg.speed.channels_last), float8=tuple(cfg.speed.float8))


@dataclass(frozen=True)
class AlignmentSettings:
    """Stage 1's objective (configs: `loss.*`, built for the teacher's context parts) and
    validation (`eval.retrieval_pool`)."""

    loss: AlignmentLoss
    empty_prompt_weight: float = 0.05
    retrieval_pool: int = 512

    @classmethod
    def from_config(cls, cfg: DictConfig, parts: Sequence[ContextPart]) -> "AlignmentSettings":
        return cls(loss=alignment_loss_from_config(cfg.loss, parts), empty_prompt_weight=float(cfg.loss.empty_prompt_weight),
                   retrieval_pool=int(cfg.eval.retrieval_pool))


@dataclass(frozen=True)
class DiffusionSettings:
    """Stages 2-3: the base's kind, the diffusion loss, validation timesteps and the EMA."""

    base_kind: str  # demo | sd15 | sdxl: SDXL's UNet takes pooled text and size conditioning
    loss: DiffusionLossConfig = field(default_factory=DiffusionLossConfig)
    val_timesteps: tuple[int, ...] = (100, 300, 500, 700, 900)
    gradient_checkpointing: bool = False
    ema_decay: float = 0.9999
    ema_update_every: int = 1
    lora: LoraSettings | None = None  # train.unet=lora: the UNet trains as a LoRA (None: full fine-tune)
    merge_lora: bool = False  # export.merge_lora: also export the merged UNet
    encode_ahead: bool = False  # speed.encode_ahead: the next batch's LLM forward runs during this step

    @classmethod
    def from_config(cls, cfg: DictConfig) -> "DiffusionSettings":
        d, lo = cfg.diffusion, cfg.lora
        lora = None
        if cfg.train.unet == "lora":
            lora = LoraSettings(rank=int(lo.rank), alpha=float(lo.alpha), target_modules=tuple(lo.target_modules),
                                dropout=float(lo.dropout), lr=None if lo.lr is None else float(lo.lr))
        return cls(base_kind=str(cfg.model.kind), lora=lora, merge_lora=bool(cfg.export.merge_lora),
                   loss=DiffusionLossConfig(d.min_snr_gamma, float(d.input_perturbation), float(d.noise_offset)),
                   val_timesteps=tuple(int(t) for t in d.val_timesteps), gradient_checkpointing=bool(d.gradient_checkpointing),
                   ema_decay=float(cfg.ema.decay), ema_update_every=int(cfg.ema.update_every),
                   encode_ahead=bool(cfg.speed.encode_ahead))
