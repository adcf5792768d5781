"""Test support (not a test file): writing tiny tar shards on the fly."""
from __future__ import annotations

import io
import tarfile
from pathlib import Path


def write_shard(path: Path, samples: list[dict[str, str | bytes]]) -> Path:
    """Writes `samples` ({"__key__": k, extension: text or bytes}) as a tar shard."""
    with tarfile.open(path, "w") as tar:
        for sample in samples:
            for extension, payload in sample.items():
                if extension == "__key__":
                    continue
                data = payload.encode("utf-8") if isinstance(payload, str) else payload
                info = tarfile.TarInfo(f"{sample['__key__']}.{extension}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path
