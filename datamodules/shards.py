"""WebDataset shard plumbing shared by the text (stage 1) and image-text (stages 2-3) data.

What lives here, and nothing about what a sample means:

- `expand_urls` / `parse_sources`: shard URLs as WebDataset writes them (brace ranges, local
  paths and globs, `pipe:` commands, remote URLs) and weighted sources.
- `Consumer` / `iter_consumer_samples`: which shards and samples one (rank, DataLoader worker)
  reads, for a finite stream (each sample exactly once across all consumers) or an infinite
  one (shards reshuffled every pass).
- `iter_tar_samples`: our own streaming tar reader, grouping members into samples the
  WebDataset way (`dir/KEY.ext`); a corrupt header skips one member, a truncated or unreadable
  shard ends that shard; both are counted, never fatal.
- `SkipCounter`: counts skipped inputs by reason and warns without flooding the log; the
  batching code hands its counts to the main process inside every batch.
- `mix_streams`, `shuffled`, `batched`: the small stream combinators the datamodules chain.
- `is_language_code`: which `KEY.<lang>.txt` / json fields hold captions per language.
- `ShardDataModule`: the LightningDataModule plumbing both datamodules share (sources,
  tokenizer roles, logging, DataLoaders); a subclass only says how to build its stream.

We read tars ourselves instead of using `wds.WebDataset` because webdataset 1.0 needs several
non-default settings to be safe here (explicit `shardshuffle`, a node splitter, `with_epoch`
counting per worker) and hangs or starves ranks when there are fewer shards than consumers;
the splitting below handles that case explicitly. `wds.gopen` still opens every URL, so
`pipe:` and remote schemes behave exactly as in WebDataset.
"""
from __future__ import annotations

import glob
import itertools
import json
import logging
import os
import random
import re
import tarfile
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlparse

import braceexpand
import lightning as L
import torch
import webdataset as wds
from lightning.pytorch.utilities import rank_zero_info
from omegaconf import DictConfig
from torch.utils.data import DataLoader, IterableDataset

from linguadiff.config import to_plain
from linguadiff.distributed import group_rank_and_world

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Runs in the DataLoader workers: a list of texts -> token tensors.
Tokenizer = Callable[[list[str]], dict[str, torch.Tensor]]

# Errors that mean "this shard cannot be read any further" (bad stream, bad archive, failed pipe).
SHARD_READ_ERRORS = (tarfile.TarError, OSError, EOFError, zlib.error, ValueError)


# ----------------------------------------------------------------------------- URLs, sources


def _is_local(url: str) -> bool:
    scheme = urlparse(url).scheme
    # One-letter schemes are Windows drive letters, not protocols.
    return scheme in ("", "file") or len(scheme) == 1


def expand_urls(urls: str | Sequence[str]) -> list[str]:
    """Expands brace ranges and local globs; checks that local shards exist.

    Remote URLs and `pipe:` commands are kept as they are (after brace expansion): only
    opening them can tell whether they work, and a failure there is counted per shard.
    A local path or glob that matches nothing raises FileNotFoundError naming it, because a
    typo in a data path should stop a run before it starts, not train on nothing.
    """
    patterns = [urls] if isinstance(urls, str) else list(urls)
    expanded: list[str] = []
    for pattern in patterns:
        for url in braceexpand.braceexpand(pattern):
            if not _is_local(url):
                expanded.append(url)
                continue
            path = os.path.expanduser(urlparse(url).path if url.startswith("file:") else url)
            if glob.has_magic(path):
                matches = sorted(glob.glob(path))
                if not matches:
                    raise FileNotFoundError(f"no shard matches {url!r} (from {pattern!r})")
                expanded.extend(matches)
            elif os.path.exists(path):
                expanded.append(path)
            else:
                raise FileNotFoundError(f"shard not found: {url!r} (from {pattern!r})")
    if not expanded:
        raise ValueError(f"no shard URLs given: {urls!r}")
    return expanded


@dataclass(frozen=True)
class ShardSource:
    """One set of shards and its share of the training samples (weights are relative)."""

    urls: list[str]
    weight: float = 1.0
    pattern: str = ""  # the URLs as configured, for log messages


