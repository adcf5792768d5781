"""Stage 1 end to end on tiny stand-ins: train.py -> checkpoints, TensorBoard, export; resume."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

import train
from datamodules.demo_data import write_demo_shards
from linguadiff.models.adapter import QueryAdapter
from tests.tiny_models import make_tiny_llm, make_tiny_sd_base


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("stage1")
    shards = root / "shards"
    write_demo_shards(shards, num_samples=96, samples_per_shard=32, seed=0, image_size=16, prefix="train",
                      with_images=False, parallel_in_json=True)
    write_demo_shards(shards, num_samples=24, samples_per_shard=24, seed=1, image_size=16, prefix="val", with_images=False)
    # A fourth training shard with bad samples among good ones: skipped, counted, logged.
    import webdataset as wds

    with wds.TarWriter(str(shards / "train-00003.tar")) as sink:
        for i in range(16):
            sink.write({"__key__": f"good{i:03d}", "txt": "a red circle", "zh.txt": "红色圆形"})
        sink.write({"__key__": "empty", "txt": "   "})
        sink.write({"__key__": "latin1", "txt": "un cercle rouge \xe9t\xe9".encode("latin-1")})
    return {
        "llm": make_tiny_llm(root / "llm", kind="qwen2"),
        "sd15": make_tiny_sd_base(root / "sd15", kind="sd15", hidden=32),
        "sdxl": make_tiny_sd_base(root / "sdxl", kind="sdxl", hidden=32, hidden_2=48, projection_dim=40),
        "train": shards / "train-{00000..00003}.tar",
        "val": shards / "val-00000.tar",
    }


def tiny_args(assets, run_dir: Path, kind: str = "sd15", **extra) -> list[str]:
    dims = {"sd15": ["adapter.dim=32", "adapter.num_queries=77", "adapter.pooled_dim=null"],
            "sdxl": ["adapter.dim=80", "adapter.num_queries=227", "adapter.pooled_dim=40"]}[kind]
    args = [
        f"model.path={assets[kind]}", f"model.kind={kind}", "model.name=tiny-" + kind,
        f"llm.path={assets['llm']}", "llm.name=tiny-qwen2", "llm.max_length=64",
        *dims, "adapter.encoder_layers=1", "adapter.decoder_layers=1", "adapter.heads=2", "adapter.ffn_dim=64",
        f"data.train.urls={assets['train']}", f"data.val.urls={assets['val']}",
        "data.batch_size=8", "data.val_batch_size=48", "data.num_workers=1", "data.shuffle_buffer=16",
        "optim.lr=3e-3", "optim.warmup_steps=2",
        "trainer.max_steps=6", "trainer.val_check_interval=3", "trainer.log_every_n_steps=1",
        "checkpoint.every_n_steps=3", f"run_dir={run_dir}",
    ]
    return args + [f"{k}={v}" for k, v in extra.items()]


def scalars(run_dir: Path, tag: str) -> list[tuple[int, float]]:
    """Every (step, value) of `tag` in every event file, as written (no de-duplication)."""
    out = []
    for f in sorted((run_dir / "tensorboard").glob("events.out.tfevents.*")):
        for event in EventFileLoader(str(f)).Load():
            for v in event.summary.value:
                if v.tag == tag:
                    out.append((event.step, v.tensor.float_val[0] if v.tensor.float_val else v.simple_value))
    return out


def test_stage1_trains_only_the_adapter_and_exports(assets, tmp_path):
    run_dir = tmp_path / "run"
    assert train.main(tiny_args(assets, run_dir, **{"trainer.max_steps": 30, "trainer.val_check_interval": 15})) == 0

    # The run folder holds everything.
    assert (run_dir / "config.yaml").is_file() and (run_dir / "checkpoints" / "last.ckpt").is_file()
    exported = run_dir / "export" / "adapter.safetensors"
    adapter, meta = QueryAdapter.from_file(exported)
    assert meta["stage"] == 1 and meta["global_step"] == 30
    assert meta["llm"]["path"] == str(assets["llm"]) and meta["base_model"]["kind"] == "sd15"
    assert adapter.config["num_queries"] == 77 and adapter.config["dim"] == 32

    # Only trained weights are in the checkpoint: the frozen LLM and teacher are not copied.
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["state_dict"] and all(k.startswith("adapter.") for k in ckpt["state_dict"])
    assert ckpt["global_step"] == 30

    # The adapter moved away from a fresh one; the loss fell.
    fresh = QueryAdapter(**adapter.config).state_dict()
    trained = load_file(exported)
    assert not torch.equal(fresh["queries"], trained["queries"])
    losses = [v for _, v in scalars(run_dir, "train/loss")]
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5
    # The bad samples of train-00003 were skipped and counted in TensorBoard.
    assert scalars(run_dir, "data/skipped_empty_caption")[-1][1] >= 1
    assert scalars(run_dir, "data/skipped_bad_encoding")[-1][1] >= 1
    # Validation logged the loss and per-language recall.
    assert scalars(run_dir, "val/loss") and scalars(run_dir, "val/recall@1/zh") and scalars(run_dir, "val/recall@5/non_english")


def test_frozen_parts_stay_unchanged(assets, tmp_path):
    """Train a few steps in-process and compare every parameter before and after."""
    from linguadiff.config import load_config, resolve
    from lightning_modules.stage1_alignment import Stage1Alignment

    cfg = resolve(load_config(tiny_args(assets, tmp_path / "run")))
    module = Stage1Alignment.from_config(cfg)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    assert {n for n, p in module.named_parameters() if p.requires_grad} == {n for n, _ in module.adapter.named_parameters(prefix="adapter")}

    import lightning as L
    from datamodules import build_datamodule

    trainer = L.Trainer(max_steps=4, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, limit_val_batches=0)
    trainer.fit(module, datamodule=build_datamodule(cfg, module.tokenizers()))
    after = module.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("adapter.") for k in changed)
    assert not module.text_encoder.training and not module.teacher.training


def test_wrong_trainable_set_is_refused(assets, tmp_path, capsys):
    assert train.main(tiny_args(assets, tmp_path / "run", **{"train.trainable": "[adapter,unet]"})) == 2
    assert "config key 'train.trainable' names ['unet']" in capsys.readouterr().err


def test_adapter_that_does_not_fit_the_base_is_refused(assets, tmp_path, capsys):
    assert train.main(tiny_args(assets, tmp_path / "run", **{"adapter.num_queries": 50})) == 2
    assert "adapter.num_queries=50 but tiny-sd15 reads 77 context tokens" in capsys.readouterr().err


def test_resume_continues_the_same_curve(assets, tmp_path):
    run_dir = tmp_path / "run"
    # 7 steps with a periodic checkpoint every 3: last.ckpt must still be at step 7.
    assert train.main(tiny_args(assets, run_dir, **{"trainer.max_steps": 7})) == 0
    first = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert first["global_step"] == 7

    assert train.main(tiny_args(assets, run_dir, **{"trainer.max_steps": 10})) == 0
    second = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert second["global_step"] == 10
    # The learning-rate schedule and optimizer went on from step 7, not from scratch.
    assert second["lr_schedulers"][0]["last_epoch"] == 10
    assert second["optimizer_states"][0]["state"][0]["step"].item() == 10
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["last.ckpt", "step00000003.ckpt", "step00000006.ckpt", "step00000009.ckpt"]

    steps = [s for s, _ in scalars(run_dir, "train/loss")]
    assert len(steps) == len(set(steps)) == 10, f"a step was logged twice or missed: {sorted(steps)}"
    assert len(list((run_dir / "tensorboard").glob("events.out.tfevents.*"))) == 2  # one folder, two launches

    # Nothing left to do at the same max_steps: it says so and returns.
    assert train.main(tiny_args(assets, run_dir, **{"trainer.max_steps": 10})) == 0


def test_sdxl_shaped_base_trains_context_and_pooled(assets, tmp_path):
    run_dir = tmp_path / "run"
    assert train.main(tiny_args(assets, run_dir, kind="sdxl", **{"trainer.max_steps": 3, "trainer.val_check_interval": 3})) == 0
    adapter, meta = QueryAdapter.from_file(run_dir / "export" / "adapter.safetensors")
    out = adapter(torch.randn(2, 5, adapter.config["llm_dim"]), torch.ones(2, 5, dtype=torch.bool))
    assert out["context"].shape == (2, 227, 80) and out["pooled"].shape == (2, 40)
    assert scalars(run_dir, "train/pooled_cosine")


def test_relaunch_refuses_a_changed_experiment_but_resumes_a_longer_one(assets, tmp_path, capsys):
    import lightning as L

    from linguadiff.settings_check import STAGE_PARTS

    class Parts(L.Callback):
        def on_fit_start(self, trainer, pl_module):
            self.names = {name for name, _ in pl_module.named_children()}

    parts = Parts()
    run_dir = tmp_path / "run"
    assert train.main(tiny_args(assets, run_dir, **{"trainer.max_steps": 3}), extra_callbacks=(parts,)) == 0
    assert parts.names == set(STAGE_PARTS[1])  # what the settings check lets train.trainable name
    capsys.readouterr()
    for key, value in [("llm.max_length", 32), ("diffusion.prediction_type", "epsilon"),
                       ("train.trainable", "[adapter,text_encoder]")]:
        assert train.main(tiny_args(assets, run_dir, **{"trainer.max_steps": 6, key: value})) == 2
        err = capsys.readouterr().err
        assert f"error: run_dir {run_dir} holds a run with {key}=" in err and "a resume may not change it" in err, err
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["global_step"] == 3
    assert train.main(tiny_args(assets, run_dir, **{"trainer.max_steps": 5})) == 0  # a longer run resumes
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["global_step"] == 5
