"""Stage-1 text shards: (teacher, student, language) caption pairs, batched in the workers.

A text shard sample is `KEY.txt` (English) plus, for parallel text, `KEY.<lang>.txt` and/or
`KEY.json` (`{"en": ..., "zh": ...}` or `{"caption": ..., "captions": {"zh": ...}}`).
Stage 1 teaches the LLM + adapter (student) to reproduce CLIP's features (teacher), and CLIP
only reads English, so every pair is (English, English or its translation, language).

- Training: an infinite stream (Lightning's `max_steps` ends it); each sample gives one pair,
  its language drawn among the languages it has by the `languages` weights. Each batch
  carries the stream's position after it, so a resumed run reads on exactly from there.
- Validation: a finite stream giving every language pair of every sample exactly once
  across all ranks and workers, in a fixed order, so per-language retrieval metrics see the
  same pool every time.

Batch (a dict built inside the DataLoader worker): `teacher_text`, `student_text`, `lang`,
`key` (lists of str), `skipped` (dict reason -> count of inputs this worker skipped since its
previous batch) and, when tokenizers are set, `teacher_tokens` / `student_tokens`.
"""
from __future__ import annotations

import random
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from omegaconf import DictConfig

from datamodules.checks import BadSample, caption_text, read_json
from datamodules.datamodule import ShardDataModule
from datamodules.skips import SkipCounter
from datamodules.sources import ShardSource, is_language_code, parse_language_weights
from datamodules.streams import (
    Consumer,
    ReadPosition,
    ShardStream,
    Tokenizer,
    UsableGuard,
    batches_with_skips,
    iter_consumer_samples,
)

TOKENIZER_ROLES = ("teacher", "student")

def is_text_member(extension: str) -> bool:
    """The tar members stage 1 reads; images in image-text shards stay unread."""
    return extension in ("txt", "json") or extension.endswith(".txt")


@dataclass(frozen=True)
class TextSample:
    """One decoded sample: its key and caption per language, English first."""

    key: str
    captions: dict[str, str]


class TextPair(NamedTuple):
    teacher_text: str
    student_text: str
    lang: str
    key: str


def _json_captions(meta: Any, extra_codes: frozenset[str]) -> dict[str, Any]:
    """Captions per language found in a sample's json, by increasing priority."""
    captions: dict[str, Any] = {}
    if isinstance(meta.get("caption"), str):
        captions["en"] = meta["caption"]
    captions.update(
        {code: text for code, text in meta.items() if is_language_code(code, extra_codes)}
    )
    if isinstance(meta.get("captions"), Mapping):
        captions.update(meta["captions"])
    return {code: text for code, text in captions.items() if isinstance(text, str)}


def decode_text_sample(
    raw: Mapping[str, Any], skips: SkipCounter, extra_codes: frozenset[str] = frozenset()
) -> TextSample | None:
    """Decodes a raw tar sample into captions per language, or None if it has no English.

    `KEY.txt` / `KEY.<lang>.txt` win over the json. A bad English side drops the sample
    (`bad_encoding`, `empty_caption` (nothing visible: blank or control characters),
    `caption_too_long`, `missing_caption`); a bad other side drops that language only
    (`bad_encoding`, `caption_too_long`, `missing_parallel`); a bad json (malformed, not an
    object, nested too deep, too big) is `bad_json` and the sample lives on if its files
    suffice. See `datamodules.checks`.
    """
    url, key = raw["__url__"], raw["__key__"]
    found: dict[str, str | bytes] = {}
    json_failed = False
    if "json" in raw:
        try:
            found.update(_json_captions(read_json(raw["json"]), extra_codes))
        except BadSample as bad:
            skips.skip(bad.reason, url, key, bad.detail)
            json_failed = True
    if "en.txt" in raw:
        found["en"] = raw["en.txt"]
    for extension, payload in raw.items():
        code = extension.removesuffix(".txt")
        if extension.endswith(".txt") and code != "en" and is_language_code(code, extra_codes):
            found[code] = payload
    if "txt" in raw:
        found["en"] = raw["txt"]
    if "en" not in found:
        if not json_failed:  # a broken json holding the caption is already counted
            skips.skip("missing_caption", url, key, "no English caption (KEY.txt or json)")
        return None

    captions: dict[str, str] = {}
    for code in ["en", *sorted(set(found) - {"en"})]:
        try:
            text = caption_text(found[code])
        except BadSample as bad:
            skips.skip(bad.reason, url, key, f"{code}: {bad.detail}")
            if code == "en":
                return None
            continue
        if not text:
            reason = "empty_caption" if code == "en" else "missing_parallel"
            skips.skip(reason, url, key, f"{code} caption is empty")
            if code == "en":
                return None
            continue
        captions[code] = text
    return TextSample(key=key, captions=captions)