def parse_sources(spec: str | Sequence[str] | Mapping[str, Any]) -> list[ShardSource]:
    """Reads `{"urls": ...}`, `{"sources": [{"urls": ..., "weight": ...}, ...]}` or bare URLs.

    Unknown keys are errors that name the key: a misspelt `weigth` must not silently
    become weight 1.
    """
    if isinstance(spec, (str, list, tuple)):
        spec = {"urls": spec}
    spec = dict(spec)
    if "sources" in spec:
        _reject_unknown_keys(spec, {"sources"}, "data spec")
        entries = [dict(entry) for entry in spec["sources"]]
    else:
        entries = [spec]
    sources = []
    for entry in entries:
        _reject_unknown_keys(entry, {"urls", "weight"}, "shard source")
        if "urls" not in entry:
            raise ValueError(f"shard source {entry!r} has no 'urls'")
        weight = float(entry.get("weight", 1.0))
        if weight <= 0:
            raise ValueError(f"shard source {entry['urls']!r}: weight must be > 0, got {weight}")
        sources.append(
            ShardSource(urls=expand_urls(entry["urls"]), weight=weight, pattern=str(entry["urls"]))
        )
    if not sources:
        raise ValueError("data spec has an empty 'sources' list")
    return sources


def parse_language_weights(languages: Mapping[str, float] | DictConfig | None) -> dict[str, float]:
    """Training weight per language code (missing codes weigh 1.0, 0 excludes); rejects < 0."""
    weights = {str(code): float(weight) for code, weight in (to_plain(languages) or {}).items()}
    negative = {code: weight for code, weight in weights.items() if weight < 0}
    if negative:
        raise ValueError(f"language weights must be >= 0, got {negative}")
    return weights


def _reject_unknown_keys(entry: Mapping[str, Any], known: set[str], what: str) -> None:
    unknown = sorted(set(entry) - known)
    if unknown:
        raise ValueError(f"unknown key(s) {unknown} in {what}; known keys: {sorted(known)}")


# Two-letter codes with an optional region/script (zh, pt-BR, zh_Hans) are always languages.
# Three-letter codes (yue, fil) only when the caller names them: otherwise `KEY.raw.txt` or
# the `url`/`key` fields of img2dataset's json would be taken for languages.
_TWO_LETTER_LANGUAGE = re.compile(r"^[a-z]{2}(?:[-_][A-Za-z0-9]{2,8})?$")


def is_language_code(code: str, extra_codes: frozenset[str] = frozenset()) -> bool:
    """Whether a `KEY.<code>.txt` extension or json field names a caption language."""
    return bool(_TWO_LETTER_LANGUAGE.match(code)) or code in extra_codes


# ----------------------------------------------------------------------------- consumers


@dataclass(frozen=True)
class Consumer:
    """One reader of the data: a DataLoader worker of one rank. Node first, then worker."""

    rank: int = 0
    world_size: int = 1
    worker_id: int = 0
    num_workers: int = 1

    @property
    def index(self) -> int:
        return self.rank * self.num_workers + self.worker_id

    @property
    def count(self) -> int:
        return self.world_size * self.num_workers

    @classmethod
    def current(cls, rank: int, world_size: int) -> Consumer:
        """The consumer running this code, given the rank the DataLoader was built on."""
        worker = torch.utils.data.get_worker_info()
        if worker is None:
            return cls(rank, world_size)
        return cls(rank, world_size, worker.id, worker.num_workers)


