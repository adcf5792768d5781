"""Config loading: presets, dotted overrides, and errors that name the key."""
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from linguadiff.config import ConfigError, available_presets, load_config, resolve
from linguadiff.run import RunDir


def test_defaults_are_the_demo():
    cfg = load_config([])
    assert cfg.stage == 1
    assert cfg.presets.model == "demo" and cfg.model.kind == "demo"
    assert cfg.adapter.dim == 64 and cfg.adapter.num_queries == 77
    assert Path(OmegaConf.select(cfg, "model.path")).joinpath("unet").is_dir()
    assert Path(OmegaConf.select(cfg, "llm.path")).joinpath("config.json").is_file()


def test_presets_and_dotted_overrides():
    cfg = load_config(["model=sdxl", "llm=qwen2.5-7b", "trainer.max_steps=1000", "optim.lr=3e-5",
                       "data.train.urls=/data/text/{00000..00999}.tar", "run_dir=/scratch/run1", "llm.layers=[-1,-2]"])
    assert cfg.model.kind == "sdxl" and cfg.adapter.num_queries == 227 and cfg.adapter.pooled_dim == 1280
    assert cfg.llm.path == "Qwen/Qwen2.5-7B" and cfg.llm.dtype == "bfloat16"
    assert cfg.trainer.max_steps == 1000 and cfg.optim.lr == 3e-5
    assert cfg.data.train.urls == "/data/text/{00000..00999}.tar" and cfg.run_dir == "/scratch/run1"
    assert list(cfg.llm.layers) == [-1, -2]


def test_every_llm_preset_loads():
    names = available_presets("llm")
    assert {"demo", "qwen2.5-1.5b", "qwen2.5-7b", "llama3-8b", "baichuan2-7b", "gemma2-2b", "mt5-xl"} <= set(names)
    for name in names:
        assert load_config([f"llm={name}"]).llm.name == name
    assert load_config(["llm=baichuan2-7b"]).llm.trust_remote_code is True


def test_language_weights_are_free_form():
    cfg = load_config(["data.languages.zh=2.0", "data.languages.ja=0"])
    assert dict(cfg.data.languages) == {"zh": 2.0, "ja": 0}


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["trainer.max_stpes=5"], "unknown config key 'trainer.max_stpes' in the command line (did you mean 'trainer.max_steps'?)"),
        (["optim.lrr=1"], "did you mean 'optim.lr'?"),
        (["trainer.max_steps=abc"], "config key 'trainer.max_steps' in the command line must be an integer"),
        (["llm.bos=maybe"], "config key 'llm.bos' must be one of auto, none, got 'maybe'"),
        (["llm.add_bos=true"], "unknown config key 'llm.add_bos'"),
        (["adapter.dim=[1,2]"], "config key 'adapter.dim'"),
        (["model=sdx"], "unknown model preset 'sdx' (did you mean 'sdxl'?)"),
        (["stage=7"], "config key 'stage' must be one of"),
        (["nonsense"], "expected key=value"),
    ],
)
def test_errors_name_the_key(argv, message):
    with pytest.raises(ConfigError) as err:
        load_config(argv)
    assert message in str(err.value)


def test_preset_from_a_file_is_checked_too(tmp_path):
    good = tmp_path / "mine.yaml"
    good.write_text("data:\n  train:\n    urls: /x/{0..3}.tar\n  batch_size: 16\n")
    assert load_config([f"data={good}"]).data.batch_size == 16
    bad = tmp_path / "bad.yaml"
    bad.write_text("data:\n  batchsize: 16\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'data.batchsize' in data preset bad.yaml \(did you mean 'data.batch_size'\?\)"):
        load_config([f"data={bad}"])


def test_required_keys_must_be_set(tmp_path):
    bare = tmp_path / "bare.yaml"
    bare.write_text("data:\n  batch_size: 8\n")  # no urls
    with pytest.raises(ConfigError, match="config key 'data.train.urls' must be set"):
        resolve(load_config([f"data={bare}"]))


def test_run_dir_refuses_another_experiment(tmp_path):
    cfg = resolve(load_config([f"run_dir={tmp_path}", "data=custom"]))
    run = RunDir.prepare(cfg)
    assert (tmp_path / "config.yaml").is_file() and run.checkpoint is None and run.resume_step == 0
    # A longer run of the same experiment is fine ...
    RunDir.prepare(resolve(load_config([f"run_dir={tmp_path}", "data=custom", "trainer.max_steps=99"])))
    # ... another LLM in the same run_dir is not.
    with pytest.raises(ConfigError, match="llm.path"):
        RunDir.prepare(resolve(load_config([f"run_dir={tmp_path}", "data=custom", "llm=qwen2.5-1.5b"])))
