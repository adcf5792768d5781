"""A resumed data stream gives exactly the batches the uninterrupted one would have given.

The datamodule is driven the way Lightning drives it: a step takes a batch
(`on_before_batch_transfer`), finishes it (`step_done`), a checkpoint takes `state_dict()`,
and the relaunch gets `load_state_dict()` before it builds its DataLoader.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import webdataset as wds

from datamodules.image_shards import ImageTextDataModule
from datamodules.skips import SkipCounter
from datamodules.streams import Consumer, ReadPosition, iter_consumer_samples
from datamodules.text_shards import TextShardsDataModule
from tests.shard_helpers import write_demo_world


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("resume")
    world = write_demo_world(root, text_train=80, image_train=72, per_shard=16)
    # A second, smaller source with bad samples among good ones: mixing by weight, skips
    # while a block is read again after a resume, and the sample split (fewer shards than
    # readers) all take part.
    with wds.TarWriter(str(root / "extra-00000.tar")) as sink:
        for i in range(12):
            sink.write({"__key__": f"extra{i:03d}", "txt": f"a red circle number {i}", "zh.txt": "红色圆形",
                        "jpg": _tiny_jpeg(i)})
            if i == 1:  # a key met again: counted by the tar reader itself
                sink.write({"__key__": "extra000", "txt": "a copy"})
            if i % 4 == 0:
                sink.write({"__key__": f"empty{i:03d}", "txt": "   ", "jpg": b"not an image"})
    return {**world, "extra": root / "extra-00000.tar"}


def _tiny_jpeg(seed: int) -> bytes:
    import io

    from PIL import Image

    image = Image.new("RGB", (40, 32), (seed * 20 % 256, 80, 160))
    out = io.BytesIO()
    image.save(out, format="JPEG")
    return out.getvalue()


def _datamodule(kind: str, shards: dict[str, Path], workers: int):
    train = {"sources": [{"urls": str(shards["train" if kind == "text" else "image_train"]), "weight": 3},
                         {"urls": str(shards["extra"]), "weight": 1}]}
    common = {"val": None, "batch_size": 5, "num_workers": workers, "shuffle_buffer": 7, "seed": 11}
    if kind == "text":
        return TextShardsDataModule(train, **common)
    # image-buckets: the demo images are square, the extra source's 40 x 32: two buckets, and
    # bucket buffers carried across shuffle blocks and passes, resumed by reading them again.
    buckets = [(16, 16), (14, 18), (18, 14)] if kind == "image-buckets" else None
    return ImageTextDataModule(train, resolution=16, buckets=buckets, **common)


def _steps(datamodule, loader_iter, count: int) -> list[dict]:
    batches = []
    for _ in range(count):
        batch = datamodule.on_before_batch_transfer(next(loader_iter), 0)
        datamodule.step_done()
        batches.append(batch)
    return batches


def _same(a: dict, b: dict) -> bool:
    if a.keys() != b.keys():
        return False
    for name in a:
        if name == "skipped":
            continue
        x, y = a[name], b[name]
        if isinstance(x, torch.Tensor):
            if not (x.shape == y.shape and x.dtype == y.dtype and torch.allclose(x, y, rtol=0, atol=0, equal_nan=True)):
                return False  # bit for bit (missing aesthetic scores are nan)
        elif x != y:
            return False
    return True


@pytest.mark.parametrize("kind,workers,stop", [
    (kind, workers, stop) for kind in ("text", "image") for workers, stop in ((0, 3), (2, 5), (3, 7))
] + [("image-buckets", 0, 3), ("image-buckets", 2, 5)])
def test_a_resumed_stream_gives_the_same_batches(shards, kind, workers, stop):
    total = 24  # more than one pass over the data: the pass boundary is crossed after a resume
    straight = _datamodule(kind, shards, workers)
    straight.setup("fit")
    reference = _steps(straight, iter(straight.train_dataloader()), total)

    first = _datamodule(kind, shards, workers)
    first.setup("fit")
    head = _steps(first, iter(first.train_dataloader()), stop)
    saved = first.state_dict()
    # The prefetched batches the DataLoader holds are not part of the position.
    assert all(_same(a, b) for a, b in zip(head, reference))

    relaunched = _datamodule(kind, shards, workers)
    relaunched.setup("fit")
    relaunched.load_state_dict(saved)
    tail = _steps(relaunched, iter(relaunched.train_dataloader()), total - stop)
    differ = [stop + i for i, (a, b) in enumerate(zip(tail, reference[stop:])) if not _same(a, b)]
    assert not differ, f"batches {differ} differ from the uninterrupted stream's"
    assert sum(len(batch["key"]) for batch in reference) > 84 + 15  # both sources read past a full pass
    if kind == "image-buckets":
        assert {tuple(batch["image"].shape[2:]) for batch in reference} == {(16, 16), (14, 18)}
        assert all(len(set(map(tuple, batch["target_size"].tolist()))) == 1 for batch in reference)
        waiting = [place for state in saved["train_streams"][0]["workers"].values()
                   for _, _, places in state["buckets"] for place in places]
        assert waiting, "the resumed stream must have had samples waiting in its bucket buffers"


def test_a_batch_taken_but_not_finished_is_not_in_the_position(shards):
    datamodule = _datamodule("text", shards, 0)
    datamodule.setup("fit")
    loader = iter(datamodule.train_dataloader())
    _steps(datamodule, loader, 2)
    after_two = datamodule.state_dict()
    datamodule.on_before_batch_transfer(next(loader), 0)  # a step took a third batch, then died
    assert datamodule.state_dict() == after_two


def test_a_changed_data_setting_reseeds_instead_of_misreading(shards, caplog):
    first = _datamodule("text", shards, 2)
    first.setup("fit")
    _steps(first, iter(first.train_dataloader()), 3)
    saved = first.state_dict()

    other = _datamodule("text", shards, 1)  # one worker now: the saved positions do not apply
    other.setup("fit")
    other.load_state_dict(saved)

    class Trainer:
        global_step = 3

    other.trainer = Trainer()
    batch = next(iter(other.train_dataloader()))
    assert len(batch["key"]) == 5
    assert "cannot continue the stream exactly" in caplog.text and "data.num_workers changed" in caplog.text
    assert other.state_dict()["train_streams"][0]["seed"] == 11 + 3


def test_a_reader_position_starts_mid_shard_without_recounting_skips(shards):
    urls = [str(shards["extra"])]
    consumer = Consumer()
    skips = SkipCounter()
    position = ReadPosition()
    everything = iter_consumer_samples(urls, consumer, skips, infinite=True, position=position)
    first = [next(everything)["__key__"] for _ in range(7)]
    saved, counted_before = ReadPosition(**vars(position)), skips.totals.copy()
    rest = [next(everything)["__key__"] for _ in range(20)]  # into the next pass over the shard
    assert counted_before["duplicate_key"] == 1 and skips.totals["duplicate_key"] == 2

    again = SkipCounter()
    resumed = iter_consumer_samples(urls, consumer, again, infinite=True, position=saved)
    assert [next(resumed)["__key__"] for _ in range(20)] == rest
    assert first[0] not in rest[:5]
    # The samples read again only to find the place are not counted twice; the next pass is.
    assert again.totals == skips.totals - counted_before


@pytest.mark.parametrize("damage", ["rng", "position", "worker"])
def test_a_malformed_stream_position_reseeds_instead_of_crashing_the_workers(shards, caplog, damage):
    first = _datamodule("text", shards, 2)
    first.setup("fit")
    _steps(first, iter(first.train_dataloader()), 3)
    saved = first.state_dict()
    mine = saved["train_streams"][0]
    state = mine["workers"][0]
    if damage == "rng":
        state["sample_rng"] = (3, (1, 2, 3), None)  # not a generator state
    elif damage == "position":
        state["order"]["positions"][0]["shard"] = "../../etc"
    else:
        mine["next_worker"] = 7

    relaunched = _datamodule("text", shards, 2)
    relaunched.setup("fit")
    relaunched.load_state_dict(saved)

    class Trainer:
        global_step = 3

    relaunched.trainer = Trainer()
    assert len(next(iter(relaunched.train_dataloader()))["key"]) == 5
    assert "stream position does not parse" in caplog.text


def _byte_tokens(texts: list[str]) -> dict[str, torch.Tensor]:
    """A model-free tokenizer: UTF-8 bytes, right-padded (what the workers run per batch)."""
    rows = [list(text.encode())[:12] or [0] for text in texts]
    width = max(len(row) for row in rows)
    ids = torch.tensor([row + [0] * (width - len(row)) for row in rows])
    mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in rows])
    return {"input_ids": ids, "attention_mask": mask}


def test_next_prompts_look_ahead_leaves_batches_and_positions_unchanged(shards):
    """speed.encode_ahead: each batch carries the next one's tokens and keys, read one batch
    ahead, while the batches and the saved stream positions stay those of a plain loader."""
    from linguadiff.models.encode_ahead import NEXT_PROMPTS

    def run(next_prompts: bool, steps: int):
        datamodule = _datamodule("image", shards, 2)
        datamodule.set_tokenizers({"student": _byte_tokens})
        datamodule.next_prompts = next_prompts
        datamodule.setup("fit")
        return datamodule, _steps(datamodule, iter(datamodule.train_dataloader()), steps)

    plain, reference = run(False, 7)
    ahead, batches = run(True, 7)
    assert all(NEXT_PROMPTS in batch for batch in batches)  # the 8th batch was read to tell the 7th
    for batch, following in zip(batches, batches[1:]):
        hint = batch[NEXT_PROMPTS]
        assert hint["key"] == following["key"]
        assert torch.equal(hint["input_ids"], following["student_tokens"]["input_ids"])
        assert hint["lengths"] == following["student_tokens"]["attention_mask"].sum(1).tolist()
    flat = lambda batch: {k: v for k, v in batch.items() if k not in (NEXT_PROMPTS, "student_tokens")}  # noqa: E731
    assert all(_same(flat(a), flat(b)) and _same(a["student_tokens"], b["student_tokens"])
               for a, b in zip(batches, reference))
    assert ahead.state_dict() == plain.state_dict()  # the batch read ahead is not in the position
