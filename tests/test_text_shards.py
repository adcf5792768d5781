"""Stage-1 text shard pipeline: splitting, language draws, bad input, tokenizers, URLs.

Every test writes its own tiny shards in tmp_path; the DataLoader tests use real worker
processes because that is where splitting and skip accounting can go wrong.
"""
from __future__ import annotations

import itertools
import json
import os
import tarfile
from collections import Counter
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from datamodules.skips import SkipCounter
from datamodules.sources import expand_urls
from datamodules.streams import Consumer
from datamodules.tar_reading import iter_tar_samples
from datamodules.text_shards import TextPairStream, TextShardsDataModule
from tests.shard_helpers import write_shard

pytestmark = pytest.mark.timeout(60)


def parallel_shards(directory: Path, num_shards: int, per_shard: int) -> dict[tuple[str, str], str]:
    """Shards where sample i has English, zh when i is even, fr when i % 3 == 0.

    Returns the expected validation pairs: (key, lang) -> student text.
    """
    expected = {}
    for shard in range(num_shards):
        samples = []
        for index in range(per_shard):
            key = f"s{shard}-{index:03d}"
            sample = {"__key__": key, "txt": f"english {key}"}
            expected[(key, "en")] = f"english {key}"
            if index % 2 == 0:
                sample["zh.txt"] = f"中文 {key}"
                expected[(key, "zh")] = f"中文 {key}"
            if index % 3 == 0:
                sample["json"] = json.dumps({"fr": f"français {key}", "url": "http://x"})
                expected[(key, "fr")] = f"français {key}"
            samples.append(sample)
        write_shard(directory / f"shard-{shard:03d}.tar", samples)
    return expected


def collect_pairs(batches) -> Counter:
    pairs = Counter()
    for batch in batches:
        for key, lang, teacher, student in zip(
            batch["key"], batch["lang"], batch["teacher_text"], batch["student_text"]
        ):
            assert teacher == f"english {key}"
            pairs[(key, lang, student)] += 1
    return pairs


def expected_counter(expected: dict[tuple[str, str], str]) -> Counter:
    return Counter({(key, lang, text): 1 for (key, lang), text in expected.items()})


def data_module(urls, **kwargs) -> TextShardsDataModule:
    return TextShardsDataModule(train={"urls": urls}, val={"urls": urls}, **kwargs)


@pytest.mark.parametrize("num_shards", [4, 1])
def test_validation_yields_every_pair_exactly_once_with_two_workers(tmp_path, num_shards):
    expected = parallel_shards(tmp_path, num_shards=num_shards, per_shard=7)
    dm = data_module(f"{tmp_path}/shard-*.tar", batch_size=4, num_workers=2)
    dm.setup("fit")
    batches = list(dm.val_dataloader())
    assert collect_pairs(batches) == expected_counter(expected)
    # Partial last batches are kept (one per worker at most), everything else is full.
    assert sum(len(batch["key"]) < 4 for batch in batches) <= 2
    # The finite stream is repeatable: a second epoch sees the same pool.
    assert collect_pairs(dm.val_dataloader()) == expected_counter(expected)


@pytest.mark.parametrize("world_size,num_shards", [(3, 2), (2, 5)])
def test_validation_split_across_ranks_and_workers(tmp_path, world_size, num_shards):
    """Simulated ranks (the dataset takes rank/world) x 2 real workers each."""
    expected = parallel_shards(tmp_path, num_shards=num_shards, per_shard=5)
    dm = data_module(f"{tmp_path}/shard-*.tar", batch_size=3)
    dm.setup("fit")
    pairs = Counter()
    for rank in range(world_size):
        stream = TextPairStream(
            dm.val_sources, train=False, batch_size=3, language_weights={}, seed=0,
            shuffle_buffer=10, tokenizers=None, rank=rank, world_size=world_size,
        )
        pairs += collect_pairs(torch.utils.data.DataLoader(stream, batch_size=None, num_workers=2))
    assert pairs == expected_counter(expected)


def test_training_stream_reads_all_shards_in_full_batches(tmp_path):
    parallel_shards(tmp_path, num_shards=3, per_shard=6)
    dm = data_module(f"{tmp_path}/shard-{{000..002}}.tar", batch_size=5, num_workers=2, shuffle_buffer=8)
    batches = list(itertools.islice(dm.train_dataloader(), 40))
    assert all(len(batch["key"]) == 5 for batch in batches)
    shards_seen = {key.split("-")[0] for batch in batches for key in batch["key"]}
    assert shards_seen == {"s0", "s1", "s2"}
    # Infinite: 200 pairs from 18 samples means several passes.
    assert Counter(key for batch in batches for key in batch["key"]).most_common(1)[0][1] > 5


