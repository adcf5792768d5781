"""LoRA on the UNet in stages 2-3 (train.unet=lora, issue 12) on tiny SD1.5/SDXL-shaped bases:
what trains, what the optimizer and checkpoint hold, resume, and the diffusers-format export."""
from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import pytest
import torch
from safetensors.torch import load_file

import generate
import train
from linguadiff.models.adapter import read_adapter_metadata
from linguadiff.models.lora import LORA_DIR, LORA_WEIGHTS, is_lora_name
from tests.test_stage1_training import scalars
from tests.test_stage23_training import stage_args
from tests.shard_helpers import write_demo_world
from tests.tiny_models import make_tiny_llm, make_tiny_sd_pipeline

# A LoRA learning rate that moves the tiny UNet's output visibly in 4 steps.
LORA = {"train.unet": "lora", "lora.rank": 4, "lora.alpha": 8.0, "lora.lr": 1e-2, "samples.every_n_steps": 0}


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("lora")
    return {
        **write_demo_world(root, text_train=64, image_train=96),
        "llm": make_tiny_llm(root / "llm", kind="llama"),
        "sd15": make_tiny_sd_pipeline(root / "sd15", kind="sd15"),
        "sdxl": make_tiny_sd_pipeline(root / "sdxl", kind="sdxl"),
    }


@pytest.fixture(scope="module")
def stage1(world, tmp_path_factory) -> dict[str, Path]:
    runs = {}
    for kind in ("sd15", "sdxl"):
        runs[kind] = tmp_path_factory.mktemp("runs") / f"stage1-{kind}"
        assert train.main(stage_args(world, runs[kind], 1, kind=kind, **{"trainer.max_steps": 2})) == 0
    return runs


class Watch(L.Callback):
    """The module's weights when training starts and ends, and what the optimizer holds."""

    def on_train_start(self, trainer, pl_module):
        self.start = {k: v.detach().clone() for k, v in pl_module.named_parameters()}
        self.trainable = {k for k, v in pl_module.named_parameters() if v.requires_grad}
        by_id = {id(v): k for k, v in pl_module.named_parameters()}
        self.in_optimizer = {by_id[id(p)] for g in trainer.optimizers[0].param_groups for p in g["params"]}

    def on_train_end(self, trainer, pl_module):
        self.end = {k: v.detach().clone() for k, v in pl_module.named_parameters()}


