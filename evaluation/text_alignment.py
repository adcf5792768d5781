"""Stage-1 measures on held-out parallel text: how close LLM + adapter come to the base's CLIP.

Per language: the alignment loss and token cosine the stage-1 module trains on, and the
retrieval recall@1/@5 its validation reports (does a caption's adapter output find its own
English CLIP teacher output among the held-out pool?). The run's already loaded LLM and
adapter (its PromptEncoder) meet the base's CLIP teacher under the run's own loss settings,
through the same loss and recall functions stage-1 training uses, so the numbers are what
training logs as ``val/...``, now split by language. For stage-2/3 runs they show how far
end-to-end training moved the adapter from CLIP.
"""
from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import Any

import torch
from omegaconf import DictConfig

from datamodules.sources import parse_sources
from datamodules.text_shards import TextPairStream
from linguadiff.models.clip_teacher import CLIPTeacher, TeacherBoundedTokenizer, teacher_kind
from linguadiff.config import ConfigError
from linguadiff.models.losses import alignment_loss_from_config, retrieval_recall
from linguadiff.models.prompt_encoder import PromptEncoder

log = logging.getLogger(__name__)

Features = dict[str, torch.Tensor | None]


def _rows(features: Features, index: list[int]) -> Features:
    return {k: (v[index] if v is not None else None) for k, v in features.items()}


def text_alignment_metrics(
    batches: Iterable[dict[str, Any]],
    student: Callable[[dict[str, Any]], Features],
    teacher: Callable[[dict[str, Any]], Features],
    alignment: Callable[[Features, Features], dict[str, torch.Tensor]],
    pool_size: int,
) -> dict[str, float]:
    """``text/loss/<lang>``, ``text/cosine/<lang>`` (means over captions) and ``text/recall@k/<lang>``.

    Only captions whose key is among the first `pool_size` keys are kept for retrieval
    (the rest would be dropped by the recall anyway), so memory stays at pool x languages.
    """
    totals: dict[str, dict[str, float]] = defaultdict(lambda: {"loss": 0.0, "cosine": 0.0, "n": 0})
    kept: list[dict[str, Any]] = []
    pool: set[str] = set()
    with torch.no_grad():
        for batch in batches:
            s, t = student(batch), teacher(batch)
            by_lang: dict[str, list[int]] = defaultdict(list)
            for i, lang in enumerate(batch["lang"]):
                by_lang[lang].append(i)
            for lang, index in by_lang.items():
                out = alignment(_rows(s, index), _rows(t, index))
                totals[lang]["loss"] += float(out["loss"]) * len(index)
                totals[lang]["cosine"] += float(out["cosine"]) * len(index)
                totals[lang]["n"] += len(index)
            for key in batch["key"]:
                if key not in pool and len(pool) < pool_size:
                    pool.add(key)
            keep = [i for i, key in enumerate(batch["key"]) if key in pool]
            if keep:
                kept.append({"key": [batch["key"][i] for i in keep], "lang": [batch["lang"][i] for i in keep],
                             "student": s["context"][keep].to("cpu", torch.float16),
                             "teacher": t["context"][keep].to("cpu", torch.float16)})
    languages = sorted(totals, key=lambda lang: (lang != "en", lang))  # English first: the others are read against it
    metrics = {f"text/{name}/{lang}": totals[lang][name] / totals[lang]["n"] for name in ("loss", "cosine") for lang in languages}
    recall = retrieval_recall(kept, pool_size)
    for k in (1, 5):
        metrics.update({f"text/recall@{k}/{lang}": recall[f"recall@{k}/{lang}"] for lang in languages if f"recall@{k}/{lang}" in recall})
    metrics.update({f"text/{name}": value for name, value in recall.items() if f"text/{name}" not in metrics})
    return metrics


def held_out_text_metrics(prompt_encoder: PromptEncoder, cfg: DictConfig, urls: str, pool_size: int,
                          base_path: str | None = None, batch_size: int = 256) -> dict[str, float]:
    """Run the stage-1 measures over held-out parallel text shards (every language pair once).

    `cfg` is the run's saved config (of any stage): its base model names the CLIP teacher, its
    `loss` section the alignment loss; `base_path` points at a local copy of that base."""
    try:
        sources = parse_sources(urls)
    except (FileNotFoundError, ValueError) as err:
        raise ConfigError(f"option 'text': {err}") from None
    device = prompt_encoder.device
    teacher_model = CLIPTeacher(base_path or cfg.model.path, kind=teacher_kind(cfg.model.kind), dtype=cfg.model.dtype,
                                revision=None if base_path else cfg.model.revision).to(device)
    alignment = alignment_loss_from_config(cfg.loss, teacher_model.context_parts)
    # The LLM reads what stage 1 fed it: what the teacher read of each caption.
    student_tokenizer = TeacherBoundedTokenizer(prompt_encoder.tokenizer, teacher_model.tokenizer)
    stream = TextPairStream(sources, train=False, language_weights={}, batch_size=batch_size, seed=0, shuffle_buffer=0,
                            tokenizers={"teacher": teacher_model.tokenizer, "student": student_tokenizer},
                            rank=0, world_size=1)

    def student(batch: dict[str, Any]) -> Features:  # in float32 like the teacher's, whatever the LLM's dtype
        tokens = batch["student_tokens"]
        out = prompt_encoder(tokens["input_ids"].to(device), tokens["attention_mask"].to(device))
        return {k: (v.float() if v is not None else None) for k, v in out.items()}

    def teacher(batch: dict[str, Any]) -> Features:
        return teacher_model(batch["teacher_tokens"])

    return text_alignment_metrics(stream, student, teacher, alignment, pool_size)
