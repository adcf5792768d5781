"""Stages 2-3 image-text shards: square image crops, one caption each, batched in the workers.

Shards use the img2dataset layout: `KEY.jpg|jpeg|png|webp`, `KEY.txt` (caption) and an
optional `KEY.json` (`caption`; several captions as `captions`, a list or a dict per language
code whose values are a string or a list; `original_width`/`original_height` or
`width`/`height`; `aesthetic_score`, `AESTHETIC_SCORE` or `aesthetic`). As in stage 1,
`KEY.txt`, the json `caption` and a json `captions` list are English.

Per sample, in order of cost, so that rejected samples are never decoded:
1. json: the `min_size` / `min_aesthetic` filters (json sizes first, else the image header);
2. captions: one drawn per visit (language by the `languages` weights, then uniformly), or
   in validation the first English one; training replaces it with "" at `caption_dropout`
   (the unconditional branch classifier-free guidance needs; the paper's code had none);
3. image: PIL only (torchvision does not import beside our CPU torch), any mode to RGB with
   transparency on white, shorter side to `resolution` (Lanczos), square crop (random in
   training, centred in validation), CHW float in [-1, 1]. SDXL's micro-conditioning needs
   `original_size` (h, w) of the decoded image and `crop_top_left` (top, left) in the
   resized image, as SDXL's own training computes them.

Bad samples are skipped, counted per reason in the `SkipCounter` and warned about
(rate-limited, naming the shard and key), never fatal; each dropped sample is counted once,
under the first reason found:
`missing_image`, `empty_image`, `bad_image` (corrupt, truncated, unsupported),
`image_format_not_allowed` (a recognisable format outside `ALLOWED_FORMATS`),
`decompression_bomb`, `missing_caption`, `empty_caption`, `caption_too_long`,
`bad_encoding`, `bad_json`, `bad_metadata` (sizes or scores that are not sane numbers),
`no_aesthetic` (a threshold is set but the json has no score), `bad_cache`,
`cache_mismatch`, `odd_shape` / `mixed_cache` (dropped from a batch they do not fit),
`bad_sample` (any other error while decoding one sample), plus the shard and member
reasons of `datamodules.tar_reading`. Filters are configuration, not bad data, so `too_small`,
`low_aesthetic` and `lang_excluded` are counted without a warning.

Batch (a dict built inside the DataLoader worker): `image` float [B, 3, R, R], `caption`,
`lang` ("" for a dropped caption), `key` (lists of str), `original_size`, `crop_top_left`,
`target_size` (Long [B, 2], (h, w) / (top, left) / (R, R)), `aesthetic_score` (float [B],
nan when absent), `skipped` (reason -> count since this worker's previous batch) and, with
tokenizers, `student_tokens`.

Shards written by `scripts/cache_features.py` (datamodules/cached.py) are detected per
sample: `moments` (VAE latent distribution, [B, 2C, h, w]) replaces `image` for latent
bases (a pixel base's cached crop arrives as `image`), and `llm_states` / `llm_mask` (LLM
features of the drawn caption, [B, T, D] / [B, T]) come along when every sample of the
batch has them for this run's LLM settings. Cached crops are centred: no random crop or
flip, the cost of caching. Examples are plain dicts collated by value type
(`collate_examples`), so a decoder for a new member type (cached latents, LLM states) only
has to add a field.
"""
from __future__ import annotations

import io
import itertools
import logging
import math
import random
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig
from PIL import Image

from datamodules.cached import (
    CACHE_MEMBERS,
    EMPTY,
    LLM_STATES,
    META_KEY,
    MOMENTS,
    MOMENTS_DTYPES,
    PIXELS,
    PIXELS_DTYPES,
    caption_name,
    from_npy,
    pad_states,
    read_llm_npz,
    signature_difference,
)
from datamodules.checks import MAX_RECORDED_SIDE, BadSample, caption_text, metadata_number, read_json
from datamodules.datamodule import ShardDataModule
from datamodules.skips import SkipCounter
from datamodules.sources import ShardSource, parse_language_weights
from datamodules.streams import (
    Consumer,
    ReadPosition,
    ShardStream,
    Tokenizer,
    UsableGuard,
    batches_with_skips,
    iter_consumer_samples,
    read_back,
)
from linguadiff.buckets import nearest_bucket

logger = logging.getLogger(__name__)

