"""Hostile data: one bad sample costs that sample, never the run (issue 10).

Every kind of bad input below is written into tiny shards by the test itself and streamed
through the real datamodules (or the cache writer); each must be skipped and counted under
its reason, and every good sample beside it must come through.
"""
from __future__ import annotations

import io
import json
import tarfile
import time
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import datamodules.tar_reading as tar_reading
from datamodules.cached import META_KEY, MOMENTS, LLM_STATES, PIXELS, from_npy, llm_npz, llm_signature, to_npy
from datamodules.image_shards import ImageTextDataModule, ImageTextDecoder, open_image, square_crop
from datamodules.skips import SkipCounter
from datamodules.streams import NoUsableData
from datamodules.tar_reading import ShardOutcome, iter_tar_samples
from datamodules.text_shards import TextShardsDataModule
from tests.shard_helpers import write_shard
from tests.test_image_shards import encode, good_sample, png_claiming, split_image

pytestmark = pytest.mark.timeout(120)

SIGNATURE = {"path": "tiny-llm", "revision": None, "layers": [-1], "layer_mix": "mean", "max_length": 16,
             "add_bos": False}


def skipped_and_keys(batches) -> tuple[Counter, list[str]]:
    skipped, keys = Counter(), []
    for batch in batches:
        skipped.update(batch["skipped"])
        keys += batch["key"]
    return skipped, sorted(keys)


def image_module(urls, **kwargs) -> ImageTextDataModule:
    kwargs = {"resolution": 16, "batch_size": 4, "num_workers": 0, **kwargs}
    return ImageTextDataModule(train={"urls": urls}, val={"urls": urls}, **kwargs)


def text_module(urls, **kwargs) -> TextShardsDataModule:
    kwargs = {"batch_size": 4, "num_workers": 0, **kwargs}
    return TextShardsDataModule(train={"urls": urls}, val={"urls": urls}, **kwargs)


def raw_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    """A tar with exactly these member names (odd characters, repeats) and payloads."""
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def image_bytes(mode: str, fmt: str = "PNG", size=(8, 8), colour=None, **params) -> bytes:
    return encode(Image.new(mode, size, colour if colour is not None else 0), fmt, **params)


def palette_with_transparency() -> bytes:
    image = Image.new("P", (8, 8), 0)
    image.putpalette([0, 0, 0, 255, 0, 0])
    image.paste(1, (0, 0, 4, 8))
    return encode(image, transparency=0)


def other_format(fmt: str) -> bytes:
    return encode(Image.new("RGB", (16, 16), (10, 20, 30)), fmt)


# ----------------------------------------------------------------------------- image-text