def test_training_with_one_shard_feeds_every_worker_a_disjoint_slice(tmp_path):
    parallel_shards(tmp_path, num_shards=1, per_shard=6)
    dm = data_module(str(tmp_path / "shard-000.tar"), batch_size=3, num_workers=2, shuffle_buffer=4)
    batches = list(itertools.islice(dm.train_dataloader(), 12))
    # The DataLoader takes batches from its workers in turn: even = worker 0, odd = worker 1.
    worker_keys = [{key for batch in batches[worker::2] for key in batch["key"]} for worker in (0, 1)]
    assert worker_keys[0] and worker_keys[1]
    assert not worker_keys[0] & worker_keys[1]
    assert worker_keys[0] | worker_keys[1] == {f"s0-{index:03d}" for index in range(6)}


def test_fewer_samples_than_consumers_does_not_starve(tmp_path):
    write_shard(tmp_path / "tiny.tar", [{"__key__": "only", "txt": "english only"}])
    dm = data_module(str(tmp_path / "tiny.tar"), batch_size=2)
    dm.setup("fit")
    for rank in range(3):
        stream = TextPairStream(
            dm.train_sources, train=True, batch_size=2, language_weights={}, seed=0,
            shuffle_buffer=1, tokenizers=None, rank=rank, world_size=3,
        )
        assert next(iter(stream))["key"] == ["only", "only"]


def test_all_shards_unreadable_raises_instead_of_hanging(tmp_path):
    (tmp_path / "bad.tar").write_bytes(b"not a tar file at all" * 100)
    dm = data_module(str(tmp_path / "bad.tar"), batch_size=2, num_workers=0)
    with pytest.raises(RuntimeError, match="no readable sample"):
        next(iter(dm.train_dataloader()))


def test_language_weights(tmp_path):
    write_shard(
        tmp_path / "pairs.tar",
        [{"__key__": f"k{index}", "txt": "hello", "zh.txt": "你好", "fr.txt": "bonjour"} for index in range(50)],
    )
    url = str(tmp_path / "pairs.tar")
    dm = data_module(url, batch_size=50, num_workers=0, languages={"en": 1.0, "zh": 3.0, "fr": 0})
    langs = Counter(lang for batch in itertools.islice(dm.train_dataloader(), 60) for lang in batch["lang"])
    assert "fr" not in langs
    assert 0.72 < langs["zh"] / (langs["zh"] + langs["en"]) < 0.78  # 3000 draws, expected 0.75
    # Validation ignores the weights: every pair, fr included.
    assert Counter(lang for batch in dm.val_dataloader() for lang in batch["lang"]) == {"en": 50, "zh": 50, "fr": 50}


def test_excluded_languages_are_counted_not_silent(tmp_path):
    write_shard(tmp_path / "en.tar", [{"__key__": f"k{index}", "txt": "hello"} for index in range(4)]
                + [{"__key__": "z", "txt": "hello", "zh.txt": "你好"}])
    dm = data_module(str(tmp_path / "en.tar"), batch_size=3, num_workers=0, languages={"en": 0}, shuffle_buffer=1)
    batch = next(iter(dm.train_dataloader()))
    assert batch["lang"] == ["zh"] * 3 and batch["student_text"] == ["你好"] * 3
    assert batch["skipped"]["lang_excluded"] >= 4


def test_source_weights(tmp_path):
    write_shard(tmp_path / "a.tar", [{"__key__": f"a{index}", "txt": "from a"} for index in range(20)])
    write_shard(tmp_path / "b.tar", [{"__key__": f"b{index}", "txt": "from b"} for index in range(20)])
    train = OmegaConf.create(
        {"sources": [{"urls": str(tmp_path / "a.tar"), "weight": 3.0}, {"urls": [str(tmp_path / "b.tar")]}]}
    )
    dm = TextShardsDataModule(train=train, val=None, batch_size=40, num_workers=0)
    texts = Counter(text for batch in itertools.islice(dm.train_dataloader(), 50) for text in batch["teacher_text"])
    assert 0.72 < texts["from a"] / 2000 < 0.78
    assert dm.val_dataloader() == []


