"""Reference ("real") images for FID/KID: a folder of images or image-text tar shards.

Shards are read exactly as stages 2-3 validate (the project's img2dataset layout, centred
square crops, the first English caption): the same decoder, the same skip accounting.
A folder holds image files (jpg, jpeg, png, webp), each optionally with a caption in a
``.txt`` file of the same name. Either way images come out as uint8 [N, 3, S, S] batches at
the generated images' size S, so both sides of FID see the same resampling, with their
captions (the prompts of the generated side when no caption file is given).
"""
from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from datamodules.image_shards import (
    DEFAULT_MAX_PIXELS,
    IMAGE_EXTENSIONS,
    BadSample,
    ImageTextDecoder,
    ImageTextStream,
    open_image,
    square_crop,
)
from datamodules.skips import SkipCounter
from datamodules.sources import parse_sources
from datamodules.streams import batched
from linguadiff.config import ConfigError

log = logging.getLogger(__name__)


@dataclass
class ReferenceBatch:
    images: torch.Tensor  # uint8 [N, 3, S, S]
    captions: list[str]  # "" where a folder image has no caption file


def to_uint8(pixels: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float images (the data pipeline's) -> uint8 [0, 255]."""
    return ((pixels.float() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)


def reference_batches(spec: str, size: int, batch_size: int, limit: int = 0) -> Iterator[ReferenceBatch]:
    """Batches of the reference images in `spec` (a folder, or shard URLs), `limit` of them at most (0: all)."""
    source = _folder_batches(Path(spec).expanduser(), size, batch_size) if Path(spec).expanduser().is_dir() \
        else _shard_batches(spec, size, batch_size)
    seen = 0
    for batch in source:
        if limit and seen + len(batch.captions) > limit:
            keep = limit - seen
            batch = ReferenceBatch(batch.images[:keep], batch.captions[:keep])
        seen += len(batch.captions)
        if batch.captions:
            yield batch
        if limit and seen >= limit:
            return


def _shard_batches(urls: str, size: int, batch_size: int) -> Iterator[ReferenceBatch]:
    try:
        sources = parse_sources(urls)
    except (FileNotFoundError, ValueError) as err:
        raise ConfigError(f"option 'reference' is neither a folder nor readable shards: {err}") from None
    decoder = ImageTextDecoder(resolution=size, train=False, caption_dropout=0.0, random_crop=False)
    stream = ImageTextStream(sources, decoder, batch_size=batch_size, seed=0, shuffle_buffer=0, tokenizers=None,
                             rank=0, world_size=1)
    for batch in stream:
        yield ReferenceBatch(to_uint8(batch["image"]), list(batch["caption"]))


def _folder_batches(folder: Path, size: int, batch_size: int) -> Iterator[ReferenceBatch]:
    files = sorted(p for p in folder.iterdir() if p.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS)
    if not files:
        raise ConfigError(f"option 'reference': {folder} holds no {'/'.join(IMAGE_EXTENSIONS)} image")
    skips = SkipCounter()
    for group in batched(files, batch_size, keep_partial=True):
        images, captions = [], []
        for path in group:
            try:
                crop = square_crop(open_image(path.read_bytes(), DEFAULT_MAX_PIXELS), size, None)
            except BadSample as bad:
                skips.skip(bad.reason, str(folder), path.name, bad.detail)
                continue
            caption_file = path.with_suffix(".txt")
            images.append(to_uint8(crop.pixels))
            captions.append(caption_file.read_text(encoding="utf-8").strip() if caption_file.is_file() else "")
        if images:
            yield ReferenceBatch(torch.stack(images), captions)
