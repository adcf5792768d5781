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
    run.release()  # the launch ends (one launch per run_dir holds its lock)
    # A longer run of the same experiment is fine ...
    RunDir.prepare(resolve(load_config([f"run_dir={tmp_path}", "data=custom", "trainer.max_steps=99"]))).release()
    # ... another LLM in the same run_dir is not.
    with pytest.raises(ConfigError, match="llm.path"):
        RunDir.prepare(resolve(load_config([f"run_dir={tmp_path}", "data=custom", "llm=qwen2.5-1.5b"])))


def test_a_control_run_resumes_whatever_the_llm_settings_say(tmp_path):
    """A control run (text_encoder=clip) reads no LLM and has no adapter: their keys do not make
    it another experiment; the text encoder and the base still do."""
    def prepare(*extra):
        return RunDir.prepare(resolve(load_config([f"run_dir={tmp_path}", "data=custom", "stage=2", "text_encoder=clip",
                                                   *extra])))

    prepare().release()
    prepare("llm=qwen2.5-1.5b", "adapter.dim=64", "trainer.max_steps=99").release()
    with pytest.raises(ConfigError, match="model.path"):
        prepare("model=sdxl")
    with pytest.raises(ConfigError, match="text_encoder"):
        prepare("text_encoder=llm")


def test_an_fsdp_run_keeps_its_fsdp_version(tmp_path):
    """FSDP1 and FSDP2 shard checkpoints differently: a relaunch may not switch between them,
    and a run saved before fsdp.version existed was FSDP1's."""
    from omegaconf import OmegaConf

    def prepare(*extra):
        return RunDir.prepare(resolve(load_config([f"run_dir={tmp_path}", "data=custom", "strategy=fsdp", *extra])))

    prepare().release()
    with pytest.raises(ConfigError, match="fsdp.version=2, this launch has fsdp.version=1"):
        prepare("fsdp.version=1")
    saved = OmegaConf.load(tmp_path / "config.yaml")
    del saved.fsdp["version"]  # as written before the key existed
    OmegaConf.save(saved, tmp_path / "config.yaml")
    with pytest.raises(ConfigError, match="fsdp.version=1, this launch has fsdp.version=2"):
        prepare()
    prepare("fsdp.version=1").release()
    # Other strategies never read it.
    ddp = tmp_path / "ddp"
    RunDir.prepare(resolve(load_config([f"run_dir={ddp}", "data=custom", "strategy=ddp"]))).release()
    RunDir.prepare(resolve(load_config([f"run_dir={ddp}", "data=custom", "strategy=ddp", "fsdp.version=1"]))).release()


def test_config_resolves_demo_shards_only_once_datamodules_registered_them(tmp_path, monkeypatch):
    import subprocess
    import sys

    # linguadiff.config imports no data code, so on its own it cannot resolve the demo preset,
    # and says which package to import instead of OmegaConf's "Unsupported interpolation type".
    script = ("import sys; from linguadiff.config import load_config, resolve; assert 'datamodules' not in sys.modules;"
              " resolve(load_config([]))")
    done = subprocess.run([sys.executable, "-c", script], cwd=Path(__file__).resolve().parents[1],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert ("config key 'data.train.urls' uses the resolver 'demo_shards', which is not registered: it comes with "
            "the datamodules package, so import datamodules before resolving the config") in done.stderr

    import datamodules  # noqa: F401  - registers the resolver
    from datamodules.demo_data import DATA_VERSION

    monkeypatch.setenv("LINGUADIFF_CACHE", str(tmp_path))
    text = tmp_path / "demo_data" / "text"
    text.mkdir(parents=True)
    (text / f"COMPLETE-v{DATA_VERSION}-16px").write_text("ok\n")  # as if generated: nothing is built here
    cfg = resolve(load_config([]))
    assert cfg.data.train.urls == str(text / "train-{00000..00011}.tar")
    assert cfg.data.val.urls == str(text / "val-00000.tar")


@pytest.mark.parametrize(
    "override",
    [
        "run_dir=5",                  # default runs/stage${stage}: an interpolation accepts anything
        "init_from=runs/stage1",      # default null
        "model.name=42",              # default ??? (must be set)
        "trainer.max_steps=${seed}",  # an interpolated value is checked once resolved, not here
        "diffusion.noise_offset=1",   # an integer is a fine number
        "llm.dtype=16",               # numbers read fine as text
        "init_from=null",             # null is allowed anywhere
    ],
)
def test_defaults_that_accept_anything_and_lenient_types(override):
    load_config([override])


def test_wrong_types_under_nested_keys_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"^config key 'llm.dtype' in the command line must be a string \(default 'float32'\), got True$"):
        load_config(["llm.dtype=true"])
    with pytest.raises(ConfigError, match=r"^config key 'data.languages' in the command line must be a mapping, got 5$"):
        load_config(["data.languages=5"])
    nested = tmp_path / "nested.yaml"
    nested.write_text("data:\n  train:\n    urls: /x.tar\n  val: [a, b]\n")
    with pytest.raises(ConfigError, match=r"^config key 'data.val' in data preset nested.yaml must be a mapping, got \['a', 'b'\]$"):
        load_config([f"data={nested}"])
    deep = tmp_path / "deep.yaml"
    deep.write_text("stages:\n  2:\n    optim: {lr: fast}\n")
    with pytest.raises(ConfigError, match=r"^config key 'optim.lr' in model preset deep.yaml \(stages.2\) must be a number"):
        load_config(["stage=2", f"model={deep}"])
