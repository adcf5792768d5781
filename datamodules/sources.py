"""Where shards come from: URLs as WebDataset writes them, weighted sources, language codes.

- `expand_urls`: brace ranges, local paths and globs (checked to exist), `pipe:` commands and
  remote URLs (kept as they are: only opening them tells whether they work).
- `parse_sources`: one set of URLs or several with relative weights, as the config gives them.
- `parse_language_weights`, `is_language_code`: which `KEY.<lang>.txt` / json fields hold
  captions per language, and how much each language counts in training.
"""
from __future__ import annotations

import glob
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

import braceexpand
from omegaconf import DictConfig

from linguadiff.config import to_plain


def is_local_url(url: str) -> bool:
    """Whether a shard URL names a local file (plain path or file:), not a stream or a command."""
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
            if not is_local_url(url):
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
