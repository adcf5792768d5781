"""The CLIP control run (text_encoder=clip): the base's own frozen CLIP, only the UNet trains,
and its export is a plain diffusers UNet that every export reader takes (issue 13)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel

import evaluate
import generate
import train
from linguadiff.config import load_config, resolve
from linguadiff.export import METADATA_FILE, find_export, read_export_metadata
from linguadiff.generation import Generator, find_adapter
from linguadiff.settings_check import settings_problems
from tests.shard_helpers import write_demo_world
from tests.test_stage23_training import Watch, stage_args
from tests.tiny_models import make_tiny_llm, make_tiny_sd_pipeline

PROMPT = "a red circle"


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("control")
    return {
        **write_demo_world(root, text_train=16, image_train=64),
        "llm": make_tiny_llm(root / "llm", kind="llama"),
        "sd15": make_tiny_sd_pipeline(root / "sd15", kind="sd15"),
        "sdxl": make_tiny_sd_pipeline(root / "sdxl", kind="sdxl"),
    }


def control_args(world, run_dir: Path, stage: int = 2, kind: str = "sd15", **extra) -> list[str]:
    """A short control run; a constant, high learning rate so 4 steps move the tiny UNet."""
    settings = {"text_encoder": "clip", "samples.every_n_steps": 0, "optim.lr": 1e-2, "optim.schedule": "constant",
                "optim.warmup_steps": 0, **extra}
    return stage_args(world, run_dir, stage, kind=kind, **settings)


@pytest.fixture(scope="module")
def sd15_control(world, tmp_path_factory) -> tuple[Path, Watch]:
    watch = Watch()
    run_dir = tmp_path_factory.mktemp("runs") / "control2"
    assert train.main(control_args(world, run_dir, **{"samples.every_n_steps": 4}), extra_callbacks=(watch,)) == 0
    return run_dir, watch


def _unet_state(folder: Path) -> dict[str, torch.Tensor]:
    return UNet2DConditionModel.from_pretrained(folder).state_dict()


def test_control_stage2_trains_only_the_unet(world, sd15_control):
    run_dir, watch = sd15_control
    # Only the UNet trains, all of it, and it is all the optimizer holds.
    unet = {k for k in watch.start if k.startswith("unet.")}
    assert watch.trainable == watch.in_optimizer == unet
    assert {k.split(".")[0] for k in watch.start} == {"text_encoder", "unet", "vae"}  # no adapter, no LLM
    # The base's CLIP is bit-identical after training, and is the base's own.
    from transformers import CLIPTextModel

    own = CLIPTextModel.from_pretrained(world["sd15"] / "text_encoder").state_dict()
    for name, value in own.items():
        key = f"text_encoder.text_encoder.{name}"
        assert torch.equal(watch.start[key], value) and torch.equal(watch.end[key], value), key
    assert any(not torch.equal(watch.start[k], watch.end[k]) for k in unet)
    # The checkpoint holds the UNet only; the export is the EMA UNet, no adapter.
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["state_dict"] and all(k.startswith("unet.") for k in ckpt["state_dict"])
    export = run_dir / "export"
    assert not (export / "adapter.safetensors").exists()
    base, trained = _unet_state(world["sd15"] / "unet"), _unet_state(export / "unet")
    assert any(not torch.equal(base[k], trained[k]) for k in base)
    meta = read_export_metadata(find_export(run_dir))
    assert (meta["text_encoder"], meta["llm"], meta["stage"], meta["global_step"]) == ("clip", None, 2, 4)
    assert meta["base_model"]["path"] == str(world["sd15"]) and meta["training"]["trainable"] == ["unet"]
    assert "control" in (export / "README.md").read_text() and str(world["sd15"]) in (export / "README.md").read_text()
    assert (run_dir / "samples" / "step00000004.png").is_file()
    with pytest.raises(FileNotFoundError, match="control run"):
        find_adapter(run_dir)


def _plain_pipeline(kind: str, base: Path, unet_dir: Path):
    """The export as a stranger loads it: diffusers alone, the base's own text encoder(s)."""
    unet = UNet2DConditionModel.from_pretrained(unet_dir)
    if kind == "sd15":
        return StableDiffusionPipeline.from_pretrained(base, unet=unet, safety_checker=None, requires_safety_checker=False)
    return StableDiffusionXLPipeline.from_pretrained(base, unet=unet)


