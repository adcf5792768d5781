"""The demo's measures: does a prompt in any language draw its colour, and how nicely?

Every colour x shape, in the plain phrasings a user would type per language
(`datamodules.demo_data.PLAIN_PROMPTS`), `per_prompt` seeds each; an image counts as right
when its dominant saturated colour is the prompt's. Shape accuracy is reported beside it,
and the demo's aesthetic measure (0-10: large, centred shapes on a clean background, read
back from the pixels), which stage 3 should raise.

`heldout`: the same colours and shapes asked for in phrasings that no demo caption uses
("I would like to see a red circle", "我想要一个红色的圆形"; evaluation/prompts/demo_heldout.json),
`heldout_per_prompt` seeds each: does the text side read wording it never saw?

    python -m evaluation.demo_eval run_dir=runs/stage1            # LLM + adapter, every language
    python -m evaluation.demo_eval base_only=true                    # the base with its own CLIP, every language
"""
from __future__ import annotations

import json
import sys
from functools import cache
from pathlib import Path

from PIL import Image

from datamodules import demo_data
from evaluation.demo_readback import aesthetic_measure, classify_shape, dominant_colour
from linguadiff.cli import parse_args
from linguadiff.config import PROJECT_ROOT, ConfigError


HELDOUT_FILE = Path(__file__).resolve().parent / "prompts" / "demo_heldout.json"


@cache
def heldout_templates() -> dict[str, list[str]]:
    """Per language, the held-out request templates (checked: every demo language, strings)."""
    templates = json.loads(HELDOUT_FILE.read_text(encoding="utf-8"))["templates"]
    for lang in demo_data.LANGUAGES:
        if not templates.get(lang) or not all(isinstance(t, str) and "{colour" in t and "{shape}" in t for t in templates[lang]):
            raise ValueError(f"{HELDOUT_FILE}: 'templates.{lang}' must list strings naming {{colour...}} and {{shape}}")
    return templates


def heldout_prompts(lang: str) -> list[tuple[str, str, str]]:
    """(prompt, colour, shape): every colour x shape in every held-out phrasing of `lang`."""
    return demo_data.phrased_prompts(lang, heldout_templates()[lang])


def colour_accuracy(generator, languages=demo_data.LANGUAGES, per_prompt: int = 4, seed: int = 1000,
                    heldout_per_prompt: int = 0, **draw) -> dict:
    """{lang: {"colour": acc, "shape": acc, "aesthetic": mean, "images": n}} on the plain prompts
    (seeds differ from generate.py's default 0); with `heldout_per_prompt` images per held-out
    prompt, also "heldout_colour" / "heldout_shape" / "heldout_images"."""
    results = {}
    for lang in languages:
        prompts = demo_data.plain_prompts(lang)
        drawn = generator([p for p, _, _ in prompts], num_images=per_prompt, seed=seed, **draw)
        results[lang] = score_demo_images([(colour, shape) for _, colour, shape in prompts], drawn)
        if heldout_per_prompt:
            prompts = heldout_prompts(lang)
            drawn = generator([p for p, _, _ in prompts], num_images=heldout_per_prompt, seed=seed, **draw)
            scores = score_demo_images([(colour, shape) for _, colour, shape in prompts], drawn)
            results[lang].update({f"heldout_{key}": scores[key] for key in ("colour", "shape", "images")})
    return results


def score_demo_images(labels: list[tuple[str, str]], drawn: list[tuple[int, int, Image.Image]]) -> dict:
    """Read the drawn (prompt index, image index, image) back against each prompt's (colour, shape):
    colour and shape accuracy and the mean aesthetic measure (evaluate.py scores its images here too)."""
    colour = sum(dominant_colour(im) == labels[i][0] for i, _, im in drawn)
    shape = sum(classify_shape(im) == labels[i][1] for i, _, im in drawn)
    aesthetic = sum(aesthetic_measure(im) for _, _, im in drawn) / len(drawn)
    return {"colour": colour / len(drawn), "shape": shape / len(drawn), "aesthetic": round(aesthetic, 3), "images": len(drawn)}


def format_table(results: dict, title: str) -> str:
    heldout = any("heldout_colour" in r for r in results.values())
    lines = [title, f"{'lang':<6}{'colour':>8}{'shape':>8}{'aesthetic':>10}{'images':>8}"
             + (f"{'held-out colour':>17}{'shape':>8}{'images':>8}" if heldout else "")]
    for lang, r in results.items():
        line = f"{lang:<6}{r['colour']:>8.1%}{r['shape']:>8.1%}{r['aesthetic']:>10.2f}{r['images']:>8}"
        if "heldout_colour" in r:
            line += f"{r['heldout_colour']:>17.1%}{r['heldout_shape']:>8.1%}{r['heldout_images']:>8}"
        lines.append(line)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    options = {"run_dir": None, "base_only": False, "base": str(PROJECT_ROOT / "assets" / "demo_base"),
               "per_prompt": 4, "heldout_per_prompt": 1, "seed": 1000, "steps": None, "guidance": None,
               "scheduler": None}
    try:
        args = parse_args(sys.argv[1:] if argv is None else argv, options)
        if not args["base_only"] and not args["run_dir"]:
            raise ConfigError("give run_dir=... (a stage-1/2/3 run) or base_only=true")
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from linguadiff.generation import Generator

    draw = {k: args[k] for k in ("steps", "guidance", "scheduler")}
    draw["heldout_per_prompt"] = args["heldout_per_prompt"]
    if args["base_only"]:
        generator = Generator.from_base(args["base"], "demo", scheduler="ddim", steps=20, guidance=1.5)
        results = colour_accuracy(generator, per_prompt=args["per_prompt"], seed=args["seed"], **draw)
        title, out = f"base {args['base']} with its own CLIP text encoder", None
    else:
        generator = Generator.from_run(args["run_dir"])
        results = colour_accuracy(generator, per_prompt=args["per_prompt"], seed=args["seed"], **draw)
        title, out = f"{args['run_dir']} (LLM + adapter)", Path(args["run_dir"]) / "eval" / "colour_accuracy.json"
    print(format_table(results, title))
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=1) + "\n")
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
