"""Aspect-ratio buckets: the bucket sets, each image's bucket and crop metadata, batches of
one size, and every sample in exactly one batch across ranks."""
from __future__ import annotations

import io
import random
from collections import Counter

import pytest
from PIL import Image

from datamodules.image_shards import PLACE, ImageTextDataModule, ImageTextDecoder
from linguadiff.buckets import bucket_problems, generate_buckets, nearest_bucket
from linguadiff.config import load_config, resolve
from linguadiff.settings_check import settings_problems
from tests.shard_helpers import write_shard

SDXL_PAPER = {(1024, 1024), (1152, 896), (896, 1152), (1216, 832), (832, 1216), (1344, 768), (768, 1344),
              (1536, 640), (640, 1536), (2048, 512), (512, 2048)}
DEMO = [(16, 16), (14, 18), (18, 14), (12, 20), (20, 12)]


def test_generated_sets_are_sdxls_and_sd15s_lists():
    sdxl = generate_buckets(1024 * 1024, 64, 4.0)
    assert SDXL_PAPER <= set(sdxl)
    assert all(h % 64 == 0 and w % 64 == 0 and h * w <= 1024 * 1024 and max(h, w) <= 4 * min(h, w) for h, w in sdxl)
    assert all(h * w >= 0.9 * 1024 * 1024 for h, w in sdxl)  # about the same pixel count each
    assert generate_buckets(512 * 512, 64, 2.0) == [(640, 384), (576, 448), (512, 512), (448, 576), (384, 640)]
    assert sorted(generate_buckets(16 * 16, 2, 2.0)) == sorted(DEMO)


def test_explicit_bucket_lists_are_checked():
    assert bucket_problems([[512, 512], [384, 640]], 64) == []
    assert any("multiples of 64" in p for p in bucket_problems([[512, 500]], 64))
    assert any("twice" in p for p in bucket_problems([[512, 512], [512, 512]], 64))
    assert bucket_problems([], 64) and bucket_problems([[512]], 64) and bucket_problems("512", 64)


