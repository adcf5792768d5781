"""Tokenizers built offline, in the formats Hugging Face loads with ``from_pretrained``.

Used for the demo's committed assets (a CLIP-style English tokenizer for the demo base, a
byte-level tokenizer for the tiny random LLM) and by tests that need tiny stand-ins. No
download is involved: vocabularies are made from a word list or from the 256 bytes.
"""
from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path

BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from bytes to printable unicode characters."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, codes)))


def save_clip_tokenizer(out_dir: str | Path, words: Iterable[str], model_max_length: int = 77, pad_token: str = EOS) -> int:
    """Write a CLIPTokenizer (vocab.json + merges.txt) whose BPE merges spell out `words` whole.

    Every byte has a token (so any text tokenizes), and each listed word becomes a single
    token through a left-to-right chain of merges. Returns the vocabulary size.
    """
    from transformers import CLIPTokenizer

    byte_chars = list(bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for token in byte_chars + [c + "</w>" for c in byte_chars]:
        vocab.setdefault(token, len(vocab))
    merges: list[tuple[str, str]] = []
    seen = set()
    encode = bytes_to_unicode()
    for word in sorted({w.lower() for w in words if w}):
        chars = [encode[b] for b in word.encode("utf-8")]
        chars[-1] += "</w>"
        left = chars[0]
        for right in chars[1:]:
            if (left, right) not in seen:
                seen.add((left, right))
                merges.append((left, right))
                vocab.setdefault(left + right, len(vocab))
            left = left + right
    for special in (BOS, EOS):
        vocab.setdefault(special, len(vocab))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length, pad_token=pad_token)
    tokenizer.save_pretrained(out)
    # The classic files too, for older transformers and other CLIP tokenizer readers.
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (out / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    return len(vocab)


def words_of(texts: Iterable[str]) -> set[str]:
    """The words CLIP's pre-tokenizer would see in `texts` (its split: contractions, letter runs,
    single digits, punctuation runs; lower-cased)."""
    pattern = re.compile(r"'s|'t|'re|'ve|'m|'ll|'d|[^\W\d_]+|\d|[^\s\w]+")
    return {w for text in texts for w in pattern.findall(text.lower())}


def save_byte_tokenizer(out_dir: str | Path, model_max_length: int = 1024) -> int:
    """Write a byte-level tokenizer (256 byte tokens + BOS/EOS/PAD): any language, no merges.

    Returns the vocabulary size. Loadable with ``AutoTokenizer.from_pretrained``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(bytes_to_unicode().values())}
    specials = ["<s>", "</s>", "<pad>"]
    for s in specials:
        vocab[s] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        model_max_length=model_max_length,
    )
    tokenizer.save_pretrained(out_dir)
    return len(vocab)
