"""Run folders and exports from elsewhere are data, never code (issue 10, "files are data").

An export's metadata may ask for the LLM's remote code and a saved config.yaml may hold a
`pipe:` command; generating from or evaluating such a folder must run neither unless the
user says so on the command line. (A checkpoint carrying a pickle payload: test_run_safety.)
"""
from __future__ import annotations

import json

from omegaconf import OmegaConf

import datamodules  # noqa: F401  (registers the demo resolver the demo config uses)
import evaluate
import generate
from linguadiff.config import load_config, resolve
from linguadiff.export import adapter_metadata, stamped
from linguadiff.models.prompt_encoder import PromptEncoder
from linguadiff.models.text_encoder import LLMTextEncoder


def write_demo_export(run_dir, **llm_overrides) -> None:
    """A finished-looking stage-1 run folder of the demo preset: config.yaml and an export whose
    adapter (random weights) fits the demo LLM and base."""
    cfg = resolve(load_config([f"run_dir={run_dir}"]))
    encoder = PromptEncoder.with_new_adapter(LLMTextEncoder.from_settings(cfg.llm), cfg.adapter)
    meta = stamped(adapter_metadata(cfg), 10, encoder.tokenizer.bos_id)
    meta["llm"].update(llm_overrides)
    encoder.adapter.save(run_dir / "export" / "adapter.safetensors", meta)
    OmegaConf.save(cfg, run_dir / "config.yaml")


def test_an_export_asking_for_remote_code_runs_none_unless_allowed(tmp_path, capsys):
    marker = tmp_path / "remote-code-ran"
    llm = tmp_path / "evil_llm"
    llm.mkdir()
    # A model repository whose code would run on load: transformers imports modeling_evil.py
    # for AutoModel when trust_remote_code is on.
    (llm / "config.json").write_text(json.dumps({"model_type": "evil", "auto_map": {
        "AutoConfig": "modeling_evil.EvilConfig", "AutoModel": "modeling_evil.EvilModel"}}))
    (llm / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    run_dir = tmp_path / "run"
    write_demo_export(run_dir, path=str(llm), trust_remote_code=True)

    assert generate.main([f"run_dir={run_dir}", "prompt=a red circle", f"out_dir={tmp_path / 'out'}"]) == 2
    err = capsys.readouterr().err
    assert "needs the remote code" in err and "llm.trust_remote_code=true" in err
    assert evaluate.main([f"run_dir={run_dir}", "sets=[text]"]) == 2
    assert "llm.trust_remote_code=true" in capsys.readouterr().err
    assert not marker.exists()


def test_a_saved_config_with_a_pipe_command_is_not_run_by_evaluation(tmp_path):
    marker = tmp_path / "pipe-ran"
    run_dir = tmp_path / "run"
    write_demo_export(run_dir)
    saved = OmegaConf.load(run_dir / "config.yaml")
    saved.data.val.urls = f"pipe:touch {marker} && cat /dev/null"
    OmegaConf.save(saved, run_dir / "config.yaml")

    assert evaluate.main([f"run_dir={run_dir}", "sets=[text]", "tensorboard=false"]) == 0
    metrics = json.loads((run_dir / "eval" / "metrics.json").read_text())
    assert "pipe: command" in metrics["skipped"]["text"] and "text=SHARD_URLS" in metrics["skipped"]["text"]
    assert not marker.exists()


def test_a_failing_sample_grid_is_logged_and_training_goes_on(tmp_path, caplog):
    """(Issue 10, a kill at any instant: a failure while drawing never kills a step.)"""
    from types import SimpleNamespace

    from callbacks.sample_images import SampleImages, SampleSettings

    class BrokenModule:
        training = True

        def eval(self):
            self.training = False

        def train(self, mode=True):
            self.training = mode

        def ema_weights(self):
            raise RuntimeError("Input type (float) and bias type (c10::BFloat16) should be the same")

    callback = SampleImages(SampleSettings(base_kind="sd15", prompts=("a red circle",), every_n_steps=2), tmp_path)
    trainer = SimpleNamespace(global_step=2, is_global_zero=True, strategy=None, logger=None)
    module = BrokenModule()
    callback.on_train_batch_end(trainer, module, None, None, 0)  # must not raise
    assert module.training  # put back in training mode
    assert "Sample grid at step 2 failed; training goes on" in caplog.text and "bias type" in caplog.text


def test_an_export_naming_models_not_on_this_machine_starts_no_download(tmp_path, capsys):
    """The LLM and base an export names load from this machine only (a folder or the Hugging Face
    cache); fetching them is the user's call on the command line."""
    run_dir = tmp_path / "run"
    write_demo_export(run_dir, path="some-org/an-llm-not-on-this-machine")
    assert generate.main([f"run_dir={run_dir}", "prompt=a red circle", f"out_dir={tmp_path / 'out'}"]) == 2
    err = capsys.readouterr().err
    assert "downloads are not started on an export's say-so" in err and "llm=some-org/an-llm-not-on-this-machine" in err

    meta_dir = tmp_path / "run2"
    write_demo_export(meta_dir)
    from linguadiff.models.adapter import QueryAdapter

    adapter, meta = QueryAdapter.from_file(meta_dir / "export" / "adapter.safetensors")
    meta["base_model"]["path"] = "/a/folder/of/another/machine"
    adapter.save(meta_dir / "export" / "adapter.safetensors", meta)
    assert evaluate.main([f"run_dir={meta_dir}", "sets=[text]"]) == 2
    assert "give base=NAME_OR_FOLDER" in capsys.readouterr().err
