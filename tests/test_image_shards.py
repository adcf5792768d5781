"""Stages 2-3 image-text pipeline: crops, modes, captions, filters, bad input, workers.

Every test writes its own tiny shards in tmp_path (16 px images); the DataLoader tests use
real worker processes because that is where splitting and skip accounting can go wrong.
"""
from __future__ import annotations

import io
import itertools
import json
import math
import os
import random
import struct
import zlib
from collections import Counter

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from datamodules.demo_data import write_demo_shards
from datamodules.image_shards import (
    BadSample,
    ImageTextDataModule,
    ImageTextDecoder,
    ImageTextStream,
    open_image,
    square_crop,
)
from tests.shard_helpers import write_shard

pytestmark = pytest.mark.timeout(60)

RED, BLUE = (255, 0, 0), (0, 0, 255)


def encode(image: Image.Image, fmt: str = "PNG", **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def split_image(width: int, height: int) -> Image.Image:
    """Left half red, right half blue."""
    pixels = np.zeros((height, width, 3), np.uint8)
    pixels[:, : width // 2] = RED
    pixels[:, width // 2 :] = BLUE
    return Image.fromarray(pixels)


def good_sample(key: str, **meta) -> dict[str, str | bytes]:
    sample = {"__key__": key, "png": encode(split_image(20, 16)), "txt": f"caption {key}"}
    if meta:
        sample["json"] = json.dumps(meta)
    return sample


def data_module(urls, **kwargs) -> ImageTextDataModule:
    kwargs = {"resolution": 16, "batch_size": 4, "num_workers": 0, **kwargs}
    return ImageTextDataModule(train={"urls": urls}, val={"urls": urls}, **kwargs)


def colour_of(pixels: torch.Tensor) -> tuple[int, int, int]:
    """[3, ...] in [-1, 1] -> mean 0-255 RGB."""
    return tuple(round(value) for value in ((pixels.reshape(3, -1).mean(1) + 1) * 127.5).tolist())


# ----------------------------------------------------------------------------- resize and crop


def test_centre_crop_of_a_wide_image_through_the_validation_stream(tmp_path):
    # 40x20, shorter side 20 -> 16: resized to 32x16, centre crop at left 8 covers source
    # columns 10-30, so the crop is half red (left), half blue (right).
    write_shard(tmp_path / "wide.tar", [{"__key__": "wide", "png": encode(split_image(40, 20)), "txt": "halves"}])
    (batch,) = list(data_module(str(tmp_path / "wide.tar")).val_dataloader())
    assert batch["image"].shape == (1, 3, 16, 16) and batch["image"].dtype == torch.float32
    assert batch["original_size"].tolist() == [[20, 40]]
    assert batch["crop_top_left"].tolist() == [[0, 8]]
    assert batch["target_size"].tolist() == [[16, 16]]
    image = batch["image"][0]
    assert image.min() >= -1 and image.max() <= 1
    assert colour_of(image[:, :, :6]) == RED  # away from the edge Lanczos blurs
    assert colour_of(image[:, :, 10:]) == BLUE


@pytest.mark.parametrize("flip", [False, True])
def test_random_crops_stay_inside_and_match_their_offsets(flip):
    rng = random.Random(0)
    lefts = set()
    for _ in range(60):
        crop = square_crop(split_image(40, 20), 16, rng, flip=flip)
        top, left = crop.crop_top_left
        assert top == 0 and 0 <= left <= 16 and crop.original_size == (20, 40)
        lefts.add(left)
        # Resized column x (of 32) is red when x < 16; a flip mirrors the resized image.
        for column in (0, 15):
            x = left + column
            red = (31 - x if flip else x) < 16
            if abs((31 - x if flip else x) - 15.5) > 2:  # not at the blurred boundary
                assert colour_of(crop.pixels[:, :, column]) == (RED if red else BLUE)
    assert len(lefts) > 8


def test_jpeg_decoded_at_reduced_scale_keeps_the_geometry():
    # 200x100 for 16 px: libjpeg decodes at 1/4 scale (50x25); the crop must not notice.
    image = open_image(encode(split_image(200, 100), "JPEG", quality=95), max_pixels=10**6)
    crop = square_crop(image, 16, None)
    assert image.size == (50, 25)  # draft() ran
    assert crop.original_size == (100, 200) and crop.crop_top_left == (0, 8)
    assert max(abs(a - b) for a, b in zip(colour_of(crop.pixels[:, :, :6]), RED)) <= 8
    assert max(abs(a - b) for a, b in zip(colour_of(crop.pixels[:, :, 10:]), BLUE)) <= 8


def test_tall_image_crops_vertically():
    crop = square_crop(split_image(16, 48), 8, random.Random(1))
    top, left = crop.crop_top_left
    assert crop.pixels.shape == (3, 8, 8) and left == 0 and 0 <= top <= 16
    assert crop.original_size == (48, 16)
    centred = square_crop(split_image(16, 48), 8, None)
    assert centred.crop_top_left == (8, 0)


# ----------------------------------------------------------------------------- modes


def _palette_with_transparency() -> bytes:
    image = Image.new("P", (8, 8), 0)
    image.putpalette([0, 0, 0, 255, 0, 0])  # index 0 (transparent), index 1 red
    image.paste(1, (0, 0, 4, 8))
    return encode(image, transparency=0)


def _rgba() -> bytes:
    pixels = np.zeros((8, 8, 4), np.uint8)
    pixels[:, :4] = (255, 0, 0, 255)  # opaque red left, fully transparent black right
    return encode(Image.fromarray(pixels, "RGBA"))


@pytest.mark.parametrize(
    "payload,left,right",
    [
        (encode(Image.new("L", (8, 8), 128)), (128, 128, 128), (128, 128, 128)),
        (_palette_with_transparency(), RED, (255, 255, 255)),
        (_rgba(), RED, (255, 255, 255)),
        (encode(Image.new("LA", (8, 8), (0, 0))), (255, 255, 255), (255, 255, 255)),
        (encode(Image.new("CMYK", (8, 8), (255, 0, 0, 0)), "JPEG", quality=95), (0, 255, 255), (0, 255, 255)),
        (encode(Image.fromarray(np.full((8, 8), 128 * 257, np.uint16))), (128, 128, 128), (128, 128, 128)),
    ],
    ids=["L", "P-transparency", "RGBA", "LA", "CMYK", "I;16"],
)
def test_any_mode_becomes_rgb_with_transparency_on_white(payload, left, right):
    crop = square_crop(open_image(payload, max_pixels=10_000), 8, None)
    assert crop.pixels.shape == (3, 8, 8)
    for expected, half in ((left, crop.pixels[:, :, :3]), (right, crop.pixels[:, :, 5:])):
        assert max(abs(a - b) for a, b in zip(colour_of(half), expected)) <= 3


def test_sixteen_bit_png_is_really_sixteen_bit():
    # Guards the test above: were this 8-bit, PIL's own convert() would not clip it to white.
    assert Image.open(io.BytesIO(encode(Image.fromarray(np.full((4, 4), 40000, np.uint16))))).mode.startswith("I")


# ----------------------------------------------------------------------------- captions


def test_caption_dropout_rate_in_training_and_none_in_validation(tmp_path):
    write_shard(tmp_path / "a.tar", [good_sample(f"k{index}") for index in range(40)])
    dm = data_module(str(tmp_path / "a.tar"), batch_size=100, seed=3, shuffle_buffer=10, resolution=8)
    batches = list(itertools.islice(dm.train_dataloader(), 20))
    captions = [caption for batch in batches for caption in batch["caption"]]
    dropped = [caption == "" for caption in captions]
    assert 0.075 < sum(dropped) / len(captions) < 0.125  # 2000 draws, expected 0.1
    langs = [lang for batch in batches for lang in batch["lang"]]
    assert all((lang == "") == drop for lang, drop in zip(langs, dropped))
    val = [caption for _ in range(3) for batch in dm.val_dataloader() for caption in batch["caption"]]
    assert len(val) == 120 and "" not in val


def test_language_weights_and_uniform_draw_within_a_language(tmp_path):
    meta = {"caption": "a cat", "captions": {"en": ["a cat", "one cat"], "zh": "一只猫", "fr": "un chat"}}
    write_shard(tmp_path / "multi.tar", [good_sample(f"k{index}", **meta) for index in range(20)])
    dm = data_module(str(tmp_path / "multi.tar"), batch_size=100, resolution=8, caption_dropout=0.0,
                     languages=OmegaConf.create({"zh": 2.0, "fr": 0}))
    captions = Counter(c for batch in itertools.islice(dm.train_dataloader(), 20) for c in batch["caption"])
    assert "un chat" not in captions
    english = {text: count for text, count in captions.items() if text != "一只猫"}
    # Languages: en weight 1 (default), zh 2; in English: "caption kN" (txt), "a cat", "one cat".
    assert 0.62 < captions["一只猫"] / 2000 < 0.71
    assert 0.28 < captions["a cat"] / sum(english.values()) < 0.39
    # Validation: the first English caption (KEY.txt), deterministically.
    (batch,) = list(dm.val_dataloader())
    assert batch["caption"] == [f"caption k{index}" for index in range(20)] and set(batch["lang"]) == {"en"}


def test_validation_falls_back_to_a_fixed_language_without_english(tmp_path):
    sample = {"__key__": "x", "png": encode(split_image(16, 16)),
              "json": json.dumps({"captions": {"zh": "猫", "de": ["eine Katze", "Katze"]}})}
    write_shard(tmp_path / "x.tar", [sample])
    (batch,) = list(data_module(str(tmp_path / "x.tar")).val_dataloader())
    assert batch["caption"] == ["eine Katze"] and batch["lang"] == ["de"]


# ----------------------------------------------------------------------------- filters


def test_aesthetic_filter_counts_low_and_missing_scores(tmp_path):
    write_demo_shards(tmp_path, num_samples=30, samples_per_shard=30, seed=0, image_size=16, prefix="demo",
                      with_images=True)
    url = str(tmp_path / "demo-00000.tar")
    all_scores = torch.cat([batch["aesthetic_score"] for batch in data_module(url).val_dataloader()])
    assert len(all_scores) == 30 and not all_scores.isnan().any()
    threshold = float(all_scores.median())
    write_shard(tmp_path / "unscored.tar", [good_sample("unscored"), good_sample("scored", AESTHETIC_SCORE=9.5)])
    dm = data_module(f"{tmp_path}/*.tar", batch_size=64, min_aesthetic=threshold)
    (batch,) = list(dm.val_dataloader())
    assert sorted(batch["aesthetic_score"].tolist()) == sorted([*all_scores[all_scores >= threshold].tolist(), 9.5])
    assert batch["skipped"] == {"low_aesthetic": int((all_scores < threshold).sum()), "no_aesthetic": 1}
    # Without a threshold, a missing score is nan, not a skip.
    (batch,) = list(data_module(str(tmp_path / "unscored.tar")).val_dataloader())
    assert math.isnan(batch["aesthetic_score"][0]) and batch["aesthetic_score"][1] == 9.5


def test_min_size_uses_json_sizes_then_the_header(tmp_path):
    write_shard(tmp_path / "sizes.tar", [
        good_sample("original_small", original_width=100, original_height=50, width=512, height=512),
        good_sample("original_large", original_width=800, original_height=600, width=64, height=64),
        good_sample("resized_small", width=40, height=300),
        good_sample("header_small"),  # the 20x16 image itself
        {"__key__": "header_large", "png": encode(split_image(80, 64)), "txt": "big"},
    ])
    dm = data_module(str(tmp_path / "sizes.tar"), min_size=60)
    (batch,) = list(dm.val_dataloader())
    assert batch["key"] == ["original_large", "header_large"]
    assert batch["skipped"] == {"too_small": 3}


# ----------------------------------------------------------------------------- bad input


def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_claiming(width: int, height: int) -> bytes:
    """A valid PNG header for a huge RGB image, with almost no pixel data behind it."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + chunk(b"IEND", b""))


def test_bad_samples_are_skipped_and_counted_in_batches(tmp_path, caplog):
    png = encode(split_image(20, 16))
    write_shard(tmp_path / "bad-0.tar", [
        good_sample("good0"),
        {"__key__": "corrupt", "png": b"\x89PNG not really" * 20, "txt": "noise"},
        {"__key__": "truncated", "png": encode(Image.fromarray(np.random.default_rng(0).integers(
            0, 255, (32, 32, 3), dtype=np.uint8)))[:400], "txt": "cut"},
        {"__key__": "zero_bytes", "jpg": b"", "txt": "nothing"},
        {"__key__": "bomb", "png": png_claiming(30_000, 30_000), "txt": "boom"},
        {"__key__": "no_caption", "png": png},
        {"__key__": "blank_caption", "png": png, "txt": "  \n", "json": json.dumps({"captions": ["", " "]})},
        {"__key__": "latin1", "png": png, "txt": "caf\xe9".encode("latin-1")},
        {"__key__": "broken_json", "png": png, "txt": "fine", "json": b"{not json"},
        {"__key__": "json_list", "png": png, "txt": "fine", "json": b"[1, 2]"},
        {"__key__": "no_image", "txt": "where is it"},
        good_sample("good1"),
    ])
    write_shard(tmp_path / "bad-1.tar", [good_sample("good2"), good_sample("good3")])

    dm = data_module(f"{tmp_path}/bad-*.tar", batch_size=2, num_workers=2)
    batches = list(dm.val_dataloader())
    skipped = Counter()
    for batch in batches:
        skipped.update(batch["skipped"])
    assert skipped == {
        "bad_image": 2, "empty_image": 1, "decompression_bomb": 1, "missing_caption": 1,
        "empty_caption": 1, "bad_encoding": 1, "bad_json": 2, "missing_image": 1,
    }
    assert sorted(key for batch in batches for key in batch["key"]) == ["good0", "good1", "good2", "good3"]
    # Warnings name the shard, the key and the reason (read in-process: caplog does not see
    # worker processes).
    with caplog.at_level("WARNING"):
        list(data_module(f"{tmp_path}/bad-0.tar").val_dataloader())
    assert any("decompression_bomb" in m and "bad-0.tar" in m and "'bomb'" in m for m in caplog.messages)


def test_max_pixels_is_checked_from_the_header():
    payload = encode(split_image(20, 16))
    assert open_image(payload, max_pixels=320).size == (20, 16)
    with pytest.raises(BadSample) as refused:
        open_image(payload, max_pixels=319)
    assert refused.value.reason == "decompression_bomb"


# ----------------------------------------------------------------------------- streams


@pytest.mark.parametrize("num_shards", [3, 1])
def test_validation_yields_each_sample_once_with_two_workers(tmp_path, num_shards):
    keys = []
    for shard in range(num_shards):
        samples = [good_sample(f"s{shard}-{index}") for index in range(5)]
        keys += [sample["__key__"] for sample in samples]
        write_shard(tmp_path / f"shard-{shard}.tar", samples)
    dm = data_module(f"{tmp_path}/shard-*.tar", batch_size=2, num_workers=2)
    for _ in range(2):  # the finite stream is repeatable
        seen = Counter(key for batch in dm.val_dataloader() for key in batch["key"])
        assert seen == Counter(keys)


def test_validation_split_across_simulated_ranks(tmp_path):
    keys = [f"k{index}" for index in range(7)]
    write_shard(tmp_path / "one.tar", [good_sample(key) for key in keys])
    dm = data_module(str(tmp_path / "one.tar"))
    dm.setup("validate")
    seen = Counter()
    for rank in range(3):
        stream = ImageTextStream(dm.val_sources, dm.val_decoder, batch_size=2, seed=0, shuffle_buffer=1,
                                 tokenizers=None, rank=rank, world_size=3)
        seen.update(key for batch in stream for key in batch["key"])
    assert seen == Counter(keys)


class LengthTokenizer:
    """Picklable stand-in for a tokenizer; records which process ran it."""

    def __call__(self, texts: list[str]) -> dict[str, torch.Tensor]:
        return {"input_ids": torch.tensor([len(text) for text in texts]), "pid": torch.tensor([os.getpid()])}


def test_infinite_training_stream_with_tokenizers_in_workers(tmp_path):
    for shard in range(2):
        write_shard(tmp_path / f"t-{shard}.tar", [good_sample(f"t{shard}-{index}") for index in range(3)])
    train = OmegaConf.create({"sources": [{"urls": f"{tmp_path}/t-*.tar", "weight": 1.0}]})
    dm = ImageTextDataModule(train=train, val=None, resolution=8, batch_size=4, num_workers=2, shuffle_buffer=4)
    dm.set_tokenizers({"student": LengthTokenizer()})
    batches = list(itertools.islice(dm.train_dataloader(), 8))
    assert all(batch["image"].shape == (4, 3, 8, 8) for batch in batches)
    keys = Counter(key for batch in batches for key in batch["key"])
    assert len(keys) == 6 and max(keys.values()) > 1  # all samples, several passes
    for batch in batches:
        assert batch["student_tokens"]["input_ids"].tolist() == [len(text) for text in batch["caption"]]
        assert batch["student_tokens"]["pid"].item() != os.getpid()
    assert dm.val_dataloader() == []
    with pytest.raises(ValueError, match="unknown tokenizer role"):
        dm.set_tokenizers({"teacher": LengthTokenizer()})


def test_decoder_builds_plain_example_dicts():
    raw = {"__key__": "k", "__url__": "u", "png": encode(split_image(20, 16)),
           "json": json.dumps({"caption": "a cat", "aesthetic": 6}).encode()}
    example = ImageTextDecoder(resolution=8, train=False)(raw, random.Random(0))
    assert set(example) == {"image", "caption", "lang", "key", "original_size", "crop_top_left",
                            "target_size", "aesthetic_score"}
    assert (example["caption"], example["lang"], example["aesthetic_score"]) == ("a cat", "en", 6.0)
