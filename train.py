"""Train one LinguaDiff stage: ``python train.py stage=1 [key=value ...]``.

    python train.py stage=1                                   # the offline CPU demo
    python train.py stage=2 init_from=runs/stage1 run_dir=runs/stage2
    python train.py stage=1 model=sdxl llm=qwen2.5-7b trainer.max_steps=1000 \\
        data.train.urls='/data/text/{00000..00999}.tar' run_dir=/scratch/run1

Rerunning a command with the same run_dir resumes it. See README.md and configs/base.yaml.
"""
from __future__ import annotations

import signal

# SLURM's SIGUSR1 (time limit, preemption) can come while this script still imports or loads
# models; its default action kills the process (and `srun --kill-on-bad-exit` then fails the
# job instead of requeueing it). So the first thing done is to note it. Once main() knows it
# runs as one process, a signal during loading ends the launch at once (a 7B model can take
# longer to load than SLURM's grace time); with several ranks it is acted on at the first
# step, all ranks together.
_EARLY_SIGNALS: list[int] = []
_STOP_AT_SIGNAL = False


class _PreemptedWhileLoading(BaseException):
    """SIGUSR1 while one process was still loading: nothing trained, nothing to save. A
    BaseException, so that no `except Exception` on the way swallows it."""


def _note_early_signal(signum, frame) -> None:  # noqa: ARG001 - signal handler signature
    _EARLY_SIGNALS.append(signum)
    if _STOP_AT_SIGNAL:
        raise _PreemptedWhileLoading


if __name__ == "__main__":
    signal.signal(signal.SIGUSR1, _note_early_signal)

import logging  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
import warnings  # noqa: E402

from datamodules import build_datamodule, shard_problems  # noqa: E402  # importing datamodules registers ${demo_shards:...}: before resolve
from linguadiff.buckets import allow_compiled_sizes  # noqa: E402
from linguadiff.config import ConfigError, load_config, resolve  # noqa: E402
from linguadiff.settings_check import check_settings  # noqa: E402


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
    # Validation metrics are gathered from every rank before they are logged (StageModule.record_val).
    warnings.filterwarnings("ignore", message=r"It is recommended to use `self.log\('val/.*sync_dist=True")
    # A resumed run writes into its own checkpoint folder on purpose.
    warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")


def main(argv: list[str] | None = None, extra_callbacks: tuple = ()) -> int:
    """Returns the exit status. `extra_callbacks`: more Lightning callbacks (tools and tests)."""
    if signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL:  # called as a function, not as the script
        signal.signal(signal.SIGUSR1, _note_early_signal)
    setup_logging()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # tokenizers run in the data workers
    try:
        cfg = resolve(load_config(sys.argv[1:] if argv is None else argv))
        check_settings(cfg, extra=[shard_problems])  # ranges, choices, shard paths: before any model loads
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    from linguadiff.distributed import launch_world
    from linguadiff.run import RunDir

    global _STOP_AT_SIGNAL
    _STOP_AT_SIGNAL = launch_world()[1] == 1
    try:
        if _STOP_AT_SIGNAL and _EARLY_SIGNALS:
            raise _PreemptedWhileLoading
        try:
            run = RunDir.prepare(cfg)  # rank 0 holds the run_dir's lock until this returns
        except ConfigError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        try:
            return _train(cfg, run, extra_callbacks)
        finally:
            run.release()
    except _PreemptedWhileLoading:
        _STOP_AT_SIGNAL = False  # a second signal while requeueing is only noted
        _stop_before_training()
        return 0
    finally:
        _STOP_AT_SIGNAL = False
        _EARLY_SIGNALS.clear()


def _stop_before_training() -> None:
    """Nothing trained in this launch, so nothing to save: the last checkpoint stands."""
    from callbacks.preemption import requeue

    logging.getLogger("train").warning("Signal SIGUSR1 received before training started: exiting without a checkpoint")
    requeue()


def _train(cfg, run, extra_callbacks: tuple) -> int:
    """Load the stage's models and data and fit, in the run folder `run` (its lock held)."""
    import lightning as L

    from callbacks import build_callbacks
    from callbacks.preemption import PreemptionHandler
    from linguadiff.distributed import launch_world
    from linguadiff.export import export_complete
    from lightning_modules import stage_class
    from linguadiff.run import build_trainer

    say = logging.getLogger("train")
    finished = run.resume_step >= cfg.trainer.max_steps
    if finished and export_complete(run.export):  # before loading any model
        say.warning(
            "%s already reached step %d >= trainer.max_steps=%d: nothing to train (raise trainer.max_steps to continue)",
            run.root, run.resume_step, cfg.trainer.max_steps,
        )
        return 0
    if finished:
        say.warning("%s reached step %d but its export is missing or incomplete: exporting it again", run.root, run.resume_step)
    try:
        L.seed_everything(cfg.seed, workers=True)
        module = stage_class(cfg.stage).from_config(cfg)
        datamodule = build_datamodule(cfg, module.tokenizers())
        buckets = getattr(datamodule, "buckets", None)
        if cfg.speed.compile and buckets:
            say.info("speed.compile with %d buckets: torch.compile may keep %d versions of each compiled frame",
                     len(buckets), allow_compiled_sizes(len(buckets)))
    except ConfigError as err:  # a setting that cannot work: say which, no traceback
        print(f"error: {err}", file=sys.stderr)
        return 2
    callbacks = [*build_callbacks(cfg, run.root, run.export), *extra_callbacks]
    preemption = next((c for c in callbacks if isinstance(c, PreemptionHandler)), None)
    global _STOP_AT_SIGNAL
    _STOP_AT_SIGNAL = False  # from here on a signal is noted, then acted on below or by the callback
    if preemption is not None:
        preemption.install()  # from here on the callback takes SIGUSR1 itself
        preemption.requested = preemption.requested or bool(_EARLY_SIGNALS)
    early = bool(_EARLY_SIGNALS) or (preemption is not None and preemption.requested)
    if early and launch_world()[1] == 1 and not finished:
        _stop_before_training()
        return 0
    # (With several ranks the callback stops them all together at the first step, with a checkpoint.)
    try:
        trainer = build_trainer(cfg, run, callbacks, module)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    # Files are data, never code: Lightning reads the checkpoint with weights_only as well.
    trainer.fit(module, datamodule=datamodule, ckpt_path=str(run.checkpoint) if run.checkpoint else None,
                weights_only=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
