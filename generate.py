"""Draw images with a trained run: ``python generate.py run_dir=PATH prompt="..." out_dir=DIR``.

    python generate.py run_dir=runs/stage1 prompt="一个红色的圆形" num_images=4 seed=0 out_dir=out
    python generate.py run_dir=runs/stage1 prompts_file=prompts.txt negative_prompt="blurry" \\
        steps=30 guidance=5 scheduler=dpm++ out_dir=out

Any language and any length: prompts go through the run's LLM + adapter (export/), the
negative prompt too. Writes one PNG per image and index.json (file -> prompt, seed).
Defaults for steps, guidance and scheduler come from the run's config.
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from linguadiff.cli import parse_args
from linguadiff.config import ConfigError

OPTIONS = {
    "run_dir": None,
    "prompt": None,
    "prompts_file": None,  # one prompt per line
    "negative_prompt": None,
    "num_images": 4,
    "seed": 0,
    "out_dir": "generated",
    "steps": None,
    "guidance": None,
    "scheduler": None,  # dpm++ | ddim | euler | ddpm
    "batch_size": 16,
    "height": None,  # pixels (null: the base's own square size); a multiple of the base's size step
    "width": None,
    "device": "auto",
    "dtype": "auto",  # auto: bfloat16 on GPUs, float32 on CPUs
    "base": None,  # override the base model path recorded in the export
    "llm": None,  # override the LLM path recorded in the export
    "llm.trust_remote_code": False,  # run the LLM repository's own code, if the export says it needs it
}


def slug(text: str, limit: int = 40) -> str:
    return re.sub(r"[^\w]+", "-", text, flags=re.UNICODE).strip("-")[:limit] or "prompt"


def read_prompts(args: dict) -> list[str]:
    prompts = [args["prompt"]] if args["prompt"] else []
    if args["prompts_file"]:
        path = Path(args["prompts_file"])
        if not path.is_file():
            raise ConfigError(f"prompts_file {path} does not exist")
        prompts += [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise ConfigError("give prompt=... or prompts_file=...")
    return prompts


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(sys.argv[1:] if argv is None else argv, OPTIONS, required=("run_dir",))
        prompts = read_prompts(args)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    from linguadiff.generation import Generator, resolve_device
    from linguadiff.models.prompt_encoder import RemoteCodeRefused

    device, dtype = resolve_device(args["device"], args["dtype"])
    try:
        generator = Generator.from_run(args["run_dir"], device=device, dtype=dtype, base_path=args["base"], llm_path=args["llm"],
                                       trust_remote_code=args["llm.trust_remote_code"])
    except (FileNotFoundError, RemoteCodeRefused) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        generator.check_size(args["height"], args["width"])
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    results = generator(
        prompts,
        negative_prompt=args["negative_prompt"],
        num_images=args["num_images"],
        seed=args["seed"],
        steps=args["steps"],
        guidance=args["guidance"],
        scheduler=args["scheduler"],
        batch_size=args["batch_size"],
        height=args["height"],
        width=args["width"],
    )
    out = Path(args["out_dir"])
    out.mkdir(parents=True, exist_ok=True)
    index = []
    for i, j, image in results:
        name = f"{i:03d}-{slug(prompts[i])}-seed{args['seed'] + j}.png"
        image.save(out / name)
        index.append({"file": name, "prompt": prompts[i], "seed": args["seed"] + j})
    (out / "index.json").write_text(json.dumps(index, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {len(results)} images for {len(prompts)} prompt(s) to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
