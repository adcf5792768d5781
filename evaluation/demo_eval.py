"""The demo's measures: does a prompt in any language draw its colour, and how nicely?

Every colour x shape, in the plain phrasings a user would type per language
(`datamodules.demo_data.PLAIN_PROMPTS`), `per_prompt` seeds each; an image counts as right
when its dominant saturated colour is the prompt's. Shape accuracy is reported beside it,
and the demo's aesthetic measure (0-10: large, centred shapes on a clean background, read
back from the pixels), which stage 3 should raise.

    python -m evaluation.demo_eval run_dir=runs/stage1            # LLM + adapter, every language
    python -m evaluation.demo_eval run_dir=runs/control2          # a CLIP control run (text_encoder=clip)
    python -m evaluation.demo_eval base_only=true                    # the base with its own CLIP, every language
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from PIL import Image

from datamodules import demo_data
from evaluation.demo_readback import aesthetic_measure, classify_shape, dominant_colour
from linguadiff.cli import parse_args
from linguadiff.config import PROJECT_ROOT, ConfigError


def colour_accuracy(generator, languages=demo_data.LANGUAGES, per_prompt: int = 4, seed: int = 1000, **draw) -> dict:
    """{lang: {"colour": acc, "shape": acc, "aesthetic": mean, "images": n}} (seeds differ from generate.py's default 0)."""
    results = {}
    for lang in languages:
        prompts = demo_data.plain_prompts(lang)
        drawn = generator([p for p, _, _ in prompts], num_images=per_prompt, seed=seed, **draw)
        results[lang] = score_demo_images([(colour, shape) for _, colour, shape in prompts], drawn)
    return results


def score_demo_images(labels: list[tuple[str, str]], drawn: list[tuple[int, int, Image.Image]]) -> dict:
    """Read the drawn (prompt index, image index, image) back against each prompt's (colour, shape):
    colour and shape accuracy and the mean aesthetic measure (evaluate.py scores its images here too)."""
    colour = sum(dominant_colour(im) == labels[i][0] for i, _, im in drawn)
    shape = sum(classify_shape(im) == labels[i][1] for i, _, im in drawn)
    aesthetic = sum(aesthetic_measure(im) for _, _, im in drawn) / len(drawn)
    return {"colour": colour / len(drawn), "shape": shape / len(drawn), "aesthetic": round(aesthetic, 3), "images": len(drawn)}


def format_table(results: dict, title: str) -> str:
    lines = [title, f"{'lang':<6}{'colour':>8}{'shape':>8}{'aesthetic':>10}{'images':>8}"]
    for lang, r in results.items():
        lines.append(f"{lang:<6}{r['colour']:>8.1%}{r['shape']:>8.1%}{r['aesthetic']:>10.2f}{r['images']:>8}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    options = {"run_dir": None, "base_only": False, "base": str(PROJECT_ROOT / "assets" / "demo_base"),
               "per_prompt": 4, "seed": 1000, "steps": None, "guidance": None, "scheduler": None}
    try:
        args = parse_args(sys.argv[1:] if argv is None else argv, options)
        if not args["base_only"] and not args["run_dir"]:
            raise ConfigError("give run_dir=... (a stage-1/2/3 run) or base_only=true")
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from linguadiff.generation import Generator

    draw = {k: args[k] for k in ("steps", "guidance", "scheduler")}
    if args["base_only"]:
        generator = Generator.from_base(args["base"], "demo", scheduler="ddim", steps=20, guidance=1.5)
        results = colour_accuracy(generator, per_prompt=args["per_prompt"], seed=args["seed"], **draw)
        title, out = f"base {args['base']} with its own CLIP text encoder", None
    else:
        generator = Generator.from_run(args["run_dir"])
        results = colour_accuracy(generator, per_prompt=args["per_prompt"], seed=args["seed"], **draw)
        what = "the base's own CLIP, a control run" if generator.metadata.get("text_encoder") == "clip" else "LLM + adapter"
        title, out = f"{args['run_dir']} ({what})", Path(args["run_dir"]) / "eval" / "colour_accuracy.json"
    print(format_table(results, title))
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=1) + "\n")
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
