"""Measure trained runs: ``python evaluate.py run_dir=PATH [key=value ...]``.

    python evaluate.py run_dir=runs/demo1                              # the demo, offline, CPU
    python evaluate.py run_dir=[runs/demo2,runs/demo3]                 # compare: one table, rows = metrics
    python evaluate.py run_dir=[base,runs/demo1]                       # and the base with its own CLIP
    python evaluate.py run_dir=/scratch/run2 clip=/models/clip-vit-large-patch14 \\
        inception_weights=/models/weights-inception-2015-12-05-6726825d.pth \\
        aesthetic_head=/models/sac+logos+ava1-l14-linearMSE.pth binding_vqa=/models/blip-vqa-base \\
        reference=/data/coco/val2014 captions=/data/coco/annotations/captions_val2014.json fid_images=30000

Writes run_dir/eval/metrics.json, run_dir/eval/grid.png (rows: prompts, columns: languages)
and TensorBoard scalars eval/* in run_dir/tensorboard/eval, for each run, then prints one
table; with several runs also one figure (comparison.png beside the first run: per-language
bars of the main scores per run, and the grids side by side). Demo runs are scored with the
demo's own tiny CLIP (assets/demo_clip) unless clip= is given. Where real weights are missing
(no clip=, no inception_weights=) stand-ins keep the command running offline and metrics.json
says so under "stand_ins". See README "Evaluating".
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

from linguadiff.cli import parse_args
from linguadiff.config import ConfigError

OPTIONS = {
    "run_dir": None,  # a run folder, or several: [a,b] or a,b (comparison mode); `base`: the base with its own CLIP
    "base_dir": None,  # where run_dir=base writes its eval/ (default: base-NAME beside the first run, else runs/base-NAME)
    "sets": None,  # which prompt sets to run: [captions,multilingual,long,text,binding] (default: all)
    "languages": None,  # [en,zh,fr,de,es,ja] by default; must include en
    "multilingual": "auto",  # auto | demo | parallel | PATH.json (a list of {lang: prompt})
    "captions": "auto",  # auto (the reference's captions) | PATH (COCO captions json or one prompt per line)
    "long_prompts": "bundled",  # bundled | PATH (one prompt per line)
    "binding": "auto",  # auto (the demo's two-object scenes on the demo, else bundled) | demo | bundled | PATH.json
    "binding_vqa": None,  # a BlipForQuestionAnswering folder (e.g. Salesforce/blip-vqa-base); the demo reads its pixels
    "reference": "auto",  # auto (the demo's held-out images on the demo) | none | FOLDER | SHARD_URLS
    "reference_images": 0,  # at most this many reference images (0: all)
    "text": "auto",  # auto | none | SHARD_URLS of held-out parallel text (stage-1 measures)
    "text_pool": 0,  # retrieval pool size (0: the run's eval.retrieval_pool)
    "num_images": 4,  # images per prompt in the multilingual and long sets
    "fid_images": 400,  # captions drawn for FID / CLIP score (one image each); 30000 for COCO-30k
    "seed": 1000,
    "steps": None,  # default: the run's generate.steps
    "guidance": None,
    "scheduler": None,  # dpm++ | ddim | euler | ddpm
    "batch_size": 32,
    "clip": None,  # a CLIP folder (CLIPModel + CLIPProcessor, e.g. openai/clip-vit-large-patch14); demo runs: assets/demo_clip
    "fid_features": "auto",  # auto | inception | clip | pixels (stand-in)
    "inception_weights": None,  # torch-fidelity's weights-inception-2015-12-05-6726825d.pth
    "aesthetic_head": None,  # LAION aesthetic head state dict (.pth / .safetensors)
    "grid_prompts": 8,  # rows of the sample grid
    "figure": "auto",  # several runs: the comparison PNG (auto: comparison.png beside the first run) | none | PATH
    "tensorboard": True,
    "device": "auto",
    "dtype": "auto",  # auto: bfloat16 on GPUs, float32 on CPUs
    "base": None,  # override the base model path recorded in the export
    "llm": None,  # override the LLM path recorded in the export
    "llm.trust_remote_code": False,  # run the LLM repository's own code, if an export says it needs it
}


def run_dirs_of(value) -> list[Path | str]:
    """The run folders named by run_dir (one, a [a,b] list or a,b), each existing, and the word
    `base` (the base with its own CLIP) where it is given; a folder named base reads ./base."""
    from evaluation.runner import BASE_RUN, as_list

    items = as_list(value, "run_dir")
    if not items:
        raise ConfigError("option 'run_dir' is required (run_dir=PATH, or run_dir=[A,B] to compare runs)")
    if items.count(BASE_RUN) > 1:
        raise ConfigError(f"run_dir names '{BASE_RUN}' twice")
    runs: list[Path | str] = []
    for item in items:
        if item == BASE_RUN:
            runs.append(BASE_RUN)
            continue
        path = Path(item).expanduser()
        if not path.is_dir():
            raise ConfigError(f"run_dir {path} does not exist")
        runs.append(path)
    return runs


def write_figure(option: str, names: list[str], reports, settings) -> Path:
    """The comparison PNG (and its legend json) for several runs' reports; the grids are this
    evaluation's (the multilingual set draws them), never an older one left in eval/."""
    from PIL import Image

    from evaluation.figure import write_comparison
    from evaluation.report import GRID_FILE

    path = reports[0].run_dir.parent / "comparison.png" if option == "auto" else Path(option).expanduser()
    grids = []
    for report in reports:
        grid = report.eval_dir / GRID_FILE
        fresh = "multilingual" in settings.sets and grid.is_file()
        grids.append(Image.open(grid).convert("RGB") if fresh else None)
    return write_comparison(path, names, [r.run_dir for r in reports], [r.metrics for r in reports], grids,
                            settings.languages)