def iter_consumer_samples(
    urls: Sequence[str],
    consumer: Consumer,
    skips: SkipCounter,
    *,
    infinite: bool,
    seed: int | str = 0,
    wanted: Callable[[str], bool] = lambda extension: True,
) -> Iterator[dict[str, Any]]:
    """The raw samples (see `iter_tar_samples`) this consumer reads from one source.

    Splitting, with C = ranks x workers consumers:

    - at least C shards: consumer i reads shards i, i + C, i + 2C, ... (node, then worker);
    - fewer shards than C: every consumer reads every shard and keeps the samples whose
      running index % C == i. Reading is repeated C times, which is cheap because this only
      happens for small data, and no consumer starves or waits for a shard that never comes.

    Either way a finite stream yields each sample exactly once across all consumers.
    The infinite stream reshuffles the shard order every pass with a seed from (seed, pass)
    only, so all consumers agree on the order and the split stays a partition; consumers
    differ in their own shuffle buffers downstream. In sample mode the running index goes on
    across passes, so even with fewer samples than consumers each consumer gets data
    (in a later pass) instead of spinning forever.

    Shard-level problems (unreadable, truncated, corrupt headers) are counted once: in sample
    mode only by the consumer that would own the shard under the shard split.
    """
    by_sample = len(urls) < consumer.count
    silent = SkipCounter.discarding()
    sample_index = 0
    shards_ever_read: set[str] = set()
    source_has_samples = False
    for pass_index in itertools.count() if infinite else (0,):
        order = list(urls)
        if infinite:
            random.Random(f"{seed}:{pass_index}").shuffle(order)
        my_shards = order if by_sample else order[consumer.index :: consumer.count]
        for position, url in enumerate(my_shards):
            shards_ever_read.add(url)
            owns_shard = not by_sample or position % consumer.count == consumer.index
            for sample in iter_tar_samples(url, skips if owns_shard else silent, wanted):
                source_has_samples = True
                if not by_sample or sample_index % consumer.count == consumer.index:
                    yield sample
                sample_index += 1
        if infinite and not source_has_samples and len(shards_ever_read) == len(set(urls)):
            # Every shard has been tried and none holds a sample: looping on would hang.
            raise RuntimeError(
                f"no readable sample in any of the {len(urls)} shards starting with {urls[0]!r} "
                f"(consumer {consumer.index} of {consumer.count}); see the skip warnings"
            )


# ----------------------------------------------------------------------------- skip accounting


class SkipCounter:
    """Counts skipped inputs by reason and logs them, rate-limited.

    The first `full_warnings` skips are logged one by one (URL, key, reason, detail), then one
    summary line per `summary_every` skips, so a broken shard cannot flood the log.
    `take()` returns the counts since the previous `take()`: the batching code attaches them
    to each batch, which is how counts made in DataLoader worker processes reach the
    LightningModule.
    """

    def __init__(self, full_warnings: int = 20, summary_every: int = 1000, enabled: bool = True):
        self.full_warnings = full_warnings
        self.summary_every = summary_every
        self.enabled = enabled
        self.totals: Counter[str] = Counter()
        self._since_take: Counter[str] = Counter()
        self._logged = 0

    @classmethod
    def discarding(cls) -> SkipCounter:
        """A counter that records nothing: for consumers reading a shard another one reports."""
        return cls(enabled=False)

    def skip(self, reason: str, url: str, key: str, detail: str = "", warn: bool = True) -> None:
        if not self.enabled:
            return
        self.totals[reason] += 1
        self._since_take[reason] += 1
        if not warn:
            return
        self._logged += 1
        if self._logged <= self.full_warnings:
            logger.warning("skipped %s: %s key=%r %s", reason, url, key, detail)
        elif self._logged % self.summary_every == 0:
            logger.warning("%d inputs skipped so far in this process: %s", self._logged, dict(self.totals))

    def take(self) -> dict[str, int]:
        counts = dict(self._since_take)
        self._since_take.clear()
        return counts


# ----------------------------------------------------------------------------- tar reading


def count_samples(urls: Sequence[str], max_scanned_shards: int = 64) -> int | None:
    """Samples in these shards, when that is cheap to know, else None.

    img2dataset writes `NAME_stats.json` (with `successes`) beside each `NAME.tar`: summed
    when every shard has one. Otherwise up to `max_scanned_shards` local shards are counted
    from their tar headers (no member is read). Remote or many unlabelled shards: None.
    """
    total = 0
    stats = [Path(url).with_name(Path(url).stem + "_stats.json") for url in urls if _is_local(url)]
    if len(stats) == len(urls) and all(path.is_file() for path in stats):
        try:
            return sum(int(json.loads(path.read_text())["successes"]) for path in stats)
        except (ValueError, KeyError, TypeError, OSError):
            pass
    if len(stats) != len(urls) or len(urls) > max_scanned_shards:
        return None
    for url in urls:
        try:
            with tarfile.open(url, "r:*") as tar:
                keys = set()
                for member in tar:
                    parts = split_member_name(member.name) if member.isfile() else None
                    if parts:
                        keys.add(parts[0])
            total += len(keys)
        except (OSError, tarfile.TarError):
            return None
    return total


def split_member_name(name: str) -> tuple[str, str] | None:
    """`dir/KEY.ext.more` -> (`dir/KEY`, `ext.more`), the WebDataset rule; None if no extension."""
    directory, base = os.path.split(name)
    stem, dot, extension = base.partition(".")
    if not stem or not dot or not extension:
        return None
    return os.path.join(directory, stem), extension