# The order decides which image a sample with several is read from.
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "gif")
# The only image formats PIL is allowed to parse (`Image.open(formats=...)`).
ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "TIFF", "GIF")
# Leading bytes of formats refused on purpose, to name them in the skip reason.
OTHER_FORMAT_MAGIC = (
    (b"%!PS", "PostScript/EPS"), (b"\xc5\xd0\xd3\xc6", "EPS"), (b"8BPS", "PSD"), (b"\x00\x00\x01\x00", "ICO"),
    (b"\x00\x00\x02\x00", "CUR"), (b"<svg", "SVG"), (b"<?xml", "SVG/XML"), (b"%PDF", "PDF"),
    (b"\x00\x00\x00\x0cjP", "JPEG 2000"), (b"\xffO\xffQ", "JPEG 2000"), (b"DDS ", "DDS"), (b"icns", "ICNS"),
    (b"\x0a\x05\x01", "PCX"), (b"qoif", "QOI"), (b"\x59\xa6\x6a\x95", "Sun raster"), (b"gimp xcf", "XCF"),
    (b"P1", "PBM"), (b"P4", "PBM"), (b"P5", "PGM"), (b"P6", "PPM"), (b"BLP", "BLP"), (b"FORM", "IFF"),
)
# Aesthetic scores beyond this are not scores (`bad_metadata`).
MAX_SCORE = 1e6
MEMBER_EXTENSIONS = frozenset((*IMAGE_EXTENSIONS, "txt", "json", *CACHE_MEMBERS))
AESTHETIC_FIELDS = ("aesthetic_score", "AESTHETIC_SCORE", "aesthetic")
# json size fields, most trustworthy first: img2dataset's width/height are after its resize.
SIZE_FIELDS = (("original_width", "original_height"), ("width", "height"))
# Captions without a language (KEY.txt, json caption, json captions list), as in stage 1.
DEFAULT_LANGUAGE = "en"
# Tokenizer role -> the batch field it tokenizes; tokens land in `{role}_tokens`.
TOKENIZED_FIELDS = {"student": "caption"}
# Where PIL itself refuses an image by default (twice its Image.MAX_IMAGE_PIXELS).
DEFAULT_MAX_PIXELS = 178_956_970
# A training stream whose filters reject everything would otherwise spin in silence.
STALL_WARNING_EVERY = 10_000


def is_image_text_member(extension: str) -> bool:
    """The tar members read for stages 2-3; anything else in the shard stays unread."""
    return extension in MEMBER_EXTENSIONS


# ----------------------------------------------------------------------------- member decoders


def read_text(payload: bytes) -> str:
    """A caption member as clean text (`datamodules.checks.caption_text`)."""
    return caption_text(payload)


def caption_candidates(raw: Mapping[str, Any], meta: Mapping[str, Any]) -> dict[str, list[str]]:
    """Distinct non-empty captions per language, in file order: KEY.txt, json caption, captions.

    KEY.txt usually repeats the json caption; keeping one copy keeps the uniform draw fair.
    """
    found: list[tuple[str, Any]] = []
    if "txt" in raw:
        found.append((DEFAULT_LANGUAGE, read_text(raw["txt"])))
    if "caption" in meta:
        found.append((DEFAULT_LANGUAGE, meta["caption"]))
    listed = meta.get("captions")
    if isinstance(listed, list):
        found.extend((DEFAULT_LANGUAGE, text) for text in listed)
    elif isinstance(listed, Mapping):
        for code, texts in listed.items():
            found.extend((str(code), text) for text in (texts if isinstance(texts, list) else [texts]))
    if not found:
        raise BadSample("missing_caption", "no KEY.txt and no caption in the json")
    captions: dict[str, list[str]] = {}
    for code, text in found:
        text = caption_text(text) if isinstance(text, str) else ""  # json captions: other types ignored
        if text and text not in captions.get(code, ()):
            captions.setdefault(code, []).append(text)
    if not captions:
        raise BadSample("empty_caption", "every caption is empty")
    return captions


def aesthetic_score(meta: Mapping[str, Any]) -> float:
    """The json's aesthetic score, nan when it has none; a score that is not a sane number
    (a string, NaN, absurdly large) is `bad_metadata`."""
    for name in AESTHETIC_FIELDS:
        score = metadata_number(meta, name, -MAX_SCORE, MAX_SCORE)
        if score is not None:
            return score
    return math.nan


def recorded_size(meta: Mapping[str, Any]) -> tuple[int, int] | None:
    """(height, width) of the source image as the json records it, or None (absent, null
    or 0); a negative, huge, NaN or non-numeric size is `bad_metadata`."""
    for width_field, height_field in SIZE_FIELDS:
        width = metadata_number(meta, width_field, 0, MAX_RECORDED_SIDE)
        height = metadata_number(meta, height_field, 0, MAX_RECORDED_SIDE)
        if width and height:
            return int(height), int(width)
    return None


