"""generate.py end to end: a stage-1 export drawn through the demo pipeline and through
diffusers' own SD1.5 / SDXL pipelines (tiny stand-ins loaded with from_pretrained)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import generate
import train
from linguadiff.generation import Generator, load_pipeline
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
    wide = tmp_path / "wide"  # another aspect ratio (a demo bucket), and a size the UNet cannot take
    assert generate.main([f"run_dir={run_dir}", "prompt=赤い円", "num_images=1", "height=12", "width=20",
                          f"out_dir={wide}"]) == 0
    assert Image.open(next(wide.glob("*.png"))).size == (20, 12)
    assert generate.main([f"run_dir={run_dir}", "prompt=x", "width=15", f"out_dir={wide}"]) == 2


def test_generate_explains_a_missing_export(tmp_path, capsys):
    assert generate.main([f"run_dir={tmp_path}", "prompt=x"]) == 2
    assert "no adapter.safetensors" in capsys.readouterr().err


class _RandomConditioning:
    """Stands in for LLM + adapter: fp32 conditioning of the shapes the UNet reads."""

    def __init__(self, unet) -> None:
        self.width = unet.config.cross_attention_dim
        self.pooled = (unet.config.projection_class_embeddings_input_dim or 0) - 6 * (unet.config.addition_time_embed_dim or 0)

    def encode(self, prompts: list[str]) -> dict:
        g = torch.Generator().manual_seed(len(prompts))
        return {"context": torch.randn(len(prompts), 7, self.width, generator=g),
                "pooled": torch.randn(len(prompts), self.pooled, generator=g) if self.pooled > 0 else None}


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
@pytest.mark.parametrize("unet_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("vae_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_drawing_is_dtype_safe(pipelines, kind, unet_dtype, vae_dtype):
    """Every UNet / VAE dtype pair the code can produce draws (issue 14: a trained fp32 UNet
    beside the presets' bf16 VAE crashed the first sample grid of every real run)."""
    pipeline = load_pipeline(kind, str(pipelines[kind]), None, torch.float32, None)
    pipeline.set_progress_bar_config(disable=True)
    pipeline.unet.to(unet_dtype)
    pipeline.vae.to(vae_dtype)
    generator = Generator(encoder=_RandomConditioning(pipeline.unet), pipeline=pipeline, kind=kind, metadata={},
                          defaults={"steps": 2, "scheduler": "ddim", "guidance": 3.0})
    drawn = generator(["a", "b"], negative_prompt="", num_images=1)
    assert [im.size for _, _, im in drawn] == [(32, 32)] * 2
    assert pipeline.vae.dtype == vae_dtype  # an upcast for decoding is undone
    assert np.asarray(drawn[0][2]).std() > 0


def test_qwen2_without_tokenizer_bos_uses_the_configs_for_the_empty_prompt_in_stage1_and_generation(assets, pipelines, tmp_path):  # noqa: F811
    """The tiny Qwen2 LLM's tokenizer has no BOS, its config names <|endoftext|> (as Qwen2.5's):
    that token goes first, the export records it, and the empty prompt the LLM reads is exactly
    [BOS] both where stage 1 aligns it and where generation feeds it as the negative prompt."""
    from linguadiff.config import load_config, resolve
    from linguadiff.models.adapter import read_adapter_metadata
    from linguadiff.models.text_encoder import LLMTextEncoder
    from lightning_modules.stage1_alignment import Stage1Alignment

    run_dir = tmp_path / "run"
    args = tiny_args({**assets, "sd15": pipelines["sd15"]}, run_dir, **{"trainer.max_steps": 1, "trainer.val_check_interval": 1})
    assert train.main(args) == 0
    meta = read_adapter_metadata(run_dir / "export" / "adapter.safetensors")
    module = Stage1Alignment.from_config(resolve(load_config(args)))
    bos = module.text_encoder.tokenizer.tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert meta["llm"]["bos"] == "auto" and meta["llm"]["bos_token_id"] == bos

    def record(into):
        return lambda _module, _args, kwargs: into.append(kwargs["input_ids"].tolist())

    seen_in_stage1: list = []
    module.text_encoder.model.register_forward_pre_hook(record(seen_in_stage1), with_kwargs=True)
    module.empty_prompt()
    assert seen_in_stage1 == [[[bos]]]

    generator = Generator.from_run(run_dir)
    seen_in_generation: list = []
    generator.encoder.text_encoder.model.register_forward_pre_hook(record(seen_in_generation), with_kwargs=True)
    generator(["a red circle"], negative_prompt="", steps=1)
    assert seen_in_generation[0] == [[bos]]  # the negative prompt, encoded first
    assert seen_in_generation[1][0][0] == bos

    # An export written before `bos` replaced `add_bos` still loads, with the same BOS.
    legacy = {k: v for k, v in meta["llm"].items() if k not in ("bos", "bos_token_id")} | {"add_bos": True}
    assert LLMTextEncoder.from_settings(legacy).tokenizer.bos_id == bos


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_sample_grids_at_several_aspect_ratios(pipelines, tmp_path, kind):
    """`samples.sizes`: a grid per (h, w), the first under the plain name; the SDXL pipeline
    gets the size as its micro-conditioning's target."""
    from contextlib import nullcontext
    from types import SimpleNamespace

    from callbacks.sample_images import SampleImages, SampleSettings

    pipeline = load_pipeline(kind, str(pipelines[kind]), None, torch.float32, None)
    generator = Generator(encoder=_RandomConditioning(pipeline.unet), pipeline=pipeline, kind=kind, metadata={},
                          defaults={})
    with pytest.raises(ValueError, match="width must be a positive multiple of 4"):
        generator(["a"], width=30)
    module = SimpleNamespace(training=True, prompt_encoder=_RandomConditioning(pipeline.unet), unet=pipeline.unet,
                             vae=pipeline.vae, noise_scheduler=pipeline.scheduler, ema_weights=nullcontext,
                             eval=lambda: None, train=lambda mode=True: None)
    settings = SampleSettings(base_kind=kind, prompts=("a", "b"), every_n_steps=2, num_images=1, steps=2,
                              scheduler="ddim", sizes=((32, 32), (24, 40)))
    trainer = SimpleNamespace(global_step=2, is_global_zero=True, strategy=None, logger=None)
    path = SampleImages(settings, tmp_path).draw(trainer, module)
    assert path == tmp_path / "step00000002.png"
    square, wide = Image.open(path), Image.open(tmp_path / "step00000002_24x40.png")
    margin = square.width - 64  # row labels; 32 px tiles are shown at 64
    assert square.height == 2 * 64 and wide.height == 2 * 48 and wide.width - margin == 80
    assert json.loads(path.with_suffix(".json").read_text())["sizes"] == [[32, 32], [24, 40]]
