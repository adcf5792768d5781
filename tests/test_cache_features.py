"""scripts/cache_features.py: cached shards give the same batches and loss as the originals."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from datamodules import build_datamodule
from lightning_modules import stage_class
from linguadiff.models.diffusion import DiffusionLossConfig, diffusion_loss
from linguadiff.config import load_config, resolve
from tests.test_scale_out import stage1_run, world  # noqa: F401  (module fixtures)
from tests.test_stage23_training import stage_args

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import cache_features  # noqa: E402


def _first_val_batch(cfg, module) -> dict:
    datamodule = build_datamodule(cfg, module.tokenizers())
    datamodule.num_workers = 0
    return next(iter(datamodule.val_dataloader()))


def _loss(module, batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)  # the latent draw: same random state for both
    x0 = module.to_model_space(batch)
    context, added = module.conditioning(batch)
    timesteps = torch.full((x0.shape[0],), 500, dtype=torch.long)
    loss = diffusion_loss(module.unet, module.noise_scheduler, x0, context, DiffusionLossConfig(), added, timesteps,
                          torch.Generator().manual_seed(1))
    return x0, context, loss.mean()


@pytest.mark.parametrize("llm_states", [False, True])
def test_cached_shards_give_the_same_loss(world, stage1_run, tmp_path, llm_states):  # noqa: F811
    out = tmp_path / "cached"
    args = stage_args(world, tmp_path / "run", 2, init_from=stage1_run)
    cache_args = [*args, f"cache.out={out}", f"cache.llm_states={str(llm_states).lower()}", "cache.splits=[val]"]
    assert cache_features.main(cache_args) == 0
    shard = out / "val" / "val-00000.tar"
    stats = json.loads((out / "val" / "val-00000_stats.json").read_text())
    assert shard.is_file() and stats["successes"] == 12 and stats["failed"] == 0

    original_cfg = resolve(load_config(args))
    cached_cfg = resolve(load_config([*args, f"data.val.urls={shard}"]))
    module = stage_class(2).from_config(original_cfg).eval()
    original, cached = _first_val_batch(original_cfg, module), _first_val_batch(cached_cfg, module)
    assert original["key"] == cached["key"] and original["caption"] == cached["caption"]
    assert "image" in original and "image" not in cached and "moments" in cached  # no image decoded
    assert ("llm_states" in cached) == llm_states
    for name in ("original_size", "crop_top_left", "target_size"):
        assert torch.equal(original[name], cached[name])

    with torch.no_grad():
        x0, context, loss = _loss(module, original)
        cached_x0, cached_context, cached_loss = _loss(module, cached)
    assert torch.equal(x0, cached_x0)  # the latent draw from cached moments is the VAE's own
    if llm_states:  # features stored in float16: equal to float16 precision
        assert torch.allclose(context, cached_context, atol=1e-3, rtol=1e-3)
        assert torch.allclose(loss, cached_loss, rtol=1e-4)
    else:
        assert torch.equal(context, cached_context) and torch.equal(loss, cached_loss)


def test_cached_bucketed_shards_give_the_same_batches(world, stage1_run, tmp_path):  # noqa: F811
    """Images of mixed aspect ratios cached at their buckets (around 32 x 32, sides multiples
    of the tiny SD1.5 base's 4): every validation batch, its sizes and its latents equal the
    uncached stream's (latents up to float rounding)."""
    from datamodules.demo_data import mixed_shapes, write_demo_shards

    write_demo_shards(tmp_path / "mixed", num_samples=12, samples_per_shard=12, seed=5, image_size=32, prefix="val",
                      with_images=True, shapes=mixed_shapes(32))
    out = tmp_path / "cached"
    args = [*stage_args(world, tmp_path / "run", 2, init_from=stage1_run),
            f"data.val.urls={tmp_path}/mixed/val-00000.tar", "data.val_batch_size=4", "data.crop=buckets"]
    assert cache_features.main([*args, f"cache.out={out}", "cache.splits=[val]"]) == 0
    original_cfg = resolve(load_config(args))
    cached_cfg = resolve(load_config([*args, f"data.val.urls={out}/val/val-00000.tar"]))
    assert original_cfg.data.crop == "buckets"
    module = stage_class(2).from_config(original_cfg).eval()
    loaders = []
    for cfg in (original_cfg, cached_cfg):
        datamodule = build_datamodule(cfg, module.tokenizers())
        datamodule.num_workers = 0
        loaders.append(list(datamodule.val_dataloader()))
    originals, cached = loaders
    assert len(originals) == len(cached) and sum(len(b["key"]) for b in cached) == 12
    assert len({tuple(b["target_size"][0].tolist()) for b in cached}) >= 3  # several buckets
    for original, again in zip(originals, cached):
        assert original["key"] == again["key"] and "moments" in again and "image" not in again
        for name in ("original_size", "crop_top_left", "target_size"):
            assert torch.equal(original[name], again[name])
        with torch.no_grad():
            x0, _, loss = _loss(module, original)
            cached_x0, _, cached_loss = _loss(module, again)
        assert x0.shape[-2:] == tuple(s // 2 for s in original["target_size"][0].tolist())
        # The cache encodes each size in other VAE batches than this one: equal up to the
        # rounding of batched convolutions.
        assert torch.allclose(x0, cached_x0, rtol=0, atol=1e-5) and torch.allclose(loss, cached_loss, rtol=1e-5)


def test_cache_resumes_per_shard_and_splits_across_processes(world, stage1_run, tmp_path, monkeypatch):  # noqa: F811
    out = tmp_path / "cached"
    args = [*stage_args(world, tmp_path / "run", 2, init_from=stage1_run), f"cache.out={out}", "cache.splits=[train]"]
    # Two writers (as srun would start them): each takes every other shard.
    for rank in range(2):
        monkeypatch.setenv("SLURM_PROCID", str(rank))
        monkeypatch.setenv("SLURM_NTASKS", "2")
        assert cache_features.main(args) == 0
    done = sorted(p.name for p in (out / "train").glob("*.tar"))
    assert done == [f"train-{i:05d}.tar" for i in range(4)]
    stamps = {p: p.stat().st_mtime_ns for p in (out / "train").glob("*.tar")}
    # A shard lost mid-write (no final rename) is redone; finished ones are left alone.
    (out / "train" / "train-00002.tar").unlink()
    (out / "train" / "train-00002_stats.json").unlink()
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.setenv("SLURM_NTASKS", "1")
    assert cache_features.main(args) == 0
    assert (out / "train" / "train-00002.tar").is_file()
    for path, stamp in stamps.items():
        if path.name != "train-00002.tar":
            assert path.stat().st_mtime_ns == stamp
    assert cache_features.main([*args[:-2], "cache.splits=[train]"]) == 2  # no cache.out: a clear error
