"""GPU check of drawing in the real presets' dtypes (issue 14): an SDXL-shaped stage 2 with the
sample callback on at every step, then generate.py from its export.

The presets load the VAE in bf16 (`model.dtype`) beside the trained fp32 UNet, and the sample
callback draws outside autocast; this ran into "Input type (float) and bias type
(c10::BFloat16) should be the same" at the first grid of every real run. Tiny random SDXL- and
SD1.5-shaped pipelines and a tiny Qwen2-shaped LLM (tests/tiny_models.py) keep it to about a
minute; what is checked is the dtype path on the GPU (bf16-mixed training, bf16 VAE, fp16 VAE
with force_upcast at generation), not speed.

    python benchmarks/check_sample_dtypes.py --out runs/gpu_check/sample_dtypes
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/gpu_check/sample_dtypes"))
    parser.add_argument("--kinds", nargs="+", default=["sdxl", "sd15"])
    args = parser.parse_args(argv)

    import torch

    import generate
    import train
    from tests.shard_helpers import write_demo_world
    from tests.tiny_models import make_tiny_llm, make_tiny_sd_pipeline

    out = args.out
    world = write_demo_world(out / "data", text_train=64, image_train=64)
    llm = make_tiny_llm(out / "llm", kind="qwen2")
    print(f"device: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu (no GPU: this checks nothing new)'}")
    failed = 0
    for kind in args.kinds:
        base = make_tiny_sd_pipeline(out / f"base_{kind}", kind=kind)
        dims = {"sd15": ["adapter.dim=32", "adapter.num_queries=77", "adapter.pooled_dim=null"],
                "sdxl": ["adapter.dim=80", "adapter.num_queries=227", "adapter.pooled_dim=40"]}[kind]
        common = [f"model.path={base}", f"model.kind={kind}", f"model.name=tiny-{kind}", "model.dtype=bfloat16",
                  f"llm.path={llm}", "llm.name=tiny-qwen2", "llm.max_length=64", *dims,
                  "adapter.encoder_layers=1", "adapter.decoder_layers=1", "adapter.heads=2", "adapter.ffn_dim=64",
                  "data.batch_size=8", "data.val_batch_size=8", "data.num_workers=1", "data.shuffle_buffer=16",
                  "optim.warmup_steps=1", "trainer.log_every_n_steps=1", "checkpoint.every_n_steps=2"]
        stage1, stage2 = out / f"{kind}_stage1", out / f"{kind}_stage2"
        start = time.perf_counter()
        code = train.main([*common, f"data.train.urls={world['train']}", f"data.val.urls={world['val']}",
                           "trainer.max_steps=2", "trainer.val_check_interval=2", f"run_dir={stage1}"])
        if code == 0:
            code = train.main([*common, "stage=2", f"init_from={stage1}", f"data.train.urls={world['image_train']}",
                               f"data.val.urls={world['image_val']}", "model.resolution=32", "trainer.max_steps=2",
                               "trainer.val_check_interval=2", "samples.every_n_steps=1", "samples.num_images=1",
                               "samples.prompts=[a red circle,一个蓝色的正方形]", "generate.steps=2",
                               "diffusion.val_timesteps=[500]", f"run_dir={stage2}"])
        grids = sorted(p.name for p in (stage2 / "samples").glob("*.png")) if code == 0 else []
        ok = code == 0 and len(grids) == 2
        for dtype in ("bfloat16", "float16", "float32"):
            if ok:
                ok = generate.main([f"run_dir={stage2}", "prompt=a red circle", "num_images=1", "steps=2",
                                    f"dtype={dtype}", f"out_dir={out / f'{kind}_generated_{dtype}'}"]) == 0
        print(f"{kind}: stage 2 in bf16 with a grid every step ({grids}), generate.py in bf16/fp16/fp32: "
              f"{'ok' if ok else 'FAILED'} ({time.perf_counter() - start:.0f} s)")
        failed |= not ok
    return int(failed)


if __name__ == "__main__":
    sys.exit(main())
