"""Write the demo's tiny LLM (committed under assets/demo_llm).

A 2-layer Qwen2-architecture decoder of hidden size 128 over a byte-level tokenizer, from a
fixed seed. It goes through the same AutoModel/AutoTokenizer.from_pretrained path as a real
LLM, and reads any language.

It has read text, as a real LLM has: `--pretrain-steps` (1200 by default) steps of next-byte
prediction on the demo's captions in all six languages and on salads of each language's most
frequent words (`demo_data`'s `filler` lists); it never reads the held-out requests of
evaluation/prompts/demo_heldout.json. A random LLM knows no word: in "quiero ver un cuadrado
rojo" the bytes of "ver" (to see) start like "verde", and an adapter on it drew the right colour
for 73-96% of the held-out requests per language after demo stage 1; on this one, 95-100%
(README, "Wording no caption uses"). The same seed and thread count give the same weights:

    python scripts/make_demo_llm.py --out assets/demo_llm                     # about 7 min on 2 cores
    python scripts/make_demo_llm.py --out /tmp/demo_llm_random --pretrain-steps 0   # random weights
"""
from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen2Model

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from linguadiff.offline_tokenizers import save_byte_tokenizer  # noqa: E402

BOS, EOS, PAD = 256, 257, 258


def reading_text(rng: random.Random) -> str:
    """One line of what the demo LLM reads: a demo caption, or a salad of frequent words."""
    from datamodules import demo_data

    lang = rng.choice(demo_data.LANGUAGES)
    if rng.random() < 0.5:
        return demo_data.parallel_captions(demo_data.sample_any_scene(rng), rng)[lang]
    words = rng.sample(demo_data.LEXICON[lang]["filler"], rng.randint(3, 10))
    return ("" if lang in ("zh", "ja") else " ").join(words)


def byte_batch(rng: random.Random, batch_size: int, max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids (BOS + UTF-8 bytes + EOS, right-padded) and the labels (-100 on padding)."""
    rows = [[BOS, *reading_text(rng).encode("utf-8")[: max_len - 2], EOS] for _ in range(batch_size)]
    width = max(map(len, rows))
    ids = torch.full((batch_size, width), PAD)
    labels = torch.full((batch_size, width), -100)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        labels[i, : len(row)] = torch.tensor(row)
    return ids, labels


def pretrain(model: Qwen2ForCausalLM, steps: int, seed: int, batch_size: int = 64, max_len: int = 96) -> list[float]:
    """Next-byte prediction; returns the loss every 100 steps."""
    rng = random.Random(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=steps, pct_start=0.05)
    losses, start = [], time.monotonic()
    model.train()
    for step in range(steps):
        ids, labels = byte_batch(rng, batch_size, max_len)
        loss = model(input_ids=ids, attention_mask=(ids != PAD).long(), labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if (step + 1) % 100 == 0 or step == 0:
            losses.append(round(loss.item(), 4))
            print(f"step {step + 1}/{steps}: next-byte loss {loss.item():.3f} ({time.monotonic() - start:.0f} s)", flush=True)
    model.eval()
    return losses


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="assets/demo_llm")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pretrain-steps", type=int, default=1200, help="0: leave the weights random")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (the same count gives the same weights)")
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    vocab_size = save_byte_tokenizer(args.out, model_max_length=1024)
    config = Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=128,
        intermediate_size=352,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        bos_token_id=BOS,
        eos_token_id=EOS,
        pad_token_id=PAD,
        tie_word_embeddings=True,
    )
    if args.pretrain_steps:
        lm = Qwen2ForCausalLM(config)
        pretrain(lm, args.pretrain_steps, args.seed)
        model = lm.model  # the decoder alone, as the text encoder loads it (the LM head is the tied embedding)
    else:
        model = Qwen2Model(config)  # the committed asset: random weights from the seed
    model.save_pretrained(args.out)
    n = sum(p.numel() for p in model.parameters())
    print(f"wrote {args.out}: Qwen2Model, {n / 1e6:.2f}M parameters, vocab {vocab_size}, "
          f"{args.pretrain_steps} pretraining steps")


if __name__ == "__main__":
    main()
