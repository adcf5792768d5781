"""Stages 2 and 3: the diffusion loss on image-text pairs, starting from the previous stage's export.

Paper, stage 2 (end-to-end image-text training): starting from the stage-1 adapter, the
adapter and the base's UNet train together on image-text pairs with the usual diffusion
loss; the LLM and the VAE stay frozen and an EMA of the trained weights is kept. Captions
are dropped at `data.caption_dropout` (the paper's code trained none), so classifier-free
guidance has a trained unconditional branch; a dropped caption is the empty prompt, which
is what inference feeds as the negative prompt by default.

Paper, stage 3 (aesthetic fine-tuning): the same loss on high-aesthetic images only (40K in
the paper); its figure freezes the adapter and trains the UNet. That is configuration, not
code: `data.min_aesthetic` selects the set from the shards' json scores before any image
is decoded, `train.trainable: [unet]` and a lower learning rate (configs/stage3.yaml). So
both stages are this one module; stage N starts from a stage-(N-1) export (`init_from`):
stage 2 from the stage-1 adapter and the base's UNet, stage 3 from the stage-2 EMA adapter
and EMA UNet.

`train.unet=lora` trains a LoRA beside the frozen UNet instead of the UNet itself
(models/lora.py): only the LoRA weights and the adapter train, sit in the optimizer and the
EMA, and are checkpointed. Where the UNet starts (`unet_for`): stage 2 puts a fresh LoRA on
the base's UNet. Stage 3 from a LoRA stage-2 export continues that same LoRA (its rank, alpha
and targets; the export stays one LoRA on the base); from a full stage-2 export it puts a
fresh LoRA on that export's UNet, and then exports the merged UNet as well (the LoRA alone
would not fit the base). A full stage 3 from a LoRA export starts from the merged UNet.

`text_encoder=clip` is the control run (ELLA's control for an LLM connector): the base's own
frozen CLIP (models/clip_teacher.py, in the SDXL pipeline's own one-window form) takes the
place of the LLM + adapter, and only the UNet (or its LoRA) trains, on the same data, schedule
and seed. Stage 2 starts from the base itself; stage 3 from a control's stage-2 export. Its
export is the UNet and a metadata file (export.METADATA_FILE), no adapter.
"""
from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from lightning_modules.base import StageModule
from lightning_modules.ema import EMA
from lightning_modules.settings import DiffusionSettings, StageSettings
from linguadiff.distributed import unwrap
from linguadiff.export import ADAPTER_FILE, check_handoff, init_export, read_export_metadata, write_export_metadata
from linguadiff.models.clip_teacher import CLIPTeacher, teacher_kind
from linguadiff.models import lora as unet_lora
from linguadiff.models.adapter import QueryAdapter
from linguadiff.models.encode_ahead import EncodeAhead
from linguadiff.models.diffusion import (
    DiffusionLossConfig,
    diffusion_loss,
    load_noise_scheduler,
    load_unet,
    load_vae,
    sample_latents,
    sdxl_time_ids,
)
from linguadiff.models.prompt_encoder import PromptEncoder
from linguadiff.models.text_encoder import LLMTextEncoder
from linguadiff.strategy import llm_device, resharded

log = logging.getLogger(__name__)


