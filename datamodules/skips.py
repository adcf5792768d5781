"""Skipped inputs: counted by reason, warned about without flooding the log, and handed from
the DataLoader workers to the main process inside every batch."""
from __future__ import annotations

import logging
from collections import Counter

logger = logging.getLogger(__name__)

# Samples left out by a setting (data.min_aesthetic, data.min_size, language weights of 0):
# counted and plotted with the rest under data/skipped_*, but not bad input, so not warned
# about and not reported as skipped inputs in the progress log.
FILTER_REASONS = frozenset({"low_aesthetic", "too_small", "lang_excluded"})


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
