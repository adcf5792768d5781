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
import select
import shlex
import signal
import subprocess
import tarfile
import unicodedata
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import webdataset as wds

from datamodules.skips import SkipCounter
from datamodules.sources import is_local_url

# Errors that mean "this shard cannot be read any further" (bad stream, bad archive, failed pipe).
# Kept for callers; the reader itself treats *any* exception while reading a shard as the
# shard's fault (counted, never raised): hostile bytes can make tarfile raise almost anything.
SHARD_READ_ERRORS = (tarfile.TarError, OSError, EOFError, zlib.error, ValueError)

# Bounds checked on tar headers before a member is read into memory. A member bigger than
# this is skipped with its whole sample (`member_too_large`); LAION-size images are far below.
DEFAULT_MAX_MEMBER_BYTES = 64 * 1024 * 1024
# A `pipe:` command that sends nothing for this long is killed and its shard counted as
# `stalled_shard` (env LINGUADIFF_PIPE_TIMEOUT, seconds, overrides it).
DEFAULT_PIPE_TIMEOUT_S = 300.0
MAX_MEMBER_NAME_CHARS = 1024


def pipe_timeout_s() -> float:
    """The `pipe:` stall timeout: env LINGUADIFF_PIPE_TIMEOUT (seconds) or the default."""
    try:
        value = float(os.environ.get("LINGUADIFF_PIPE_TIMEOUT", DEFAULT_PIPE_TIMEOUT_S))
    except ValueError:
        return DEFAULT_PIPE_TIMEOUT_S
    return value if value > 0 else DEFAULT_PIPE_TIMEOUT_S


@dataclass
class ShardOutcome:
    """How reading one shard ended: `complete` only if it was read to its end-of-archive
    marker without a shard-level error (what the cache writer needs before committing)."""

    complete: bool = False
    error: str = ""


class PipeStalled(OSError):
    """A `pipe:` command sent nothing within the timeout."""


class _TimedPipe:
    """stdout of a `pipe:` command, read with a timeout per read (select on the fd).

    webdataset's own pipe reader blocks forever on a command that hangs (a stuck object
    store download); this one kills the command's process group and raises PipeStalled.
    """

    def __init__(self, command: str, timeout_s: float):
        self.command = command
        self.timeout_s = timeout_s
        self.process = subprocess.Popen(command, shell=True, stdout=subprocess.PIPE, start_new_session=True)
        self.fd = self.process.stdout.fileno()

    def read(self, size: int = -1) -> bytes:
        """Up to `size` bytes (a short read when less has arrived, b"" at the end), as a raw
        pipe reads; raises PipeStalled when nothing arrives within the timeout."""
        ready, _, _ = select.select([self.fd], [], [], self.timeout_s)
        if not ready:
            self._kill()
            raise PipeStalled(f"no data for {self.timeout_s:g} s from {self.command!r}")
        return os.read(self.fd, size if size is not None and 0 < size < 1 << 20 else 1 << 20)

    def drain(self, limit: int = 16 * 1024 * 1024) -> None:
        """Reads what the command still sends after the archive's end (record padding), up to
        `limit` bytes, so that a command that finished its job exits 0 instead of being killed."""
        drained = 0
        while drained < limit:
            chunk = self.read(1 << 20)
            if not chunk:
                return
            drained += len(chunk)

    def _kill(self) -> None:
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def close(self) -> None:
        """Closes the pipe; raises OSError if the command failed (or was cut short by us)."""
        finished = self.process.poll() is not None
        if not finished:
            self._kill()
        self.process.stdout.close()
        try:
            status = self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            status = -1
        if status != 0:
            raise OSError(f"{self.command!r} exited with status {status}")


def open_shard(url: str, timeout_s: float | None = None):
    """A readable stream of one shard URL: `pipe:` commands and http(s) (curl, as WebDataset
    runs it) with a stall timeout, anything else through `wds.gopen` as in WebDataset."""
    timeout_s = pipe_timeout_s() if timeout_s is None else timeout_s
    if url.startswith("pipe:"):
        return _TimedPipe(url[len("pipe:"):], timeout_s)
    if url.startswith(("http://", "https://")):  # webdataset's curl command, with the stall timeout
        return _TimedPipe(f"curl --connect-timeout 30 --retry 30 --retry-delay 2 -f -s -L {shlex.quote(url)}", timeout_s)
    return wds.gopen(url)


