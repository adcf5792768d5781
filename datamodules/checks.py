"""Checks on the untrusted contents of one sample, shared by the text, image-text and cached
readers: every failure is a `BadSample` with a reason, which the streams count and skip.

Shards come from the web: a json can nest 100,000 deep or be a list, a caption can be a
megabyte of control characters, a size field can be a string or NaN. Bounds here are checked
before anything expensive (decoding, tokenizing, allocating) happens.
"""
from __future__ import annotations

import json
import math
import unicodedata
from typing import Any

# Longer captions are skipped (`caption_too_long`) before decoding or tokenizing: CLIP reads
# 77 tokens, LLMs a few hundred; 10,000 characters is far past any real caption.
MAX_CAPTION_CHARS = 10_000
# A sample's json (img2dataset metadata) is a few hundred bytes; bigger ones are refused.
MAX_JSON_BYTES = 1 << 20
# Image sides recorded in a json beyond this are not real sizes (`bad_metadata`).
MAX_RECORDED_SIDE = 1 << 20


class BadSample(Exception):
    """Raised while building an example: the sample is skipped and counted under `reason`."""

    def __init__(self, reason: str, detail: str = "", warn: bool = True):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
        self.warn = warn


def read_json(payload: bytes, max_bytes: int = MAX_JSON_BYTES) -> dict[str, Any]:
    """A sample's json as a dict; anything else (too big, not UTF-8, malformed, nested too
    deep, not an object) is `bad_json`."""
    if len(payload) > max_bytes:
        raise BadSample("bad_json", f"{len(payload)} bytes > {max_bytes}")
    try:
        meta = json.loads(payload.decode("utf-8"))
    except Exception as error:  # noqa: BLE001 - ValueError, UnicodeDecodeError, RecursionError, ...
        raise BadSample("bad_json", f"{type(error).__name__}: {str(error)[:200]}") from None
    if not isinstance(meta, dict):
        raise BadSample("bad_json", f"expected an object, got {type(meta).__name__}")
    return meta


def caption_text(payload: bytes | str, max_chars: int = MAX_CAPTION_CHARS) -> str:
    """A caption as clean text: UTF-8 (`bad_encoding`), at most `max_chars` characters
    (`caption_too_long`, checked on the bytes before decoding too), control characters as
    spaces, stripped; "" when nothing visible is left (the caller decides if that is fatal).
    """
    if len(payload) > (4 * max_chars if isinstance(payload, bytes) else max_chars):
        raise BadSample("caption_too_long", f"{len(payload)} > {max_chars} characters")
    if isinstance(payload, bytes):
        try:
            payload = payload.decode("utf-8")
        except UnicodeDecodeError as error:
            raise BadSample("bad_encoding", str(error)) from None
    if len(payload) > max_chars:
        raise BadSample("caption_too_long", f"{len(payload)} > {max_chars} characters")
    text = "".join(" " if unicodedata.category(ch) in ("Cc", "Cs") else ch for ch in payload)
    text = text.strip()
    if not any(not ch.isspace() and unicodedata.category(ch) not in ("Cf", "Zs", "Zl", "Zp") for ch in text):
        return ""
    return text


def metadata_number(meta: dict[str, Any], name: str, low: float = -math.inf, high: float = math.inf) -> float | None:
    """A json number field: None when absent or null; a string, bool, NaN, infinity or a
    value outside [low, high] is `bad_metadata` (a broken record, not a missing one)."""
    value = meta.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BadSample("bad_metadata", f"{name}={str(value)[:50]!r} is not a number")
    try:
        number = float(value)
    except OverflowError:
        raise BadSample("bad_metadata", f"{name} is out of range") from None
    if not math.isfinite(number) or not low <= number <= high:
        raise BadSample("bad_metadata", f"{name}={number} is not in [{low}, {high}]")
    return number
