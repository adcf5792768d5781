"""Converts TSV and parallel text files into stage-1 text shards.

    python -m datamodules.convert_text INPUT... --out DIR [--lang zh] [--shard-size 10000]
    python -m datamodules.convert_text --pair captions.en captions.zh --lang zh --out DIR

Inputs:
- `*.tsv`: `english<TAB>other[<TAB>lang]` per line (the language from the third column or
  `--lang`), or a first line like `en<TAB>zh<TAB>fr` naming the language of every column;
  an empty cell other than English just leaves that language out of the sample.
- any other file: plain English text, one caption per line.
- `--pair FILE_EN FILE_OTHER --lang xx`: two line-aligned files.

Output: `DIR/PREFIX-000000.tar`, ... with `KEY.txt` (English) and `KEY.<lang>.txt` per sample
(the layout `TextShardsDataModule` reads), keys zero-padded and unique across shards.
Lines that cannot be used are skipped and counted (empty, bad encoding, wrong column count,
unknown language, unpaired); the summary prints the counts and the first few file:line.
The exit code is non-zero only for usage errors and unreadable inputs.
"""
from __future__ import annotations

import argparse
import itertools
import os
import re
import sys
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import webdataset as wds

from datamodules.sources import is_language_code

EXAMPLES_SHOWN = 5
TSV_SUFFIXES = (".tsv", ".tab")


@dataclass
class Report:
    """What the conversion wrote and skipped, for the printed summary."""

    samples_per_language: Counter[str] = field(default_factory=Counter)
    skipped: Counter[str] = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)
    empty_parallel_cells: int = 0
    shards: list[Path] = field(default_factory=list)

    def skip(self, reason: str, path: Path, line_number: int) -> None:
        self.skipped[reason] += 1
        if len(self.examples) < EXAMPLES_SHOWN:
            self.examples.append(f"{path}:{line_number}: {reason}")


Row = dict[str, str]  # language -> caption; "en" always present


def _valid_code(code: str) -> bool:
    """Language codes we write: two letters (+ region/script) or three letters (yue, fil)."""
    return is_language_code(code) or bool(re.fullmatch(r"[a-z]{3}", code))


def _decoded_lines(path: Path) -> Iterator[tuple[int, str | None]]:
    """(line number, text or None when not UTF-8), line ends stripped."""
    with open(path, "rb") as lines:
        for line_number, raw in enumerate(lines, start=1):
            try:
                text = raw.decode("utf-8-sig" if line_number == 1 else "utf-8")
            except UnicodeDecodeError:
                yield line_number, None
                continue
            yield line_number, text.rstrip("\r\n")


def _row(path: Path, line_number: int, languages: Sequence[str], cells: Sequence[str], report: Report) -> Row | None:
    """Builds a sample from cells; None (and a counted skip) when English is empty."""
    row: Row = {}
    for language, cell in zip(languages, cells):
        cell = cell.strip()
        if cell:
            row[language] = cell
        elif language != "en":
            report.empty_parallel_cells += 1
    if "en" not in row:
        report.skip("empty", path, line_number)
        return None
    return row


def _tsv_header(first_line: str | None) -> list[str] | None:
    """The languages of a header line such as `en<TAB>zh<TAB>fr`, else None."""
    if first_line is None:
        return None
    cells = [cell.strip() for cell in first_line.split("\t")]
    if len(cells) >= 2 and cells[0] == "en" and all(map(_valid_code, cells)):
        return cells
    return None


def read_tsv(path: Path, default_language: str | None, report: Report) -> Iterator[Row]:
    lines = _decoded_lines(path)
    first = next(lines, None)
    header = _tsv_header(first[1]) if first else None
    if first and header is None:
        lines = itertools.chain([first], lines)
    for line_number, text in lines:
        if text is None:
            report.skip("bad_encoding", path, line_number)
            continue
        if not text.strip():
            report.skip("empty", path, line_number)
            continue
        cells = text.split("\t")
        if header is not None:
            languages = header
        elif len(cells) == 3:
            language = cells[2].strip()
            if language == "en" or not _valid_code(language):
                report.skip("unknown_language", path, line_number)
                continue
            languages, cells = ["en", language], cells[:2]
        elif len(cells) == 2 and default_language:
            languages = ["en", default_language]
        else:
            report.skip("wrong_columns", path, line_number)
            continue
        if header is not None and len(cells) != len(header):
            report.skip("wrong_columns", path, line_number)
            continue
        row = _row(path, line_number, languages, cells, report)
        if row is not None:
            yield row


def read_plain(path: Path, report: Report) -> Iterator[Row]:
    for line_number, text in _decoded_lines(path):
        if text is None:
            report.skip("bad_encoding", path, line_number)
        elif (row := _row(path, line_number, ["en"], [text], report)) is not None:
            yield row