@contextmanager
def _pil_errors() -> Iterator[None]:
    """Turns what PIL raises on bad bytes into BadSample.

    PIL's format plugins raise many exception types on malformed input (OSError, ValueError,
    SyntaxError, struct.error, ...), so anything raised inside this block means bad bytes;
    keep only PIL calls in it. The `max_pixels` check in `open_image` replaces PIL's bomb
    warning (its threshold is half its error's), so that warning is silenced here.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            yield
    except Image.DecompressionBombError as error:
        raise BadSample("decompression_bomb", str(error)) from None
    except Exception as error:
        raise BadSample("bad_image", f"{type(error).__name__}: {error}") from None


def open_image(payload: bytes, max_pixels: int) -> Image.Image:
    """Reads the image header only (PIL decodes lazily) and refuses empty images and bombs.

    Only `ALLOWED_FORMATS` are tried, whatever the member's extension says: PIL's other
    plugins (EPS runs Ghostscript, PSD, ICO, ...) never see web bytes. A payload that is
    recognisably another format is `image_format_not_allowed`, anything else unreadable
    `bad_image`.
    """
    if not payload:
        raise BadSample("empty_image", "zero-byte image")
    try:
        with _pil_errors():
            image = Image.open(io.BytesIO(payload), formats=ALLOWED_FORMATS)
    except BadSample as bad:
        other = next((name for magic, name in OTHER_FORMAT_MAGIC if payload.lstrip()[:64].startswith(magic)), None)
        if bad.reason == "bad_image" and other:
            raise BadSample("image_format_not_allowed", f"{other} (allowed: {', '.join(ALLOWED_FORMATS)})") from None
        raise
    width, height = image.size
    if width <= 0 or height <= 0:
        raise BadSample("empty_image", f"size {width}x{height}")
    if width * height > max_pixels:
        raise BadSample("decompression_bomb", f"{width}x{height} is over max_pixels={max_pixels}")
    return image


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode to 8-bit RGB; transparent pixels become white, as viewers show them."""
    if image.mode == "I" or image.mode.startswith("I;16"):
        # convert() clips 16-bit values at 255 instead of scaling them: a near-white image.
        levels = np.asarray(image).astype(np.float32) / 257.0
        image = Image.fromarray(np.clip(np.rint(levels), 0, 255).astype(np.uint8))
    # Alpha modes, or a palette/L/RGB image with a transparent colour (PNG tRNS, GIF).
    if image.mode in ("RGBA", "RGBa", "LA", "La", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


@dataclass(frozen=True)
class Crop:
    """A decoded crop and where it came from (SDXL's micro-conditioning)."""

    pixels: torch.Tensor  # [3, h, w] float in [-1, 1]
    original_size: tuple[int, int]  # (h, w) of the decoded image
    crop_top_left: tuple[int, int]  # (top, left) in the image resized to cover the crop


def cover_crop(
    image: Image.Image, size: tuple[int, int], rng: random.Random | None, flip: bool = False
) -> Crop:
    """Resized to cover `size` (h, w) keeping its aspect ratio, then cropped to it: random
    offset with `rng`, else centred. A square `size` is `square_crop`.

    Only the cropped region is resampled (PIL's `box`): a long panorama costs what its crop
    does and never materialises at its full resized width. Lanczos antialiases when
    shrinking. A flip mirrors the crop, and its offset is given in the mirrored image.
    """
    target_h, target_w = size
    width, height = image.size
    scale = max(target_h / height, target_w / width)
    resized_w = max(target_w, round(width * scale))
    resized_h = max(target_h, round(height * scale))
    if rng is None:
        top, left = (resized_h - target_h) // 2, (resized_w - target_w) // 2
    else:
        top, left = rng.randint(0, resized_h - target_h), rng.randint(0, resized_w - target_w)
    with _pil_errors():
        # JPEG: let libjpeg decode at 1/2, 1/4 or 1/8 scale while that keeps enough pixels.
        image.draft(None, (resized_w, resized_h))
        rgb = to_rgb(image)
        # Resized-image coordinates -> coordinates in the decoded (maybe drafted) pixels.
        sx, sy = rgb.width / resized_w, rgb.height / resized_h
        box = (left * sx, top * sy, (left + target_w) * sx, (top + target_h) * sy)
        crop = rgb.resize((target_w, target_h), Image.Resampling.LANCZOS, box=box)
        if flip:
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if flip:
        left = resized_w - target_w - left
    pixels = torch.from_numpy(np.array(crop)).permute(2, 0, 1).contiguous().float() / 127.5 - 1.0
    return Crop(pixels, (height, width), (top, left))


def square_crop(image: Image.Image, resolution: int, rng: random.Random | None, flip: bool = False) -> Crop:
    """Shorter side to `resolution`, then a square crop (`cover_crop`)."""
    return cover_crop(image, (resolution, resolution), rng, flip)


def _int_pair(cache: Mapping[str, Any], name: str) -> tuple[int, int]:
    """A cached (h, w) / (top, left) pair: two non-negative ints of sane size, else `bad_cache`."""
    value = cache.get(name)
    if not (isinstance(value, list) and len(value) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= MAX_RECORDED_SIDE for v in value)):
        raise BadSample("bad_cache", f"{name}={str(value)[:50]} is not a pair of sizes")
    return value[0], value[1]


def example_signature(example: Mapping[str, Any]) -> tuple:
    """What must agree across a batch for `collate_examples`: field names and types, and the
    shape and dtype of every tensor. Cached LLM states are optional per sample (see
    `ImageTextStream._collate_items`), so they are left out."""
    parts = []
    for name in sorted(set(example) - {"llm_states"}):
        value = example[name]
        if isinstance(value, torch.Tensor):
            parts.append((name, "tensor", tuple(value.shape), str(value.dtype)))
        else:
            parts.append((name, type(value).__name__, len(value) if isinstance(value, tuple) else None))
    return tuple(parts)