@dataclass
class _HeaderScan:
    """What tarfile saw while looking for headers; tarfile itself keeps no such record."""

    saw_end_marker: bool = False  # a zero block after the last member: the archive is whole
    corrupt_headers: int = 0  # runs of unparseable header blocks, one per lost member
    in_corrupt_run: bool = False


def _tarinfo_class(scan: _HeaderScan) -> type[tarfile.TarInfo]:
    """A TarInfo class that reports header errors into `scan`.

    We open archives with `ignore_zeros=True` so tarfile skips a corrupt header block and
    resynchronises on the next valid header (losing one member, not the rest of the shard),
    but then tarfile says nothing about what it skipped; this hook is how we count it and
    tell a complete archive (end marker seen) from a truncated one.
    """

    class RecordingTarInfo(tarfile.TarInfo):
        @classmethod
        def fromtarfile(cls, tar: tarfile.TarFile) -> tarfile.TarInfo:
            try:
                member = super().fromtarfile(tar)
            except tarfile.EOFHeaderError:
                scan.saw_end_marker = True
                raise
            except tarfile.InvalidHeaderError as error:
                if tar.offset == 0:
                    raise tarfile.ReadError(f"not a tar archive ({error})") from None
                if not scan.in_corrupt_run:
                    scan.corrupt_headers += 1
                scan.in_corrupt_run = True
                raise
            scan.saw_end_marker = False
            scan.in_corrupt_run = False
            return member

    return RecordingTarInfo


def iter_tar_samples(
    url: str, skips: SkipCounter, wanted: Callable[[str], bool] = lambda extension: True
) -> Iterator[dict[str, Any]]:
    """Streams one shard as samples: `{"__key__", "__url__", extension: bytes, ...}`.

    Consecutive members with the same key form a sample. Only members whose extension
    `wanted` accepts are read (stage 1 leaves the images of image-text shards unread).
    Problems are counted in `skips` and never raised: `unreadable_shard` (cannot open, not a
    tar), `corrupt_member` (unparseable header; reading resumes at the next good header),
    `truncated_tar` (data ends inside a member or without the end-of-archive marker; the
    sample being read is dropped).
    """
    scan = _HeaderScan()
    finished = False
    key = ""
    try:
        stream = wds.gopen(url)
    except SHARD_READ_ERRORS as error:
        skips.skip("unreadable_shard", url, "", f"cannot open: {error}")
        return
    try:
        try:
            tar = tarfile.open(
                fileobj=stream, mode="r|*", ignore_zeros=True, tarinfo=_tarinfo_class(scan)
            )
        except SHARD_READ_ERRORS as error:
            skips.skip("unreadable_shard", url, "", f"not a readable tar: {error}")
            return
        sample: dict[str, Any] = {}
        try:
            while (member := tar.next()) is not None:
                tar.members = []  # stream mode keeps every TarInfo otherwise
                if scan.corrupt_headers:
                    skips.skip("corrupt_member", url, key, "unreadable tar header after this key")
                    scan.corrupt_headers = 0
                parts = split_member_name(member.name)
                if not member.isfile() or parts is None or not wanted(parts[1]):
                    continue
                key, extension = parts
                if sample and sample["__key__"] != key:
                    yield sample
                    sample = {}
                sample.setdefault("__key__", key)
                sample.setdefault("__url__", url)
                sample[extension] = tar.extractfile(member).read()
        except SHARD_READ_ERRORS as error:
            skips.skip("truncated_tar", url, key, f"read failed: {error}")
            return
        if scan.corrupt_headers:
            skips.skip("corrupt_member", url, key, "unreadable tar header after this key")
        if not scan.saw_end_marker:
            # The sample in progress may lack members that were cut off; drop it.
            skips.skip("truncated_tar", url, key, "archive ends without end-of-archive marker")
            return
        if sample:
            yield sample
        finished = True
    finally:
        try:
            stream.close()
        except OSError as error:
            # A `pipe:` command that exits non-zero after a complete tar is still suspect;
            # one we cut short ourselves (stream abandoned) is expected to complain.
            if finished:
                skips.skip("unreadable_shard", url, "", f"closing failed: {error}")


# ----------------------------------------------------------------------------- combinators