def _png(width: int, height: int) -> bytes:
    out = io.BytesIO()
    # Left half red, right half blue: the crop offset shows in the pixels.
    image = Image.new("RGB", (width, height), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, width // 2, height))
    image.save(out, format="PNG")
    return out.getvalue()


@pytest.mark.parametrize("width,height,bucket,top_left", [
    (16, 16, (16, 16), (0, 0)),        # exactly a bucket
    (160, 160, (16, 16), (0, 0)),      # square, shrunk
    (300, 200, (12, 20), (0, 0)),      # wide 3:2 -> 12 x 20 (covered at 13 x 20)
    (200, 300, (20, 12), (0, 0)),      # tall
    (1000, 100, (12, 20), (0, 50)),    # panorama 10:1: the widest bucket, centre cut out
    (100, 1000, (20, 12), (50, 0)),    # a very tall strip
    (3, 2, (12, 20), (0, 0)),          # tiny: enlarged to cover
    (18, 14, (14, 18), (0, 0)),        # exactly another bucket
])
def test_each_shape_goes_to_its_nearest_bucket_with_true_metadata(width, height, bucket, top_left):
    raw = {"__key__": "k", "txt": "a red circle", "png": _png(width, height)}
    decoder = ImageTextDecoder(resolution=16, train=False, caption_dropout=0.0, buckets=tuple(DEMO))
    assert decoder.bucket_of(raw) == bucket
    example = decoder(raw, random.Random(0))
    assert tuple(example["image"].shape) == (3, *bucket)
    assert example["target_size"] == bucket and example["original_size"] == (height, width)
    scale = max(bucket[0] / height, bucket[1] / width)
    resized = (max(bucket[0], round(height * scale)), max(bucket[1], round(width * scale)))
    assert example["crop_top_left"] == ((resized[0] - bucket[0]) // 2, (resized[1] - bucket[1]) // 2)
    assert example["crop_top_left"] == top_left
    # Training: the random offset stays inside the resized image, on both axes.
    train = ImageTextDecoder(resolution=16, train=True, caption_dropout=0.0, buckets=tuple(DEMO))
    for seed in range(5):
        top, left = train(raw, random.Random(seed))["crop_top_left"]
        assert 0 <= top <= resized[0] - bucket[0] and 0 <= left <= resized[1] - bucket[1]
    if width >= 10 * height:  # the centre of a red|blue panorama: half red, half blue
        row = example["image"][:, bucket[0] // 2]
        assert row[0, 2] > 0.9 and row[2, 2] < -0.9 and row[0, -3] < -0.9 and row[2, -3] > 0.9


def test_ties_and_the_square_setting():
    assert nearest_bucket(DEMO, 10, 10) == (16, 16)
    square = ImageTextDecoder(resolution=16, train=False)
    assert square.target_size(100, 300) == (16, 16)


SHAPES = [(16, 16), (16, 24), (24, 16), (16, 32), (32, 16), (20, 16)]


@pytest.fixture(scope="module")
def mixed(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("mixed")
    for shard in range(4):
        samples = []
        for i in range(shard * 15, shard * 15 + 15):
            height, width = SHAPES[(i * 7) % len(SHAPES)]
            samples.append({"__key__": f"k{i:03d}", "txt": f"caption {i}", "png": _png(width, height)})
            if i % 11 == 0:  # a bad image among them: skipped, counted, never in a batch
                samples.append({"__key__": f"bad{i:03d}", "txt": "x", "png": b"\x89PNG broken"})
        write_shard(root / f"m-{shard}.tar", samples)
    return str(root / "m-{0..3}.tar")


def _datamodule(urls: str, batch_size: int = 4) -> ImageTextDataModule:
    datamodule = ImageTextDataModule({"urls": urls}, {"urls": urls}, resolution=16, batch_size=batch_size,
                                     val_batch_size=batch_size, num_workers=0, shuffle_buffer=9, seed=3,
                                     caption_dropout=0.0, buckets=DEMO)
    datamodule.setup("fit")
    return datamodule


def test_every_training_sample_in_exactly_one_batch_across_two_ranks(mixed):
    """What the training order hands the bucketing is recorded (with the pass each sample was
    read in): every sample of a pass is read by exactly one rank, and each one read is in
    exactly one batch or still waiting in its bucket's buffer, none twice, none lost."""
    datamodule = _datamodule(mixed)
    read_in_pass: dict[int, list[str]] = {}
    for rank in range(2):
        stream = datamodule._stream(datamodule.train_sources, train=True, batch_size=4, rank=rank, world_size=2)
        taken: list[str] = []
        bucketing = stream._bucketed_groups

        def recorded(raw_samples, *args, **kwargs):
            def record():
                for raw in raw_samples:
                    if raw["__key__"].startswith("k"):
                        taken.append(raw["__key__"])
                        read_in_pass.setdefault(raw[PLACE][1], []).append(raw["__key__"])
                    yield raw
            return bucketing(record(), *args, **kwargs)

        stream._bucketed_groups = recorded
        batches = iter(stream)
        emitted: list[str] = []
        for _ in range(30):  # 120 samples: four passes over this rank's 30
            batch = next(batches)
            assert len(set(map(tuple, batch["target_size"].tolist()))) == 1  # one size per batch
            assert tuple(batch["image"].shape) == (4, 3, *batch["target_size"][0].tolist())
            emitted.extend(batch["key"])
        waiting = [raw["__key__"] for raws in stream._buffers.waiting.values() for raw in raws]
        assert Counter(emitted) + Counter(waiting) == Counter(taken)
        assert len(waiting) <= len(DEMO) * 3
    # The last two passes may be partly taken: a shuffle block straddles a pass boundary.
    full_passes = sorted(read_in_pass)[:-2]
    assert len(full_passes) >= 2, sorted(read_in_pass)
    for number in full_passes:
        assert sorted(read_in_pass[number]) == [f"k{i:03d}" for i in range(60)]  # one rank each, all of them


def test_validation_gives_each_sample_once_in_batches_of_one_size(mixed):
    datamodule = _datamodule(mixed, batch_size=4)
    keys = []
    for rank in range(2):
        stream = datamodule._stream(datamodule.val_sources, train=False, batch_size=4, rank=rank, world_size=2)
        for batch in stream:
            assert len(set(map(tuple, batch["target_size"].tolist()))) == 1
            keys.extend(batch["key"])
    assert sorted(keys) == [f"k{i:03d}" for i in range(60)]  # no bad sample, no repeat, none lost
    again = [batch["key"] for batch in datamodule._stream(datamodule.val_sources, train=False, batch_size=4,
                                                           rank=0, world_size=1)]
    assert again == [batch["key"] for batch in datamodule._stream(datamodule.val_sources, train=False, batch_size=4,
                                                                   rank=0, world_size=1)]


def _cfg(*overrides: str):
    return resolve(load_config(["stage=2", "data.train.urls=/x/{0..1}.tar", *overrides]))


def test_bucket_settings_are_checked_by_key():
    assert not [p for p in settings_problems(_cfg("data.crop=buckets")) if "bucket" in p or "crop" in p]
    problems = settings_problems(_cfg("data.crop=buckets", "data.buckets=[[16,16],[15,17]]"))
    assert any("'data.buckets'" in p and "[15, 17]" in p and "multiples of 2" in p for p in problems), problems
    problems = settings_problems(_cfg("data.crop=round"))
    assert any("'data.crop'" in p for p in problems), problems
    problems = settings_problems(_cfg("data.crop=buckets", "data.bucket_step=3"))
    assert any("'data.bucket_step'" in p for p in problems), problems
    problems = settings_problems(_cfg("data.crop=buckets", "data.bucket_max_ratio=0.5"))
    assert any("'data.bucket_max_ratio'" in p for p in problems), problems


def test_presets_choose_their_buckets():
    from datamodules import build_datamodule

    assert build_datamodule(_cfg()).buckets is None  # the demo trains on squares
    demo = build_datamodule(_cfg("data.crop=buckets"))
    assert sorted(demo.buckets) == sorted(DEMO)
    cfg = _cfg("model=sdxl")
    assert cfg.data.crop == "buckets" and SDXL_PAPER <= set(build_datamodule(cfg).buckets)
    assert set(build_datamodule(_cfg("model=sd15")).buckets) == {(512, 512), (448, 576), (576, 448), (384, 640),
                                                                 (640, 384)}
    assert build_datamodule(_cfg("model=sdxl", "data.crop=square")).buckets is None


def test_compiled_parts_keep_compiling_for_every_bucket():
    """Past dynamo's recompile limit (8) a frame runs eagerly for good; the limit set from the
    bucket count keeps every bucket's size compiled (sizes forced static here, the worst case)."""
    import torch
    import torch._dynamo

    from linguadiff.buckets import allow_compiled_sizes

    compiled_shapes = []

    def counting_backend(graph, example_inputs):
        compiled_shapes.append(tuple(example_inputs[0].shape))
        return graph

    sizes = generate_buckets(1024 * 1024, 64, 4.0)[:12]
    with torch._dynamo.config.patch(automatic_dynamic_shapes=False, recompile_limit=8,
                                    accumulated_recompile_limit=256):
        torch._dynamo.reset()
        assert allow_compiled_sizes(len(sizes)) >= len(sizes)
        step = torch.compile(lambda x: (x * 2).sum(), backend=counting_backend)
        for h, w in sizes:
            step(torch.ones(1, h // 64, w // 64))
    torch._dynamo.reset()
    assert len(compiled_shapes) == len(sizes)  # not stuck at 8 with the rest eager