class TextPairStream(ShardStream):
    """Batches of caption pairs from shard sources; one instance per DataLoader.

    Everything here runs in the DataLoader workers: reading, decoding, shuffling, drawing
    languages, batching and tokenizing; the main process only receives finished batches.
    """

    # The student's tokenizer also reads the teacher's text: stage 1 feeds the LLM only what
    # the teacher read (linguadiff.models.clip_teacher.TeacherBoundedTokenizer).
    tokenized_fields = {"teacher": "teacher_text", "student": ("student_text", "teacher_text")}

    def __init__(
        self,
        sources: Sequence[ShardSource],
        *,
        train: bool,
        language_weights: Mapping[str, float],
        **common: Any,
    ):
        super().__init__(sources, **common)
        self.train = train
        self.language_weights = dict(language_weights)
        self.extra_codes = frozenset(language_weights)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        skips = SkipCounter()
        self._guard = UsableGuard([source.urls for source in self.sources], skips, self.shuffle_buffer)
        if self.train:
            yield from self._resumable_batches(
                skips,
                lambda index, consumer, position: self._samples(index, consumer, skips, position),
                lambda order, rng: self._train_pairs(order, rng, skips),  # languages drawn with rng
            )
            return
        reader, consumer = self._consumers(train=False)
        batches = batches_with_skips(self._val_pairs(reader, skips), self.batch_size, True, skips, self._collate)
        yield from self._share(batches, False, consumer)

    def _samples(
        self, source_index: int, consumer: Consumer, skips: SkipCounter, position: ReadPosition | None = None
    ) -> Iterator[TextSample]:
        raw_samples = iter_consumer_samples(
            self.sources[source_index].urls,
            consumer,
            skips,
            infinite=self.train,
            seed=f"{self.seed}:{source_index}",
            wanted=is_text_member,
            on_pass=lambda size: self._guard.pass_done(source_index, size),
            position=position,
        )
        for raw in raw_samples:
            try:
                sample = decode_text_sample(raw, skips, self.extra_codes)
            except Exception as error:  # noqa: BLE001 - one bad sample costs that sample, not the run
                skips.skip("bad_sample", raw.get("__url__", ""), raw.get("__key__", ""),
                           f"{type(error).__name__}: {str(error)[:200]}")
                sample = None
            if sample is not None:
                yield sample
            elif self.train:
                self._guard.rejected()

    def _train_pairs(self, samples: Iterable[TextSample], rng: random.Random, skips: SkipCounter) -> Iterator[TextPair]:
        for sample in samples:
            languages = [code for code in sample.captions if self.language_weights.get(code, 1.0) > 0]
            if not languages:
                # A configuration choice, not bad data: counted for TensorBoard, not warned.
                skips.skip("lang_excluded", "", sample.key, warn=False)
                self._guard.rejected()
                continue
            self._guard.accepted()
            weights = [self.language_weights.get(code, 1.0) for code in languages]
            lang = rng.choices(languages, weights=weights)[0]
            yield TextPair(sample.captions["en"], sample.captions[lang], lang, sample.key)

    def _val_pairs(self, consumer: Consumer, skips: SkipCounter) -> Iterator[TextPair]:
        # Every language, whatever its training weight: a zero-weight language is exactly
        # the zero-shot case one wants to measure.
        for source_index in range(len(self.sources)):
            for sample in self._samples(source_index, consumer, skips):
                english = sample.captions["en"]
                for lang, text in sample.captions.items():
                    yield TextPair(english, text, lang, sample.key)

    def _collate_items(self, pairs: list[TextPair], skips: SkipCounter) -> dict[str, Any]:
        return {
            "teacher_text": [pair.teacher_text for pair in pairs],
            "student_text": [pair.student_text for pair in pairs],
            "lang": [pair.lang for pair in pairs],
            "key": [pair.key for pair in pairs],
        }


class TextShardsDataModule(ShardDataModule):
    """Stage-1 data: caption pairs from text shards (see the module docstring).

    `train` / `val`: `{"urls": URLS}` or `{"sources": [{"urls": URLS, "weight": W}, ...]}`
    where URLS is a string or list (brace ranges, globs, `pipe:` commands). Source weights
    are shares of training samples; validation reads every source once, unweighted.
    `languages`: training weight per language code; missing codes weigh 1.0, 0 excludes.
    """

    tokenizer_roles = TOKENIZER_ROLES
    source_kind = "text"

    def __init__(
        self,
        train: Mapping[str, Any] | DictConfig,
        val: Mapping[str, Any] | DictConfig | None,
        batch_size: int,
        val_batch_size: int | None = None,
        num_workers: int = 2,
        shuffle_buffer: int = 1000,
        languages: Mapping[str, float] | DictConfig | None = None,
        seed: int = 0,
        tokenizers: Mapping[str, Tokenizer] | None = None,
    ):
        super().__init__(train, val, batch_size, val_batch_size, num_workers, shuffle_buffer, seed)
        self.language_weights = parse_language_weights(languages)
        self.set_tokenizers(tokenizers)

    def _split_summary(self, split: str) -> str:
        return (
            f"{split}: languages {self.language_weights or 'all at weight 1.0'}, batch size "
            f"{self.batch_size if split == 'train' else self.val_batch_size}, workers {self.num_workers}"
        )

    def _stream(
        self, sources: list[ShardSource], *, train: bool, batch_size: int, rank: int, world_size: int
    ) -> TextPairStream:
        return TextPairStream(
            sources,
            train=train,
            batch_size=batch_size,
            language_weights=self.language_weights,
            seed=self.seed,
            shuffle_buffer=self.shuffle_buffer,
            tokenizers=self.tokenizers,
            rank=rank,
            world_size=world_size,
        )
