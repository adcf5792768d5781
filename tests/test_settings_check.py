"""Settings that cannot work fail before any model loads, with one `error:` line that names the
key; a relaunch may not change what makes a run another experiment."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

import train
from datamodules import shard_problems
from linguadiff.config import ConfigError, available_presets, load_config, resolve
from linguadiff.run import RunDir
from linguadiff.settings_check import (
    DTYPES, FSDP_SHARDING, LAYER_MIXES, LOSS_TYPES, SAMPLERS, STRATEGIES, check_settings, resolution_multiple,
    settings_problems,
)


@pytest.fixture()
def shards(tmp_path) -> dict[str, Path]:
    """Shard files that exist (their content is never read here)."""
    folder = tmp_path / "shards"
    folder.mkdir()
    for name in ("train-0.tar", "train-1.tar", "val-0.tar"):
        (folder / name).write_bytes(b"")
    return {"train": folder / "train-{0..1}.tar", "val": folder / "val-0.tar", "folder": folder}


def config(shards, *argv: str):
    return resolve(load_config([f"data.train.urls={shards['train']}", f"data.val.urls={shards['val']}", *argv]))


# (override, the key the error must name, a piece of what it says is allowed)
BAD = [
    ("data.batch_size=0", "data.batch_size", ">= 1"),
    ("data.val_batch_size=-4", "data.val_batch_size", ">= 1"),
    ("optim.lr=0", "optim.lr", "> 0"),
    ("optim.lr=.inf", "optim.lr", "> 0"),
    ("optim.adapter_lr=-1e-4", "optim.adapter_lr", "> 0 or null"),
    ("optim.min_lr_ratio=1.5", "optim.min_lr_ratio", "[0, 1]"),
    ("optim.schedule=linear", "optim.schedule", "cosine | constant"),
    ("optim.warmup_steps=-1", "optim.warmup_steps", ">= 0"),
    ("optim.weight_decay=-0.01", "optim.weight_decay", ">= 0"),
    ("optim.betas=[0.9,1.0]", "optim.betas", "[0, 1)"),
    ("optim.betas=[0.9]", "optim.betas", "two numbers"),
    ("data.caption_dropout=1.0", "data.caption_dropout", "[0, 1)"),
    ("ema.decay=1.0", "ema.decay", "(0, 1)"),
    ("ema.update_every=0", "ema.update_every", ">= 1"),
    ("checkpoint.every_n_steps=0", "checkpoint.every_n_steps", ">= 1"),
    ("checkpoint.keep_last=-2", "checkpoint.keep_last", ">= -1"),
    ("trainer.max_steps=0", "trainer.max_steps", ">= 1"),
    ("trainer.val_check_interval=0", "trainer.val_check_interval", ">= 1"),
    ("trainer.accumulate_grad_batches=0", "trainer.accumulate_grad_batches", ">= 1"),
    ("trainer.gradient_clip_val=-1", "trainer.gradient_clip_val", ">= 0 or null"),
    ("stage=2 model.resolution=15", "model.resolution", "multiple of 2"),
    ("llm.layer_mix=sum", "llm.layer_mix", "mean | concat"),
    ("llm.bos=maybe", "llm.bos", "auto, none"),  # refused when the config is read (linguadiff/config.py)
    ("loss.encoder_weights=[1.0,1.0]", "loss.encoder_weights", "1 weight(s) >= 0"),
    ("llm.max_length=0", "llm.max_length", ">= 1"),
    ("llm.layers=[]", "llm.layers", "non-empty list"),
    ("llm.dtype=bfloat", "llm.dtype", "bfloat16"),
    ("loss.type=l1", "loss.type", "cos_len | mse"),
    ("loss.norm_weight=-1", "loss.norm_weight", ">= 0"),
    ("loss.empty_prompt_weight=-0.5", "loss.empty_prompt_weight", ">= 0"),
    ("diffusion.prediction_type=sample", "diffusion.prediction_type", "null | epsilon | v_prediction"),
    ("generate.scheduler=dpm", "generate.scheduler", "dpm++ | ddim | euler | ddpm"),
    ("speed.compile_mode=fast", "speed.compile_mode", "reduce-overhead"),
    ("speed.compile=[unet]", "speed.compile", "its parts"),
    ("fsdp.sharding=ZERO3", "fsdp.sharding", "FULL_SHARD"),
    ("fsdp.version=3", "fsdp.version", "1 | 2"),
    ("fsdp.frozen=offload", "fsdp.frozen", "shard | replicate"),
    ("trainer.strategy=fsdp fsdp.version=1 speed.compile=[adapter]", "speed.compile", "use fsdp.version=2"),
    ("trainer.strategy=fsdp fsdp.version=1 fsdp.sharding=HYBRID_SHARD", "fsdp.sharding", "needs fsdp.version=2"),
    ("trainer.strategy=deepspeed", "trainer.strategy", "auto | ddp | fsdp"),
    ("train.trainable=[]", "train.trainable", "at least one part"),
    ("train.trainable=[adapter,unet]", "train.trainable", "its parts"),
    ("adapter.heads=5", "adapter.heads", "divide adapter.dim"),
    ("model.kind=sd3", "model.kind", "demo | sd15 | sdxl"),
    ("data.train.urls=/nonexistent/shard-{0..3}.tar", "data.train.urls", "shard not found"),
    ("data.val.urls=/nonexistent/*.tar", "data.val.urls", "no shard matches"),
]


@pytest.mark.parametrize(("override", "key", "allowed"), BAD, ids=[b[0] for b in BAD])
def test_a_bad_setting_fails_before_any_model_loads(shards, tmp_path, capsys, monkeypatch, override, key, allowed):
    import lightning_modules

    def no_model(*args, **kwargs):
        raise AssertionError("a model was about to load")

    monkeypatch.setattr(lightning_modules, "stage_class", no_model)
    run_dir = tmp_path / "run"
    argv = [f"data.train.urls={shards['train']}", f"data.val.urls={shards['val']}", f"run_dir={run_dir}",
            "llm.path=/nonexistent/llm", *override.split()]  # an LLM that could never load: the settings error comes first
    assert train.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert f"config key '{key}'" in err[0] and allowed in err[0], err[0]
    assert not run_dir.exists()  # not even the run folder was made


def test_every_problem_is_reported_at_once(shards):
    with pytest.raises(ConfigError) as err:
        check_settings(config(shards, "optim.lr=0", "data.batch_size=0", "loss.type=l1"))
    parts = str(err.value).split("; ")
    assert [p.split("'")[1] for p in parts] == ["loss.type", "data.batch_size", "optim.lr"]


def test_stage_2_needs_prompts_for_its_samples(shards):
    cfg = config(shards, "stage=2", "samples.prompts=[]")
    assert any("samples.prompts" in p for p in settings_problems(cfg, training=False))
    cfg = config(shards, "stage=2", "samples.prompts=[]", "samples.every_n_steps=0")
    assert settings_problems(cfg, training=False) == []
    assert settings_problems(config(shards, "samples.prompts=[]")) == []  # stage 1 draws no samples


def test_stages_2_and_3_need_an_export_to_start_from(shards, tmp_path):
    problems = settings_problems(config(shards, "stage=3", f"init_from={tmp_path / 'nothing'}"))
    assert problems == [f"init_from={tmp_path / 'nothing'} has no export/adapter.safetensors: "
                        "has its stage-2 run finished? (export happens at the end of training)"]


@pytest.mark.parametrize("group", ["model", "llm", "strategy"])
def test_every_shipped_preset_passes(shards, group):
    for name in available_presets(group):
        for stage in (1, 2, 3):
            cfg = config(shards, f"stage={stage}", f"{group}={name}")
            assert settings_problems(cfg, training=False) == [], (group, name, stage)


def test_resolution_rule_follows_the_base():
    # Hugging Face names: Stable Diffusion's VAE (8x) and UNet (3 downsamplings).
    assert resolution_multiple(OmegaConf.create({"kind": "sdxl", "path": "stabilityai/sdxl"}))[0] == 64
    # The committed demo base: pixel space, a 2-level UNet.
    assert resolution_multiple(load_config([]).model)[0] == 2


def test_resolution_rule_reads_a_local_base(tmp_path):
    (tmp_path / "unet").mkdir()
    (tmp_path / "vae").mkdir()
    (tmp_path / "unet" / "config.json").write_text(json.dumps({"down_block_types": ["A", "B"]}))
    (tmp_path / "vae" / "config.json").write_text(json.dumps({"block_out_channels": [8, 16]}))
    assert resolution_multiple(OmegaConf.create({"kind": "sd15", "path": str(tmp_path)})) == (4, "a VAE of 2x, 1 UNet downsampling(s)")


def test_shard_check_leaves_commands_and_remote_urls_alone(shards):
    cfg = config(shards, "data.train.urls=pipe:aws s3 cp s3://bucket/{000..009}.tar -", "data.val.urls=https://x/y.tar")
    assert shard_problems(cfg) == []
    cfg.data.train.urls = None
    cfg.data.train.sources = [{"urls": str(shards["folder"] / "train-*.tar"), "weight": 2.0},
                              {"urls": "/nonexistent/{0..1}.tar"}]
    [problem] = shard_problems(cfg)
    assert problem.startswith("config key 'data.train.sources': shard not found: '/nonexistent/0.tar'")


def test_choices_are_the_ones_the_code_takes():
    import torch
    from torch.distributed.fsdp import ShardingStrategy

    from linguadiff import strategy
    from linguadiff.generation import make_scheduler
    from linguadiff.models.losses import ALIGNMENT_LOSSES
    from linguadiff.models.text_encoder import torch_dtype

    assert set(LOSS_TYPES) == set(ALIGNMENT_LOSSES)
    assert set(STRATEGIES) == set(strategy.STRATEGIES)
    assert set(FSDP_SHARDING) <= {s.name for s in ShardingStrategy}
    assert all(isinstance(torch_dtype(d), torch.dtype) for d in DTYPES)
    config = {"num_train_timesteps": 1000, "beta_schedule": "scaled_linear"}
    assert all(make_scheduler(name, config) is not None for name in SAMPLERS)
    assert LAYER_MIXES == ("mean", "concat")


# ---------------------------------------------------------------------- relaunching a run_dir


@pytest.mark.parametrize(
    ("change", "key"),
    [
        ("llm.max_length=128", "llm.max_length"),  # the LLM features
        ("llm.dtype=bfloat16", "llm.dtype"),
        ("llm.revision=abc123", "llm.revision"),
        ("model.resolution=32", "model.resolution"),  # shapes
        ("adapter.num_queries=16", "adapter"),
        ("diffusion.prediction_type=epsilon", "diffusion.prediction_type"),  # the objective
        ("loss.type=mse", "loss.type"),
        ("train.trainable=[adapter,text_encoder]", "train.trainable"),  # what the checkpoint holds
        ("trainer.strategy=fsdp", "trainer.strategy"),  # sharded checkpoints
    ],
)
def test_a_relaunch_may_not_change_what_the_run_is(shards, tmp_path, change, key):
    run_dir = f"run_dir={tmp_path / 'run'}"
    RunDir.prepare(config(shards, run_dir))
    with pytest.raises(ConfigError, match=f"holds a run with {key}=.*, this launch has {key}=.*a resume may not change it"):
        RunDir.prepare(config(shards, run_dir, change))


@pytest.mark.parametrize("change", ["trainer.max_steps=99", "optim.lr=3e-4", "data.batch_size=8", "trainer.strategy=ddp",
                                    "samples.every_n_steps=50", "checkpoint.keep_last=-1"])
def test_a_relaunch_may_change_how_long_and_how_fast(shards, tmp_path, change, caplog):
    run_dir = f"run_dir={tmp_path / 'run'}"
    RunDir.prepare(config(shards, run_dir))
    with caplog.at_level("INFO", logger="linguadiff.run"):
        RunDir.prepare(config(shards, run_dir, change))
    assert change.split("=")[0] in caplog.text  # listed among the changed settings


def test_trainable_parts_are_a_set(shards, tmp_path):
    run_dir = f"run_dir={tmp_path / 'run'}"
    RunDir.prepare(config(shards, run_dir, "stage=2", "train.trainable=[adapter,unet]"))
    RunDir.prepare(config(shards, run_dir, "stage=2", "train.trainable=[unet,adapter]"))


def test_strategy_change_says_why(shards, tmp_path):
    run_dir = f"run_dir={tmp_path / 'run'}"
    RunDir.prepare(config(shards, run_dir, "trainer.strategy=ddp"))
    with pytest.raises(ConfigError, match=r"\(unsharded checkpoints cannot be resumed sharded\)"):
        RunDir.prepare(config(shards, run_dir, "trainer.strategy=fsdp"))


@pytest.mark.parametrize(("overrides", "message"), [
    (["speed.encode_ahead=true"], "only stages 2 and 3"),
    (["stage=2", "speed.encode_ahead=true", "text_encoder=clip"], "no LLM to run ahead"),
    (["stage=2", "speed.encode_ahead=true", "trainer.strategy=fsdp"], "not verified under strategy=fsdp"),
    (["speed.float8=[unet]"], "only stages 2 and 3"),
    (["stage=2", "speed.float8=[vae]"], "it takes unet, adapter"),
    (["stage=2", "speed.float8=[adapter]", "text_encoder=clip"], "has no adapter"),
    (["stage=2", "speed.float8=[unet,adapter]", "trainer.strategy=fsdp"], "not verified under strategy=fsdp"),
    (["stage=2", "speed.float8=[unet]", "train.unet=lora", "train.trainable=[adapter,unet]"], "train.unet=lora"),
])
def test_speed_levers_are_refused_where_they_do_not_run(shards, overrides, message):
    problems = [p for p in settings_problems(config(shards, *overrides), training=False)
                if "speed." in p and "does not import" not in p]  # torchao itself: the next test
    key = overrides[1 if overrides[0] == "stage=2" else 0].split("=")[0]
    assert len(problems) == 1 and message in problems[0] and f"'{key}'" in problems[0], problems
    fine = config(shards, "stage=2", "speed.encode_ahead=true", "speed.float8=[unet,adapter]")
    assert not [p for p in settings_problems(fine, training=False) if "speed." in p and "torchao" not in p]


def test_float8_without_torchao_names_the_key_and_the_extra(shards, monkeypatch):
    import linguadiff.models.float8 as float8

    monkeypatch.setattr(float8, "torchao_missing", lambda: "ModuleNotFoundError: No module named 'torchao'")
    problems = [p for p in settings_problems(config(shards, "stage=2", "speed.float8=[unet]"), training=False)
                if "speed." in p]
    assert len(problems) == 1 and "'speed.float8'" in problems[0] and ".[float8]" in problems[0], problems


def test_float8_refuses_a_gpu_without_float8_matmuls(monkeypatch):
    import torch

    from linguadiff.models.float8 import check_float8_device

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    with pytest.raises(ConfigError, match=r"'speed.float8'.*A100.* 8\.0"):
        check_float8_device(torch.device("cuda", 0))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    check_float8_device(torch.device("cuda", 0))  # H100/H200
    check_float8_device(torch.device("cpu"))