def check_matches_diffusers(kind: str, base: Path, run_dir: Path | None) -> None:
    """Generator.from_run (run_dir None: Generator.from_base, the base's own UNet) and the plain
    diffusers pipeline: the same conditioning and the same latents from the same seed (to
    ~1e-5), and the same image."""
    generator = Generator.from_run(run_dir) if run_dir is not None else Generator.from_base(str(base), kind)
    plain = _plain_pipeline(kind, base, run_dir / "export" / "unet" if run_dir is not None else base / "unet")
    plain.set_progress_bar_config(disable=True)
    ours = generator.encoder.encode([PROMPT])
    if kind == "sd15":
        theirs, negative = plain.encode_prompt(PROMPT, "cpu", 1, True, "")
    else:
        theirs, negative, pooled, negative_pooled = plain.encode_prompt(PROMPT, device="cpu", negative_prompt="")
        assert torch.allclose(ours["pooled"], pooled, atol=1e-6)
        assert torch.allclose(generator.encoder.encode([""])["pooled"], negative_pooled, atol=1e-6)
    assert ours["context"].shape == theirs.shape and torch.allclose(ours["context"], theirs, atol=1e-6)
    assert torch.allclose(generator.encoder.encode([""])["context"], negative, atol=1e-6)

    (_, _, image), = generator([PROMPT], num_images=1, seed=7, steps=3, guidance=5.0, scheduler="ddim")
    plain.scheduler = type(generator.pipeline.scheduler).from_config(generator.pipeline.scheduler.config)
    cond, uncond = generator.encoder.encode([PROMPT]), generator.encoder.encode([""])
    kwargs = dict(prompt_embeds=cond["context"], negative_prompt_embeds=uncond["context"])
    if kind == "sdxl":
        kwargs.update(pooled_prompt_embeds=cond["pooled"], negative_pooled_prompt_embeds=uncond["pooled"])
    ours_latents = generator.pipeline(**kwargs, num_inference_steps=3, guidance_scale=5.0, output_type="latent",
                                      generator=torch.Generator().manual_seed(7)).images
    theirs_out = plain(PROMPT, negative_prompt="", num_inference_steps=3, guidance_scale=5.0, output_type="latent",
                       generator=torch.Generator().manual_seed(7)).images
    assert torch.allclose(ours_latents, theirs_out, atol=1e-5)
    theirs_image = plain(PROMPT, negative_prompt="", num_inference_steps=3, guidance_scale=5.0,
                         generator=torch.Generator().manual_seed(7)).images[0]
    difference = (torch.tensor(list(image.getdata())) - torch.tensor(list(theirs_image.getdata()))).abs().max()
    assert difference <= 1  # uint8 rounding at most


def test_control_export_generates_through_plain_diffusers(world, sd15_control, tmp_path):
    run_dir, _ = sd15_control
    check_matches_diffusers("sd15", world["sd15"], run_dir)
    # generate.py and evaluate.py take it like any run; its text set is skipped like the base's.
    out = tmp_path / "out"
    assert generate.main([f"run_dir={run_dir}", f"prompt={PROMPT}", "num_images=1", "steps=2", f"out_dir={out}"]) == 0
    assert len(list(out.glob("*.png"))) == 1
    assert evaluate.main([f"run_dir={run_dir}", "sets=[multilingual,text]", "languages=[en,zh]", "multilingual=parallel",
                          "reference=none", "num_images=1", "steps=2", "grid_prompts=2", "tensorboard=false"]) == 0
    metrics = json.loads((run_dir / "eval" / "metrics.json").read_text())
    assert metrics["text_encoder"] == "clip" and metrics["llm"] is None
    assert "text" in metrics["skipped"] and "multilingual/clip_score/zh" in metrics["metrics"]


def test_control_sdxl_uses_both_encoders_pooled_and_time_ids_and_matches_diffusers(world, tmp_path):
    run_dir = tmp_path / "control-sdxl"
    assert train.main(control_args(world, run_dir, kind="sdxl", **{"trainer.max_steps": 2, "trainer.limit_val_batches": 0})) == 0
    base, trained = _unet_state(world["sdxl"] / "unet"), _unet_state(run_dir / "export" / "unet")
    assert any(not torch.equal(base[k], trained[k]) for k in base)
    check_matches_diffusers("sdxl", world["sdxl"], run_dir)


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_the_base_row_draws_as_the_bases_own_diffusers_pipeline(world, kind):
    """evaluate.py's `base` row (Generator.from_base): the base exactly as diffusers draws it,
    SDXL's prompt in the pipeline's one window of 77 tokens (not stage 1's three)."""
    check_matches_diffusers(kind, world[kind], None)


