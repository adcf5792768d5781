"""Stage 2: end-to-end image-text training of adapter + UNet with the diffusion loss.

Paper, stage 2: starting from the stage-1 adapter, the adapter and the base's UNet train
together on image-text pairs with the usual diffusion loss; the LLM and the VAE stay frozen
and an EMA of the trained weights is kept. Captions are dropped at `data.caption_dropout`
(the paper's code trained none), so classifier-free guidance has a trained unconditional
branch; a dropped caption is the empty prompt, which is what inference feeds as the
negative prompt by default. Stage 3 (`stage3_aesthetic.py`) reuses this module.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from linguadiff.models.adapter import QueryAdapter
from lightning_modules.base import StageModule
from linguadiff.models.diffusion import (
    DiffusionLossConfig,
    diffusion_loss,
    load_noise_scheduler,
    load_unet,
    load_vae,
    sample_latents,
    sdxl_time_ids,
)
from lightning_modules.ema import EMA, STATE_KEY
from linguadiff.models.text_encoder import LLMTextEncoder, encode_by_length
from linguadiff.config import ConfigError
from linguadiff.distributed import unwrap
from linguadiff.export import check_handoff, init_export
from linguadiff.strategy import llm_device

log = logging.getLogger(__name__)


class Stage2EndToEnd(StageModule):
    #: which stage's export `init_from` must hold
    init_stage = 1
    #: parts FSDP leaves whole (called through vae.encode, not forward; linguadiff/strategy.py)
    fsdp_ignored = ("vae",)

    def __init__(self, cfg: DictConfig, text_encoder: LLMTextEncoder, adapter: QueryAdapter, unet, vae, noise_scheduler) -> None:
        super().__init__(cfg)
        self.text_encoder = text_encoder
        self.adapter = adapter
        self.unet = unet
        self.vae = vae
        self.noise_scheduler = noise_scheduler
        self.apply_trainable()
        if cfg.diffusion.gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
        d = cfg.diffusion
        self.loss_options = DiffusionLossConfig(d.min_snr_gamma, d.input_perturbation, d.noise_offset)
        self.ema = EMA(cfg.ema.decay, cfg.ema.update_every)
        self.apply_speed_options()

    # ------------------------------------------------------------------ building

    @classmethod
    def from_config(cls, cfg: DictConfig) -> "Stage2EndToEnd":
        export = init_export(cfg, cls.init_stage)
        adapter, meta = QueryAdapter.from_file(export / "adapter.safetensors")
        check_handoff(cfg, meta, export)
        text_encoder = LLMTextEncoder.from_settings(cfg.llm, device=llm_device(cfg))
        m = cfg.model
        # Stage 3 continues the stage-2 UNet (its export); stage 2 starts from the base's.
        unet = load_unet(str(export / "unet"), subfolder=None) if (export / "unet").is_dir() else load_unet(m.path, revision=m.revision)
        vae = load_vae(m.path, m.kind, m.dtype, m.revision)
        scheduler = load_noise_scheduler(m.path, cfg.diffusion.prediction_type, m.revision)
        log.info("Stage %d starts from %s (stage-%d export, step %s)", cfg.stage, export, meta["stage"], meta.get("global_step"))
        return cls(cfg, text_encoder, adapter, unet, vae, scheduler)

    def tokenizers(self) -> dict[str, Any]:
        return {"student": self.text_encoder.tokenizer}

    # ------------------------------------------------------------------ forward parts

    def encode_prompts(self, tokens: dict[str, torch.Tensor]) -> dict[str, torch.Tensor | None]:
        """LLM + adapter, grouped by prompt length (as in stage 1)."""
        return encode_by_length(self.text_encoder, self.adapter, tokens["input_ids"].to(self.device),
                                tokens["attention_mask"].to(self.device), grouped=not self.sharded)

    @torch.no_grad()
    def to_model_space(self, batch: dict) -> torch.Tensor:
        """The batch's images in [-1, 1] -> what the UNet denoises (VAE latents; pixels for the
        demo). Cached VAE moments (scripts/cache_features.py) are sampled exactly as the VAE would."""
        if "moments" in batch:
            x0 = sample_latents(batch["moments"].to(self.device), self.vae.dtype, self.vae.config.scaling_factor)
        elif self.vae is None:
            x0 = batch["image"].to(self.device)
        else:
            latents = self.vae.encode(batch["image"].to(self.device, self.vae.dtype)).latent_dist.sample()
            x0 = (latents * self.vae.config.scaling_factor).float()
        return x0.contiguous(memory_format=torch.channels_last) if self.cfg.speed.channels_last else x0

    def _conditioning(self, batch: dict) -> tuple[torch.Tensor, dict | None]:
        if "llm_states" in batch:  # cached LLM features: the adapter only
            cond = self.adapter(batch["llm_states"].to(self.device), batch["llm_mask"].to(self.device))
        else:
            tokens = batch.get("student_tokens") or self.text_encoder.tokenizer(batch["caption"])
            cond = self.encode_prompts(tokens)
        added = None
        if self.cfg.model.kind == "sdxl":
            time_ids = sdxl_time_ids(batch["original_size"], batch["crop_top_left"], batch["target_size"]).to(self.device)
            added = {"text_embeds": cond["pooled"], "time_ids": time_ids}
        return cond["context"], added

    # ------------------------------------------------------------------ steps

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        self.count_skipped(batch)
        size = self.batch_size_of(batch)
        x0 = self.to_model_space(batch)
        context, added = self._conditioning(batch)
        loss = diffusion_loss(self.unet, self.noise_scheduler, x0, context, self.loss_options, added).mean()
        self.log("train/loss", loss, prog_bar=True, batch_size=size)
        for i, group in enumerate(self.optimizers().param_groups):
            self.log(f"train/lr_{group.get('name', i)}", group["lr"], batch_size=size)
        return loss

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None) -> None:
        initial = self.ema.before_step(optimizer)
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        # Here rather than in on_train_batch_end: checkpoint callbacks run before the module's
        # batch-end hook, and a checkpoint must hold the average including this step.
        self.ema.after_step(optimizer, initial)

    def ema_weights(self):
        """Context: the EMA weights in place of the trained ones (samples, export)."""
        optimizer = self.optimizers(use_pl_optimizer=False) if self._trainer is not None and self.trainer.optimizers else None
        return self.ema.applied(optimizer)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        """Loss at fixed timesteps with fixed noise: comparable across validations and runs."""
        size = self.batch_size_of(batch)
        x0 = self.to_model_space(batch)
        context, added = self._conditioning(batch)
        no_perturbation = DiffusionLossConfig(self.loss_options.min_snr_gamma, 0.0, 0.0)
        total = 0.0
        for t in self.cfg.diffusion.val_timesteps:
            generator = torch.Generator(device=self.device).manual_seed(1000 * batch_idx + int(t))
            timesteps = torch.full((x0.shape[0],), int(t), device=self.device, dtype=torch.long)
            loss = diffusion_loss(self.unet, self.noise_scheduler, x0, context, no_perturbation, added, timesteps, generator).mean()
            if batch.get("padding"):  # an FSDP rank's filler batch: run, not counted
                continue
            self.log(f"val/loss_t{int(t)}", loss, batch_size=size, sync_dist=True)
            total += loss
        if not batch.get("padding"):
            self.log("val/loss", total / len(self.cfg.diffusion.val_timesteps), batch_size=size, sync_dist=True, prog_bar=True)

    # ------------------------------------------------------------------ optimisation and state

    def param_groups(self) -> list[dict[str, Any]]:
        """The adapter may get its own learning rate (`optim.adapter_lr`): it is small and was
        trained in stage 1, the UNet is large and pretrained."""
        if self.cfg.optim.adapter_lr is None or not any(p.requires_grad for p in self.adapter.parameters()):
            return super().param_groups()
        adapter = [p for p in self.adapter.parameters() if p.requires_grad]
        adapter_ids = {id(p) for p in adapter}
        rest = [p for p in self.parameters() if p.requires_grad and id(p) not in adapter_ids]
        return [{"params": rest, "name": "unet"}, {"params": adapter, "name": "adapter", "lr": self.cfg.optim.adapter_lr}]

    def export(self, directory: Path, metadata: dict[str, Any]) -> None:
        """The EMA weights: the adapter (safetensors + metadata) and the UNet in diffusers format.
        Called on every rank (FSDP gathers the shards); rank 0 writes."""
        with self.ema_weights(), self.full_weights() as write:
            if write:
                unwrap(self.adapter).save(directory / "adapter.safetensors", metadata)
                unwrap(self.unet).save_pretrained(directory / "unet")

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["ema"] = self.ema.state_dict()  # the counters; the averages ride in the optimizer state

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        if "ema" in checkpoint:
            self.ema.load_state_dict(checkpoint["ema"])
            if "shadow" in checkpoint["ema"]:  # written before the averages moved into the optimizer state
                self._legacy_ema = dict(zip(checkpoint["ema"]["names"], checkpoint["ema"]["shadow"]))

    def on_train_start(self) -> None:
        """Carry a legacy checkpoint's EMA (a list beside the optimizer) into the optimizer state,
        once the optimizer has been restored."""
        legacy = getattr(self, "_legacy_ema", None)
        if not legacy:
            return
        optimizer = self.optimizers(use_pl_optimizer=False)
        params = dict(self.named_parameters())
        for name, shadow in legacy.items():
            if name in params and optimizer.state.get(params[name]):
                optimizer.state[params[name]][STATE_KEY] = shadow.to(params[name].device, torch.float32)
        self._legacy_ema = None
        log.info("Moved the checkpoint's EMA of %d weights into the optimizer state", len(legacy))