def test_json_caption_layouts(tmp_path):
    write_shard(
        tmp_path / "json.tar",
        [
            {"__key__": "flat", "json": json.dumps({"en": "a cat", "zh": "一只猫", "url": "u", "key": "k"})},
            {"__key__": "nested", "json": json.dumps({"caption": "a dog", "captions": {"de": "ein Hund"}})},
            {"__key__": "files_win", "txt": "a bird", "ja.txt": "鳥", "json": json.dumps({"caption": "ignored", "ja": "x"})},
            {"__key__": "three", "json": json.dumps({"en": "a fish", "yue": "魚", "raw": "not a language"})},
        ],
    )
    dm = data_module(str(tmp_path / "json.tar"), batch_size=16, num_workers=0, languages={"yue": 1.0})
    (batch,) = list(dm.val_dataloader())
    pairs = set(zip(batch["key"], batch["lang"], batch["teacher_text"], batch["student_text"]))
    assert pairs == {
        ("flat", "en", "a cat", "a cat"), ("flat", "zh", "a cat", "一只猫"),
        ("nested", "en", "a dog", "a dog"), ("nested", "de", "a dog", "ein Hund"),
        ("files_win", "en", "a bird", "a bird"), ("files_win", "ja", "a bird", "鳥"),
        ("three", "en", "a fish", "a fish"), ("three", "yue", "a fish", "魚"),
    }
    assert batch["skipped"] == {}


def corrupt_header_of(path: Path, member_name: str) -> None:
    """Overwrites part of a member's header so its checksum fails."""
    with tarfile.open(path) as tar:
        offset = tar.getmember(member_name).offset
    data = bytearray(path.read_bytes())
    data[offset : offset + 8] = b"\xff" * 8
    path.write_bytes(bytes(data))


def test_bad_input_is_skipped_and_counted_in_batches(tmp_path, caplog):
    good = [{"__key__": f"good{index}", "txt": f"good {index}", "zh.txt": f"好 {index}"} for index in range(4)]
    write_shard(
        tmp_path / "bad-0.tar",
        [
            good[0],
            {"__key__": "empty", "txt": "   \n"},
            {"__key__": "latin1", "txt": "caf\xe9".encode("latin-1")},
            {"__key__": "no_zh", "txt": "english kept", "zh.txt": " "},
            {"__key__": "bad_zh", "txt": "english kept too", "zh.txt": b"\xff\xfe"},
            {"__key__": "broken_json", "json": b"{not json"},
            {"__key__": "zh_only", "zh.txt": "只有中文"},
            {"__key__": "lost", "txt": "header will be corrupted"},
            good[1],
        ],
    )
    corrupt_header_of(tmp_path / "bad-0.tar", "lost.txt")
    truncated = write_shard(tmp_path / "bad-1.tar", [good[2], {"__key__": "cut", "txt": "x" * 5000}, good[3]])
    truncated.write_bytes(truncated.read_bytes()[:3000])  # ends inside the data of cut.txt
    (tmp_path / "bad-2.tar").write_bytes(b"")

    dm = data_module(f"{tmp_path}/bad-*.tar", batch_size=2, num_workers=2)
    batches = list(dm.val_dataloader())
    skipped = Counter()
    for batch in batches:
        assert all(isinstance(count, int) for count in batch["skipped"].values())
        skipped.update(batch["skipped"])
    assert skipped == {
        "empty_caption": 1, "bad_encoding": 2, "missing_parallel": 1, "bad_json": 1,
        "missing_caption": 1, "corrupt_member": 1, "truncated_tar": 1, "unreadable_shard": 1,
    }
    pairs = {(key, lang) for batch in batches for key, lang in zip(batch["key"], batch["lang"])}
    assert pairs == {
        ("good0", "en"), ("good0", "zh"), ("good1", "en"), ("good1", "zh"), ("good2", "en"), ("good2", "zh"),
        ("no_zh", "en"), ("bad_zh", "en"),
    }
    # The warnings name the shard, the key and the reason (read in-process: caplog does
    # not see the worker processes).
    in_process = data_module(f"{tmp_path}/bad-*.tar", batch_size=2, num_workers=0)
    with caplog.at_level("WARNING"):
        list(in_process.val_dataloader())
    assert any("unreadable_shard" in message and "bad-2.tar" in message for message in caplog.messages)
    assert any("empty_caption" in m and "bad-0.tar" in m and "'empty'" in m for m in caplog.messages)


def test_skip_warnings_are_rate_limited(caplog):
    skips = SkipCounter(full_warnings=3, summary_every=10)
    with caplog.at_level("WARNING"):
        for index in range(25):
            skips.skip("empty_caption", "shard.tar", f"k{index}")
    assert len(caplog.records) == 3 + 2  # 3 in full, then summaries at 10 and 20
    assert skips.take() == {"empty_caption": 25} and skips.take() == {}