def read_pair(english_path: Path, other_path: Path, language: str, report: Report) -> Iterator[Row]:
    pairs = itertools.zip_longest(_decoded_lines(english_path), _decoded_lines(other_path))
    for english, other in pairs:
        if english is None or other is None:
            # Point at the line that exists: it is the one without a partner.
            report.skip("unpaired", english_path if other is None else other_path, (english or other)[0])
            continue
        line_number = english[0]
        if english[1] is None or other[1] is None:
            report.skip("bad_encoding", english_path if english[1] is None else other_path, line_number)
            continue
        row = _row(english_path, line_number, ["en", language], [english[1], other[1]], report)
        if row is not None:
            yield row


def write_shards(rows: Iterator[Row], out: Path, prefix: str, shard_size: int, report: Report) -> None:
    """Writes rows into shards of `shard_size` samples; each shard appears only when complete.

    A shard is written under a temporary name and renamed at the end, so an interrupted
    conversion never leaves a truncated shard that a glob would pick up.
    """
    out.mkdir(parents=True, exist_ok=True)
    for shard_index in itertools.count():
        first_rows = list(itertools.islice(rows, shard_size))
        if not first_rows:
            return
        path = out / f"{prefix}-{shard_index:06d}.tar"
        partial = path.with_name(path.name + ".partial")
        with open(partial, "wb") as stream, wds.TarWriter(stream) as writer:
            for offset, row in enumerate(first_rows):
                sample: dict[str, bytes | str] = {"__key__": f"{shard_index * shard_size + offset:012d}"}
                for language, text in row.items():
                    sample["txt" if language == "en" else f"{language}.txt"] = text.encode("utf-8")
                    report.samples_per_language[language] += 1
                writer.write(sample)
        os.replace(partial, path)
        report.shards.append(path)


def print_report(report: Report, out: Path, prefix: str) -> None:
    print(f"shards written: {len(report.shards)} in {out}")
    if report.shards:
        print(f"  urls: {out}/{prefix}-{{000000..{len(report.shards) - 1:06d}}}.tar")
    print(f"samples: {report.samples_per_language['en']}")
    for language, count in sorted(report.samples_per_language.items()):
        print(f"  {language}: {count}")
    print(f"lines skipped: {sum(report.skipped.values())}")
    for reason, count in sorted(report.skipped.items()):
        print(f"  {reason}: {count}")
    for example in report.examples:
        print(f"    e.g. {example}")
    if report.empty_parallel_cells:
        print(f"empty non-English cells left out: {report.empty_parallel_cells}")
    stale = sorted(set(out.glob(f"{prefix}-*.tar")) - set(report.shards))
    if stale:
        print(f"warning: {len(stale)} older {prefix}-*.tar in {out} were not written now, e.g. {stale[0]}")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m datamodules.convert_text",
        description="Convert TSV / text files into stage-1 text shards (KEY.txt + KEY.<lang>.txt).",
    )
    parser.add_argument("inputs", nargs="*", type=Path, help="*.tsv (english<TAB>other[<TAB>lang], or an en<TAB>zh... header) or plain English text files")
    parser.add_argument("--pair", nargs=2, action="append", default=[], type=Path, metavar=("FILE_EN", "FILE_OTHER"), help="two line-aligned files; needs --lang")
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    parser.add_argument("--lang", help="language of the second column of headerless 2-column TSV and of --pair")
    parser.add_argument("--shard-size", type=int, default=10000, help="samples per shard (default 10000)")
    parser.add_argument("--prefix", default="text", help="shard name prefix (default 'text')")
    args = parser.parse_args(argv)
    if not args.inputs and not args.pair:
        parser.error("give at least one INPUT or --pair")
    if args.pair and not args.lang:
        parser.error("--pair needs --lang")
    if args.lang is not None and (args.lang == "en" or not _valid_code(args.lang)):
        parser.error(f"--lang must be a non-English language code such as zh or pt-BR, got {args.lang!r}")
    if args.shard_size < 1:
        parser.error("--shard-size must be >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    paths = [*args.inputs, *(path for pair in args.pair for path in pair)]
    unreadable = [path for path in paths if not (path.is_file() and os.access(path, os.R_OK))]
    if unreadable:
        print(f"error: cannot read input(s): {', '.join(map(str, unreadable))}", file=sys.stderr)
        return 2
    # A headerless 2-column TSV needs --lang; say so before writing anything.
    for path in args.inputs:
        if path.suffix.lower() in TSV_SUFFIXES and not args.lang:
            first = next(_decoded_lines(path), (0, None))[1]
            if first is not None and _tsv_header(first) is None and len(first.split("\t")) == 2:
                print(f"error: {path} has 2 columns and no en<TAB>xx header: give --lang", file=sys.stderr)
                return 2

    report = Report()

    def all_rows() -> Iterator[Row]:
        for path in args.inputs:
            if path.suffix.lower() in TSV_SUFFIXES:
                yield from read_tsv(path, args.lang, report)
            else:
                yield from read_plain(path, report)
        for english_path, other_path in args.pair:
            yield from read_pair(english_path, other_path, args.lang, report)

    write_shards(all_rows(), args.out, args.prefix, args.shard_size, report)
    print_report(report, args.out, args.prefix)
    return 0


if __name__ == "__main__":
    sys.exit(main())
