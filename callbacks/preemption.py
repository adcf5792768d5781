"""Stop cleanly when the cluster asks: SIGUSR1 -> checkpoint at the next step -> requeue.

SLURM sends SIGUSR1 shortly before a job's time limit or preemption (`#SBATCH
--signal=USR1@180`, to the tasks of `srun`; `B:USR1` would signal only the batch shell, and
`scancel --signal=USR1 JOBID` sends it by hand). The handler only sets a flag (nothing else is safe inside a signal
handler); at the next step boundary every rank agrees to stop (one rank's signal is enough),
Lightning ends the fit, `RunCheckpoint` writes last.ckpt at that step, and the job is
requeued with `scontrol requeue` when it runs under SLURM and scontrol exists (otherwise
it just exits). Relaunching the same command resumes from that checkpoint.

train.py notes the signal from its first line on (models can take minutes to load): one that
comes before training starts ends a single-process launch cleanly without a checkpoint (the
previous one stands) and requeues it; with several ranks it sets `requested`, so all stop
together at the first step.
"""
from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess

import lightning as L

log = logging.getLogger(__name__)


class PreemptionHandler(L.Callback):
    def __init__(self, signum: int = signal.SIGUSR1) -> None:
        self.signum = signum
        self.requested = False
        self.stopped_at: int | None = None
        self._previous = None
        self._installed = False

    def _on_signal(self, signum, frame) -> None:  # noqa: ARG002 - signal handler signature
        self.requested = True

    def install(self) -> None:
        """Take the signal from now on (train.py calls this as soon as the callback exists; a
        signal noted before that is passed on by setting `requested`)."""
        if not self._installed:
            self._previous = signal.signal(self.signum, self._on_signal)
            self._installed = True

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.install()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        # Every rank must stop at the same step, or the others hang in the next collective.
        if trainer.strategy.reduce_boolean_decision(self.requested, all=False):
            self.stopped_at = trainer.global_step
            trainer.should_stop = True
            if trainer.is_global_zero:
                log.warning("Signal %s received: stopping at step %d with a checkpoint", signal.Signals(self.signum).name,
                            trainer.global_step)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._installed:
            signal.signal(self.signum, self._previous if self._previous is not None else signal.SIG_DFL)
            self._installed = False
        if self.stopped_at is not None and trainer.is_global_zero:
            requeue()


def requeue() -> None:
    """Requeue this SLURM job (the relaunch resumes from run_dir); say so when that is not possible."""
    job = os.environ.get("SLURM_ARRAY_JOB_ID") and f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ.get('SLURM_ARRAY_TASK_ID')}"
    job = job or os.environ.get("SLURM_JOB_ID")
    if not job:
        log.warning("Not under SLURM: checkpoint saved, exiting. Rerun the same command to resume.")
        return
    if shutil.which("scontrol") is None:
        log.warning("SLURM job %s but no scontrol on PATH: checkpoint saved, not requeued.", job)
        return
    result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
    if result.returncode == 0:
        log.warning("Requeued SLURM job %s: it resumes from its run_dir when it starts again.", job)
    else:
        log.error("scontrol requeue %s failed (%s): resubmit the job to resume.", job, result.stderr.strip())