class DiffusionStage(StageModule):
    #: parts FSDP leaves whole (called through vae.encode, not forward; linguadiff/strategy.py)
    fsdp_ignored = ("vae",)

    def __init__(self, settings: StageSettings, diffusion: DiffusionSettings, prompt_encoder: PromptEncoder | CLIPTeacher,
                 unet, vae, noise_scheduler, lora_on: str = "base") -> None:
        """`lora_on` (train.unet=lora): what UNet the LoRA applies to, "base" (the base model's)
        or "init_from" (a full stage-2 export's). A `unet` without a LoRA gets a fresh one.
        `prompt_encoder`: the LLM + adapter, or for a control run the base's own CLIP (it is
        then the `text_encoder` part, and there is no adapter)."""
        super().__init__(settings)
        self.diffusion = diffusion
        if isinstance(prompt_encoder, CLIPTeacher):
            self.text_encoder = prompt_encoder
            self.adapter = None
        else:
            self.text_encoder = prompt_encoder.text_encoder
            self.adapter = prompt_encoder.adapter
        self.unet = unet
        self.vae = vae
        self.noise_scheduler = noise_scheduler
        self.lora_on = lora_on
        if diffusion.lora is not None:
            self.lora_parts = ("unet",)
            if not getattr(unet, "peft_config", None):
                unet_lora.add_lora(unet, diffusion.lora)
        self.apply_trainable()
        if diffusion.gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
        self.ema = EMA(diffusion.ema_decay, diffusion.ema_update_every)
        # speed.encode_ahead: the next batch's LLM features, made during this step (not with CLIP)
        self.encode_ahead = EncodeAhead() if diffusion.encode_ahead and self.adapter is not None else None
        self.apply_speed_options()

    # ------------------------------------------------------------------ building

    @classmethod
    def from_config(cls, cfg: DictConfig) -> "DiffusionStage":
        """The previous stage's export (`init_from`), the LLM, and the base's diffusion parts."""
        if cfg.text_encoder == "clip":
            return cls.control_from_config(cfg)
        export = init_export(cfg, int(cfg.stage) - 1)
        check_handoff(cfg, read_export_metadata(export), export)  # a control's export has no adapter to load
        adapter, meta = QueryAdapter.from_file(export / ADAPTER_FILE)
        text_encoder = LLMTextEncoder.from_settings(cfg.llm, device=llm_device(cfg))
        m = cfg.model
        diffusion = DiffusionSettings.from_config(cfg)
        unet, lora_on = cls.unet_for(cfg, export, diffusion)
        vae = load_vae(m.path, m.kind, m.dtype, m.revision)
        scheduler = load_noise_scheduler(m.path, cfg.diffusion.prediction_type, m.revision)
        log.info("Stage %d starts from %s (stage-%d export, step %s)", cfg.stage, export, meta["stage"], meta.get("global_step"))
        return cls(StageSettings.from_config(cfg), diffusion, PromptEncoder(text_encoder, adapter), unet, vae, scheduler, lora_on)

    @classmethod
    def control_from_config(cls, cfg: DictConfig) -> "DiffusionStage":
        """A control run (text_encoder=clip): the base's own CLIP, frozen, in model.dtype; the
        base's UNet (stage 2) or a control's stage-2 export's (stage 3)."""
        m = cfg.model
        diffusion = DiffusionSettings.from_config(cfg)
        if int(cfg.stage) == 2:
            unet, lora_on, start = load_unet(m.path, revision=m.revision), "base", f"the base {m.path}"
        else:
            export = init_export(cfg, 2)
            check_handoff(cfg, read_export_metadata(export), export)
            (unet, lora_on), start = cls.unet_for(cfg, export, diffusion), f"{export} (a control's stage-2 export)"
        clip = CLIPTeacher(m.path, teacher_kind(m.kind), dtype=m.dtype, windows=1, revision=m.revision)
        vae = load_vae(m.path, m.kind, m.dtype, m.revision)
        scheduler = load_noise_scheduler(m.path, cfg.diffusion.prediction_type, m.revision)
        log.info("Stage %d control run: the base's own frozen CLIP (text_encoder=clip), the UNet starts from %s",
                 cfg.stage, start)
        return cls(StageSettings.from_config(cfg), diffusion, clip, unet, vae, scheduler, lora_on)

    @property
    def prompt_encoder(self) -> PromptEncoder | CLIPTeacher:
        """The LLM + adapter, or a control run's CLIP: both give `encode`, `condition` and `tokenizer`."""
        return self.text_encoder if self.adapter is None else super().prompt_encoder

    @staticmethod
    def unet_for(cfg: DictConfig, export: Path, diffusion: DiffusionSettings):
        """The UNet this stage starts from, and (LoRA) what the LoRA applies to. Stage 2: the
        base's (a stage-1 export has none). Stage 3: the stage-2 export's, which is `unet/` (a
        full or merged UNet) and/or `lora/` (a LoRA on the base's UNet)."""
        m = cfg.model
        full_dir, lora_dir = export / "unet", export / unet_lora.LORA_DIR
        has_lora = (lora_dir / unet_lora.LORA_WEIGHTS).is_file()
        if diffusion.lora is not None and has_lora:  # continue the stage-2 LoRA, on the base
            unet = load_unet(m.path, revision=m.revision)
            unet_lora.load_lora(unet, lora_dir)
            found, wanted = unet_lora.lora_config_of(unet), diffusion.lora
            if (found["rank"], found["alpha"], found["target_modules"]) != (wanted.rank, wanted.alpha, sorted(wanted.target_modules)):
                log.warning("Stage %d continues the LoRA of %s (rank %d, alpha %g, on %s); lora.rank, lora.alpha and "
                            "lora.target_modules of this run's config are not used", cfg.stage, lora_dir, found["rank"],
                            found["alpha"], ", ".join(found["target_modules"]))
            return unet, "base"
        if full_dir.is_dir():  # a full (or merged) stage-2 UNet
            return load_unet(str(full_dir), subfolder=None), "init_from"
        unet = load_unet(m.path, revision=m.revision)
        if has_lora:  # a full fine-tune from a LoRA export: from the merged UNet
            unet_lora.load_lora(unet, lora_dir)
            unet_lora.merge_into(unet)
        return unet, "base"

    def tokenizers(self) -> dict[str, Any]:
        """Run in the data workers: the LLM's tokenizer (a control run: CLIP's)."""
        return {"student": self.text_encoder.tokenizer}

    def apply_trainable(self) -> None:
        """As the base, then in a LoRA'd UNet only the LoRA weights train."""
        super().apply_trainable()
        for name in self.lora_parts:
            if name in self.settings.trainable:
                for pname, p in getattr(self, name).named_parameters():
                    p.requires_grad_(unet_lora.is_lora_name(pname))

    # ------------------------------------------------------------------ forward parts

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
        # One memory layout whatever the source: the VAE's encoder may hand back channels-last
        # latents, cached moments are contiguous, and the UNet's convolutions pick their kernels
        # (and so their rounding) by layout: a cached batch must give the VAE's loss bit for bit.
        return x0.contiguous(memory_format=torch.channels_last if self.settings.channels_last else torch.contiguous_format)

    def conditioning(self, batch: dict, llm_ahead: tuple[list, list] | None = None) -> tuple[torch.Tensor, dict | None]:
        """The UNet's text inputs for a batch: the cross-attention context and, for SDXL, the
        pooled text and size conditioning (`added_cond_kwargs`). `llm_ahead`: this batch's LLM
        features made during the previous step (`speed.encode_ahead`); only the adapter runs."""
        if llm_ahead is not None:
            cond = self.prompt_encoder.adapt(*llm_ahead)
        else:
            cond = self.prompt_encoder.condition(batch, self.device, grouped=not self.sharded)
        added = None
        if self.diffusion.base_kind == "sdxl":
            time_ids = sdxl_time_ids(batch["original_size"], batch["crop_top_left"], batch["target_size"]).to(self.device)
            added = {"text_embeds": cond["pooled"], "time_ids": time_ids}
        return cond["context"], added

    def llm_ahead(self, batch: dict) -> tuple[list, list] | None:
        """`speed.encode_ahead`, at the start of a training step: this batch's LLM features if
        the previous step made them (else None: `conditioning` runs the LLM), then the next
        batch's LLM forward starts, overlapping this step's VAE, adapter and UNet (a side
        CUDA stream; in line on a CPU)."""
        if self.encode_ahead is None:
            return None
        ahead = self.encode_ahead.take(batch)
        self.encode_ahead.launch(self.prompt_encoder, batch, grouped=not self.sharded)
        return ahead

    # ------------------------------------------------------------------ steps

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        self.count_skipped(batch)
        size = self.batch_size_of(batch)
        llm_ahead = self.llm_ahead(batch)
        x0 = self.to_model_space(batch)
        context, added = self.conditioning(batch, llm_ahead)
        loss = diffusion_loss(self.unet, self.noise_scheduler, x0, context, self.diffusion.loss, added).mean()
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

    @contextmanager
    def ema_weights(self) -> Iterator[None]:
        """Context: the EMA weights in place of the trained ones (samples, export)."""
        optimizer = self.optimizers(use_pl_optimizer=False) if self._trainer is not None and self.trainer.optimizers else None
        # FSDP2 units a forward left gathered would not see the averages written into their
        # shards, and after the swap back would keep computing with the averages: reshard.
        with resharded(self), self.ema.applied(optimizer):
            yield

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        """Loss at fixed timesteps with fixed noise: comparable across validations and runs."""
        self.count_val_skipped(batch)
        size = self.batch_size_of(batch)
        x0 = self.to_model_space(batch)
        context, added = self.conditioning(batch)
        no_perturbation = DiffusionLossConfig(self.diffusion.loss.min_snr_gamma, 0.0, 0.0)
        losses = {}
        for t in self.diffusion.val_timesteps:
            generator = torch.Generator(device=self.device).manual_seed(1000 * batch_idx + int(t))
            timesteps = torch.full((x0.shape[0],), int(t), device=self.device, dtype=torch.long)
            losses[f"val/loss_t{int(t)}"] = diffusion_loss(self.unet, self.noise_scheduler, x0, context, no_perturbation,
                                                            added, timesteps, generator).mean()
        if batch.get("padding"):  # an FSDP rank's filler batch: run, not counted
            return
        losses["val/loss"] = sum(losses.values()) / len(losses)
        self.record_val(losses, size)  # logged when the pass ends (on_validation_epoch_end)

    # ------------------------------------------------------------------ optimisation and state

    def param_groups(self) -> list[dict[str, Any]]:
        """The adapter may get its own learning rate (`optim.adapter_lr`): it is small and was
        trained in stage 1, the UNet is large and pretrained. A UNet LoRA has its own too
        (`lora.lr`): new weights starting from zero learn at a LoRA's rate, not a fine-tune's."""
        adapter_lr = self.settings.optim.adapter_lr
        lora = self.diffusion.lora
        unet_lr = lora.lr if lora is not None else None
        adapter = [p for p in self.adapter.parameters() if p.requires_grad] if self.adapter is not None else []
        if unet_lr is None and (adapter_lr is None or not adapter):
            return super().param_groups()
        adapter_ids = {id(p) for p in adapter}
        rest = [p for p in self.parameters() if p.requires_grad and id(p) not in adapter_ids]
        groups = [{"params": rest, "name": "unet", **({"lr": unet_lr} if unet_lr is not None else {})}]
        if adapter:
            groups.append({"params": adapter, "name": "adapter", **({"lr": adapter_lr} if adapter_lr is not None else {})})
        return [g for g in groups if g["params"]]

    def export(self, directory: Path, metadata: dict[str, Any]) -> None:
        """The EMA weights: the adapter (safetensors + metadata) and the UNet in diffusers format,
        or its LoRA in diffusers' LoRA format (`lora/`) and, with `export.merge_lora` (always
        when the LoRA is not on the base's UNet), the merged UNet too (`unet/`).
        A LoRA adds `metadata["lora"]` (its settings), which the model card reads after.
        Called on every rank (FSDP gathers the shards); rank 0 writes."""
        with self.ema_weights(), self.full_weights() as write:
            if not write:
                return
            unet = unwrap(self.unet)
            if self.diffusion.lora is None:
                self.save_text_side(directory, metadata)
                unet.save_pretrained(directory / "unet")
                return
            metadata["lora"] = {**unet_lora.lora_config_of(unet), "lr": self.diffusion.lora.lr, "on": self.lora_on}
            self.save_text_side(directory, metadata)
            unet_lora.save_lora(unet, directory / unet_lora.LORA_DIR, self.diffusion.base_kind)
            if self.diffusion.merge_lora or self.lora_on != "base":
                unet_lora.merged_copy(unet).save_pretrained(directory / "unet")

    def save_text_side(self, directory: Path, metadata: dict[str, Any]) -> None:
        """The adapter with the metadata in its header; a control run (no adapter) the metadata file."""
        if self.adapter is None:
            write_export_metadata(directory, metadata)
        else:
            unwrap(self.adapter).save(directory / ADAPTER_FILE, metadata)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["ema"] = self.ema.state_dict()  # the counters; the averages ride in the optimizer state

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        if "ema" in checkpoint:
            self.ema.load_state_dict(checkpoint["ema"])