def mix_streams(
    streams: Sequence[Iterator[T]], weights: Sequence[float], rng: random.Random
) -> Iterator[T]:
    """Interleaves infinite streams, drawing the stream of every item by weight."""
    if len(streams) == 1:
        yield from streams[0]
        return
    indices = range(len(streams))
    while True:
        yield next(streams[rng.choices(indices, weights=weights)[0]])


def shuffled(stream: Iterable[T], buffer_size: int, rng: random.Random) -> Iterator[T]:
    """Shuffle buffer: yields a random buffered item once the buffer is full."""
    if buffer_size <= 1:
        yield from stream
        return
    buffer: list[T] = []
    for item in stream:
        if len(buffer) < buffer_size:
            buffer.append(item)
            continue
        index = rng.randrange(buffer_size)
        buffer[index], item = item, buffer[index]
        yield item
    rng.shuffle(buffer)
    yield from buffer


def batched(stream: Iterable[T], batch_size: int, keep_partial: bool) -> Iterator[list[T]]:
    """Groups items into lists of `batch_size`; the last short list only if `keep_partial`."""
    batch: list[T] = []
    for item in stream:
        batch.append(item)
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch and keep_partial:
        yield batch


def batches_with_skips(
    stream: Iterable[T],
    batch_size: int,
    keep_partial: bool,
    skips: "SkipCounter",
    collate: Callable[[list[T], dict[str, int]], dict[str, Any]],
) -> Iterator[dict[str, Any]]:
    """Collated batches, each carrying the skip counts since the previous one.

    Each batch is held back until the next one is ready, so skips met after the last items
    of a finite stream (a truncated final shard, say) still ride on its last batch.
    """
    pending: list[T] | None = None
    for group in batched(stream, batch_size, keep_partial):
        if pending is not None:
            yield collate(pending, skips.take())
        pending = group
    if pending is not None:
        yield collate(pending, skips.take())


