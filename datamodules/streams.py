"""Streams of samples and batches, from shards to what a DataLoader worker returns.

- `Consumer` / `iter_consumer_samples`: which shards and samples one (rank, DataLoader worker)
  reads, for a finite stream (each sample exactly once across all consumers) or an infinite
  one (shards reshuffled every pass).
- `mix_streams`, `TrainingOrder`, `batched`, `batches_with_skips`, `even_share`: the small
  stream combinators the datamodules chain; the batching hands skip counts to the main
  process inside every batch.
- `ShardStream`: the IterableDataset both the text and image-text streams build on. Its
  training batches carry the stream's position after them (`stream_position`), so that a
  checkpoint can say where the data stream stood at its step and a resumed run reads on
  from exactly there.
"""
from __future__ import annotations

import itertools
import random
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any, TypeVar

import torch
from torch.utils.data import IterableDataset

from datamodules.skips import SkipCounter
from datamodules.sources import ShardSource
from datamodules.tar_reading import iter_tar_samples

T = TypeVar("T")

# Runs in the DataLoader workers: a list of texts -> token tensors.
Tokenizer = Callable[[list[str]], dict[str, torch.Tensor]]


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


class NoUsableData(RuntimeError):
    """A training stream read a full pass of its data without one usable sample."""


def describe_failure(urls: Sequence[str], skips: SkipCounter) -> str:
    """The shards (a few) and the most common skip reasons, for an error message."""
    shards = ", ".join(repr(url) for url in list(urls)[:3]) + (f" and {len(urls) - 3} more" if len(urls) > 3 else "")
    reasons = ", ".join(f"{reason} x{count}" for reason, count in skips.totals.most_common(5)) or "none counted"
    return f"shards {shards}; top skip reasons: {reasons}"


class UsableGuard:
    """Turns an infinite stream that never yields a usable item into an error.

    The readers report each full pass over a source's shards (`pass_done`, with the number
    of raw samples this consumer read in it) and the stream reports every item it rejects
    or accepts. Once every source has completed a pass and more items were rejected in a row
    than two passes over all of them hold (plus the shuffle buffer, which delays decoding),
    no pass can give a usable item: raise `NoUsableData` naming the shards and the top skip
    reasons instead of spinning in silence for days.
    """

    def __init__(self, sources: Sequence[Sequence[str]], skips: SkipCounter, slack: int = 0):
        self.urls = [url for urls in sources for url in urls]
        self.skips = skips
        self.slack = slack
        self.pass_sizes: list[int | None] = [None] * len(sources)
        self.rejected_in_a_row = 0

    def pass_done(self, source_index: int, raw_samples: int) -> None:
        self.pass_sizes[source_index] = raw_samples

    def accepted(self) -> None:
        self.rejected_in_a_row = 0

    def rejected(self) -> None:
        self.rejected_in_a_row += 1
        if any(size is None for size in self.pass_sizes):
            return
        if self.rejected_in_a_row > 2 * sum(self.pass_sizes) + self.slack:
            raise NoUsableData(
                f"no usable sample in {self.rejected_in_a_row} samples read in a row, more than two full "
                f"passes over the data: {describe_failure(self.urls, self.skips)}"
            )


@dataclass
class ReadPosition:
    """Where one consumer's reader of one source stands: enough to read on from there.

    Plain ints, so that it goes into checkpoints (`weights_only`) and through the
    DataLoader's worker queue with every batch.
    """

    pass_index: int = 0
    shard: int = 0  # index into this consumer's shards of the pass
    sample: int = 0  # samples read from that shard (every one of them in the sample split)
    index: int = 0  # running index of the sample split, over all shards and passes
    yielded_in_pass: int = 0


def consumer_shards(urls: Sequence[str], consumer: Consumer, seed: int | str, pass_index: int,
                    infinite: bool) -> list[str]:
    """The shards `consumer` reads in pass `pass_index`, in order (`iter_consumer_samples`)."""
    order = list(urls)
    if infinite:
        random.Random(f"{seed}:{pass_index}").shuffle(order)
    return order if len(urls) < consumer.count else order[consumer.index :: consumer.count]


