"""Write the demo's tiny random LLM (committed under assets/demo_llm).

A 2-layer Qwen2-architecture decoder of hidden size 128 over a byte-level tokenizer, with
random weights from a fixed seed: it reads any language, and it carries no meaning, so
whatever the demo shows is learnt by the adapter (DESIGN.md: "a tiny random LLM").
It goes through the same AutoModel/AutoTokenizer.from_pretrained path as a real LLM.

    python scripts/make_demo_llm.py --out assets/demo_llm
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from transformers import Qwen2Config, Qwen2Model

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from linguadiff.offline_tokenizers import save_byte_tokenizer  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="assets/demo_llm")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    vocab_size = save_byte_tokenizer(args.out, model_max_length=1024)
    config = Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=128,
        intermediate_size=352,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        bos_token_id=256,
        eos_token_id=257,
        pad_token_id=258,
        tie_word_embeddings=True,
    )
    torch.manual_seed(args.seed)
    model = Qwen2Model(config)
    model.save_pretrained(args.out)
    n = sum(p.numel() for p in model.parameters())
    print(f"wrote {args.out}: Qwen2Model, {n / 1e6:.2f}M parameters, vocab {vocab_size}")


if __name__ == "__main__":
    main()
