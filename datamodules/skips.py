"""Skipped inputs: counted by reason, warned about without flooding the log, and handed from
the DataLoader workers to the main process inside every batch."""
from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping

import torch

logger = logging.getLogger(__name__)

# Samples left out by a setting (data.min_aesthetic, data.min_size, language weights of 0):
# counted and plotted with the rest under data/skipped_*, but not bad input, so not warned
# about and not reported as skipped inputs in the progress log.
FILTER_REASONS = frozenset({"low_aesthetic", "too_small", "lang_excluded"})

# Every reason the readers count, in a fixed order: the vector summed over ranks. A reason
# missing here still counts on its own rank, as `other` in the sum (a test keeps it whole).
SKIP_REASONS = (
    # shards (datamodules.tar_reading)
    "unreadable_shard", "truncated_tar", "corrupt_member", "stalled_shard",
    # members and keys (datamodules.tar_reading)
    "member_too_large", "bad_member_name", "duplicate_key",
    # captions and json (datamodules.checks, text_shards, image_shards)
    "missing_caption", "empty_caption", "caption_too_long", "bad_encoding", "missing_parallel", "bad_json",
    "bad_metadata", "no_aesthetic",
    # images (image_shards)
    "missing_image", "empty_image", "bad_image", "image_format_not_allowed", "decompression_bomb",
    # cached features (cached, image_shards, scripts/cache_features.py)
    "bad_cache", "cache_mismatch", "odd_shape", "mixed_cache", "already_cached",
    # anything else raised while decoding one sample
    "bad_sample",
    # settings, not bad input (FILTER_REASONS)
    "low_aesthetic", "too_small", "lang_excluded",
)


def sum_over_ranks(counts: Mapping[str, int], device: torch.device | str = "cpu") -> dict[str, int]:
    """Skip counts summed over all ranks (one all_reduce of a fixed-length vector); the
    counts themselves outside distributed runs. Every rank must call it equally often
    (once per training batch: DDP runs as many steps on every rank)."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return dict(counts)
    names = (*SKIP_REASONS, "other")
    index = {name: i for i, name in enumerate(names)}
    vector = torch.zeros(len(names), dtype=torch.float64)
    for reason, count in counts.items():
        vector[index.get(reason, len(names) - 1)] += int(count)
    vector = vector.to(device)
    dist.all_reduce(vector)
    return {name: int(value) for name, value in zip(names, vector.tolist()) if value}


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
        self._muted = 0  # > 0 while inputs counted before a resume are read again

    def mute(self) -> None:
        """Stop counting until the matching `unmute` (nested calls nest): for samples a
        resumed stream reads again only to find its place, whose skips were counted before."""
        self._muted += 1

    def unmute(self) -> None:
        self._muted -= 1

    @classmethod
    def discarding(cls) -> SkipCounter:
        """A counter that records nothing: for consumers reading a shard another one reports."""
        return cls(enabled=False)

    def skip(self, reason: str, url: str, key: str, detail: str = "", warn: bool = True) -> None:
        if not self.enabled or self._muted:
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
