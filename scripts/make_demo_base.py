"""Train the demo's tiny pretrained text-to-image base and write it in the diffusers layout.

Real runs start from a pretrained SD1.5/SDXL whose CLIP text encoder the LLM + adapter
replaces; the demo starts the same way from this base. It is a pixel-space
UNet2DConditionModel (16 px, v-prediction, the pooled text feature added to the time
embedding through ``addition_embed_type="text"``) and a tiny CLIPTextModel trained jointly
on English captions of coloured shapes (a frozen random encoder does not generalise to
new phrasings; DESIGN.md). 10% caption dropout trains the unconditional branch that
classifier-free guidance needs; the weights written are the EMA ones.

    python scripts/make_demo_base.py --out assets/demo_base        # about 35 min on one CPU thread

Deterministic for a given seed, torch version and thread count. Writes unet/, text_encoder/,
tokenizer/, scheduler/, model_index.json and a README.md with the measured accuracy.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from datamodules import demo_data  # noqa: E402
from evaluation.demo_readback import classify_shape, dominant_colour  # noqa: E402
from linguadiff.offline_tokenizers import save_clip_tokenizer, words_of  # noqa: E402
from linguadiff.models.pixel_pipeline import PixelDiffusionPipeline  # noqa: E402


def english_corpus(rng: random.Random, n: int) -> list[str]:
    """Captions whose words make up the tokenizer's vocabulary (others fall back to bytes)."""
    out = []
    for i in range(n):
        scene = demo_data.sample_scene(rng)
        out.append(demo_data.caption("en", scene, rng, ("position", "background", "size"), long=i % 40 == 0))
    return out


def build_models(tokenizer_dir: Path, image_size: int, text_dim: int) -> tuple[CLIPTokenizer, CLIPTextModel, UNet2DConditionModel]:
    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=text_dim,
            intermediate_size=4 * text_dim,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=tokenizer.model_max_length,
            projection_dim=text_dim,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    unet = UNet2DConditionModel(
        sample_size=image_size,
        in_channels=3,
        out_channels=3,
        layers_per_block=1,
        block_out_channels=(32, 64),
        # Cross-attention at 8 px only (it costs twice as much at 16 px on a CPU); the pooled text
        # feature in the time embedding conditions every level.
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=text_dim,
        attention_head_dim=4,
        norm_num_groups=16,
        # The pooled text feature joins the time embedding as well as cross-attention: at this
        # size cross-attention alone learnt colour too slowly (DESIGN.md prototype).
        addition_embed_type="text",
        addition_embed_type_num_heads=4,
    )
    return tokenizer, text_encoder, unet


def encode(tokenizer, text_encoder, captions: list[str]) -> torch.Tensor:
    ids = tokenizer(captions, padding="max_length", truncation=True, max_length=tokenizer.model_max_length, return_tensors="pt").input_ids
    return text_encoder(ids).last_hidden_state