class LengthTokenizer:
    """Picklable stand-in for a tokenizer; records which process ran it."""

    def __call__(self, texts: list[str], teacher_texts: list[str] | None = None) -> dict[str, torch.Tensor]:
        return {
            "input_ids": torch.tensor([len(text) for text in texts]),
            "teacher_lengths": torch.tensor([len(text) for text in teacher_texts or []]),
            "pid": torch.tensor([os.getpid()]),
        }


def test_tokenizers_run_in_workers(tmp_path):
    parallel_shards(tmp_path, num_shards=2, per_shard=4)
    dm = data_module(f"{tmp_path}/shard-*.tar", batch_size=3, num_workers=2)
    dm.set_tokenizers({"teacher": LengthTokenizer(), "student": LengthTokenizer()})
    batch = next(iter(dm.train_dataloader()))
    for role in ("teacher", "student"):
        tokens = batch[f"{role}_tokens"]
        assert tokens["input_ids"].tolist() == [len(text) for text in batch[f"{role}_text"]]
        assert tokens["pid"].item() != os.getpid()
    # The student's tokenizer also gets the teacher's text (stage 1 bounds the LLM's input by it).
    assert batch["student_tokens"]["teacher_lengths"].tolist() == [len(text) for text in batch["teacher_text"]]
    with pytest.raises(ValueError, match="unknown tokenizer role"):
        dm.set_tokenizers({"techer": LengthTokenizer()})


def test_brace_expansion_pipe_urls_and_missing_paths(tmp_path):
    expected = parallel_shards(tmp_path, num_shards=3, per_shard=2)
    assert expand_urls(f"{tmp_path}/shard-{{000..002}}.tar") == [f"{tmp_path}/shard-{index:03d}.tar" for index in range(3)]
    pipe_urls = [f"pipe:cat {tmp_path}/shard-{index:03d}.tar" for index in range(3)]
    assert expand_urls(f"pipe:cat {tmp_path}/shard-{{000..002}}.tar") == pipe_urls
    dm = data_module(pipe_urls, batch_size=4, num_workers=0)
    assert collect_pairs(dm.val_dataloader()) == expected_counter(expected)

    missing = f"{tmp_path}/nothing-*.tar"
    with pytest.raises(FileNotFoundError, match="nothing-"):
        expand_urls(missing)
    with pytest.raises(FileNotFoundError, match="typo.tar"):
        data_module(str(tmp_path / "typo.tar"), batch_size=2).setup("fit")
    with pytest.raises(ValueError, match="weigth"):
        TextShardsDataModule(train={"urls": pipe_urls, "weigth": 2}, val=None, batch_size=2).setup("fit")


def test_failing_pipe_is_counted_not_fatal(tmp_path):
    skips = SkipCounter()
    assert list(iter_tar_samples(f"pipe:cat {tmp_path}/absent.tar", skips)) == []
    assert sum(skips.take().values()) == 1


def test_consumer_index_is_node_then_worker():
    assert Consumer(rank=1, world_size=2, worker_id=1, num_workers=3).index == 4
    assert Consumer(rank=1, world_size=2, worker_id=1, num_workers=3).count == 6


def test_the_datamodule_gives_the_progress_log_its_epoch_size_and_filter_reasons(tmp_path, caplog):
    from types import SimpleNamespace

    from callbacks.progress import ThroughputLogger

    parallel_shards(tmp_path, num_shards=3, per_shard=5)
    dm = data_module(f"{tmp_path}/shard-{{000..002}}.tar", batch_size=3)
    assert dm.samples_per_epoch() is None  # not set up yet: no sources to count
    dm.setup("fit")
    assert dm.samples_per_epoch() == 15
    trainer = SimpleNamespace(datamodule=dm, accumulate_grad_batches=1, world_size=2, num_devices=2, num_nodes=1,
                              strategy=object(), precision="32-true", global_step=0, max_steps=10,
                              is_global_zero=True)
    with caplog.at_level("INFO", logger="callbacks.progress"):
        ThroughputLogger().on_train_start(trainer, None)
    assert "global batch 6 samples" in caplog.text
    assert "15 training samples: 2.5 steps per epoch" in caplog.text

    # The datamodule also says which skip reasons are settings, not bad input (filter_reasons).
    module = SimpleNamespace(batch_size_of=lambda batch: 3, log_dict=lambda *args, **kwargs: None,
                             skipped={"lang_excluded": 5, "bad_encoding": 2})
    trainer.global_step, trainer.callback_metrics = 50, {}
    progress = ThroughputLogger(every_n_steps=50)
    progress.on_train_batch_start(trainer, module, None, 0)
    caplog.clear()
    with caplog.at_level("INFO", logger="callbacks.progress"):
        progress.on_train_batch_end(trainer, module, None, None, 0)
    assert "skipped inputs 2 (data/skipped_*" in caplog.text