def test_hostile_image_text_samples_are_each_counted_under_their_reason(tmp_path, monkeypatch):
    monkeypatch.setattr(tar_reading, "DEFAULT_MAX_MEMBER_BYTES", 300_000)
    png = encode(split_image(20, 16))
    kept = {  # odd but valid: these must decode
        "one_pixel": {"png": image_bytes("RGB", size=(1, 1), colour=(200, 0, 0))},
        "cmyk": {"jpg": image_bytes("CMYK", "JPEG", colour=(255, 0, 0, 0), quality=95)},
        "sixteen_bit": {"png": encode(Image.fromarray(np.full((8, 8), 128 * 257, np.uint16)))},
        "palette_alpha": {"png": palette_with_transparency()},
        "gif": {"gif": other_format("GIF")}, "bmp_as_jpg": {"jpg": other_format("BMP")},
        "tiff": {"tiff": other_format("TIFF")}, "webp": {"webp": other_format("WEBP")},
        "null_sizes": {"png": png, "json": json.dumps({"width": None, "height": None, "aesthetic_score": None})},
    }
    bad = {  # key -> (members, reason)
        "undecodable": ({"png": b"\x89PNG not really" * 20}, "bad_image"),
        "zero_size": ({"png": png_claiming(0, 16)}, "bad_image"),
        "eps_as_jpg": ({"jpg": b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"},
                       "image_format_not_allowed"),
        "psd_as_jpg": ({"jpg": b"8BPS\x00\x01" + b"\x00" * 64}, "image_format_not_allowed"),
        "ico_as_jpg": ({"jpg": other_format("ICO")}, "image_format_not_allowed"),
        "svg_as_jpg": ({"jpg": b'<svg xmlns="http://www.w3.org/2000/svg" width="9" height="9"/>'},
                       "image_format_not_allowed"),
        "bomb": ({"png": png_claiming(30_000, 30_000)}, "decompression_bomb"),
        "zero_bytes": ({"jpg": b""}, "empty_image"),
        "latin1": ({"png": png, "txt": "caf\xe9".encode("latin-1")}, "bad_encoding"),
        "empty_caption": ({"png": png, "txt": ""}, "empty_caption"),
        "control_caption": ({"png": png, "txt": " \t\x00\x07\u200b\r\n "}, "empty_caption"),
        "huge_caption": ({"png": png, "txt": "a" * 20_000}, "caption_too_long"),
        "huge_json_caption": ({"png": png, "json": json.dumps({"caption": "b" * 12_000})}, "caption_too_long"),
        "deep_json": ({"png": png, "txt": "ok", "json": "[" * 100_000 + "]" * 100_000}, "bad_json"),
        "json_list": ({"png": png, "txt": "ok", "json": "[1, 2]"}, "bad_json"),
        "json_number": ({"png": png, "txt": "ok", "json": "42"}, "bad_json"),
        "json_huge_int": ({"png": png, "txt": "ok", "json": '{"width": ' + "9" * 5000 + "}"}, "bad_json"),
        "width_string": ({"png": png, "txt": "ok", "json": json.dumps({"width": "wide", "height": 16})},
                         "bad_metadata"),
        "width_negative": ({"png": png, "txt": "ok", "json": json.dumps({"width": -20, "height": 16})},
                           "bad_metadata"),
        "width_huge": ({"png": png, "txt": "ok", "json": json.dumps({"width": 1e30, "height": 16})},
                       "bad_metadata"),
        "score_nan": ({"png": png, "txt": "ok", "json": '{"aesthetic_score": NaN}'}, "bad_metadata"),
        "score_string": ({"png": png, "txt": "ok", "json": json.dumps({"AESTHETIC_SCORE": "6.5"})}, "bad_metadata"),
        "no_image": ({"txt": "where is it"}, "missing_image"),
        "no_caption": ({"png": png}, "missing_caption"),
        "too_large": ({"png": png, "txt": "big", "json": json.dumps({"pad": "x" * 400_000})}, "member_too_large"),
    }
    samples = [good_sample("good0")]
    for key, members in kept.items():
        samples.append({"__key__": key, "txt": f"kept {key}", **members})
    for key, (members, _) in bad.items():
        samples.append({"__key__": key, **({} if key == "no_caption" else {"txt": "a caption"}), **members})
    samples.append(good_sample("good1"))
    write_shard(tmp_path / "hostile-0.tar", samples)
    # Keys: a repeat later in the shard, a member twice, odd characters in names.
    raw_tar(tmp_path / "hostile-1.tar", [
        ("good2.png", png), ("good2.txt", b"fine"),
        ("dup.png", png), ("dup.txt", b"first copy"), ("other.png", png), ("other.txt", b"between"),
        ("dup.png", png), ("dup.txt", b"second copy"),
        ("twice.png", png), ("twice.txt", b"a"), ("twice.txt", b"b"),
        ("bell\x07.png", png), ("bell\x07.txt", b"control character"),
        ("../escape.png", png), ("../escape.txt", b"dot dot"),
        ("url.png", png), ("url.txt", b"reserved"), ("url.__url__", b"evil: never read, not a wanted member"),
        ("good3.png", png), ("good3.txt", b"fine too"),
    ])
    cut = write_shard(tmp_path / "hostile-2.tar", [good_sample("good4"), {"__key__": "cut", "txt": "x" * 9000}])
    cut.write_bytes(cut.read_bytes()[:6000])  # truncated tar: ends inside cut.txt
    (tmp_path / "hostile-3.tar").write_bytes(b"")  # zero-byte shard
    (tmp_path / "hostile-4.tar").write_bytes(b"\x00garbage, not a tar" * 50)

    skipped, keys = skipped_and_keys(image_module(f"{tmp_path}/hostile-*.tar").val_dataloader())
    expected = Counter(reason for _, reason in bad.values())
    expected.update({"duplicate_key": 2, "bad_member_name": 2, "truncated_tar": 1, "unreadable_shard": 2})
    assert skipped == expected
    assert keys == sorted(["good0", "good1", "good2", "good3", "good4", "dup", "other", "url", *kept])
    # A reserved extension is refused when it is read (stage 1 and the default read none).
    skips = SkipCounter()
    assert [s["__key__"] for s in iter_tar_samples(str(tmp_path / "hostile-1.tar"), skips)][-1] == "good3"
    assert skips.totals["bad_member_name"] == 3
    assert len(bad) >= 25 and len(set(expected)) >= 15


def test_hostile_samples_with_worker_processes(tmp_path):
    """The same through real DataLoader workers: nothing escapes a worker."""
    png = encode(split_image(20, 16))
    write_shard(tmp_path / "w-0.tar", [
        good_sample("good0"), {"__key__": "deep", "png": png, "txt": "x", "json": "{" * 50_000},
        {"__key__": "psd", "jpg": b"8BPS" + b"\0" * 30, "txt": "x"}, good_sample("good1"),
    ])
    write_shard(tmp_path / "w-1.tar", [good_sample("good2"), {"__key__": "blank", "png": png, "txt": "\x00\x01"}])
    skipped, keys = skipped_and_keys(image_module(f"{tmp_path}/w-*.tar", num_workers=2).val_dataloader())
    assert skipped == {"bad_json": 1, "image_format_not_allowed": 1, "empty_caption": 1}
    assert keys == ["good0", "good1", "good2"]


def test_odd_modes_decode_to_rgb_crops():
    for payload in (image_bytes("CMYK", "JPEG", colour=(0, 0, 0, 0)), palette_with_transparency(),
                    encode(Image.fromarray(np.full((8, 8), 65535, np.uint16))), image_bytes("RGB", size=(1, 1))):
        assert square_crop(open_image(payload, 10_000), 8, None).pixels.shape == (3, 8, 8)


# ----------------------------------------------------------------------------- cached features


def cached_sample(key: str, *, moments=None, pixels=None, cache=None, llm=None, json_extra=None) -> dict:
    cache = {"resolution": 16, "original_size": [16, 20], "crop_top_left": [0, 2], **(cache or {})}
    sample = {"__key__": key, "txt": f"caption {key}", "json": json.dumps({**(json_extra or {}), META_KEY: cache})}
    if moments is not None:
        sample[MOMENTS] = moments if isinstance(moments, bytes) else to_npy(moments)
    if pixels is not None:
        sample[PIXELS] = pixels if isinstance(pixels, bytes) else to_npy(pixels)
    if llm is not None:
        sample[LLM_STATES] = llm
    return sample


def npy_claiming(shape: tuple, dtype: str = "<f4") -> bytes:
    header = repr({"descr": dtype, "fortran_order": False, "shape": shape}).encode()
    header += b" " * (63 - (10 + len(header)) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header + b"\0" * 64


def pickled_npz() -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **{"en/0": np.array([{"evil": 1}], dtype=object)})
    return buffer.getvalue()


def test_hostile_cached_samples_are_each_counted(tmp_path):
    good_moments = lambda: torch.randn(8, 2, 2)  # noqa: E731
    states = llm_npz({"en/0": torch.randn(3, 4), "empty": torch.randn(1, 4)})
    with_llm = {"llm": SIGNATURE}
    samples = [cached_sample(f"good{i}", moments=good_moments(), llm=states, cache=with_llm) for i in range(5)]
    bad = {
        "absurd_header": (cached_sample("absurd_header", moments=npy_claiming((1 << 20, 1 << 20, 1 << 20))),
                          "bad_cache"),
        "wrong_dtype": (cached_sample("wrong_dtype", moments=np.zeros((8, 2, 2), np.int64)), "bad_cache"),
        "object_dtype": (cached_sample("object_dtype", moments=npy_claiming((1,), "|O")), "bad_cache"),
        "wrong_ndim": (cached_sample("wrong_ndim", moments=torch.randn(8, 4)), "bad_cache"),
        "short_data": (cached_sample("short_data", moments=to_npy(torch.randn(8, 2, 2))[:-8]), "bad_cache"),
        "not_npy": (cached_sample("not_npy", moments=b"definitely not numpy"), "bad_cache"),
        "pixels_wrong_shape": (cached_sample("pixels_wrong_shape", pixels=np.zeros((3, 8, 8), np.uint8)),
                               "bad_cache"),
        "pickled_llm": (cached_sample("pickled_llm", moments=good_moments(), llm=pickled_npz(), cache=with_llm),
                        "bad_cache"),
        "bad_zip_llm": (cached_sample("bad_zip_llm", moments=good_moments(), llm=b"PK\x03\x04broken", cache=with_llm),
                        "bad_cache"),
        "bad_crop_meta": (cached_sample("bad_crop_meta", moments=good_moments(), cache={"crop_top_left": "x"}),
                          "bad_cache"),
        "other_resolution": (cached_sample("other_resolution", moments=good_moments(), cache={"resolution": 32}),
                             "cache_mismatch"),
        "odd_shape": (cached_sample("odd_shape", moments=torch.randn(8, 3, 3), llm=states, cache=with_llm),
                      "odd_shape"),
        "odd_dtype": (cached_sample("odd_dtype", moments=torch.randn(8, 2, 2).half(), llm=states, cache=with_llm),
                      "odd_shape"),
        "uncached": ({**good_sample("uncached")}, "mixed_cache"),
    }
    order = ["good0", "absurd_header", "wrong_dtype", "odd_shape", "good1", "object_dtype", "wrong_ndim",
             "short_data", "good2", "uncached", "not_npy", "pixels_wrong_shape", "pickled_llm", "good3",
             "bad_zip_llm", "bad_crop_meta", "other_resolution", "odd_dtype", "good4"]
    by_key = {s["__key__"]: s for s in samples} | {key: sample for key, (sample, _) in bad.items()}
    write_shard(tmp_path / "cached.tar", [by_key[key] for key in order])

    module = image_module(str(tmp_path / "cached.tar"), val_batch_size=3, llm_signature=SIGNATURE)
    batches = list(module.val_dataloader())
    skipped, keys = skipped_and_keys(batches)
    assert skipped == Counter(reason for _, reason in bad.values())
    assert keys == [f"good{i}" for i in range(5)]
    for batch in batches:
        assert batch["moments"].shape[1:] == (8, 2, 2) and "image" not in batch
        assert batch["llm_states"].shape[-1] == 4


def test_cached_llm_states_are_keyed_by_the_llm_dtype(caplog):
    """States of a bf16 LLM differ from an fp32 one's: a cache from another dtype, or written
    before the dtype was recorded, is stale (the LLM runs), and the warning names the key."""
    import random

    run = {"path": "tiny-llm", "revision": None, "layers": [-1], "layer_mix": "mean", "max_length": 16,
           "bos": "auto", "dtype": "bf16"}
    wanted = llm_signature(run)
    assert wanted["dtype"] == "bfloat16" and llm_signature({**run, "dtype": "bfloat16"}) == wanted
    decoder = ImageTextDecoder(16, train=False, caption_dropout=0.0, llm_signature=wanted)
    states = llm_npz({"en/0": torch.randn(3, 4), "empty": torch.randn(1, 4)})
    old = {key: value for key, value in wanted.items() if key != "dtype"}  # a cache from before the change

    def decoded(signature: dict) -> dict:
        sample = cached_sample("s", moments=torch.randn(8, 2, 2), llm=states, cache={"llm": signature})
        raw = {**sample, "txt": sample["txt"].encode(), "json": sample["json"].encode()}
        return decoder(raw, random.Random(0))

    assert decoded(wanted)["llm_states"].shape == (3, 4)
    with caplog.at_level("WARNING", logger="datamodules.image_shards"):
        for stale, message in ((old, "llm.dtype: not recorded"), ({**wanted, "dtype": "float32"},
                                                                  "llm.dtype: cached 'float32', this run 'bfloat16'")):
            example = decoded(stale)
            assert "llm_states" not in example and example["moments"].shape == (8, 2, 2)  # the latents still count
            assert message in caplog.text and "stale" in caplog.text
    assert "llm.path" not in caplog.text  # only the differing key is named


def test_npy_header_is_checked_before_allocating():
    with pytest.raises(ValueError, match="claims"):
        from_npy(npy_claiming((1 << 40,)), ("float32",))
    assert from_npy(to_npy(np.arange(4, dtype=np.float32)), ("float32",), 1).tolist() == [0, 1, 2, 3]


# ----------------------------------------------------------------------------- text


def test_hostile_text_samples_are_each_counted(tmp_path, monkeypatch):
    import datamodules.text_shards as text_shards

    real_decode = text_shards.decode_text_sample

    def flaky(raw, skips, extra_codes=frozenset()):
        if raw["__key__"] == "explodes":
            raise KeyError("a decoder bug or an input nobody foresaw")
        return real_decode(raw, skips, extra_codes)

    monkeypatch.setattr(text_shards, "decode_text_sample", flaky)
    write_shard(tmp_path / "text-0.tar", [
        {"__key__": "good0", "txt": "hello", "zh.txt": "你好"},
        {"__key__": "deep", "json": "[" * 100_000},
        {"__key__": "deep_with_txt", "txt": "kept", "json": "{" * 100_000},
        {"__key__": "json_number", "json": "3.5"},
        {"__key__": "huge", "txt": "w " * 30_000},
        {"__key__": "huge_zh", "txt": "kept too", "zh.txt": "字" * 20_000},
        {"__key__": "controls", "txt": "\x00\x1b\u200b \t"},
        {"__key__": "explodes", "txt": "boom"},
        {"__key__": "json_wrong_types", "json": json.dumps({"caption": 5, "captions": ["a"], "zh": None})},
        {"__key__": "good1", "txt": "bye"},
    ])
    batches = list(text_module(str(tmp_path / "text-0.tar")).val_dataloader())
    skipped, _ = skipped_and_keys(batches)
    assert skipped == {"bad_json": 3, "caption_too_long": 2, "empty_caption": 1, "bad_sample": 1,
                       "missing_caption": 1}
    pairs = sorted((key, lang) for b in batches for key, lang in zip(b["key"], b["lang"]))
    assert pairs == [("deep_with_txt", "en"), ("good0", "en"), ("good0", "zh"), ("good1", "en"),
                     ("huge_zh", "en")]


# ----------------------------------------------------------------------------- no usable data, stalls


def test_training_on_nothing_usable_stops_with_the_shards_and_reasons(tmp_path):
    write_shard(tmp_path / "useless-0.tar", [{"__key__": f"k{i}", "txt": " "} for i in range(3)])
    write_shard(tmp_path / "useless-1.tar", [{"__key__": "j", "png": b"\x89PNG junk", "txt": "\x00"}])
    with pytest.raises(NoUsableData, match=r"useless-0\.tar.*empty_caption x"):
        next(iter(text_module(f"{tmp_path}/useless-*.tar", shuffle_buffer=2).train_dataloader()))
    with pytest.raises(NoUsableData, match=r"useless-.*top skip reasons: (missing_image|empty_caption)"):
        next(iter(image_module(f"{tmp_path}/useless-*.tar", shuffle_buffer=2).train_dataloader()))


def test_a_stalled_pipe_times_out_and_counts_as_a_failed_shard(tmp_path, monkeypatch):
    monkeypatch.setenv("LINGUADIFF_PIPE_TIMEOUT", "0.5")
    shard = write_shard(tmp_path / "s.tar", [{"__key__": "a", "txt": "first"}, {"__key__": "b", "txt": "x" * 3000}])
    skips, outcome = SkipCounter(), ShardOutcome()
    started = time.monotonic()
    samples = list(iter_tar_samples(f"pipe:head -c 2100 {shard}; sleep 30", skips, outcome=outcome))
    assert time.monotonic() - started < 10
    assert skips.totals == {"stalled_shard": 1} and not outcome.complete and len(samples) <= 1
    # Through the datamodule: a stalled shard beside a good one.
    write_shard(tmp_path / "ok.tar", [{"__key__": "ok", "txt": "fine"}])
    module = text_module([f"pipe:sleep 30; cat {shard}", f"pipe:cat {tmp_path / 'ok.tar'}"])
    skipped, keys = skipped_and_keys(module.val_dataloader())
    assert skipped == {"stalled_shard": 1} and keys == ["ok"]
    # A whole, well-behaved pipe is complete.
    outcome = ShardOutcome()
    assert len(list(iter_tar_samples(f"pipe:cat {shard}", SkipCounter(), outcome=outcome))) == 2 and outcome.complete


# ----------------------------------------------------------------------------- the cache writer


class PixelWriter:
    """scripts/cache_features.FeatureWriter for a pixel-space base, without any model."""

    @staticmethod
    def build():
        import sys

        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
        import cache_features

        writer = cache_features.FeatureWriter.__new__(cache_features.FeatureWriter)
        writer.resolution, writer.device, writer.vae, writer.text_encoder = 16, torch.device("cpu"), None, None
        writer.sizer = ImageTextDecoder(16, train=False)  # square crops
        return cache_features, writer


def test_cache_writer_skips_bad_samples_and_commits_only_whole_shards(tmp_path, monkeypatch):
    monkeypatch.setenv("LINGUADIFF_PIPE_TIMEOUT", "0.5")
    cache_features, writer = PixelWriter.build()
    png = encode(split_image(20, 16))
    samples = [
        good_sample("good0"),
        {"__key__": "deep", "png": png, "txt": "x", "json": "[" * 100_000},
        {"__key__": "eps", "jpg": b"%!PS-Adobe-3.0\n", "txt": "x"},
        {"__key__": "bomb", "png": png_claiming(30_000, 30_000), "txt": "x"},
        {"__key__": "blank", "png": png, "txt": "\x00 \n"},
        cached_sample("already", moments=torch.randn(8, 2, 2)),
        good_sample("good1"),
    ]
    source = write_shard(tmp_path / "in.tar", samples)
    out = tmp_path / "out"
    out.mkdir()
    stats = cache_features.cache_shard(writer, str(source), out / "in.tar", batch_size=2)
    assert "error" not in stats and stats["successes"] == 2
    assert stats["skipped"] == {"bad_json": 1, "image_format_not_allowed": 1, "decompression_bomb": 1,
                                "empty_caption": 1, "already_cached": 1}
    assert (out / "in.tar").is_file() and (out / "in_stats.json").is_file()
    batch = next(iter(image_module(str(out / "in.tar")).val_dataloader()))
    assert batch["key"] == ["good0", "good1"] and batch["image"].shape == (2, 3, 16, 16)

    # Shards cut short (truncated, stalled pipe, failing pipe, zero bytes) are not committed.
    cut = tmp_path / "cut.tar"
    cut.write_bytes(source.read_bytes()[:4000])
    (tmp_path / "empty.tar").write_bytes(b"")
    for name, url in [("cut.tar", str(cut)), ("stalled.tar", f"pipe:head -c 3000 {source}; sleep 30"),
                      ("failing.tar", f"pipe:cat {source}; exit 3"), ("empty.tar", str(tmp_path / "empty.tar"))]:
        stats = cache_features.cache_shard(writer, url, out / name, batch_size=2)
        assert stats.get("error"), name
        assert sorted(p.name for p in out.iterdir()) == ["in.tar", "in_stats.json"], name


# ----------------------------------------------------------------------------- counts over ranks


def _rank_sums(rank: int, world: int, port: int, out: str) -> None:
    import os
    from types import SimpleNamespace

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        module = text_module("unused.tar")
        module.trainer = SimpleNamespace(training=True, validating=False, sanity_checking=False,
                                         strategy=SimpleNamespace(root_device=torch.device("cpu")))
        mine = {"bad_json": rank + 1, "empty_caption": 2} if rank == 0 else {"bad_json": 5, "new_reason": 1}
        summed = module.on_after_batch_transfer({"skipped": mine, "key": []}, 0)["skipped"]
        # Between sums (every log_every_n_steps) counts wait on their rank, then arrive together.
        module.trainer.global_step, module.trainer.log_every_n_steps, module.trainer.max_steps = 11, 10, 100
        assert module.on_after_batch_transfer({"skipped": mine, "key": []}, 0)["skipped"] == {}
        module.trainer.global_step = 20
        assert module.on_after_batch_transfer({"skipped": mine, "key": []}, 0)["skipped"] == {
            k: 2 * v for k, v in summed.items()}
        module.trainer.training, module.trainer.validating = False, True  # per rank: never a collective
        assert module.on_after_batch_transfer({"skipped": mine}, 0)["skipped"] == mine
        Path(out, f"{rank}.json").write_text(json.dumps(summed))
    finally:
        torch.distributed.destroy_process_group()


def test_skip_counts_are_summed_over_ranks_before_logging(tmp_path):
    import socket

    from datamodules.skips import SKIP_REASONS, sum_over_ranks

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    # fork: no re-import of torch in the children (seconds, not a minute, on a loaded machine)
    torch.multiprocessing.start_processes(_rank_sums, args=(2, port, str(tmp_path)), nprocs=2, start_method="fork")
    for rank in range(2):
        assert json.loads((tmp_path / f"{rank}.json").read_text()) == {"bad_json": 6, "empty_caption": 2, "other": 1}
    assert sum_over_ranks({"bad_json": 3}) == {"bad_json": 3}  # one process: as it is
    # Every reason the readers count has its own slot in the sum (none lands in `other`).
    source = "".join(Path(p).read_text() for p in Path(tar_reading.__file__).parent.glob("*.py"))
    source += (Path(__file__).resolve().parents[1] / "scripts" / "cache_features.py").read_text()
    import re

    counted = set(re.findall(r'(?:skip|BadSample)\(\s*"([a-z_]+)"', source))
    counted |= set(re.findall(r'\("([a-z_]+)", (?:why|"key met)', source)) | {"mixed_cache", "odd_shape"}
    counted -= {"unknown_language", "wrong_columns", "unpaired", "empty"}  # convert_text's report, not a stream
    assert counted and counted <= set(SKIP_REASONS), counted - set(SKIP_REASONS)
