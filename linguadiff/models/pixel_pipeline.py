"""Sampling for a pixel-space base (the demo has no VAE), through diffusers' scheduler API.

SD1.5 and SDXL bases go through diffusers' own pipelines (`linguadiff.generation`); this one
exists so the demo is sampled the same way: a UNet2DConditionModel, any diffusers scheduler,
prompt embeddings from whatever text encoder, classifier-free guidance.
"""
from __future__ import annotations

import numpy as np
import torch
from diffusers import DiffusionPipeline, SchedulerMixin, UNet2DConditionModel
from PIL import Image


class PixelDiffusionPipeline(DiffusionPipeline):
    """Text-conditioned sampling directly in pixel space (images in [-1, 1])."""

    def __init__(self, unet: UNet2DConditionModel, scheduler: SchedulerMixin):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)

    @torch.no_grad()
    def __call__(
        self,
        prompt_embeds: torch.Tensor,
        negative_prompt_embeds: torch.Tensor | None = None,
        num_inference_steps: int = 20,
        guidance_scale: float = 1.5,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "pil",
        height: int | None = None,
        width: int | None = None,
    ) -> list[Image.Image] | torch.Tensor:
        """`prompt_embeds` [B, N, D] is the UNet's cross-attention context (CLIP's, or the adapter's);
        `height` / `width`: the image size (default: the UNet's square `sample_size`)."""
        unet, scheduler = self.unet, self.scheduler
        device, dtype = unet.device, unet.dtype
        batch = prompt_embeds.shape[0]
        size, channels = unet.config.sample_size, unet.config.in_channels
        shape = (batch, channels, height or size, width or size)
        if isinstance(generator, list):  # one generator per image: each image reproducible alone
            x = torch.cat([torch.randn((1, *shape[1:]), generator=g, dtype=torch.float32) for g in generator])
        else:
            x = torch.randn(shape, generator=generator, dtype=torch.float32)
        x = x.to(device) * scheduler.init_noise_sigma
        guided = guidance_scale != 1.0 and negative_prompt_embeds is not None
        context = prompt_embeds.to(device, dtype)
        if guided:
            context = torch.cat([negative_prompt_embeds.to(device, dtype), context])
        scheduler.set_timesteps(num_inference_steps, device=device)
        for t in self.progress_bar(scheduler.timesteps):
            model_in = torch.cat([x, x]) if guided else x
            model_in = scheduler.scale_model_input(model_in, t)
            out = unet(model_in.to(dtype), t, encoder_hidden_states=context).sample.float()
            if guided:
                uncond, cond = out.chunk(2)
                out = uncond + guidance_scale * (cond - uncond)
            x = scheduler.step(out, t, x, generator=generator if not isinstance(generator, list) else None).prev_sample
        images = (x.clamp(-1, 1) + 1) / 2
        if output_type == "pt":
            return images
        arrays = (images.permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)
        return [Image.fromarray(a) for a in arrays]
