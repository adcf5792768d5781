"""Stages 2 and 3 on tiny SD1.5/SDXL-shaped stand-ins: hand-offs, what trains, EMA, export."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import lightning as L
import pytest
import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import evaluate
import generate
import train
from linguadiff.models.adapter import read_adapter_metadata
from tests.test_stage1_training import scalars, tiny_args
from tests.shard_helpers import write_demo_world
from tests.tiny_models import make_tiny_llm, make_tiny_sd_pipeline


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("stage23")
    return {
        **write_demo_world(root, text_train=64, image_train=96),
        "llm": make_tiny_llm(root / "llm", kind="llama"),
        "sd15": make_tiny_sd_pipeline(root / "sd15", kind="sd15"),
        "sdxl": make_tiny_sd_pipeline(root / "sdxl", kind="sdxl"),
    }


def stage_args(world, run_dir: Path, stage: int, kind: str = "sd15", **extra) -> list[str]:
    args = tiny_args(world, run_dir, kind=kind, **{"trainer.max_steps": 4, "trainer.val_check_interval": 2})
    if stage > 1:
        args += [f"stage={stage}", f"data.train.urls={world['image_train']}", f"data.val.urls={world['image_val']}",
                 "model.resolution=32", "data.val_batch_size=8", "samples.every_n_steps=2", "samples.num_images=1",
                 "samples.prompts=[a red circle,一个蓝色的正方形]", "generate.steps=2", "generate.scheduler=ddim",
                 "diffusion.val_timesteps=[200,800]", "ema.decay=0.9"]
    return args + [f"{k}={v}" for k, v in extra.items()]


@pytest.fixture(scope="module")
def stage1_run(world, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("runs") / "stage1"
    assert train.main(stage_args(world, run_dir, 1)) == 0
    return run_dir


@pytest.fixture(scope="module")
def stage1_sdxl_run(world, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("runs") / "stage1-sdxl"
    assert train.main(stage_args(world, run_dir, 1, kind="sdxl", **{"trainer.max_steps": 2})) == 0
    return run_dir


def _unet_state(folder: Path) -> dict[str, torch.Tensor]:
    return UNet2DConditionModel.from_pretrained(folder).state_dict()


def test_stage2_trains_adapter_and_unet_and_exports_for_diffusers(world, stage1_run, tmp_path):
    import lightning as L

    from linguadiff.settings_check import STAGE_PARTS

    class Parts(L.Callback):
        def on_fit_start(self, trainer, pl_module):
            self.names = {name for name, _ in pl_module.named_children()}

    parts = Parts()
    run_dir = tmp_path / "stage2"
    assert train.main(stage_args(world, run_dir, 2, init_from=stage1_run), extra_callbacks=(parts,)) == 0
    assert parts.names == set(STAGE_PARTS[2])  # what the settings check lets train.trainable name
    export = run_dir / "export"
    meta = read_adapter_metadata(export / "adapter.safetensors")
    assert meta["stage"] == 2 and meta["global_step"] == 4
    # Both trained parts moved away from where they started.
    before_adapter = load_file(stage1_run / "export" / "adapter.safetensors")
    after_adapter = load_file(export / "adapter.safetensors")
    assert any(not torch.equal(before_adapter[k], after_adapter[k]) for k in before_adapter)
    base_unet, trained_unet = _unet_state(world["sd15"] / "unet"), _unet_state(export / "unet")
    assert any(not torch.equal(base_unet[k], trained_unet[k]) for k in base_unet)
    # The exported UNet is the EMA one, not the last raw weights.
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    raw = ckpt["state_dict"]["unet.conv_in.weight"]
    assert not torch.equal(raw, trained_unet["conv_in.weight"])
    assert ckpt["ema"]["updates"] == 4
    # Only trained weights in the checkpoint; the model card and sample grids are there.
    assert all(k.startswith(("adapter.", "unet.")) for k in ckpt["state_dict"])
    assert (export / "README.md").read_text().startswith("# LinguaDiff export")
    assert sorted(p.name for p in (run_dir / "samples").glob("*.png")) == ["step00000002.png", "step00000004.png"]
    assert scalars(run_dir, "val/loss") and scalars(run_dir, "val/loss_t200")
    # Each grid says what it shows (issue 13): a legend beside the PNG, and in TensorBoard one
    # image per prompt and a text table holding every prompt exactly (the Chinese one too).
    prompts = ["a red circle", "一个蓝色的正方形"]
    legend = json.loads((run_dir / "samples" / "step00000004.json").read_text(encoding="utf-8"))
    assert [(r["row"], r["prompt"], r["seeds"]) for r in legend["rows"]] == [(0, prompts[0], [0]), (1, prompts[1], [0])]
    events = EventAccumulator(str(run_dir / "tensorboard")).Reload()
    assert {"samples/grid", "samples/prompt_00", "samples/prompt_01"} <= set(events.Tags()["images"])
    assert [e.step for e in events.Images("samples/prompt_01")] == [2, 4]
    (table,) = [e for e in events.Tensors("samples/prompts/text_summary") if e.step == 4]
    text = table.tensor_proto.string_val[0].decode("utf-8")
    assert [line.split(" | ")[1] for line in text.splitlines()[2:]] == prompts

    # generate.py draws with the stage-2 export (its UNet) through the diffusers pipeline.
    out = tmp_path / "out"
    assert generate.main([f"run_dir={run_dir}", "prompt=一个红色的圆形", "num_images=2", "steps=2", f"out_dir={out}"]) == 0
    assert len(list(out.glob("*.png"))) == 2


def test_stage2_resume_keeps_the_ema(world, stage1_run, tmp_path):
    run_dir = tmp_path / "stage2"
    assert train.main(stage_args(world, run_dir, 2, init_from=stage1_run, **{"samples.every_n_steps": 0})) == 0
    first = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert train.main(stage_args(world, run_dir, 2, init_from=stage1_run, **{"samples.every_n_steps": 0, "trainer.max_steps": 6})) == 0
    second = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert first["ema"]["updates"] == 4 and second["ema"]["updates"] == 6
    assert second["global_step"] == 6
    steps = [s for s, _ in scalars(run_dir, "train/loss")]
    assert len(steps) == len(set(steps)) == 6


def test_encode_ahead_gives_the_same_steps_and_resumes_exactly(world, stage1_run, tmp_path):
    """speed.encode_ahead (the next batch's LLM forward during this step) changes no number:
    a run with it from the start, and a plain run stopped after step 1 and resumed with it,
    log the same losses and end with the same weights (steps 2-3 use features made ahead in
    one and not in the other; the look-ahead shifts neither the stream nor the noise)."""

    class Hits(L.Callback):
        def on_train_end(self, trainer, pl_module):
            self.hits = pl_module.encode_ahead.hits if pl_module.encode_ahead is not None else None

    quick = {"samples.every_n_steps": 0, "trainer.val_check_interval": 100, "data.val.urls": "null",
             "checkpoint.every_n_steps": 1, "data.num_workers": 0}
    hits = {}
    for name, ahead, steps in (("ahead", True, 3), ("resumed", False, 1), ("resumed", True, 3)):
        counter = Hits()
        args = stage_args(world, tmp_path / name, 2, init_from=stage1_run, **quick,
                          **{"trainer.max_steps": steps, "speed.encode_ahead": str(ahead).lower()})
        assert train.main(args, extra_callbacks=(counter,)) == 0
        hits[name] = counter.hits
    assert hits == {"ahead": 2, "resumed": 1}  # features made ahead were used (not by a resumed run's first step)
    losses = {name: dict(scalars(tmp_path / name, "train/loss")) for name in ("ahead", "resumed")}
    assert len(losses["ahead"]) == 3 and losses["ahead"] == losses["resumed"]
    ahead, resumed = (torch.load(tmp_path / name / "checkpoints" / "last.ckpt", map_location="cpu",
                                 weights_only=True)["state_dict"] for name in ("ahead", "resumed"))
    assert ahead.keys() == resumed.keys() and all(torch.equal(ahead[k], resumed[k]) for k in ahead)


def test_stage3_freezes_the_adapter_and_filters_by_aesthetics(world, stage1_run, tmp_path):
    stage2 = tmp_path / "stage2"
    assert train.main(stage_args(world, stage2, 2, init_from=stage1_run, **{"samples.every_n_steps": 0})) == 0
    stage3 = tmp_path / "stage3"
    assert train.main(stage_args(world, stage3, 3, init_from=stage2, **{"data.min_aesthetic": 5.0})) == 0
    # The adapter is exactly stage 2's; the UNet trained on.
    a2, a3 = load_file(stage2 / "export" / "adapter.safetensors"), load_file(stage3 / "export" / "adapter.safetensors")
    assert all(torch.equal(a2[k], a3[k]) for k in a2)
    u2, u3 = _unet_state(stage2 / "export" / "unet"), _unet_state(stage3 / "export" / "unet")
    assert any(not torch.equal(u2[k], u3[k]) for k in u2)
    assert read_adapter_metadata(stage3 / "export" / "adapter.safetensors")["stage"] == 3
    # Low-aesthetic samples were dropped before decoding, and counted.
    assert scalars(stage3, "data/skipped_low_aesthetic")[-1][1] > 0


@pytest.mark.parametrize(
    ("stage", "init", "message"),
    [
        (2, None, "set init_from=RUN_DIR"),
        (2, "missing", "has no export/adapter.safetensors"),
        (3, "stage1", "is a stage-1 export; stage 3 starts from stage 2"),
    ],
)
def test_stage_handoff_errors(world, stage1_run, tmp_path, capsys, stage, init, message):
    extra = {} if init is None else {"init_from": stage1_run if init == "stage1" else tmp_path / "nothing"}
    assert train.main(stage_args(world, tmp_path / "run", stage, **extra)) == 2
    assert message in capsys.readouterr().err


def test_stage2_refuses_an_export_made_for_another_llm(world, stage1_run, tmp_path, capsys):
    other = make_tiny_llm(tmp_path / "other-llm", kind="qwen2")
    assert train.main(stage_args(world, tmp_path / "run", 2, init_from=stage1_run, **{"llm.path": other})) == 2
    assert "its LLM is" in capsys.readouterr().err


def test_sdxl_stage2_uses_pooled_and_time_ids(world, stage1_sdxl_run, tmp_path):
    stage1 = stage1_sdxl_run
    stage2 = tmp_path / "stage2"
    assert train.main(stage_args(world, stage2, 2, kind="sdxl", init_from=stage1, **{"samples.every_n_steps": 0, "trainer.max_steps": 2})) == 0
    assert (stage2 / "export" / "unet" / "config.json").is_file()
    out = tmp_path / "out"
    assert generate.main([f"run_dir={stage2}", "prompt=a red circle", "num_images=1", "steps=2", f"out_dir={out}"]) == 0


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_presets_dtypes_stage2_samples_export_generate_evaluate(world, tmp_path, kind):
    """The real presets' dtypes (model.dtype=bfloat16: bf16 VAE beside the trained fp32 UNet)
    with a sample grid every step, then the export through generate.py and evaluate.py in
    bf16 (issue 14: the first sample grid of every real stage-2 run crashed)."""
    stage1 = tmp_path / "stage1"
    assert train.main(stage_args(world, stage1, 1, kind=kind, **{"trainer.max_steps": 1, "trainer.val_check_interval": 1})) == 0
    if kind == "sdxl":  # the per-encoder loss logs each part's cosine
        assert scalars(stage1, "train/cosine_clip_l") and scalars(stage1, "train/cosine_clip_g")
    stage2 = tmp_path / "stage2"
    assert train.main(stage_args(world, stage2, 2, kind=kind, init_from=stage1,
                                 **{"model.dtype": "bfloat16", "samples.every_n_steps": 1, "trainer.max_steps": 2,
                                    "trainer.val_check_interval": 2})) == 0
    assert sorted(p.name for p in (stage2 / "samples").glob("*.png")) == ["step00000001.png", "step00000002.png"]
    assert (stage2 / "export" / "unet" / "config.json").is_file()
    out = tmp_path / "out"
    assert generate.main([f"run_dir={stage2}", "prompt=a red circle", "num_images=1", "steps=2", "dtype=bfloat16",
                          "scheduler=ddim", f"out_dir={out}"]) == 0
    assert len(list(out.glob("*.png"))) == 1
    assert evaluate.main([f"run_dir={stage2}", "sets=[multilingual]", "languages=[en,zh]", "multilingual=parallel",
                          "reference=none", "text=none", "num_images=1", "steps=2", "grid_prompts=2",
                          "dtype=bfloat16", "tensorboard=false"]) == 0
    assert (stage2 / "eval" / "metrics.json").is_file()


# ---------------------------------------------------------------------- LoRA (train.unet=lora)

# A LoRA learning rate that moves the tiny UNet's output visibly in 4 steps; a constant one,
# so that a 4-step run resumed to 6 steps can equal a 6-step run.
LORA = {"train.unet": "lora", "lora.rank": 4, "lora.alpha": 8.0, "lora.lr": 1e-2, "samples.every_n_steps": 0,
        "optim.schedule": "constant", "optim.warmup_steps": 0, "trainer.limit_val_batches": 0}


class Watch(L.Callback):
    """The module's weights when training starts and ends, and what the optimizer holds."""

    def on_train_start(self, trainer, pl_module):
        self.start = {k: v.detach().clone() for k, v in pl_module.named_parameters()}
        self.trainable = {k for k, v in pl_module.named_parameters() if v.requires_grad}
        by_id = {id(v): k for k, v in pl_module.named_parameters()}
        self.in_optimizer = {by_id[id(p)] for g in trainer.optimizers[0].param_groups for p in g["params"]}

    def on_train_end(self, trainer, pl_module):
        self.end = {k: v.detach().clone() for k, v in pl_module.named_parameters()}


@pytest.fixture(scope="module")
def lora_run(world, stage1_run, tmp_path_factory) -> tuple[Path, Watch]:
    """A 4-step LoRA stage 2 on the tiny SD1.5 base, exporting the merged UNet too."""
    watch = Watch()
    run_dir = tmp_path_factory.mktemp("lora") / "stage2"
    assert train.main(stage_args(world, run_dir, 2, init_from=stage1_run, **{**LORA, "export.merge_lora": "true",
                                                                             "samples.every_n_steps": 4}),
                      extra_callbacks=(watch,)) == 0
    return run_dir, watch


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


def check_lora_run(world, run_dir: Path, watch: Watch, kind: str, merged: bool) -> None:
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    from linguadiff.generation import Generator
    from linguadiff.models.lora import LORA_DIR, LORA_WEIGHTS, is_lora_name

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

    # The checkpoint holds the trained weights only: every LoRA weight, no base UNet weight.
    ckpt_path = run_dir / "checkpoints" / "last.ckpt"
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    assert set(ckpt["state_dict"]) == lora | adapter
    trained_bytes = sum(v.numel() * v.element_size() for v in ckpt["state_dict"].values())
    assert ckpt_path.stat().st_size < 4 * trained_bytes + 200_000  # weights, AdamW's 2 moments, the EMA; bookkeeping

    # The export: diffusers' LoRA file (EMA weights) that load_lora_weights puts on a plain
    # pipeline of the base; its UNet gives what our generation path's UNet gives.
    export = run_dir / "export"
    assert (export / LORA_DIR / LORA_WEIGHTS).is_file() and (export / "unet").is_dir() == merged
    meta = read_adapter_metadata(export / "adapter.safetensors")
    assert meta["training"]["unet"] == "lora" and meta["lora"]["rank"] == 4 and meta["lora"]["alpha"] == 8.0
    exported = load_file(export / LORA_DIR / LORA_WEIGHTS)
    assert len(exported) == len(lora) and all(k.startswith("unet.") for k in exported)
    raw_b = [v for k, v in ckpt["state_dict"].items() if ".lora_B." in k]
    assert not any(torch.equal(v, e) for v in raw_b for e in exported.values())  # the EMA, not the raw weights

    if kind == "sdxl":
        plain = StableDiffusionXLPipeline.from_pretrained(world[kind])
    else:
        plain = StableDiffusionPipeline.from_pretrained(world[kind], safety_checker=None, requires_safety_checker=False)
    base_out = _unet_out(plain.unet, kind)
    plain.load_lora_weights(export / LORA_DIR)
    lora_out = _unet_out(plain.unet, kind)
    ours = Generator.from_run(run_dir, device="cpu", dtype="float32")  # merged: unet/; else the base + lora/
    assert (lora_out - base_out).abs().max() > 1e-3  # the LoRA does change the UNet
    # Equal up to fp32 rounding (the merged UNet adds B @ A into the weights once).
    torch.testing.assert_close(_unet_out(ours.pipeline.unet, kind), lora_out, atol=1e-5, rtol=1e-4)


def test_lora_stage2_sd15_trains_only_lora_and_adapter_and_exports_for_diffusers(world, lora_run):
    check_lora_run(world, *lora_run, kind="sd15", merged=True)
    assert (lora_run[0] / "samples" / "step00000004.png").is_file()  # the grid draws with the LoRA'd UNet


def test_lora_stage2_sdxl_exports_a_lora_that_generate_draws_with(world, stage1_sdxl_run, tmp_path):
    watch, stage2 = Watch(), tmp_path / "stage2"
    assert train.main(stage_args(world, stage2, 2, kind="sdxl", init_from=stage1_sdxl_run, **LORA), extra_callbacks=(watch,)) == 0
    check_lora_run(world, stage2, watch, kind="sdxl", merged=False)
    out = tmp_path / "out"
    assert generate.main([f"run_dir={stage2}", "prompt=a red circle", "num_images=1", "steps=2", f"out_dir={out}"]) == 0
    assert len(list(out.glob("*.png"))) == 1


def test_lora_resume_restores_the_lora_exactly_and_continues(world, stage1_run, lora_run, tmp_path):
    run_dir = tmp_path / "stage2"
    shutil.copytree(lora_run[0], run_dir)
    first = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    watch = Watch()
    args = {**LORA, "export.merge_lora": "true", "trainer.max_steps": 6}
    assert train.main(stage_args(world, run_dir, 2, init_from=stage1_run, **args), extra_callbacks=(watch,)) == 0
    second = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    # The resumed run starts from exactly the checkpoint's LoRA and adapter weights, and goes on.
    assert all(torch.equal(watch.start[k], v) for k, v in first["state_dict"].items())
    assert first["global_step"] == 4 and second["global_step"] == 6 and second["ema"]["updates"] == 6
    steps = [s for s, _ in scalars(run_dir, "train/loss")]
    assert len(steps) == len(set(steps)) == 6
    assert any(not torch.equal(second["state_dict"][k], v) for k, v in first["state_dict"].items() if ".lora_B." in k)


def test_lora_stage3_continues_the_stage2_lora(world, lora_run, tmp_path):
    from linguadiff.models.lora import LORA_DIR, LORA_WEIGHTS

    stage2 = lora_run[0]
    stage3 = tmp_path / "stage3"
    # Another rank in the config: stage 3 continues the stage-2 LoRA as it is (and logs so).
    assert train.main(stage_args(world, stage3, 3, init_from=stage2, **{**LORA, "lora.rank": 2})) == 0
    l2, l3 = load_file(stage2 / "export" / LORA_DIR / LORA_WEIGHTS), load_file(stage3 / "export" / LORA_DIR / LORA_WEIGHTS)
    assert l2.keys() == l3.keys() and all(l2[k].shape == l3[k].shape for k in l2)
    assert any(not torch.equal(l2[k], l3[k]) for k in l2)
    assert read_adapter_metadata(stage3 / "export" / "adapter.safetensors")["lora"]["on"] == "base"
    assert not (stage3 / "export" / "unet").exists()


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
def test_lora_settings_errors_name_the_key(world, stage1_run, tmp_path, capsys, extra, message):
    stage = extra.pop("stage", 2)
    assert train.main(stage_args(world, tmp_path / "run", stage, init_from=stage1_run, **extra)) == 2
    assert message in capsys.readouterr().err