def training_batch(rng: random.Random, batch_size: int, image_size: int, dropout: float) -> tuple[torch.Tensor, list[str]]:
    images, captions = [], []
    for _ in range(batch_size):
        scene = demo_data.sample_scene(rng)
        image = demo_data.render(scene, image_size, rng)
        images.append(torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(image_size, image_size, 3))
        details = tuple(d for d in ("position", "background", "size") if rng.random() < 0.3)
        text = demo_data.caption("en", scene, rng, details, long=rng.random() < 0.05)
        captions.append("" if rng.random() < dropout else text)
    x = torch.stack(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    return x, captions


@torch.no_grad()
def evaluate(tokenizer, text_encoder, unet, scheduler_config, image_size: int, per_prompt: int, guidance: float, steps: int) -> dict:
    """Colour and shape accuracy on the plain English prompts (every colour x shape)."""
    sampler = DDIMScheduler.from_config(scheduler_config)
    pipe = PixelDiffusionPipeline(unet=unet, scheduler=sampler)
    pipe.set_progress_bar_config(disable=True)
    prompts = demo_data.plain_prompts("en")
    texts = [p for p, _, _ in prompts for _ in range(per_prompt)]
    context = encode(tokenizer, text_encoder, texts)
    uncond = encode(tokenizer, text_encoder, [""]).expand_as(context)
    images = pipe(context, uncond, num_inference_steps=steps, guidance_scale=guidance, generator=torch.Generator().manual_seed(0))
    truth = [(c, s) for _, c, s in prompts for _ in range(per_prompt)]
    colour = sum(dominant_colour(im) == c for im, (c, _) in zip(images, truth)) / len(images)
    shape = sum(classify_shape(im) == s for im, (_, s) in zip(images, truth)) / len(images)
    return {"colour_accuracy": round(colour, 4), "shape_accuracy": round(shape, 4), "images": len(images)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="assets/demo_base")
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--image-size", type=int, default=16)
    parser.add_argument("--text-dim", type=int, default=64)
    parser.add_argument("--caption-dropout", type=float, default=0.1)
    parser.add_argument("--ema", type=float, default=0.995)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--eval-per-prompt", type=int, default=4)
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    out = Path(args.out)
    save_clip_tokenizer(out / "tokenizer", words_of(english_corpus(random.Random(args.seed + 1), 20000)))
    tokenizer, text_encoder, unet = build_models(out / "tokenizer", args.image_size, args.text_dim)
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction")

    params = list(unet.parameters()) + list(text_encoder.parameters())
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    warmup = 100
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / args.steps)))
    )
    ema_unet, ema_text = copy.deepcopy(unet).requires_grad_(False), copy.deepcopy(text_encoder).requires_grad_(False)
    ema_params = list(ema_unet.parameters()) + list(ema_text.parameters())

    start = time.time()
    for step in range(1, args.steps + 1):
        x0, captions = training_batch(rng, args.batch_size, args.image_size, args.caption_dropout)
        noise = torch.randn_like(x0)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (x0.shape[0],))
        noisy = scheduler.add_noise(x0, noise, t)
        target = scheduler.get_velocity(x0, noise, t)
        pred = unet(noisy, t, encoder_hidden_states=encode(tokenizer, text_encoder, captions)).sample
        loss = F.mse_loss(pred, target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        with torch.no_grad():
            decay = min(args.ema, (1 + step) / (10 + step))
            torch._foreach_lerp_(ema_params, params, 1 - decay)
        if step % 100 == 0 or step == args.steps:
            elapsed = time.time() - start
            print(f"step {step}/{args.steps}  loss {loss.item():.4f}  {step / elapsed:.2f} steps/s  {elapsed / 60:.1f} min", flush=True)
    train_minutes = (time.time() - start) / 60

    ema_unet.eval()
    ema_text.eval()
    metrics = evaluate(tokenizer, ema_text, ema_unet, scheduler.config, args.image_size, args.eval_per_prompt, 1.5, 20)
    print(json.dumps(metrics))

    ema_unet.save_pretrained(out / "unet")
    ema_text.save_pretrained(out / "text_encoder")
    scheduler.save_pretrained(out / "scheduler")
    model_index = {
        "_class_name": "PixelDiffusionPipeline",
        "_diffusers_version": __import__("diffusers").__version__,
        "linguadiff_base": "demo",
        "scheduler": ["diffusers", "DDPMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
    }
    (out / "model_index.json").write_text(json.dumps(model_index, indent=2) + "\n")
    n_unet = sum(p.numel() for p in unet.parameters()) / 1e6
    n_text = sum(p.numel() for p in text_encoder.parameters()) / 1e6
    (out / "README.md").write_text(
        f"""# LinguaDiff demo base

A tiny pretrained pixel-space text-to-image model ({args.image_size} px coloured shapes, English
captions), made by `python scripts/make_demo_base.py --out {args.out}` (seed {args.seed},
{args.steps} steps at batch {args.batch_size}, lr {args.lr}, caption dropout {args.caption_dropout},
EMA {args.ema}, v-prediction, {args.threads} CPU threads: {train_minutes:.1f} minutes of training).

- unet/: UNet2DConditionModel, {n_unet:.2f}M parameters (EMA weights)
- text_encoder/ + tokenizer/: CLIPTextModel, {n_text:.2f}M parameters, CLIP BPE tokenizer built offline
- scheduler/: DDPMScheduler config (sample with DDIM or DPM-Solver++ made from it)

With its own English encoder, guidance 1.5, 20 DDIM steps, {metrics['images']} images of the plain
prompts ("a red circle", ...): colour accuracy {metrics['colour_accuracy']:.1%}, shape accuracy
{metrics['shape_accuracy']:.1%} (chance: 25% and 33%).
"""
    )
    print(f"wrote {out} in {(time.time() - start) / 60:.1f} min")


if __name__ == "__main__":
    main()