def _unet_out(unet, kind: str) -> torch.Tensor:
    """The UNet's prediction on one fixed input (SDXL: with fixed pooled text and size ids)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 4, 4, generator=g)
    context = torch.randn(2, 7, unet.config.cross_attention_dim, generator=g)
    added = None
    if kind == "sdxl":
        added = {"text_embeds": torch.randn(2, 40, generator=g), "time_ids": torch.tensor([[32.0, 32, 0, 0, 32, 32]] * 2)}
    with torch.no_grad():
        return unet(x, torch.tensor([10, 700]), context, added_cond_kwargs=added).sample


def _plain_pipeline(kind: str, path: Path):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    if kind == "sdxl":
        return StableDiffusionXLPipeline.from_pretrained(path)
    return StableDiffusionPipeline.from_pretrained(path, safety_checker=None, requires_safety_checker=False)


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_lora_stage2_trains_only_lora_and_adapter_and_exports_for_diffusers(world, stage1, tmp_path, kind):
    from linguadiff.generation import Generator

    watch = Watch()
    run_dir = tmp_path / "stage2"
    merge = kind == "sd15"  # SD1.5: the merged UNet too; SDXL: the LoRA alone
    assert train.main(stage_args(world, run_dir, 2, kind=kind, init_from=stage1[kind],
                                 **{**LORA, "export.merge_lora": str(merge).lower()}), extra_callbacks=(watch,)) == 0
    # Only the UNet's LoRA weights and the adapter train, and they are all the optimizer holds.
    lora = {k for k in watch.start if k.startswith("unet.") and is_lora_name(k)}
    adapter = {k for k in watch.start if k.startswith("adapter.")}
    assert lora and watch.trainable == watch.in_optimizer == lora | adapter
    # The frozen UNet is bit for bit the base's; the LoRA (B starts at zero) and the adapter moved.
    assert all(torch.equal(watch.start[k], watch.end[k]) for k in watch.start if k not in lora | adapter)
    assert all(not torch.equal(watch.start[k], watch.end[k]) for k in lora if ".lora_B." in k)
    assert any(not torch.equal(watch.start[k], watch.end[k]) for k in adapter)
    losses = [v for _, v in scalars(run_dir, "train/loss")]
    assert len(losses) == 4 and all(math.isfinite(v) for v in losses)

    # The checkpoint holds the trained weights only: no base UNet weight, every LoRA weight.
    ckpt_path = run_dir / "checkpoints" / "last.ckpt"
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    assert set(ckpt["state_dict"]) == lora | adapter
    trained_bytes = sum(v.numel() * 4 for v in ckpt["state_dict"].values())
    # weights + AdamW's two moments + the EMA, and some bookkeeping
    assert ckpt_path.stat().st_size < 4 * trained_bytes + 200_000

    # The export: diffusers' LoRA file (EMA weights) that load_lora_weights puts on a plain
    # pipeline of the base; its UNet gives what our generation path's UNet gives.
    export = run_dir / "export"
    assert (export / LORA_DIR / LORA_WEIGHTS).is_file() and (export / "unet").is_dir() == merge
    meta = read_adapter_metadata(export / "adapter.safetensors")
    assert meta["training"]["unet"] == "lora" and meta["lora"]["rank"] == 4 and meta["lora"]["alpha"] == 8.0
    exported = load_file(export / LORA_DIR / LORA_WEIGHTS)
    assert len(exported) == len(lora) and all(k.startswith("unet.") for k in exported)
    raw_b = {k: v for k, v in ckpt["state_dict"].items() if ".lora_B." in k}
    assert not any(any(torch.equal(v, e) for e in exported.values()) for v in raw_b.values())  # EMA, not raw

    plain = _plain_pipeline(kind, world[kind])
    base_out = _unet_out(plain.unet, kind)
    plain.load_lora_weights(export / LORA_DIR)
    lora_out = _unet_out(plain.unet, kind)
    ours = Generator.from_run(run_dir, device="cpu", dtype="float32")  # merged unet/ (sd15) or base + lora/ (sdxl)
    ours_out = _unet_out(ours.pipeline.unet, kind)
    assert (lora_out - base_out).abs().max() > 1e-3  # the LoRA changes the UNet
    torch.testing.assert_close(ours_out, lora_out, atol=1e-5, rtol=1e-4)  # merged = base + LoRA (fp32 rounding)
    if not merge:  # generate.py draws with a LoRA export
        out = tmp_path / "out"
        assert generate.main([f"run_dir={run_dir}", "prompt=a red circle", "num_images=1", "steps=2", f"out_dir={out}"]) == 0
        assert len(list(out.glob("*.png"))) == 1


def test_lora_resume_restores_lora_weights_and_continues(world, stage1, tmp_path):
    args = {**LORA, "optim.schedule": "constant", "optim.warmup_steps": 0}
    run_dir = tmp_path / "stage2"
    assert train.main(stage_args(world, run_dir, 2, init_from=stage1["sd15"], **args)) == 0
    first = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    watch = Watch()
    assert train.main(stage_args(world, run_dir, 2, init_from=stage1["sd15"], **{**args, "trainer.max_steps": 6}),
                      extra_callbacks=(watch,)) == 0
    second = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    # The resumed run starts from exactly the checkpoint's LoRA and adapter weights, and goes on.
    assert all(torch.equal(watch.start[k], v) for k, v in first["state_dict"].items())
    assert first["global_step"] == 4 and second["global_step"] == 6 and second["ema"]["updates"] == 6
    steps = [s for s, _ in scalars(run_dir, "train/loss")]
    assert len(steps) == len(set(steps)) == 6
    # ... and ends where an uninterrupted 6-step run ends.
    straight = tmp_path / "straight"
    assert train.main(stage_args(world, straight, 2, init_from=stage1["sd15"], **{**args, "trainer.max_steps": 6})) == 0
    third = torch.load(straight / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    for k, v in third["state_dict"].items():
        torch.testing.assert_close(second["state_dict"][k], v, rtol=0, atol=1e-6, msg=k)


def test_lora_stage3_continues_the_stage2_lora_and_full_stage3_merges_it(world, stage1, tmp_path):
    stage2 = tmp_path / "stage2"
    assert train.main(stage_args(world, stage2, 2, init_from=stage1["sd15"], **LORA)) == 0
    stage3 = tmp_path / "stage3"
    # Another rank in the config: stage 3 continues the stage-2 LoRA as it is (and says so in the log).
    assert train.main(stage_args(world, stage3, 3, init_from=stage2, **{**LORA, "lora.rank": 2})) == 0
    l2, l3 = load_file(stage2 / "export" / LORA_DIR / LORA_WEIGHTS), load_file(stage3 / "export" / LORA_DIR / LORA_WEIGHTS)
    assert l2.keys() == l3.keys() and all(l2[k].shape == l3[k].shape for k in l2)
    assert any(not torch.equal(l2[k], l3[k]) for k in l2)
    assert read_adapter_metadata(stage3 / "export" / "adapter.safetensors")["lora"]["on"] == "base"
    assert not (stage3 / "export" / "unet").exists()
    # A full stage 3 from the LoRA export starts from base + LoRA merged, and exports a whole UNet.
    full = tmp_path / "stage3-full"
    assert train.main(stage_args(world, full, 3, init_from=stage2, **{"samples.every_n_steps": 0})) == 0
    assert (full / "export" / "unet" / "config.json").is_file() and not (full / "export" / LORA_DIR).exists()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"stage": 1, "train.unet": "lora"}, "config key 'train.unet' is lora, which only stages 2 and 3 have"),
        ({"train.unet": "lora", "strategy": "fsdp"}, "does not run under strategy=fsdp"),
        ({"train.unet": "lora", "train.trainable": "[adapter]"}, "does not name unet"),
        ({"train.unet": "partial"}, "config key 'train.unet' must be one of full | lora"),
        ({"train.unet": "lora", "lora.rank": 0}, "config key 'lora.rank' must be an integer >= 1"),
        ({"train.unet": "lora", "lora.target_modules": "[]"}, "config key 'lora.target_modules' must be a non-empty list"),
        ({"train.unet": "lora", "lora.target_modules": "[no_such_layer]"}, "config key 'lora.target_modules'=['no_such_layer'] matches no layer"),
    ],
)
def test_lora_settings_errors_name_the_key(world, stage1, tmp_path, capsys, extra, message):
    stage = extra.pop("stage", 2)
    args = stage_args(world, tmp_path / "run", stage, init_from=stage1["sd15"], **extra)
    assert train.main(args) == 2
    assert message in capsys.readouterr().err