def drop_odd_examples(
    examples: list[dict[str, Any]], skips: SkipCounter, previous: tuple | None = None
) -> tuple[list[dict[str, Any]], tuple]:
    """The examples of a batch that agree with its most common signature (ties: the
    previous batch's, else the first example's), and that signature; the others are counted
    and dropped so that `torch.stack` never sees a mixed batch: `mixed_cache` (cached among
    uncached, or the reverse), `odd_shape` (a tensor of another shape or dtype, fields of
    other types). The batch is that much smaller."""
    signatures = [example_signature(example) for example in examples]
    counts: dict[tuple, int] = {}
    for signature in signatures:
        counts[signature] = counts.get(signature, 0) + 1
    keep = max(counts, key=lambda signature: (counts[signature], signature == previous, -signatures.index(signature)))
    kept = []
    for example, signature in zip(examples, signatures):
        if signature == keep:
            kept.append(example)
            continue
        cached = ("image" in example, "image" in examples[signatures.index(keep)])
        reason = "mixed_cache" if cached[0] != cached[1] else "odd_shape"
        skips.skip(reason, "", str(example.get("key", "")), f"does not match the rest of its batch: {signature}"[:300])
    return kept, keep


def collate_examples(examples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Examples -> batch, field by field according to the value type.

    Tensors are stacked, int tuples become Long [B, n], floats float32 [B], strings a list.
    """
    batch: dict[str, Any] = {}
    for name, first in examples[0].items():
        values = [example[name] for example in examples]
        if isinstance(first, torch.Tensor):
            batch[name] = torch.stack(values)
        elif isinstance(first, tuple):
            batch[name] = torch.tensor(values, dtype=torch.long)
        elif isinstance(first, float):
            batch[name] = torch.tensor(values, dtype=torch.float32)
        elif isinstance(first, str):
            batch[name] = values
        else:
            raise TypeError(f"example field {name!r}: no collate rule for {type(first).__name__}")
    return batch


# ----------------------------------------------------------------------------- examples


# Stale-cache differences already warned about in this process (each worker warns once per kind).
_STALE_LLM_STATES_WARNED: set[str] = set()


@dataclass(frozen=True)
class ImageTextDecoder:
    """Raw tar sample -> example dict (see the module docstring); raises BadSample.

    `train` switches on the random parts: caption draw and dropout, crop offset, flip.
    """

    resolution: int
    train: bool
    caption_dropout: float = 0.1
    random_crop: bool = True
    random_flip: bool = False
    min_size: int = 0
    min_aesthetic: float | None = None
    max_pixels: int = DEFAULT_MAX_PIXELS
    language_weights: Mapping[str, float] = field(default_factory=dict)
    # The run's LLM settings (datamodules.cached.llm_signature): cached LLM features made
    # with exactly these are used; None or others: the LLM runs on the caption.
    llm_signature: Mapping[str, Any] | None = None
    # Aspect-ratio buckets, (h, w) each (linguadiff.buckets); None: square crops of `resolution`.
    buckets: tuple[tuple[int, int], ...] | None = None

    def target_size(self, height: int, width: int) -> tuple[int, int]:
        """The (h, w) an image of this size is cropped to: its nearest bucket, or the square."""
        if self.buckets is None:
            return self.resolution, self.resolution
        return nearest_bucket(self.buckets, height, width)

    def bucket_of(self, raw: Mapping[str, Any]) -> tuple[int, int]:
        """The target size of a raw sample without decoding its pixels or drawing anything
        random: the json filters and caption checks (as `__call__` makes them, so a sample
        rejected here is counted under the same reason), then the cached crop's size or the
        image header's. Raises BadSample."""
        meta, _, size, _ = self._checked_meta(raw)
        if MOMENTS in raw or PIXELS in raw:
            return self._cached_target(meta)
        image = self._open_checked(raw, size)
        return self.target_size(image.height, image.width)

    def _checked_meta(self, raw: Mapping[str, Any]) -> tuple[dict, float, tuple[int, int] | None, dict[str, list[str]]]:
        """The json's filters (aesthetic score, recorded size) and the captions: (meta, score,
        recorded size or None, captions). Raises BadSample."""
        meta = read_json(raw["json"]) if "json" in raw else {}
        score = aesthetic_score(meta)
        self._check_aesthetic(score)
        size = recorded_size(meta)
        if size is not None:
            self._check_size(size)
        return meta, score, size, caption_candidates(raw, meta)

    def _open_checked(self, raw: Mapping[str, Any], size: tuple[int, int] | None) -> Image.Image:
        """The sample's image, opened (header checks) and, without a recorded size, size-checked."""
        extension = next((ext for ext in IMAGE_EXTENSIONS if ext in raw), None)
        if extension is None:
            raise BadSample("missing_image", f"no {'/'.join(IMAGE_EXTENSIONS)} member")
        image = open_image(raw[extension], self.max_pixels)
        if size is None:
            self._check_size((image.height, image.width))
        return image

    def _cached_target(self, meta: Mapping[str, Any]) -> tuple[int, int]:
        """The size a cached crop was made at, if this run trains at it (else `cache_mismatch`).
        Caches written before buckets existed hold squares of `resolution`."""
        cache = meta.get(META_KEY)
        if not isinstance(cache, Mapping) or cache.get("resolution") != self.resolution:
            got = cache.get("resolution") if isinstance(cache, Mapping) else None
            raise BadSample("cache_mismatch", f"cached at resolution {got}, this run trains at {self.resolution}")
        target = _int_pair(cache, "target_size") if "target_size" in cache else (self.resolution, self.resolution)
        allowed = self.buckets if self.buckets is not None else ((self.resolution, self.resolution),)
        if target not in allowed:
            raise BadSample("cache_mismatch", f"cached at {target[0]}x{target[1]}, not one of this run's "
                            f"{'buckets' if self.buckets is not None else 'square crops'}")
        return target

    def __call__(self, raw: Mapping[str, Any], rng: random.Random) -> dict[str, Any]:
        meta, score, size, captions = self._checked_meta(raw)
        caption, lang = self._choose_caption(captions, rng)
        if MOMENTS in raw or PIXELS in raw:
            example = self._cached_example(raw, meta)
        else:
            example = self._image_example(raw, size, rng)
        example.update(caption=caption, lang=lang, aesthetic_score=score)
        cache = meta.get(META_KEY)
        if LLM_STATES in raw and self.llm_signature is not None and self._llm_states_fit(raw, cache):
            try:
                states = read_llm_npz(raw[LLM_STATES])
            except Exception as error:  # noqa: BLE001 - bad zip, pickled objects, absurd headers
                raise BadSample("bad_cache", f"llm.npz: {type(error).__name__}: {str(error)[:200]}") from None
            name = EMPTY if not caption else caption_name(lang, captions[lang].index(caption))
            if name not in states:
                raise BadSample("bad_cache", f"llm.npz has no features for caption {name}")
            example["llm_states"] = torch.from_numpy(states[name])
        return example

    def _llm_states_fit(self, raw: Mapping[str, Any], cache: Any) -> bool:
        """Whether a sample's cached LLM states were made with this run's LLM settings. Stale
        ones (another LLM, layers, dtype, ...) are not used: the LLM runs on the caption, as
        for an uncached sample, and the first such sample per difference and process says
        which `llm.*` keys differ."""
        difference = signature_difference(cache.get("llm") if isinstance(cache, Mapping) else None, self.llm_signature)
        if difference is not None and difference not in _STALE_LLM_STATES_WARNED:
            _STALE_LLM_STATES_WARNED.add(difference)
            logger.warning("cached LLM states of sample %s are stale (%s): not used, the LLM encodes the captions "
                           "of such samples; cache again with this run's llm settings (scripts/cache_features.py "
                           "cache.llm_states=true) to skip the LLM", raw.get("__key__"), difference)
        return difference is None

    def _cached_example(self, raw: Mapping[str, Any], meta: Mapping[str, Any]) -> dict[str, Any]:
        """The crop as `scripts/cache_features.py` stored it: VAE moments or uint8 pixels."""
        target = self._cached_target(meta)
        cache = meta[META_KEY]
        try:
            if MOMENTS in raw:
                array = from_npy(raw[MOMENTS], MOMENTS_DTYPES, ndim=3)
            else:
                array = from_npy(raw[PIXELS], PIXELS_DTYPES, ndim=3)
                if array.shape != (3, *target):
                    raise ValueError(f"pixels of shape {array.shape}, expected (3, {target[0]}, {target[1]})")
        except Exception as error:  # noqa: BLE001 - ValueError, OSError, EOFError, ... from hostile headers
            raise BadSample("bad_cache", f"{type(error).__name__}: {str(error)[:200]}") from None
        example: dict[str, Any] = {"key": raw["__key__"], "original_size": _int_pair(cache, "original_size"),
                                   "crop_top_left": _int_pair(cache, "crop_top_left"),
                                   "target_size": target}
        if MOMENTS in raw:
            example["moments"] = torch.from_numpy(array)
        else:  # exactly what cover_crop gives for the same crop
            example["image"] = torch.from_numpy(array).float() / 127.5 - 1.0
        return example

    def _image_example(self, raw: Mapping[str, Any], size: tuple[int, int] | None, rng: random.Random) -> dict[str, Any]:
        image = self._open_checked(raw, size)
        flip = self.train and self.random_flip and rng.random() < 0.5
        target = self.target_size(image.height, image.width)
        crop = cover_crop(image, target, rng if self.train and self.random_crop else None, flip)
        return {
            "image": crop.pixels,
            "key": raw["__key__"],
            "original_size": crop.original_size,
            "crop_top_left": crop.crop_top_left,
            "target_size": target,
        }

    def _check_aesthetic(self, score: float) -> None:
        if self.min_aesthetic is None:
            return
        if math.isnan(score):
            raise BadSample("no_aesthetic", f"min_aesthetic={self.min_aesthetic} but the json has no score")
        if score < self.min_aesthetic:
            raise BadSample("low_aesthetic", f"{score} < {self.min_aesthetic}", warn=False)

    def _check_size(self, size: tuple[int, int]) -> None:
        if min(size) < self.min_size:
            raise BadSample("too_small", f"{size[1]}x{size[0]} < min_size={self.min_size}", warn=False)

    def _choose_caption(self, captions: dict[str, list[str]], rng: random.Random) -> tuple[str, str]:
        """(caption, language): validation is deterministic and ignores the weights."""
        if not self.train:
            lang = DEFAULT_LANGUAGE if DEFAULT_LANGUAGE in captions else min(captions)
            return captions[lang][0], lang
        languages = [code for code in captions if self.language_weights.get(code, 1.0) > 0]
        if not languages:
            raise BadSample("lang_excluded", f"languages {sorted(captions)} all weigh 0", warn=False)
        weights = [self.language_weights.get(code, 1.0) for code in languages]
        lang = rng.choices(languages, weights=weights)[0]
        caption = rng.choice(captions[lang])
        if rng.random() < self.caption_dropout:
            return "", ""
        return caption, lang


# Where a bucketed training stream read a raw sample: (source, pass, shard, sample).
PLACE = "__place__"


class BucketBuffers:
    """Raw samples waiting, per bucket (h, w), for a batch of one size to fill up.

    What waits is saved with every batch as the places its samples were read from
    (`state()`, a few ints each, at most buckets x (batch size - 1) of them): a resumed stream
    reads those samples again and finds the buffers as they were. Nothing is dropped or
    flushed at a shuffle block's end, so every sample lands in exactly one full batch, only
    sometimes later than its block; a rare bucket's samples can wait long, which costs only
    their encoded bytes.
    """

    def __init__(self, batch_size: int) -> None:
        self.batch_size = batch_size
        self.waiting: dict[tuple[int, int], list[dict[str, Any]]] = {}

    def add(self, bucket: tuple[int, int], raw: dict[str, Any]) -> list[dict[str, Any]] | None:
        """Queues `raw`; its bucket's samples when that makes a full batch (emptying it)."""
        waiting = self.waiting.setdefault(bucket, [])
        waiting.append(raw)
        if len(waiting) < self.batch_size:
            return None
        del self.waiting[bucket]
        return waiting

    def restore(self, bucket: tuple[int, int], raw: dict[str, Any]) -> None:
        self.waiting.setdefault(bucket, []).append(raw)

    def drain(self) -> Iterator[list[dict[str, Any]]]:
        """What is left, bucket by bucket in the order they were first filled."""
        while self.waiting:
            yield self.waiting.pop(next(iter(self.waiting)))

    def state(self) -> list[list[Any]]:
        """[[h, w, [[source, pass, shard, sample], ...]], ...] in plain ints."""
        return [[h, w, [list(raw[PLACE]) for raw in waiting]] for (h, w), waiting in self.waiting.items()]


def groups_with_skips(
    groups: Iterator[list[Any]], skips: SkipCounter, collate: Callable[[list[Any], SkipCounter], dict[str, Any]]
) -> Iterator[dict[str, Any]]:
    """`batches_with_skips` for items already grouped: each batch held back until the next
    is ready, so skips met after the last items still ride on the last batch."""
    pending = None
    for group in groups:
        if pending is not None:
            yield collate(pending, skips)
        pending = group
    if pending is not None:
        yield collate(pending, skips)


class ImageTextStream(ShardStream):
    """Batches of examples from shard sources; one instance per DataLoader.

    Everything runs in the DataLoader workers: reading, shuffling, decoding, batching and
    tokenizing. The shuffle blocks hold raw (still encoded) samples: a block of decoded
    1024 px float images would cost 12 MB per entry. Training batches carry the stream's
    position after them (`ShardStream._resumable_batches`).
    """

    tokenized_fields = TOKENIZED_FIELDS

    def __init__(self, sources: Sequence[ShardSource], decoder: ImageTextDecoder, **common: Any):
        super().__init__(sources, **common)
        self.decoder = decoder

    def __iter__(self) -> Iterator[dict[str, Any]]:
        skips = SkipCounter()
        self._guard = UsableGuard([source.urls for source in self.sources], skips, self.shuffle_buffer)
        bucketed = self.decoder.buckets is not None
        if self.decoder.train:
            if bucketed:  # batches of one size each, from per-bucket buffers of raw samples
                to_items = lambda order, rng: self._bucketed_groups(iter(order), skips, rng, self._restored_buffers())
            else:  # captions, dropout, crops, flips
                to_items = lambda order, rng: self._examples(iter(order), skips, rng)
            yield from self._resumable_batches(
                skips,
                lambda index, consumer, position: self._source_samples(index, consumer, skips, infinite=True,
                                                                       position=position),
                to_items,
                grouped=bucketed,
            )
            return
        # Validation: every source once, in order, the same pool every time.
        reader, consumer = self._consumers(train=False)
        raw_samples = itertools.chain.from_iterable(
            self._source_samples(index, reader, skips, infinite=False) for index in range(len(self.sources))
        )
        rng = random.Random(self.seed)
        if bucketed:  # the same deterministic buckets; what is left at the end goes as smaller batches
            groups = self._bucketed_groups(raw_samples, skips, rng, BucketBuffers(self.batch_size), flush=True)
            batches = groups_with_skips(groups, skips, self._collate)
        else:
            batches = batches_with_skips(self._examples(raw_samples, skips, rng), self.batch_size, True, skips,
                                         self._collate)
        yield from self._share(batches, False, consumer)

    def _extra_state(self) -> dict[str, Any]:
        state = {"signature": getattr(self, "_signature", None)}  # which batch shape wins a tie
        if self.decoder.buckets is not None:
            state["buckets"] = self._buffers.state()
        return state

    def _restore_extra_state(self, saved: Mapping[str, Any]) -> None:
        if saved.get("signature") is not None:
            self._signature = saved["signature"]
        self._saved_buckets = saved.get("buckets") or []

    def _bucketed_groups(
        self, raw_samples: Iterator[dict[str, Any]], skips: SkipCounter, rng: random.Random, buffers: BucketBuffers,
        flush: bool = False,
    ) -> Iterator[list[dict[str, Any]]]:
        """Lists of examples of one target size: each raw sample waits (still encoded) in its
        bucket's buffer, placed by its header alone; a full buffer is decoded in its order,
        drawing from `rng`. A sample that fails only then makes its batch one smaller.
        `flush`: at the end (a finite stream) the partial buffers go out too."""
        self._buffers = buffers
        placed = self._examples(raw_samples, skips, rng, decode=lambda raw, _: (self.decoder.bucket_of(raw), raw))
        for bucket, raw in placed:
            full = buffers.add(bucket, raw)
            if full is not None:
                group = list(self._examples(iter(full), skips, rng))
                if group:
                    yield group
        if flush:
            for rest in buffers.drain():
                group = list(self._examples(iter(rest), skips, rng))
                if group:
                    yield group

    def _restored_buffers(self) -> BucketBuffers:
        """The bucket buffers as the saved position left them: their samples read again from
        where the saved places say (`streams.read_back`); the training order itself resumes
        after them."""
        buffers = BucketBuffers(self.batch_size)
        saved = getattr(self, "_saved_buckets", None) or []
        self._saved_buckets = []
        if not saved:
            return buffers
        consumer = self.training_consumer()
        places: dict[int, list[tuple[int, int, int]]] = {}
        for _, _, bucket_places in saved:
            for source, *place in bucket_places:
                places.setdefault(source, []).append(tuple(place))
        found = {
            (source, *place): raw
            for source, wanted in places.items()
            for place, raw in read_back(self.sources[source].urls, consumer, f"{self.seed}:{source}", wanted,
                                        is_image_text_member).items()
        }
        for height, width, bucket_places in saved:
            for place in bucket_places:
                raw = found.get(tuple(place))
                if raw is None:
                    logger.warning("train data: a sample waiting in bucket %dx%d at %s is no longer in its shard",
                                   height, width, place)
                    continue
                buffers.restore((height, width), {**raw, PLACE: tuple(place)})
        return buffers

    def _source_samples(
        self, index: int, consumer: Consumer, skips: SkipCounter, *, infinite: bool, position: ReadPosition | None = None
    ) -> Iterator[dict[str, Any]]:
        """Raw samples of source `index` for `consumer`; the shuffle comes after, on raw bytes.
        Bucketed training marks each with where it was read (`PLACE`), to save what waits in
        the bucket buffers."""
        samples = iter_consumer_samples(
            self.sources[index].urls,
            consumer,
            skips,
            infinite=infinite,
            seed=f"{self.seed}:{index}",
            wanted=is_image_text_member,
            on_pass=lambda size: self._guard.pass_done(index, size),
            position=position,
        )
        if position is None or self.decoder.buckets is None:
            return samples
        return ({**sample, PLACE: (index, position.pass_index, position.shard, position.sample)} for sample in samples)

    def _examples(
        self, raw_samples: Iterator[dict[str, Any]], skips: SkipCounter, rng: random.Random,
        decode: Callable[[dict[str, Any], random.Random], Any] | None = None,
    ) -> Iterator[Any]:
        """`decode(raw, rng)` (the decoder by default) of each raw sample; bad ones skipped."""
        decode = decode or self.decoder
        train = self.decoder.train
        rejected_in_a_row = 0
        for raw in raw_samples:
            try:
                example = decode(raw, rng)
            except Exception as error:  # noqa: BLE001 - one bad sample costs that sample, not the run
                bad = error if isinstance(error, BadSample) else BadSample(
                    "bad_sample", f"{type(error).__name__}: {str(error)[:200]}")
                skips.skip(bad.reason, raw.get("__url__", ""), raw.get("__key__", ""), bad.detail, warn=bad.warn)
                if train:
                    self._guard.rejected()
                rejected_in_a_row += 1
                if rejected_in_a_row % STALL_WARNING_EVERY == 0:
                    logger.warning(
                        "no usable sample in the last %d read (filters too strict?); skipped so far: %s",
                        rejected_in_a_row, dict(skips.totals),
                    )
                continue
            rejected_in_a_row = 0
            self._guard.accepted()
            yield example

    def _collate_items(self, examples: list[dict[str, Any]], skips: SkipCounter) -> dict[str, Any]:
        examples, self._signature = drop_odd_examples(examples, skips, getattr(self, "_signature", None))
        states = [example.pop("llm_states", None) for example in examples]
        batch = collate_examples(examples)
        # Cached LLM features are used when every sample of the batch has them, alike.
        if all(s is not None for s in states) and len({(s.dim(), s.shape[1:], s.dtype) for s in states}) == 1:
            batch["llm_states"], batch["llm_mask"] = pad_states(states)
        return batch


# ----------------------------------------------------------------------------- datamodule


class ImageTextDataModule(ShardDataModule):
    """Stages 2-3 data: (image, caption) examples from img2dataset shards (module docstring).

    `train` / `val`: `{"urls": URLS}` or `{"sources": [{"urls": URLS, "weight": W}, ...]}`
    as in stage 1. `languages`: training weight per caption language; missing codes weigh
    1.0, 0 excludes. `min_size` (shorter side of the original, px) and `min_aesthetic` apply
    to both splits: they choose the data set. `random_flip` is off by default because
    captions say left and right. `buckets`: (h, w) sizes (`linguadiff.buckets`); each image
    goes to the one nearest its aspect ratio and every batch holds one size (`BucketBuffers`);
    None: square crops of `resolution`.
    """

    tokenizer_roles = tuple(TOKENIZED_FIELDS)
    source_kind = "image-text"

    def __init__(
        self,
        train: Mapping[str, Any] | DictConfig,
        val: Mapping[str, Any] | DictConfig | None,
        resolution: int,
        batch_size: int,
        val_batch_size: int | None = None,
        num_workers: int = 2,
        shuffle_buffer: int = 1000,
        seed: int = 0,
        languages: Mapping[str, float] | DictConfig | None = None,
        caption_dropout: float = 0.1,
        random_crop: bool = True,
        random_flip: bool = False,
        min_size: int = 0,
        min_aesthetic: float | None = None,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        tokenizers: Mapping[str, Tokenizer] | None = None,
        llm_signature: Mapping[str, Any] | None = None,
        buckets: Sequence[Sequence[int]] | None = None,
    ):
        super().__init__(train, val, batch_size, val_batch_size, num_workers, shuffle_buffer, seed)
        self.buckets = None if buckets is None else tuple((int(h), int(w)) for h, w in buckets)
        if self.buckets is not None and (not self.buckets or min(min(b) for b in self.buckets) < 1):
            raise ValueError(f"buckets must be a non-empty list of positive (h, w) sizes, got {buckets!r}")
        if resolution < 1 or max_pixels < 1 or min_size < 0:
            raise ValueError(f"need resolution >= 1, max_pixels >= 1, min_size >= 0; got "
                             f"{resolution}, {max_pixels}, {min_size}")
        if not 0.0 <= caption_dropout <= 1.0:
            raise ValueError(f"caption_dropout must be in [0, 1], got {caption_dropout}")
        language_weights = parse_language_weights(languages)
        self.train_decoder = ImageTextDecoder(
            resolution=resolution,
            train=True,
            caption_dropout=caption_dropout,
            random_crop=random_crop,
            random_flip=random_flip,
            min_size=min_size,
            min_aesthetic=min_aesthetic,
            max_pixels=max_pixels,
            language_weights=language_weights,
            llm_signature=llm_signature,
            buckets=self.buckets,
        )
        # Validation: centred crops, the first English caption, nothing dropped or flipped.
        self.val_decoder = ImageTextDecoder(
            resolution=resolution,
            train=False,
            caption_dropout=0.0,
            random_crop=False,
            min_size=min_size,
            min_aesthetic=min_aesthetic,
            max_pixels=max_pixels,
            llm_signature=llm_signature,
            buckets=self.buckets,
        )
        self.set_tokenizers(tokenizers)

    def _fingerprint_extra(self) -> Any:
        # A bucketed position holds bucket buffers: only valid for the same buckets and batch size.
        return None if self.buckets is None else [[list(b) for b in self.buckets], self.batch_size]

    def _split_summary(self, split: str) -> str:
        decoder = self.train_decoder if split == "train" else self.val_decoder
        batch_size = self.batch_size if split == "train" else self.val_batch_size
        return f"{split}: batch size {batch_size}, workers {self.num_workers}, {decoder}"

    def _stream(
        self, sources: list[ShardSource], *, train: bool, batch_size: int, rank: int, world_size: int
    ) -> ImageTextStream:
        return ImageTextStream(
            sources,
            self.train_decoder if train else self.val_decoder,
            batch_size=batch_size,
            seed=self.seed,
            shuffle_buffer=self.shuffle_buffer,
            tokenizers=self.tokenizers,
            rank=rank,
            world_size=world_size,
        )
