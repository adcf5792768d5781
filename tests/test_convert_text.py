"""The TSV / text -> text shard converter: round trips through the datamodule, and its counts."""
from __future__ import annotations

import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from datamodules.convert_text import main
from datamodules.text_shards import TextShardsDataModule

pytestmark = pytest.mark.timeout(60)


def read_back(out: Path, prefix: str = "text") -> set[tuple[str, str, str]]:
    """(lang, teacher, student) of every validation pair in the written shards."""
    dm = TextShardsDataModule(train={"urls": f"{out}/{prefix}-*.tar"}, val={"urls": f"{out}/{prefix}-*.tar"},
                              batch_size=64, num_workers=0)
    pairs = set()
    for batch in dm.val_dataloader():
        assert batch["skipped"] == {}
        pairs.update(zip(batch["lang"], batch["teacher_text"], batch["student_text"]))
    return pairs


def test_tsv_with_header_round_trip_and_counts(tmp_path, capsys):
    tsv = tmp_path / "captions.tsv"
    tsv.write_bytes(
        "en\tzh\tfr\n"
        "a red ball\t红球\tune balle rouge\n"
        "a blue cube\t蓝色立方体\t\n"  # empty fr cell: English and Chinese still written
        "\n"
        "too\tfew\n"
        "\tno english\tpas d'anglais\n".encode("utf-8")
        + b"caf\xe9\tbad\tbytes\n"
        + "a green cone\t绿锥\tun cône vert\n".encode("utf-8")
    )
    assert main([str(tsv), "--out", str(tmp_path / "out"), "--shard-size", "2"]) == 0
    printed = capsys.readouterr().out
    assert sorted(path.name for path in (tmp_path / "out").iterdir()) == ["text-000000.tar", "text-000001.tar"]
    assert read_back(tmp_path / "out") == {
        ("en", "a red ball", "a red ball"), ("zh", "a red ball", "红球"), ("fr", "a red ball", "une balle rouge"),
        ("en", "a blue cube", "a blue cube"), ("zh", "a blue cube", "蓝色立方体"),
        ("en", "a green cone", "a green cone"), ("zh", "a green cone", "绿锥"), ("fr", "a green cone", "un cône vert"),
    }
    for line in ["shards written: 2", "  en: 3", "  zh: 3", "  fr: 2", "lines skipped: 4", "  empty: 2",
                 "  wrong_columns: 1", "  bad_encoding: 1", f"{tsv}:4: empty", f"{tsv}:5: wrong_columns",
                 f"{tsv}:7: bad_encoding", "empty non-English cells left out: 1",
                 f"{tmp_path / 'out'}/text-{{000000..000001}}.tar"]:
        assert line in printed


def test_paired_files_plain_text_and_headerless_tsv(tmp_path, capsys):
    (tmp_path / "en.txt").write_text("one\ntwo\nthree\nfour\n", encoding="utf-8")
    (tmp_path / "de.txt").write_text("eins\nzwei\n\n", encoding="utf-8")
    (tmp_path / "plain.txt").write_text("just english\n  \n", encoding="utf-8")
    (tmp_path / "mixed.tsv").write_text("a cat\tun chat\tfr\na dog\t一只狗\tzh\na fish\tpez\t\n", encoding="utf-8")
    out = tmp_path / "shards"
    argv = [str(tmp_path / "plain.txt"), str(tmp_path / "mixed.tsv"), "--pair", str(tmp_path / "en.txt"),
            str(tmp_path / "de.txt"), "--lang", "de", "--out", str(out), "--prefix", "pairs"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    pairs = read_back(out, prefix="pairs")
    assert {(lang, student) for lang, _, student in pairs if lang != "en"} == {
        ("fr", "un chat"), ("zh", "一只狗"), ("de", "eins"), ("de", "zwei"),
    }
    # "just english", two TSV rows ("a fish" has no language), one..three ("three" alone).
    assert Counter(lang for lang, _, _ in pairs)["en"] == 6
    for line in ["  unpaired: 1", "  empty: 1", "  unknown_language: 1", "  de: 2", "  en: 6"]:
        assert line in printed
    assert f"{tmp_path / 'en.txt'}:4: unpaired" in printed


def test_usage_errors_and_unreadable_inputs(tmp_path, capsys):
    with pytest.raises(SystemExit) as usage:
        main(["--out", str(tmp_path)])
    assert usage.value.code != 0
    with pytest.raises(SystemExit):
        main(["--pair", "a", "b", "--out", str(tmp_path)])  # --pair without --lang
    assert main([str(tmp_path / "absent.tsv"), "--out", str(tmp_path / "out")]) == 2
    assert "absent.tsv" in capsys.readouterr().err
    (tmp_path / "two.tsv").write_text("a cat\tun chat\n", encoding="utf-8")
    assert main([str(tmp_path / "two.tsv"), "--out", str(tmp_path / "out")]) == 2
    assert "--lang" in capsys.readouterr().err


def test_command_line_help():
    result = subprocess.run([sys.executable, "-m", "datamodules.convert_text", "--help"],
                            capture_output=True, text=True, cwd=Path(__file__).parents[1], check=True)
    assert "--shard-size" in result.stdout and "--pair" in result.stdout
