"""Train one LinguaDiff stage: ``python train.py stage=1 [key=value ...]``.

    python train.py stage=1                                   # the offline CPU demo
    python train.py stage=2 init_from=runs/stage1 run_dir=runs/stage2
    python train.py stage=1 model=sdxl llm=qwen2.5-7b trainer.max_steps=1000 \\
        data.train.urls='/data/text/{00000..00999}.tar' run_dir=/scratch/run1

Rerunning a command with the same run_dir resumes it. See README.md and configs/base.yaml.
"""
from __future__ import annotations

import logging
import os
import sys
import warnings

from datamodules import build_datamodule, shard_problems  # importing datamodules registers ${demo_shards:...}: before resolve
from linguadiff.config import ConfigError, load_config, resolve
from linguadiff.settings_check import check_settings


def setup_logging() -> None:
    """One format for our lines and Lightning's (it adds its own handler on import: drop it,
    or every line is printed twice)."""
    import lightning  # noqa: F401  - so its handlers exist before we remove them

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).handlers.clear()
        logging.getLogger(name).propagate = True
    # Frozen parts are in eval mode on purpose; the stage module asserts what trains instead.
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
    # Lightning's own use of a deprecated torch API; nothing a user can act on.
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
    # A resumed run writes into its own checkpoint folder on purpose.
    warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")


def main(argv: list[str] | None = None, extra_callbacks: tuple = ()) -> int:
    """Returns the exit status. `extra_callbacks`: more Lightning callbacks (tools and tests)."""
    setup_logging()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # tokenizers run in the data workers
    try:
        cfg = resolve(load_config(sys.argv[1:] if argv is None else argv))
        check_settings(cfg, extra=[shard_problems])  # ranges, choices, shard paths: before any model loads
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    import lightning as L

    from callbacks import build_callbacks
    from lightning_modules import stage_class
    from linguadiff.run import RunDir, build_trainer

    try:
        run = RunDir.prepare(cfg)
        if run.resume_step >= cfg.trainer.max_steps:  # before loading any model
            logging.getLogger("train").warning(
                "%s already reached step %d >= trainer.max_steps=%d: nothing to train (raise trainer.max_steps to continue)",
                run.root, run.resume_step, cfg.trainer.max_steps,
            )
            return 0
        L.seed_everything(cfg.seed, workers=True)
        module = stage_class(cfg.stage).from_config(cfg)
        # A resumed run reads fresh samples instead of replaying the stream from its start.
        cfg.seed = int(cfg.seed) + run.resume_step
        datamodule = build_datamodule(cfg, module.tokenizers())
    except ConfigError as err:  # a setting that cannot work: say which, no traceback
        print(f"error: {err}", file=sys.stderr)
        return 2
    callbacks = [*build_callbacks(cfg, run.root, run.export), *extra_callbacks]
    try:
        trainer = build_trainer(cfg, run, callbacks, module)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    trainer.fit(module, datamodule=datamodule, ckpt_path=str(run.checkpoint) if run.checkpoint else None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
