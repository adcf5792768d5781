"""Reading shards: our own streaming tar reader, grouping members into samples the WebDataset
way (`dir/KEY.ext`), and a cheap count of the samples in a set of shards.

A corrupt header skips one member, a truncated or unreadable shard ends that shard; both are
counted in a `SkipCounter`, never fatal. We read tars ourselves instead of using
`wds.WebDataset` because webdataset 1.0 needs several non-default settings to be safe here
(explicit `shardshuffle`, a node splitter, `with_epoch` counting per worker) and hangs or
starves ranks when there are fewer shards than consumers (`streams.iter_consumer_samples`
handles that case explicitly). `wds.gopen` still opens every URL, so `pipe:` and remote
schemes behave exactly as in WebDataset.
"""
from __future__ import annotations

import json
import os
import tarfile
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import webdataset as wds

from datamodules.skips import SkipCounter
from datamodules.sources import is_local_url

# Errors that mean "this shard cannot be read any further" (bad stream, bad archive, failed pipe).
SHARD_READ_ERRORS = (tarfile.TarError, OSError, EOFError, zlib.error, ValueError)


def count_samples(urls: Sequence[str], max_scanned_shards: int = 64) -> int | None:
    """Samples in these shards, when that is cheap to know, else None.

    img2dataset writes `NAME_stats.json` (with `successes`) beside each `NAME.tar`: summed
    when every shard has one. Otherwise up to `max_scanned_shards` local shards are counted
    from their tar headers (no member is read). Remote or many unlabelled shards: None.
    """
    total = 0
    stats = [Path(url).with_name(Path(url).stem + "_stats.json") for url in urls if is_local_url(url)]
    if len(stats) == len(urls) and all(path.is_file() for path in stats):
        try:
            return sum(int(json.loads(path.read_text())["successes"]) for path in stats)
        except (ValueError, KeyError, TypeError, OSError):
            pass
    if len(stats) != len(urls) or len(urls) > max_scanned_shards:
        return None
    for url in urls:
        try:
            with tarfile.open(url, "r:*") as tar:
                keys = set()
                for member in tar:
                    parts = split_member_name(member.name) if member.isfile() else None
                    if parts:
                        keys.add(parts[0])
            total += len(keys)
        except (OSError, tarfile.TarError):
            return None
    return total


def split_member_name(name: str) -> tuple[str, str] | None:
    """`dir/KEY.ext.more` -> (`dir/KEY`, `ext.more`), the WebDataset rule; None if no extension."""
    directory, base = os.path.split(name)
    stem, dot, extension = base.partition(".")
    if not stem or not dot or not extension:
        return None
    return os.path.join(directory, stem), extension


@dataclass
class _HeaderScan:
    """What tarfile saw while looking for headers; tarfile itself keeps no such record."""

    saw_end_marker: bool = False  # a zero block after the last member: the archive is whole
    corrupt_headers: int = 0  # runs of unparseable header blocks, one per lost member
    in_corrupt_run: bool = False


def _tarinfo_class(scan: _HeaderScan) -> type[tarfile.TarInfo]:
    """A TarInfo class that reports header errors into `scan`.

    We open archives with `ignore_zeros=True` so tarfile skips a corrupt header block and
    resynchronises on the next valid header (losing one member, not the rest of the shard),
    but then tarfile says nothing about what it skipped; this hook is how we count it and
    tell a complete archive (end marker seen) from a truncated one.
    """

    class RecordingTarInfo(tarfile.TarInfo):
        @classmethod
        def fromtarfile(cls, tar: tarfile.TarFile) -> tarfile.TarInfo:
            try:
                member = super().fromtarfile(tar)
            except tarfile.EOFHeaderError:
                scan.saw_end_marker = True
                raise
            except tarfile.InvalidHeaderError as error:
                if tar.offset == 0:
                    raise tarfile.ReadError(f"not a tar archive ({error})") from None
                if not scan.in_corrupt_run:
                    scan.corrupt_headers += 1
                scan.in_corrupt_run = True
                raise
            scan.saw_end_marker = False
            scan.in_corrupt_run = False
            return member

    return RecordingTarInfo


def iter_tar_samples(
    url: str, skips: SkipCounter, wanted: Callable[[str], bool] = lambda extension: True
) -> Iterator[dict[str, Any]]:
    """Streams one shard as samples: `{"__key__", "__url__", extension: bytes, ...}`.

    Consecutive members with the same key form a sample. Only members whose extension
    `wanted` accepts are read (stage 1 leaves the images of image-text shards unread).
    Problems are counted in `skips` and never raised: `unreadable_shard` (cannot open, not a
    tar), `corrupt_member` (unparseable header; reading resumes at the next good header),
    `truncated_tar` (data ends inside a member or without the end-of-archive marker; the
    sample being read is dropped).
    """
    scan = _HeaderScan()
    finished = False
    key = ""
    try:
        stream = wds.gopen(url)
    except SHARD_READ_ERRORS as error:
        skips.skip("unreadable_shard", url, "", f"cannot open: {error}")
        return
    try:
        try:
            tar = tarfile.open(
                fileobj=stream, mode="r|*", ignore_zeros=True, tarinfo=_tarinfo_class(scan)
            )
        except SHARD_READ_ERRORS as error:
            skips.skip("unreadable_shard", url, "", f"not a readable tar: {error}")
            return
        sample: dict[str, Any] = {}
        try:
            while (member := tar.next()) is not None:
                tar.members = []  # stream mode keeps every TarInfo otherwise
                if scan.corrupt_headers:
                    skips.skip("corrupt_member", url, key, "unreadable tar header after this key")
                    scan.corrupt_headers = 0
                parts = split_member_name(member.name)
                if not member.isfile() or parts is None or not wanted(parts[1]):
                    continue
                key, extension = parts
                if sample and sample["__key__"] != key:
                    yield sample
                    sample = {}
                sample.setdefault("__key__", key)
                sample.setdefault("__url__", url)
                sample[extension] = tar.extractfile(member).read()
        except SHARD_READ_ERRORS as error:
            skips.skip("truncated_tar", url, key, f"read failed: {error}")
            return
        if scan.corrupt_headers:
            skips.skip("corrupt_member", url, key, "unreadable tar header after this key")
        if not scan.saw_end_marker:
            # The sample in progress may lack members that were cut off; drop it.
            skips.skip("truncated_tar", url, key, "archive ends without end-of-archive marker")
            return
        if sample:
            yield sample
        finished = True
    finally:
        try:
            stream.close()
        except OSError as error:
            # A `pipe:` command that exits non-zero after a complete tar is still suspect;
            # one we cut short ourselves (stream abandoned) is expected to complain.
            if finished:
                skips.skip("unreadable_shard", url, "", f"closing failed: {error}")
