"""Train the demo's tiny CLIP, the one evaluate.py scores demo runs with, and save it.

Real evaluations score images with a real CLIP (`clip=/models/clip-vit-large-patch14`); the
demo has no such model offline, and a random stand-in gives CLIP scores that read 0. This
CLIP is trained contrastively on the demo's own pictures (`demo_data.sample_scene` /
`render`, 16 px) and their English captions (`demo_data.caption`): the CLIP score compares
each image with the English prompt (every language's images too), and the captions set
scores against the reference images' English captions, so English is what it reads.

Captions often share colour and shape inside a batch (12 colour x shape pairs), so the
contrastive targets are soft: caption j counts as a match for image i when it names image
i's colour and shape and every detail it mentions (position, background) is image i's,
instead of treating such captions as negatives. Mild pixel noise stands in for the
imperfections of drawn images.

    nice -n 10 python scripts/make_demo_clip.py --out assets/demo_clip     # about 5 min on one busy CPU thread

Deterministic for a given seed, torch version and thread count. Writes a transformers
CLIPModel + CLIPProcessor (save_pretrained, safetensors; the tokenizer is the demo base's
CLIP tokenizer) and a README.md with the measured held-out figures.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from transformers import CLIPConfig, CLIPModel, CLIPProcessor, CLIPTokenizer
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from datamodules import demo_data  # noqa: E402
from evaluation.clip_models import demo_caption_retrieval, features_tensor, load_clip  # noqa: E402
from linguadiff.config import PROJECT_ROOT  # noqa: E402

TOKENIZER = PROJECT_ROOT / "assets" / "demo_base" / "tokenizer"


def build_model(tokenizer: CLIPTokenizer, image_size: int, patch: int, width: int, layers: int, projection: int) -> CLIPModel:
    heads = max(1, width // 16)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers,
                         num_attention_heads=heads, max_position_embeddings=tokenizer.model_max_length,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id),
        vision_config=dict(hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers, num_attention_heads=heads,
                           image_size=image_size, patch_size=patch),
        projection_dim=projection,
    )
    return CLIPModel(config)


def rendered_batch(rng: random.Random, batch_size: int, image_size: int, noise: float):
    """uint8 images [B, 3, H, W], their English captions and the match matrix [B, B] (image i, caption j)."""
    images, captions, keys = [], [], []
    for _ in range(batch_size):
        scene = demo_data.sample_scene(rng)
        image = np.asarray(demo_data.render(scene, image_size, rng), dtype=np.float32)
        if noise and rng.random() < 0.5:
            image = image + np.random.default_rng(rng.getrandbits(32)).normal(0.0, noise, image.shape)
        images.append(torch.from_numpy(np.clip(image, 0, 255).astype(np.uint8)).permute(2, 0, 1))
        long = rng.random() < 0.05
        details = ("position", "background") if long else tuple(d for d in ("position", "background", "size") if rng.random() < 0.3)
        captions.append(demo_data.caption("en", scene, rng, details, long))
        keys.append((scene, set(details) - {"size"}))  # size words are optional in captions ("medium" may be left out)
    match = torch.tensor([[img.colour == cap.colour and img.shape == cap.shape and all(getattr(img, d) == getattr(cap, d) for d in said)
                           for cap, said in keys] for img, _ in keys], dtype=torch.float32)
    return torch.stack(images), captions, match


def text_features(model: CLIPModel, tokenizer: CLIPTokenizer, captions: list[str], short: int = 24) -> torch.Tensor:
    """Projected text embeddings, short and long captions padded apart: a few long captions
    per batch would otherwise pad every caption to 77 tokens (three times the work)."""
    lengths = [len(ids) for ids in tokenizer(captions, truncation=True, max_length=tokenizer.model_max_length)["input_ids"]]
    out = [None] * len(captions)
    for group in ([i for i, n in enumerate(lengths) if n <= short], [i for i, n in enumerate(lengths) if n > short]):
        if group:
            tokens = tokenizer([captions[i] for i in group], padding=True, truncation=True,
                               max_length=tokenizer.model_max_length, return_tensors="pt")
            embeds = features_tensor(model.get_text_features(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]), "text")
            for row, i in enumerate(group):
                out[i] = embeds[row]
    return torch.stack(out)


def soft_clip_loss(logits_per_image: torch.Tensor, match: torch.Tensor) -> torch.Tensor:
    """CLIP's symmetric cross-entropy with every matching caption (image) as a shared target."""
    to_text = match / match.sum(1, keepdim=True)
    to_image = match.t() / match.t().sum(1, keepdim=True)
    image_loss = -(to_text * F.log_softmax(logits_per_image, dim=1)).sum(1).mean()
    text_loss = -(to_image * F.log_softmax(logits_per_image.t(), dim=1)).sum(1).mean()
    return (image_loss + text_loss) / 2


