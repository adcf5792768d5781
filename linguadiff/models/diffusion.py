"""The base model's diffusion parts (UNet, VAE, noise schedule) and the diffusion loss.

Loaded from the base's diffusers folder (SD1.5, SDXL, or the demo's pixel-space base, which
has no VAE). The loss is the usual one of the diffusers training examples, with the options
the paper's code and its peers use: epsilon or v-prediction (from the scheduler config),
input perturbation (0.1 in the paper's code), noise offset, Min-SNR-gamma weighting.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

from linguadiff.models.frozen import freeze
from linguadiff.models.text_encoder import torch_dtype


def load_unet(path: str, subfolder: str | None = "unet", revision: str | None = None) -> UNet2DConditionModel:
    """The trainable UNet, in fp32 (mixed precision casts on the fly; AdamW states stay fp32)."""
    return UNet2DConditionModel.from_pretrained(path, subfolder=subfolder, revision=revision, torch_dtype=torch.float32)


def load_vae(path: str, kind: str, dtype: str, revision: str | None = None) -> AutoencoderKL | None:
    """The frozen VAE (None for the demo's pixel-space base)."""
    if kind == "demo":
        return None
    return freeze(AutoencoderKL.from_pretrained(path, subfolder="vae", revision=revision, torch_dtype=torch_dtype(dtype)))


def load_noise_scheduler(path: str, prediction_type: str | None = None, revision: str | None = None) -> DDPMScheduler:
    """The training noise schedule (DDPM, 1000 steps) from the base's scheduler config."""
    scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler", revision=revision)
    if prediction_type:
        scheduler.register_to_config(prediction_type=prediction_type)
    return scheduler


@dataclass
class DiffusionLossConfig:
    min_snr_gamma: float | None = None
    input_perturbation: float = 0.0
    noise_offset: float = 0.0


def diffusion_loss(
    unet: UNet2DConditionModel,
    scheduler: DDPMScheduler,
    x0: torch.Tensor,
    context: torch.Tensor,
    options: DiffusionLossConfig,
    added_cond_kwargs: dict[str, torch.Tensor] | None = None,
    timesteps: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Per-sample diffusion loss [B] for clean inputs `x0` (latents, or pixels for the demo).

    `timesteps`/`generator` fix the noise for validation at chosen timesteps.
    """
    batch = x0.shape[0]
    noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype) if generator else torch.randn_like(x0)
    if options.noise_offset:
        noise = noise + options.noise_offset * torch.randn((batch, x0.shape[1], 1, 1), device=x0.device, dtype=x0.dtype)
    if timesteps is None:
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (batch,), device=x0.device)
    # Input perturbation (paper code, after Ning et al. 2023): the model sees slightly
    # different noise than it must predict, which reduces exposure bias at sampling time.
    model_noise = noise + options.input_perturbation * torch.randn_like(noise) if options.input_perturbation else noise
    noisy = scheduler.add_noise(x0, model_noise, timesteps)
    prediction_type = scheduler.config.prediction_type
    if prediction_type == "epsilon":
        target = noise
    elif prediction_type == "v_prediction":
        target = scheduler.get_velocity(x0, noise, timesteps)
    else:
        raise ValueError(f"unsupported prediction_type {prediction_type!r} (epsilon or v_prediction)")
    pred = unet(noisy, timesteps, encoder_hidden_states=context, added_cond_kwargs=added_cond_kwargs).sample
    loss = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=list(range(1, pred.ndim)))
    if options.min_snr_gamma:
        snr = _snr(scheduler, timesteps)
        weight = torch.clamp(snr, max=options.min_snr_gamma) / (snr + 1 if prediction_type == "v_prediction" else snr)
        loss = loss * weight
    return loss


def _snr(scheduler: DDPMScheduler, timesteps: torch.Tensor) -> torch.Tensor:
    alphas_cumprod = scheduler.alphas_cumprod.to(timesteps.device)[timesteps].float()
    return alphas_cumprod / (1 - alphas_cumprod)


def sdxl_time_ids(original_size: torch.Tensor, crop_top_left: torch.Tensor, target_size: torch.Tensor) -> torch.Tensor:
    """SDXL micro-conditioning [B, 6]: (original h, w, crop top, left, target h, w)."""
    return torch.cat([original_size, crop_top_left, target_size], dim=1).float()


def sample_latents(moments: torch.Tensor, dtype: torch.dtype, scaling_factor: float) -> torch.Tensor:
    """What `vae.encode(x).latent_dist.sample() * scaling_factor` gives, from cached moments."""
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    return (DiagonalGaussianDistribution(moments.to(dtype)).sample() * scaling_factor).float()