def read_back(
    urls: Sequence[str],
    consumer: Consumer,
    seed: int | str,
    places: Sequence[tuple[int, int, int]],
    wanted: Callable[[str], bool] = lambda extension: True,
) -> dict[tuple[int, int, int], dict[str, Any]]:
    """The raw samples an infinite `iter_consumer_samples` read at `places` ((pass, shard,
    sample) as its `ReadPosition` stood right after each), reading each shard once. Problems
    were counted on the first reading; a place no longer there is left out."""
    wanted_places: dict[tuple[int, int], set[int]] = {}
    for pass_index, shard, sample in places:
        wanted_places.setdefault((pass_index, shard), set()).add(sample)
    found: dict[tuple[int, int, int], dict[str, Any]] = {}
    for (pass_index, shard), samples in sorted(wanted_places.items()):
        shards = consumer_shards(urls, consumer, seed, pass_index, True)
        if shard >= len(shards):
            continue
        last = max(samples)
        for number, sample in enumerate(iter_tar_samples(shards[shard], SkipCounter.discarding(), wanted), 1):
            if number in samples:
                found[(pass_index, shard, number)] = sample
            if number >= last:
                break
    return found


def iter_consumer_samples(
    urls: Sequence[str],
    consumer: Consumer,
    skips: SkipCounter,
    *,
    infinite: bool,
    seed: int | str = 0,
    wanted: Callable[[str], bool] = lambda extension: True,
    on_pass: Callable[[int], None] | None = None,
    position: ReadPosition | None = None,
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
    differ in their own shuffles downstream. In sample mode the running index goes on
    across passes, so even with fewer samples than consumers each consumer gets data
    (in a later pass) instead of spinning forever.

    `position`, when given, is where to start and is kept up to date as samples are
    yielded (a resumed stream passes the one saved with its last batch): the shard it names
    is read again from its start, without yielding or counting, up to the samples already
    read. Shard-level problems (unreadable, truncated, corrupt headers) are counted once:
    in sample mode only by the consumer that would own the shard under the shard split.
    `on_pass` is called after every full pass with the number of samples this consumer got
    in it.
    """
    by_sample = len(urls) < consumer.count
    silent = SkipCounter.discarding()
    position = position if position is not None else ReadPosition()
    start = replace(position)
    shards_ever_read: set[str] = set()
    source_has_samples = False
    for pass_index in itertools.count(start.pass_index) if infinite else (0,):
        my_shards = consumer_shards(urls, consumer, seed, pass_index, infinite)
        resuming = pass_index == start.pass_index
        position.pass_index = pass_index
        if not resuming:
            position.yielded_in_pass = 0
        for shard_position in range(start.shard if resuming else 0, len(my_shards)):
            url = my_shards[shard_position]
            shards_ever_read.add(url)
            owns_shard = not by_sample or shard_position % consumer.count == consumer.index
            counter = skips if owns_shard else silent
            already_read = start.sample if resuming and shard_position == start.shard else 0
            position.shard, position.sample = shard_position, 0
            muted = already_read > 0  # their problems were counted when they were first read
            if muted:
                counter.mute()
            try:
                for sample in iter_tar_samples(url, counter, wanted):
                    source_has_samples = True
                    position.sample += 1
                    if position.sample <= already_read:
                        if position.sample == already_read:
                            counter.unmute()
                            muted = False
                        continue
                    keep = not by_sample or position.index % consumer.count == consumer.index
                    position.index += 1
                    if keep:
                        position.yielded_in_pass += 1
                        yield sample
            finally:
                if muted:
                    counter.unmute()
        if on_pass is not None:
            on_pass(position.yielded_in_pass)
        if infinite and not source_has_samples and len(shards_ever_read) == len(set(urls)):
            # Every shard has been tried and none holds a sample: looping on would hang.
            raise NoUsableData(
                f"no readable sample in any of the {len(urls)} shards "
                f"(consumer {consumer.index} of {consumer.count}): {describe_failure(urls, skips)}"
            )


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


class TrainingOrder:
    """One consumer's training items: its sources mixed by weight, shuffled in blocks.

    Items are read `block_size` at a time (drawing the source of each by weight) and each
    block is yielded in a random order drawn from (seed, consumer, block number). Unlike a
    rolling shuffle buffer, whose content is the whole history of the stream, the place in
    this order is a few numbers (`state()`): the sources' read positions and the mixing
    generator where the current block began, the block's number and how many of its items
    were taken. A resumed stream reads that one block again and goes on with exactly the
    items the uninterrupted one would have given, for the cost of re-reading one block.

    `open_sources(positions)` gives one item iterator per source that starts at, and keeps
    updating, the `ReadPosition` it is handed. `skips` is muted while a resumed block is
    read again: its skips were counted the first time.
    """

    def __init__(
        self,
        open_sources: Callable[[list[ReadPosition]], list[Iterator[T]]],
        weights: Sequence[float],
        block_size: int,
        seed: int | str,
        skips: SkipCounter,
        state: Mapping[str, Any] | None = None,
    ) -> None:
        self.open_sources = open_sources
        self.weights = list(weights)
        self.block_size = max(1, block_size)
        self.seed = seed
        self.skips = skips
        self._resume = dict(state) if state else None
        self._start: dict[str, Any] = {}
        self._block, self._taken = 0, 0

    def state(self) -> dict[str, Any]:
        """Where the next item comes from (plain types: see `ReadPosition`)."""
        return {**self._start, "block": self._block, "taken": self._taken}

    def __iter__(self) -> Iterator[T]:
        resume = self._resume or {}
        positions = [ReadPosition(**saved) for saved in resume.get("positions", ())] or [
            ReadPosition() for _ in self.weights
        ]
        if len(positions) != len(self.weights):
            raise ValueError(f"a stream position for {len(positions)} sources, this stream has {len(self.weights)}")
        mix_rng = random_from(f"{self.seed}:mix", resume.get("mix_rng"))
        block, taken = int(resume.get("block", 0)), int(resume.get("taken", 0))
        mixed = mix_streams(self.open_sources(positions), self.weights, mix_rng)
        while True:
            self._start = {"positions": [asdict(position) for position in positions], "mix_rng": mix_rng.getstate()}
            if taken:
                self.skips.mute()
            try:
                items = list(itertools.islice(mixed, self.block_size))
            finally:
                if taken:
                    self.skips.unmute()
            order = list(range(len(items)))
            random.Random(f"{self.seed}:block:{block}").shuffle(order)
            for index in range(taken, len(items)):
                self._block, self._taken = block, index + 1
                yield items[order[index]]
            if len(items) < self.block_size:
                return
            block, taken = block + 1, 0


def check_position(state: Mapping[str, Any], sources: int) -> None:
    """Raises ValueError/TypeError unless `state` is a training position (`ShardStream._resumable_batches`) of a
    stream of `sources` sources that the workers can parse."""
    order = state.get("order") or {}
    positions = order.get("positions", [])
    if positions and len(positions) != sources:
        raise ValueError(f"a position for {len(positions)} sources, the stream has {sources}")
    for position in positions:
        if not all(isinstance(value, int) and value >= 0 for value in asdict(ReadPosition(**position)).values()):
            raise ValueError(f"read position {position!r}")
    for saved in (order.get("mix_rng"), state.get("sample_rng")):
        if saved is not None:
            random_from(0, saved)
    if not all(isinstance(order.get(name, 0), int) and order.get(name, 0) >= 0 for name in ("block", "taken")):
        raise ValueError(f"block {order.get('block')!r}, taken {order.get('taken')!r}")
    for bucket in state.get("buckets") or ():  # [h, w, [[source, pass, shard, sample], ...]]
        height, width, places = bucket
        if not all(isinstance(v, int) and v > 0 for v in (height, width)):
            raise ValueError(f"bucket {height!r} x {width!r}")
        for place in places:
            if not (len(place) == 4 and all(isinstance(v, int) and v >= 0 for v in place) and place[0] < sources):
                raise ValueError(f"buffered sample at {place!r}")


def random_from(seed: int | str, saved: Sequence[Any] | None = None) -> random.Random:
    """A generator seeded with `seed`, or in the state `saved` (a `getstate()` that went
    through a checkpoint) when there is one."""
    rng = random.Random(seed)
    if saved is not None:
        version, internal, gauss = saved
        rng.setstate((int(version), tuple(int(value) for value in internal), gauss))
    return rng


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
    skips: SkipCounter,
    collate: Callable[[list[T], SkipCounter], dict[str, Any]],
) -> Iterator[dict[str, Any]]:
    """Collated batches, each carrying the skip counts since the previous one.

    With `keep_partial` (finite streams) each batch is held back until the next one is
    ready, so skips met after the last items of a finite stream (a truncated final shard, say) still ride on its last batch. `collate`
    gets the counter itself: samples it drops (a mixed batch) ride on the same batch.
    """
    if not keep_partial:  # an endless training stream: nothing comes after the last batch
        for group in batched(stream, batch_size, keep_partial):
            yield collate(group, skips)
        return
    pending: list[T] | None = None
    for group in batched(stream, batch_size, keep_partial):
        if pending is not None:
            yield collate(pending, skips)
        pending = group
    if pending is not None:
        yield collate(pending, skips)


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
        # A resumed training stream: each DataLoader worker's saved position (by the worker
        # it was saved from) and the worker whose batch comes next (see `training_consumer`).
        self.resume_positions: dict[int, dict[str, Any]] = {}
        self.first_worker = 0

    def training_consumer(self) -> Consumer:
        """The consumer this training worker plays. A DataLoader takes batches from its
        workers in turn, starting with worker 0; a resumed stream must start with the worker
        whose turn was next when the checkpoint was taken, so worker w plays the saved
        worker (w + first_worker) % workers: its shards, generators and position."""
        physical = Consumer.current(self.rank, self.world_size)
        return replace(physical, worker_id=(physical.worker_id + self.first_worker) % physical.num_workers)

    def _resumable_batches(
        self,
        skips: SkipCounter,
        open_source: Callable[[int, Consumer, ReadPosition], Iterator[Any]],
        to_items: Callable[[TrainingOrder, random.Random], Iterator[Any]],
        grouped: bool = False,
    ) -> Iterator[dict[str, Any]]:
        """Endless full training batches, each carrying the stream's position after it
        (`stream_position`, plain types); a resumed stream starts where `resume_positions`
        says. `open_source(index, consumer, position)` gives one source's items from
        `position` on; `to_items(order, rng)` turns the training order into what `_collate`
        batches, drawing per-sample randomness from `rng` (this consumer's generator), or
        with `grouped` into the lists of items `_collate` takes as they are (`_extra_state`
        then holds whatever those lists are formed from)."""
        consumer = self.training_consumer()
        saved = self.resume_positions.get(consumer.worker_id, {})
        self._restore_extra_state(saved)
        # Per-consumer randomness: workers and ranks must not shuffle or draw alike.
        seed = f"{self.seed}:{consumer.rank}:{consumer.worker_id}"
        rng = random_from(seed, saved.get("sample_rng"))
        order = TrainingOrder(
            lambda positions: [open_source(index, consumer, positions[index]) for index in range(len(self.sources))],
            [source.weight for source in self.sources], self.shuffle_buffer, seed, skips, saved.get("order"),
        )
        groups = to_items(order, rng) if grouped else batched(to_items(order, rng), self.batch_size, False)
        for group in groups:
            batch = self._collate(group, skips)
            state = {"order": order.state(), "sample_rng": rng.getstate(), **self._extra_state()}
            batch["stream_position"] = {"worker": consumer.worker_id, "workers": consumer.num_workers, "state": state}
            yield batch

    def _extra_state(self) -> dict[str, Any]:
        """More of a subclass's stream state to save with each position (plain types)."""
        return {}

    def _restore_extra_state(self, saved: Mapping[str, Any]) -> None:
        """Puts back what `_extra_state` saved."""

    def _collate_items(self, items: list[Any], skips: SkipCounter) -> dict[str, Any]:
        """Items -> batch dict; may drop (and count in `skips`) items that do not fit the batch."""
        raise NotImplementedError

    def _consumers(self, train: bool) -> tuple[Consumer, Consumer]:
        """(who reads, who this is): with `even_batches`, a finite stream is read whole by
        every consumer and shared out by `even_share` after batching."""
        consumer = Consumer.current(self.rank, self.world_size)
        return (Consumer() if self.even_batches and not train else consumer), consumer

    def _share(self, batches: Iterator[dict[str, Any]], train: bool, consumer: Consumer) -> Iterator[dict[str, Any]]:
        return even_share(batches, consumer) if self.even_batches and not train else batches

    def _collate(self, items: list[Any], skips: SkipCounter) -> dict[str, Any]:
        batch = self._collate_items(items, skips)
        batch["skipped"] = skips.take()
        for role, tokenize in self.tokenizers.items():
            fields = self.tokenized_fields[role]  # one field, or several passed in order
            batch[f"{role}_tokens"] = tokenize(*(batch[f] for f in ((fields,) if isinstance(fields, str) else fields)))
        return batch
