"""generate.py end to end: a stage-1 export drawn through the demo pipeline and through
diffusers' own SD1.5 / SDXL pipelines (tiny stand-ins loaded with from_pretrained)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

import generate
import train
from linguadiff.models.prompt_encoder import PromptEncoder
from tests.test_stage1_training import assets, tiny_args  # noqa: F401  (module fixture)
from tests.tiny_models import make_tiny_sd_pipeline


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pipelines")
    return {kind: make_tiny_sd_pipeline(root / kind, kind=kind) for kind in ("sd15", "sdxl")}


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_generate_through_the_diffusers_pipeline(assets, pipelines, tmp_path, kind):  # noqa: F811
    run_dir = tmp_path / "run"
    args = tiny_args({**assets, kind: pipelines[kind]}, run_dir, kind=kind, **{"trainer.max_steps": 2, "trainer.val_check_interval": 2})
    assert train.main(args) == 0

    long_prompt = "a red circle on a white background, " * 20  # far past CLIP's 77 tokens
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("一个红色的圆形\nun carré bleu\n" + long_prompt + "\n", encoding="utf-8")
    out = tmp_path / "out"
    code = generate.main([f"run_dir={run_dir}", f"prompts_file={prompts}", "negative_prompt=blurry",
                          "num_images=2", "seed=3", "steps=2", "guidance=5.0", "scheduler=ddim", f"out_dir={out}"])
    assert code == 0
    index = json.loads((out / "index.json").read_text(encoding="utf-8"))
    assert len(index) == 6 and {e["seed"] for e in index} == {3, 4}
    assert index[0]["prompt"] == "一个红色的圆形"
    for entry in index:
        image = Image.open(out / entry["file"])
        assert image.size == (32, 32)  # tiny UNet sample 16 x VAE factor 2


def test_demo_export_draws_with_the_pixel_pipeline(assets, tmp_path):  # noqa: F811
    """The demo preset's path: the committed demo base, a freshly trained adapter."""
    run_dir = tmp_path / "run"
    assert train.main([f"run_dir={run_dir}", f"data.train.urls={assets['train']}", f"data.val.urls={assets['val']}",
                       "data.batch_size=8", "data.num_workers=0", "trainer.max_steps=2", "trainer.val_check_interval=2"]) == 0
    encoder, meta = PromptEncoder.from_export(run_dir / "export" / "adapter.safetensors")
    assert meta["base_model"]["kind"] == "demo" and meta["generate"]["guidance"] == 1.5
    assert not any(p.requires_grad for p in encoder.parameters()) and not encoder.training
    cond = encoder.encode(["赤い円", "", "a very long prompt " * 40])  # any language, empty, long: one shape
    assert cond["context"].shape == (3, 77, 64) and cond["pooled"] is None
    out = tmp_path / "out"
    assert generate.main([f"run_dir={run_dir}", "prompt=赤い円", "num_images=3", f"out_dir={out}"]) == 0
    files = sorted(out.glob("*.png"))
    assert len(files) == 3 and Image.open(files[0]).size == (16, 16)


def test_generate_explains_a_missing_export(tmp_path, capsys):
    assert generate.main([f"run_dir={tmp_path}", "prompt=x"]) == 2
    assert "no adapter.safetensors" in capsys.readouterr().err