def test_control_stage3_continues_with_clip_and_resume_may_not_switch(world, sd15_control, tmp_path, capsys):
    stage2, _ = sd15_control
    stage3 = tmp_path / "control3"
    # No text_encoder on the command line: stage 3 takes the export's (clip).
    args = stage_args(world, stage3, 3, init_from=stage2, **{"samples.every_n_steps": 0, "trainer.max_steps": 2,
                                                             "data.min_aesthetic": 5.0, "optim.lr": 1e-2})
    assert train.main(args) == 0
    meta = read_export_metadata(find_export(stage3))
    assert (meta["text_encoder"], meta["stage"]) == ("clip", 3)
    u2, u3 = _unet_state(stage2 / "export" / "unet"), _unet_state(stage3 / "export" / "unet")
    assert any(not torch.equal(u2[k], u3[k]) for k in u2)
    # An LLM stage 3 cannot start from a control's export.
    assert train.main(args + ["text_encoder=llm", f"run_dir={tmp_path / 'other'}"]) == 2
    assert "text_encoder=clip" in capsys.readouterr().err
    # A resume may not switch the text encoder: the control's run_dir relaunched as an LLM run.
    assert train.main(args + ["text_encoder=llm", "trainer.max_steps=3"]) == 2
    err = capsys.readouterr().err
    assert "text_encoder=clip" in err and "a resume may not change it" in err


def test_control_lora_trains_only_the_lora_and_generate_draws_with_it(world, tmp_path):
    from linguadiff.models.lora import LORA_DIR, LORA_WEIGHTS, is_lora_name

    watch = Watch()
    run_dir = tmp_path / "control-lora"
    settings = {"train.unet": "lora", "lora.rank": 4, "lora.alpha": 8.0, "lora.lr": 1e-2, "trainer.max_steps": 2,
                "trainer.limit_val_batches": 0}
    assert train.main(control_args(world, run_dir, **settings), extra_callbacks=(watch,)) == 0
    assert watch.trainable and watch.trainable == watch.in_optimizer
    assert all(k.startswith("unet.") and is_lora_name(k) for k in watch.trainable)
    assert any(not torch.equal(watch.start[k], watch.end[k]) for k in watch.trainable)
    export = run_dir / "export"
    assert (export / LORA_DIR / LORA_WEIGHTS).is_file()
    assert not (export / "unet").exists() and not (export / "adapter.safetensors").exists()
    assert read_export_metadata(export)["lora"]["rank"] == 4
    out = tmp_path / "out"
    assert generate.main([f"run_dir={run_dir}", f"prompt={PROMPT}", "num_images=1", "steps=2", f"out_dir={out}"]) == 0
    assert len(list(out.glob("*.png"))) == 1


def data_urls(tmp_path: Path) -> list[str]:
    """Shard paths that exist (never read here), so the demo's data is not made."""
    (tmp_path / "shard.tar").write_bytes(b"")
    return [f"data.train.urls={tmp_path / 'shard.tar'}", f"data.val.urls={tmp_path / 'shard.tar'}"]


@pytest.mark.parametrize(
    ("argv", "key", "says"),
    [
        (["stage=1", "text_encoder=clip"], "text_encoder", "only stages 2 and 3"),
        (["stage=2", "text_encoder=clip", "init_from=runs/stage1"], "init_from", "starts from the base"),
        (["stage=2", "text_encoder=clip", "train.trainable=[adapter,unet]"], "train.trainable", "must be [unet]"),
        (["stage=2", "text_encoder=clip", "strategy=fsdp"], "text_encoder", "strategy=ddp"),
        (["stage=2", "text_encoder=bert"], "text_encoder", "llm | clip"),
    ],
)
def test_control_settings_errors_name_the_key(tmp_path, argv, key, says):
    problems = settings_problems(resolve(load_config(argv + data_urls(tmp_path))))
    assert any(f"'{key}'" in p and says in p for p in problems), problems


def test_control_settings(tmp_path):
    # stage 2 with clip: no init_from needed, the adapter leaves the trainable set.
    cfg = resolve(load_config(["stage=2", "text_encoder=clip", *data_urls(tmp_path)]))
    assert list(cfg.train.trainable) == ["unet"] and settings_problems(cfg) == []
    # Caching LLM states is refused for a control's config (training=False: scripts/cache_features.py).
    cached = resolve(load_config(["stage=2", "text_encoder=clip", "cache.llm_states=true", *data_urls(tmp_path)]))
    assert any("'cache.llm_states'" in p for p in settings_problems(cached, training=False))
    # A control export's metadata file is read with bounds: not JSON, too deep, not a control's.
    export = tmp_path / "export"
    export.mkdir()
    for text in ("{", "[" * 100_000 + "]" * 100_000, json.dumps({"stage": 2, "text_encoder": "llm"})):
        (export / METADATA_FILE).write_text(text)
        with pytest.raises(ValueError, match=METADATA_FILE):
            read_export_metadata(find_export(tmp_path))
