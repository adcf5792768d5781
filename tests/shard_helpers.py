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


def write_demo_world(root: Path, text_train: int, image_train: int, text_val: int = 16, image_val: int = 16,
                     per_shard: int = 32) -> dict[str, Path]:
    """Demo text and image-text shards for end-to-end runs: train/val URLs as train.py takes them.

    Images are 32 px: the tiny VAE halves them to the tiny UNet's 16 x 16 latents.
    """
    from datamodules.demo_data import write_demo_shards

    text, images = root / "text", root / "images"
    write_demo_shards(text, num_samples=text_train, samples_per_shard=per_shard, seed=0, image_size=16, prefix="train",
                      with_images=False)
    write_demo_shards(text, num_samples=text_val, samples_per_shard=text_val, seed=1, image_size=16, prefix="val",
                      with_images=False)
    write_demo_shards(images, num_samples=image_train, samples_per_shard=per_shard, seed=2, image_size=32,
                      prefix="train", with_images=True)
    write_demo_shards(images, num_samples=image_val, samples_per_shard=image_val, seed=3, image_size=32, prefix="val",
                      with_images=True)
    last_text, last_image = -(-text_train // per_shard) - 1, -(-image_train // per_shard) - 1
    return {
        "train": text / f"train-{{00000..{last_text:05d}}}.tar",
        "val": text / "val-00000.tar",
        "image_train": images / f"train-{{00000..{last_image:05d}}}.tar",
        "image_val": images / "val-00000.tar",
    }