def bad_member_name(name: str) -> str:
    """Why a tar member name is refused as a sample key ("" if fine): control characters,
    undecodable bytes (surrogates), absolute paths or `..`, absurd length. Such keys would
    break log lines, output shards written from them (the cache writer) or file systems."""
    if len(name) > MAX_MEMBER_NAME_CHARS:
        return f"name of {len(name)} characters"
    if any(unicodedata.category(ch) in ("Cc", "Cs", "Cf") for ch in name):
        return "control or undecodable characters in the name"
    if name.startswith("/") or ".." in name.split("/"):
        return "absolute path or '..' in the name"
    if os.path.basename(name).partition(".")[2].startswith("__"):
        return "extension starting with '__' (reserved: __key__, __url__)"
    return ""


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
        except Exception:  # noqa: BLE001 - a bad stats file: count from the headers instead
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
        except Exception:  # noqa: BLE001 - only an estimate: the reader counts the real damage
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
    url: str,
    skips: SkipCounter,
    wanted: Callable[[str], bool] = lambda extension: True,
    *,
    max_member_bytes: int | None = None,
    outcome: ShardOutcome | None = None,
    pipe_timeout: float | None = None,
) -> Iterator[dict[str, Any]]:
    """Streams one shard as samples: `{"__key__", "__url__", extension: bytes, ...}`.

    Consecutive members with the same key form a sample. Only members whose extension
    `wanted` accepts are read (stage 1 leaves the images of image-text shards unread).
    Problems are counted in `skips` and never raised: `unreadable_shard` (cannot open, not a
    tar), `corrupt_member` (unparseable header; reading resumes at the next good header),
    `truncated_tar` (data ends inside a member or without the end-of-archive marker, or the
    reader failed in any other way; the sample being read is dropped), `stalled_shard` (a
    `pipe:` command sent nothing for `pipe_timeout` s), and per sample `member_too_large`
    (a header claims more than `max_member_bytes`: the sample is dropped unread),
    `bad_member_name` (see `bad_member_name`) and `duplicate_key` (a key met again in the
    shard, or one member twice: the later copy is dropped, so that two samples never share
    a key). `outcome`, when given, says whether the shard was read whole.
    """
    outcome = outcome if outcome is not None else ShardOutcome()
    max_member_bytes = DEFAULT_MAX_MEMBER_BYTES if max_member_bytes is None else max_member_bytes
    scan = _HeaderScan()
    finished = False
    key = ""
    try:
        stream = open_shard(url, pipe_timeout)
    except Exception as error:  # noqa: BLE001 - any failure to open is this shard's fault
        skips.skip("unreadable_shard", url, "", f"cannot open: {type(error).__name__}: {error}")
        outcome.error = f"cannot open: {error}"
        return
    try:
        try:
            tar = tarfile.open(
                fileobj=stream, mode="r|*", ignore_zeros=True, tarinfo=_tarinfo_class(scan)
            )
        except PipeStalled as error:
            skips.skip("stalled_shard", url, "", str(error))
            outcome.error = str(error)
            return
        except Exception as error:  # noqa: BLE001
            skips.skip("unreadable_shard", url, "", f"not a readable tar: {type(error).__name__}: {error}")
            outcome.error = f"not a readable tar: {error}"
            return
        sample: dict[str, Any] = {}
        seen: set[str] = set()
        dropped = ""  # the key of a sample being dropped: its other members are passed over
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
                if key == dropped:
                    continue
                if sample and sample["__key__"] != key:
                    yield sample
                    sample = {}
                why = bad_member_name(member.name)
                if why or key in seen and not sample:
                    reason, detail = ("bad_member_name", why) if why else ("duplicate_key", "key met again in the shard")
                    skips.skip(reason, url, key, detail)
                    dropped, sample = key, {}
                    continue
                if extension in sample:
                    skips.skip("duplicate_key", url, key, f"two {extension!r} members")
                    dropped, sample = key, {}
                    continue
                if member.size > max_member_bytes:
                    skips.skip("member_too_large", url, key,
                               f"{extension}: {member.size} bytes > max_member_bytes={max_member_bytes}")
                    dropped, sample = key, {}
                    seen.add(key)
                    continue
                seen.add(key)
                sample.setdefault("__key__", key)
                sample.setdefault("__url__", url)
                sample[extension] = tar.extractfile(member).read()
        except PipeStalled as error:
            skips.skip("stalled_shard", url, key, str(error))
            outcome.error = str(error)
            return
        except Exception as error:  # noqa: BLE001 - hostile bytes: anything may come out of tarfile
            skips.skip("truncated_tar", url, key, f"read failed: {type(error).__name__}: {error}")
            outcome.error = f"read failed: {error}"
            return
        if scan.corrupt_headers:
            skips.skip("corrupt_member", url, key, "unreadable tar header after this key")
            outcome.error = "corrupt tar header"
        if not scan.saw_end_marker:
            # The sample in progress may lack members that were cut off; drop it.
            skips.skip("truncated_tar", url, key, "archive ends without end-of-archive marker")
            outcome.error = "archive ends without end-of-archive marker"
            return
        if sample:
            yield sample
        finished = True
    finally:
        try:
            if finished and isinstance(stream, _TimedPipe):
                stream.drain()
            stream.close()
        except Exception as error:  # noqa: BLE001
            # A `pipe:` command that exits non-zero after a complete tar is still suspect;
            # one we cut short ourselves (stream abandoned) is expected to complain.
            if finished:
                skips.skip("unreadable_shard", url, "", f"closing failed: {error}")
                outcome.error = f"closing failed: {error}"
                finished = False
        outcome.complete = finished and not outcome.error