def even_share(batches: Iterable[dict[str, Any]], consumer: Consumer) -> Iterator[dict[str, Any]]:
    """This consumer's share of batches every consumer formed alike, in equal numbers.

    Consumer i keeps batches i, i + C, ...; at the end every consumer has seen the total and
    tops its share up to ceil(total / C) with copies of its last batch flagged
    `padding=True` (steps run them, metrics skip them). Under FSDP every rank must run as
    many forward passes as the others (each pass gathers weights from all ranks), so its
    validation cannot end one batch early on one rank. Skip counts ride on the batch they
    came with, so each is reported once, by the consumer that keeps it.
    """
    total, kept, last = 0, 0, None
    for index, batch in enumerate(batches):
        total += 1
        if index % consumer.count == consumer.index:
            kept += 1
            yield batch
        last = batch
    for _ in range(-(-total // consumer.count) - kept):
        yield {**last, "padding": True, "skipped": {}}


class ShardStream(IterableDataset):
    """What the text and image-text streams share: their sources and batching settings, the
    rank they read for, and batches finished in the worker (skip counts, tokens).

    A subclass sets `tokenized_fields` (tokenizer role -> the batch field it reads, or a tuple
    of fields the tokenizer takes in that order) and
    implements `__iter__` and `_collate_items` (items -> batch dict).
    """

    tokenized_fields: Mapping[str, str | tuple[str, ...]] = {}

    def __init__(
        self,
        sources: Sequence[ShardSource],
        *,
        batch_size: int,
        seed: int,
        shuffle_buffer: int,
        tokenizers: Mapping[str, Tokenizer] | None,
        rank: int,
        world_size: int,
        even_batches: bool = False,
    ) -> None:
        super().__init__()
        self.even_batches = even_batches  # finite streams: the same number of batches per consumer
        self.sources = list(sources)
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle_buffer = shuffle_buffer
        self.tokenizers = dict(tokenizers or {})
        self.rank = rank
        self.world_size = world_size

    def _collate_items(self, items: list[Any]) -> dict[str, Any]:
        raise NotImplementedError

    def _consumers(self, train: bool) -> tuple[Consumer, Consumer]:
        """(who reads, who this is): with `even_batches`, a finite stream is read whole by
        every consumer and shared out by `even_share` after batching."""
        consumer = Consumer.current(self.rank, self.world_size)
        return (Consumer() if self.even_batches and not train else consumer), consumer

    def _share(self, batches: Iterator[dict[str, Any]], train: bool, consumer: Consumer) -> Iterator[dict[str, Any]]:
        return even_share(batches, consumer) if self.even_batches and not train else batches

    def _collate(self, items: list[Any], skipped: dict[str, int]) -> dict[str, Any]:
        batch = self._collate_items(items)
        batch["skipped"] = skipped
        for role, tokenize in self.tokenizers.items():
            fields = self.tokenized_fields[role]  # one field, or several passed in order
            batch[f"{role}_tokens"] = tokenize(*(batch[f] for f in ((fields,) if isinstance(fields, str) else fields)))
        return batch


# ----------------------------------------------------------------------------- datamodule base


class ShardDataModule(L.LightningDataModule):
    """What the text and image-text datamodules share: train/val shard sources, batch sizes,
    workers, tokenizers run in the workers, and DataLoaders over worker-batched streams.

    A subclass names its `tokenizer_roles` and `source_kind` (for log lines), and implements
    `_stream` (the IterableDataset for one split) and `_split_summary` (its log line).
    """

    tokenizer_roles: tuple[str, ...] = ()
    source_kind = "shard"

    def __init__(
        self,
        train: Mapping[str, Any] | DictConfig,
        val: Mapping[str, Any] | DictConfig | None,
        batch_size: int,
        val_batch_size: int | None,
        num_workers: int,
        shuffle_buffer: int,
        seed: int,
    ):
        super().__init__()
        if batch_size < 1 or (val_batch_size is not None and val_batch_size < 1):
            raise ValueError(f"batch sizes must be >= 1, got {batch_size} / {val_batch_size}")
        self.train_spec = to_plain(train)
        self.val_spec = to_plain(val)
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size or batch_size
        self.num_workers = num_workers
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.tokenizers: dict[str, Tokenizer] = {}
        self.train_sources: list[ShardSource] | None = None
        self.val_sources: list[ShardSource] | None = None
        # FSDP: every rank must get as many validation batches as the others (`even_share`).
        self.even_val_batches = False

    def set_tokenizers(self, tokenizers: Mapping[str, Tokenizer] | None) -> None:
        """Attaches the tokenizers applied in the workers; call before the dataloaders are built."""
        tokenizers = dict(tokenizers or {})
        unknown = sorted(set(tokenizers) - set(self.tokenizer_roles))
        if unknown:
            raise ValueError(f"unknown tokenizer role(s) {unknown}; known: {list(self.tokenizer_roles)}")
        self.tokenizers = tokenizers

    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit") and self.train_sources is None:
            self.train_sources = parse_sources(self.train_spec)
            self._log_sources("train", self.train_sources)
        if stage in (None, "fit", "validate") and self.val_sources is None and self.val_spec is not None:
            self.val_sources = parse_sources(self.val_spec)
            self._log_sources("val", self.val_sources)

    def _log_sources(self, split: str, sources: list[ShardSource]) -> None:
        for source in sources:
            rank_zero_info(
                f"{split} {self.source_kind} shards: {len(source.urls)} from {source.pattern} "
                f"(weight {source.weight})"
            )
        rank_zero_info(self._split_summary(split))

    def _split_summary(self, split: str) -> str:
        """The log line after a split's sources: its batch size, workers and options."""
        raise NotImplementedError

    def train_dataloader(self) -> DataLoader:
        if self.train_sources is None:
            self.setup("fit")
        return self._loader(self.train_sources, train=True)

    def val_dataloader(self) -> DataLoader | list:
        """The finite validation stream: each sample once across ranks and workers; iterate
        it directly for a 'seen once' check."""
        if self.val_spec is None:
            return []  # Lightning skips validation for an empty list
        if self.val_sources is None:
            self.setup("validate")
        return self._loader(self.val_sources, train=False)

    def _loader(self, sources: list[ShardSource], *, train: bool) -> DataLoader:
        rank, world_size = group_rank_and_world()
        batch_size = self.batch_size if train else self.val_batch_size
        stream = self._stream(sources, train=train, batch_size=batch_size, rank=rank, world_size=world_size)
        stream.even_batches = self.even_val_batches and not train
        # batch_size=None: the workers already return whole batches.
        return DataLoader(
            stream,
            batch_size=None,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def _stream(
        self, sources: list[ShardSource], *, train: bool, batch_size: int, rank: int, world_size: int
    ) -> IterableDataset:
        """The dataset yielding whole batches of one split, built on the main process."""
        raise NotImplementedError