def main(argv: list[str] | None = None) -> int:
    from linguadiff.models.prompt_encoder import RemoteCodeRefused
    from train import setup_logging

    setup_logging()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        args = parse_args(sys.argv[1:] if argv is None else argv, OPTIONS)
        items = run_dirs_of(args["run_dir"])
        from evaluation.report import comparison_table, run_names
        from evaluation.runner import (BASE_RUN, EvalSettings, SharedTools, all_on_demo_base, evaluate_base, evaluate_run,
                                       resolve_base)
        from linguadiff.export import find_export
        from linguadiff.generation import resolve_device

        run_dirs = [item for item in items if item != BASE_RUN]
        for run_dir in run_dirs:
            find_export(run_dir)  # every run (LLM or CLIP control) must have finished before any is measured
        settings = EvalSettings.from_args(args, *resolve_device(args["device"], args["dtype"]))
        base = resolve_base(settings, run_dirs) if BASE_RUN in items else None
        if base is not None:
            default = (run_dirs[0].parent if run_dirs else Path("runs")) / f"base-{base.name}"
            base_dir = Path(args["base_dir"]).expanduser() if args["base_dir"] else default
        tools = SharedTools(settings, demo=all_on_demo_base(run_dirs, base))
        reports = [evaluate_base(base, base_dir, settings, tools) if item == BASE_RUN else evaluate_run(item, settings, tools)
                   for item in items]
    except (ConfigError, FileNotFoundError, RemoteCodeRefused) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    names = run_names(run_dirs)
    columns = [BASE_RUN if item == BASE_RUN else names.pop(0) for item in items]
    print(comparison_table(columns, [r.metrics for r in reports]))
    if len(reports) > 1 and str(args["figure"]) != "none":
        try:
            print(f"figure: {write_figure(args['figure'], columns, reports, settings)}")
        except OSError as err:  # the metrics are written already: a picture must not lose them
            print(f"warning: the comparison figure was not written: {err}", file=sys.stderr)
    for report in reports:
        for warning in report.stand_ins():
            print(f"note ({report.run_dir.name}): {warning}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
