"""`ShardDataModule`: the LightningDataModule plumbing the text (stage 1) and image-text
(stages 2-3) datamodules share; a subclass only says how to build its stream."""
from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from collections.abc import Mapping
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from omegaconf import DictConfig
from torch.utils.data import DataLoader, IterableDataset

from datamodules.skips import FILTER_REASONS, sum_over_ranks
from datamodules.sources import ShardSource, parse_sources
from datamodules.streams import Tokenizer, check_position
from datamodules.tar_reading import count_samples
from linguadiff.config import to_plain
from linguadiff.distributed import gather_objects, group_rank_and_world

logger = logging.getLogger(__name__)


class NextPromptsLoader(DataLoader):
    """A DataLoader whose batches also carry the next batch's tokens (`speed.encode_ahead`,
    linguadiff/models/encode_ahead.py): read one batch ahead in the main process, where the
    order of the workers' batches is known."""

    def __iter__(self):
        from linguadiff.models.encode_ahead import with_next_prompts

        return with_next_prompts(super().__iter__())


class ShardDataModule(L.LightningDataModule):
    """What the text and image-text datamodules share: train/val shard sources, batch sizes,
    workers, tokenizers run in the workers, and DataLoaders over worker-batched streams.

    A subclass names its `tokenizer_roles` and `source_kind` (for log lines), and implements
    `_stream` (the IterableDataset for one split) and `_split_summary` (its log line).
    """

    tokenizer_roles: tuple[str, ...] = ()
    source_kind = "shard"
    filter_reasons = FILTER_REASONS  # skip reasons that are settings, not bad input

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
        self._unsynced_skips: Counter[str] = Counter()  # this rank's, since the last sum over ranks
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
        # speed.encode_ahead: each training batch also carries the next one's tokens (NextPromptsLoader).
        self.next_prompts = False
        # Where this rank's training stream stands after the last batch a step took: the
        # position of every DataLoader worker and whose batch comes next (`state_dict`).
        self._stream_seed = seed
        self._positions: dict[int, dict[str, Any]] = {}
        self._next_worker = 0
        self._taken: dict[str, Any] | None = None  # the position after the batch a step is working on
        self._saved_streams: list[dict[str, Any]] | None = None  # from the checkpoint resumed
        self._stream_placed = False  # the first training loader was placed (resumed or reseeded)

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

    def samples_per_epoch(self) -> int | None:
        """Samples in one pass over the training shards, when that is cheap to know, else None.

        Summed over the sources from img2dataset's `*_stats.json` or the headers of a few local
        shards (`count_samples`); None before `setup("fit")` or when any source is remote or
        unlabelled. What the progress callback turns into steps per epoch.
        """
        counts = [count_samples(source.urls) for source in self.train_sources or []]
        return sum(counts) if counts and all(count is not None for count in counts) else None

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
        if train:
            self._resume_stream(sources, rank, world_size)
        stream = self._stream(sources, train=train, batch_size=batch_size, rank=rank, world_size=world_size)
        stream.even_batches = self.even_val_batches and not train
        if train:
            stream.seed = self._stream_seed
            stream.resume_positions, stream.first_worker = dict(self._positions), self._next_worker
        # batch_size=None: the workers already return whole batches. The loader's own
        # generator: starting its workers draws a seed, which from the global generator would
        # shift the training noise by where Lightning happens to start the iterator (not the
        # same place in a resumed run). The streams draw from generators of their own.
        return (NextPromptsLoader if train and self.next_prompts else DataLoader)(
            stream,
            batch_size=None,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
            generator=torch.Generator().manual_seed(int(self._stream_seed)),
        )

    # ------------------------------------------------------------ where the stream stands

    def _stream_fingerprint(self, sources: list[ShardSource], world_size: int) -> str:
        """What a saved stream position is only valid for: the shards and their weights, the
        shuffle block and how the data is split (ranks x workers)."""
        identity = [[(list(source.urls), source.weight) for source in sources], self.shuffle_buffer,
                    world_size, max(1, self.num_workers)]
        extra = self._fingerprint_extra()
        if extra is not None:
            identity.append(extra)
        return hashlib.sha256(json.dumps(identity).encode()).hexdigest()[:16]

    def _fingerprint_extra(self) -> Any:
        """More that a subclass's saved positions are only valid for (plain types; None: nothing)."""
        return None

    def state_dict(self) -> dict[str, Any]:
        """Every rank's training-stream position (gathered: rank 0 writes the checkpoint), in
        plain types: Lightning reads checkpoints with `weights_only`."""
        if self.train_sources is None:
            return {}
        rank, world_size = group_rank_and_world()
        mine = {"fingerprint": self._stream_fingerprint(self.train_sources, world_size), "seed": self._stream_seed,
                "workers": dict(self._positions), "next_worker": self._next_worker}
        return {"train_streams": gather_objects(mine)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        streams = state_dict.get("train_streams") if isinstance(state_dict, Mapping) else None
        self._saved_streams = list(streams) if isinstance(streams, (list, tuple)) else None

    def _resume_stream(self, sources: list[ShardSource], rank: int, world_size: int) -> None:
        """Puts this rank's training stream where the checkpoint resumed left it, or, when the
        checkpoint cannot say (older checkpoint, other shards, ranks or workers, a position
        that does not parse), reseeds it from the step so that a resumed run does not replay
        the samples it began with. Once per run: a loader built again later goes on from the
        last finished step."""
        if self._stream_placed:
            return
        self._stream_placed = True
        trainer = getattr(self, "trainer", None)
        step = int(getattr(trainer, "global_step", 0) or 0) if trainer is not None else 0
        saved, problem = self._saved_streams, None
        self._saved_streams = None
        if saved is None:
            problem = "the checkpoint holds no data-stream position (written by an older version)"
        elif len(saved) != world_size:
            problem = f"the checkpoint's stream was read by {len(saved)} ranks, this run has {world_size}"
        elif not isinstance(saved[rank], Mapping) or saved[rank].get("fingerprint") != self._stream_fingerprint(
                sources, world_size):
            problem = "the shards, their weights, data.shuffle_buffer or data.num_workers changed"
        else:
            try:  # a checkpoint is a file like any other: check what the workers will parse
                mine = saved[rank]
                seed, next_worker = int(mine["seed"]), int(mine["next_worker"])
                positions = {int(worker): dict(state) for worker, state in dict(mine["workers"]).items()}
                for state in positions.values():
                    check_position(state, len(sources))
                if not 0 <= next_worker < max(1, self.num_workers):
                    raise ValueError(f"next worker {next_worker} of {self.num_workers}")
            except Exception as error:  # noqa: BLE001 - any malformed content is the same problem
                problem = f"its stream position does not parse: {type(error).__name__}: {str(error)[:200]}"
        if problem is None:
            self._stream_seed, self._positions, self._next_worker = seed, positions, next_worker
            rank_zero_info(f"train data: resuming the stream where step {step} left it")
        elif step > 0:
            self._stream_seed = int(self.seed) + step
            self._positions, self._next_worker = {}, 0
            if rank == 0:
                logger.warning("train data: cannot continue the stream exactly (%s); reading a stream reseeded "
                               "from step %d instead", problem, step)

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Takes the stream position off a training batch as a step takes it (batches are
        prefetched: the DataLoader's own position is ahead of the steps)."""
        position = batch.pop("stream_position", None) if isinstance(batch, dict) else None
        if position is not None:
            self._taken = position
        return batch

    def step_done(self) -> None:
        """The step that took the last batch has finished with it: from now on a checkpoint
        says the stream stands after that batch (`callbacks.StreamPosition` calls this)."""
        if self._taken is not None:
            position, self._taken = self._taken, None
            self._positions[int(position["worker"])] = position["state"]
            self._next_worker = (int(position["worker"]) + 1) % max(1, int(position["workers"]))

    def _stream(
        self, sources: list[ShardSource], *, train: bool, batch_size: int, rank: int, world_size: int
    ) -> IterableDataset:
        """The dataset yielding whole batches of one split, built on the main process."""
        raise NotImplementedError

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Sums the workers' skip counts over all ranks, so that `data/skipped_*` (logged by
        rank 0 from what the stage module adds up) covers the whole run, not rank 0's share.

        Only for training batches, where every rank runs the same steps. The sum is taken
        every `log_every_n_steps` steps (and at the last), not every step: reading the summed
        vector back waits for the device, which would stall the next step's launch each step;
        batches in between carry no counts and the totals come a few steps late (a kill
        loses at most that window of counts). Validation batches differ in number between
        ranks, so their counts stay per rank: they are to be gathered once at the end of the
        validation epoch (`linguadiff.distributed.gather_objects`) by whoever logs them."""
        trainer = getattr(self, "trainer", None)
        if trainer is None or not isinstance(batch, dict) or not isinstance(batch.get("skipped"), dict):
            return batch
        if not trainer.training or group_rank_and_world()[1] == 1:
            return batch
        self._unsynced_skips.update(batch["skipped"])
        step, every = int(getattr(trainer, "global_step", 0)), max(1, int(getattr(trainer, "log_every_n_steps", 1) or 1))
        last = step + 1 >= int(getattr(trainer, "max_steps", 0) or 0) > 0
        if step % every == 0 or last:  # the same steps on every rank: equal collective calls
            batch["skipped"] = sum_over_ranks(self._unsynced_skips, trainer.strategy.root_device)
            self._unsynced_skips = Counter()
        else:
            batch["skipped"] = {}
        return batch