def held_out_images(seed: int, per_class: int, image_size: int) -> tuple[torch.Tensor, list[tuple[str, str]]]:
    """`per_class` fresh scenes of every colour x shape (sizes, positions, backgrounds at random)."""
    from dataclasses import replace

    rng = random.Random(seed)
    images, labels = [], []
    for colour in demo_data.COLOURS:
        for shape in demo_data.SHAPES:
            for _ in range(per_class):
                scene = replace(demo_data.sample_scene(rng), colour=colour, shape=shape)
                images.append(torch.from_numpy(np.array(demo_data.render(scene, image_size, rng))).permute(2, 0, 1))
                labels.append((colour, shape))
    return torch.stack(images), labels


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="assets/demo_clip")
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--image-size", type=int, default=16)
    parser.add_argument("--patch", type=int, default=4)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--projection", type=int, default=64)
    parser.add_argument("--noise", type=float, default=8.0, help="std of the pixel noise added to half the images (0-255 scale)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-seed", type=int, default=12345, help="seed of the held-out pictures measured at the end")
    parser.add_argument("--eval-per-class", type=int, default=40)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    tokenizer = CLIPTokenizer.from_pretrained(TOKENIZER)
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": args.image_size},
                                            crop_size={"height": args.image_size, "width": args.image_size})
    processor = CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)
    model = build_model(tokenizer, args.image_size, args.patch, args.width, args.layers, args.projection)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.05)
    warmup = 100
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / args.steps))))

    started = time.perf_counter()
    model.train()
    for step in range(args.steps):
        images, captions, match = rendered_batch(rng, args.batch_size, args.image_size, args.noise)
        pixels = image_processor(images=list(images), return_tensors="pt")["pixel_values"]
        image = F.normalize(features_tensor(model.get_image_features(pixel_values=pixels), "image"), dim=-1)
        text = F.normalize(text_features(model, tokenizer, captions), dim=-1)
        loss = soft_clip_loss(model.logit_scale.exp() * image @ text.T, match)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))  # CLIP's cap on the temperature
        if step % 100 == 0 or step == args.steps - 1:
            print(f"step {step:5d}  loss {loss.item():.4f}  scale {model.logit_scale.exp().item():.1f}  "
                  f"{time.perf_counter() - started:.0f} s", flush=True)
    train_s = time.perf_counter() - started

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.eval().save_pretrained(out_dir)  # safetensors
    processor.save_pretrained(out_dir)

    # Measured on the saved files, as evaluate.py loads them.
    bundle = load_clip(str(out_dir))
    images, labels = held_out_images(args.eval_seed, args.eval_per_class, args.image_size)
    figures = demo_caption_retrieval(bundle, images, labels)
    params = sum(p.numel() for p in model.parameters())
    record = {"train_seconds": round(train_s, 1), "parameters": params, "args": vars(args), "held_out": figures}
    print(json.dumps(record, indent=1))
    (out_dir / "README.md").write_text(readme(args, params, train_s, figures), encoding="utf-8")


def readme(args, params: int, train_s: float, figures: dict) -> str:
    return "\n".join([
        "# The demo's tiny CLIP",
        "",
        "A transformers `CLIPModel` + `CLIPProcessor` that `evaluate.py` uses for the CLIP scores and CLIP",
        "image embeddings of runs on the committed demo base, in place of a random stand-in.",
        f"Written by `scripts/make_demo_clip.py`: seed {args.seed}, {args.steps} steps of batch {args.batch_size}, "
        f"{train_s / 60:.1f} min on {args.threads} CPU thread(s),",
        "contrastively on the demo's own 16 px pictures and English captions.",
        f"{params / 1e6:.2f}M parameters: vision tower {args.image_size} px in {args.patch} px patches, text tower on "
        f"the demo base's CLIP tokenizer, both {args.layers} layers of width {args.width}, projection {args.projection}.",
        "",
        "It knows coloured shapes and the words of the demo's English captions, nothing else: its scores",
        "compare demo runs with each other, never with a real CLIP's.",
        "",
        f"Held out: {figures['images']} freshly rendered pictures (seed {args.eval_seed}, every colour x shape alike), "
        "each against the 12 plain captions \"a COLOUR SHAPE\":",
        "",
        "| measure | value |",
        "|---|---|",
        f"| right caption ranked first (of 12) | {figures['retrieval_accuracy']:.1%} |",
        f"| right colour in the first-ranked caption | {figures['colour_accuracy']:.1%} |",
        f"| right shape in the first-ranked caption | {figures['shape_accuracy']:.1%} |",
        f"| CLIP score, matching caption | {figures['clip_score_matching']:.1f} |",
        f"| CLIP score, the 11 mismatched captions (mean) | {figures['clip_score_mismatched']:.1f} |",
        f"| CLIP score, same shape, other colour | {figures['clip_score_other_colour']:.1f} |",
        f"| CLIP score, same colour, other shape | {figures['clip_score_other_shape']:.1f} |",
        "",
        "(CLIP score: 100 x cosine, torchmetrics' definition before its clamp at 0.)",
        "",
    ])


if __name__ == "__main__":
    main()
