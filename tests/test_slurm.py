"""The SLURM template on a real SLURM: a one-node cluster started on this machine (munged,
slurmctld, slurmd from a slurm.conf written here, loopback only), a fresh clone of the
repository, `sbatch scripts/slurm/train.sbatch` as the README says with two tasks (DDP, gloo on
CPUs) on the demo, SIGUSR1 while it trains, the job's own `scontrol requeue`, the resumed job
finishing with its export and one TensorBoard curve.

It installs nothing: without the daemons and clients (Debian: `apt-get install slurmctld slurmd
slurm-client munge`, which `.ci/run` does in CI) or where the cluster cannot start, it is
skipped and says why. The clone is of HEAD plus the working tree's uncommitted changes to
tracked files (`git diff HEAD`: a new file counts once it is added with `git add`). About
3 minutes on 2 CPU cores.
"""
from __future__ import annotations

import getpass
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "squeue", "scontrol", "scancel", "sinfo")
MAX_STEPS = 20

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def _which(name: str) -> str | None:
    # Daemons live in sbin, which a non-root PATH often lacks.
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin:/usr/local/sbin")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: Path, n: int = 3000) -> str:
    try:
        return f"--- {path.name}:\n" + path.read_text(errors="replace")[-n:]
    except OSError:
        return f"--- {path.name}: (none)"


class Cluster:
    """A one-node SLURM in `root`; every process it starts is stopped by `stop()`."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.node = socket.gethostname().split(".")[0]
        self.user = getpass.getuser()
        self.procs: list[subprocess.Popen] = []
        self.jobs: list[str] = []
        self.logs = root / "log"
        self.conf = root / "slurm.conf"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_"))}
        self.env["SLURM_CONF"] = str(self.conf)

    # ------------------------------------------------------------------ start, stop

    def _spawn(self, name: str, *args: str) -> subprocess.Popen:
        out = open(self.logs / f"{name}.out", "wb")
        proc = subprocess.Popen([_which(name), *args], stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=self.env, start_new_session=True)
        out.close()
        self.procs.append(proc)
        return proc

    def start(self) -> None:
        for sub in ("log", "munge", "state", "spool"):
            (self.root / sub).mkdir(mode=0o755)
        # munged: a key of its own (the system's /etc/munge is never touched), socket in our folder.
        key = self.root / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        sock = self.root / "munge" / "socket"
        self._spawn("munged", "--foreground", "--force", f"--socket={sock}", f"--key-file={key}",
                    f"--pid-file={self.root / 'munge' / 'pid'}", f"--seed-file={self.root / 'munge' / 'seed'}",
                    f"--log-file={self.logs / 'munged.log'}")
        self._wait(lambda: sock.exists(), 20, "munged did not create its socket")
        self.conf.write_text(f"""\
ClusterName=linguadiff-test
SlurmctldHost={self.node}(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser={self.user}
SlurmdUser={self.user}
AuthType=auth/munge
CredType=cred/munge
# cred_expire also delays a requeued job's next start (120 s by default)
AuthInfo=socket={sock},cred_expire=10
StateSaveLocation={self.root / 'state'}
SlurmdSpoolDir={self.root / 'spool'}
SlurmctldPidFile={self.root / 'slurmctld.pid'}
SlurmdPidFile={self.root / 'slurmd.pid'}
SlurmctldLogFile={self.logs / 'slurmctld.log'}
SlurmdLogFile={self.logs / 'slurmd.log'}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
# look at pending jobs every 2 s (a requeued job starts again promptly)
SchedulerParameters=sched_interval=2,bf_interval=2
JobRequeue=1
ReturnToService=2
SlurmdParameters=config_overrides
MpiDefault=none
SwitchType=switch/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MailProg=/bin/true
NodeName={self.node} NodeAddr=127.0.0.1 CPUs=2 RealMemory=2048 State=UNKNOWN
PartitionName=test Nodes={self.node} Default=YES MaxTime=INFINITE State=UP
""")
        self._spawn("slurmctld", "-D", "-i", "-f", str(self.conf))
        self._spawn("slurmd", "-D", "-f", str(self.conf), "-N", self.node)
        self._wait(lambda: self.run("sinfo", "-h", "-N", "-o", "%T", check=False).stdout.strip() == "idle", 60,
                   "the node never became idle")

    def _wait(self, ready, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if ready():
                return
            if any(p.poll() is not None for p in self.procs):
                break
            time.sleep(0.5)
        raise RuntimeError(what)

    def stop(self) -> None:
        if self.jobs and any(p.poll() is None for p in self.procs):
            self.run("scancel", *self.jobs, check=False)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and self.run("squeue", "-h", "-o", "%i", check=False).stdout.strip():
                time.sleep(1)
        for proc in reversed(self.procs):  # slurmd, slurmctld, munged
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=15)

    def logs_tail(self) -> str:
        return "\n".join(_tail(p) for p in sorted(self.logs.iterdir()))

    # ------------------------------------------------------------------ clients

    def run(self, *cmd: str, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
        result = subprocess.run([_which(cmd[0]) or cmd[0], *cmd[1:]], capture_output=True, text=True, timeout=60,
                                env=kwargs.pop("env", self.env), **kwargs)
        if check and result.returncode:
            raise AssertionError(f"{' '.join(cmd)} failed ({result.returncode}): {result.stderr}\n{self.logs_tail()}")
        return result

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict ({} once the controller has forgotten the job)."""
        out = self.run("scontrol", "-o", "show", "job", job_id, check=False).stdout
        return dict(re.findall(r"(\w+)=(\S*)", out))


@pytest.fixture(scope="module")
def cluster():
    missing = [name for name in DAEMONS + CLIENTS if _which(name) is None]
    if missing:
        pytest.skip(f"no SLURM here ({', '.join(missing)} not found; Debian: apt-get install slurmctld slurmd "
                    "slurm-client munge)")
    # Short paths: the munge socket's must fit a unix socket address (108 bytes).
    root = Path(tempfile.mkdtemp(prefix="ld-slurm-"))
    cluster = Cluster(root)
    try:
        cluster.start()
    except Exception as err:  # noqa: BLE001 - whatever stops the daemons, say it and skip
        cluster.stop()
        reason = f"the single-node SLURM cluster did not start: {err}\n{cluster.logs_tail()}"
        shutil.rmtree(root, ignore_errors=True)
        pytest.skip(reason)
    yield cluster
    cluster.stop()
    shutil.rmtree(root, ignore_errors=True)


def _fresh_clone(dest: Path) -> Path:
    """`git clone` of this repository, plus the working tree's uncommitted changes to tracked files."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout: the SLURM test runs the template from a fresh clone")
    subprocess.run(["git", "clone", "-q", "--no-hardlinks", str(ROOT), str(dest)], check=True, timeout=120)
    diff = subprocess.run(["git", "-C", str(ROOT), "diff", "HEAD", "--binary"], check=True, capture_output=True,
                          timeout=60).stdout
    if diff:
        subprocess.run(["git", "-C", str(dest), "apply", "--whitespace=nowarn"], input=diff, check=True, timeout=60)
    return dest


def _wait_for(cluster: Cluster, job_id: str, log: Path, done, timeout: float, what: str) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = cluster.job(job_id)
        text = log.read_text(errors="replace") if log.exists() else ""
        if done(info, text):
            return info
        if info.get("JobState") in ("FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL"):
            break
        time.sleep(1)
    raise AssertionError(f"{what}: job {info}\n--- job log:\n{text[-6000:]}\n{cluster.logs_tail()}")


def test_template_trains_requeues_on_sigusr1_resumes_and_exports(cluster):
    clone = _fresh_clone(cluster.root / "clone")
    run_dir = cluster.root / "run"
    # `python` in the job is this interpreter (a wrapper: a symlink would lose a virtualenv).
    bin_dir = cluster.root / "bin"
    bin_dir.mkdir()
    (bin_dir / "python").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    (bin_dir / "python").chmod(0o755)
    env = {k: v for k, v in cluster.env.items() if k not in ("PYTHONPATH", "LINGUADIFF_CACHE")}
    env.update(PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '')}", RUN_DIR=str(run_dir), HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1",
               # loopback only, and a port of its own (Lightning derives one from the job id otherwise)
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))

    # The clone runs its own code, not an installed copy.
    where = subprocess.run(["python", "-c", "import datamodules.demo_data as d, train; print(d.__file__, train.__file__)"],
                           cwd=clone, env=env, capture_output=True, text=True, timeout=120)
    assert where.returncode == 0, where.stderr
    assert all(Path(p).resolve().is_relative_to(clone.resolve()) for p in where.stdout.split()), where.stdout
    assert not (clone / ".cache").exists()  # the demo data is generated by the job, by both ranks at once

    # The README's command for the demo on CPUs, two tasks on one node.
    submitted = cluster.run(
        # (--time: a limit of its own, should this test ever leave the job behind)
        "sbatch", "--parsable", "--ntasks-per-node=2", "--gpus-per-node=0", "--cpus-per-task=1", "--time=15",
        "scripts/slurm/train.sbatch", "stage=1", "trainer.accelerator=cpu",
        # CPU-sized: small batches, no periodic validation or checkpoint (the signal's is the one)
        f"trainer.max_steps={MAX_STEPS}", "trainer.log_every_n_steps=2", "data.batch_size=16",
        "data.val_batch_size=32", "data.shuffle_buffer=200", "trainer.val_check_interval=1000000",
        "checkpoint.every_n_steps=1000000",
        cwd=clone, env=env,
    )
    job_id = submitted.stdout.strip().split(";")[0]
    cluster.jobs.append(job_id)
    log = clone / f"linguadiff-{job_id}.out"  # the template's --output=%x-%j.out, in the submit folder

    # Training is under way (progress every 5 x log_every_n_steps): ask it to stop, as SLURM does
    # before a time limit (--signal=USR1@180 reaches the tasks of srun, as scancel does here).
    start = time.monotonic()
    _wait_for(cluster, job_id, log, lambda info, text: f"step 10/{MAX_STEPS}" in text, 420, "training never got going")
    print(f"submitted -> step 10: {time.monotonic() - start:.0f} s")
    cluster.run("scancel", "--signal=USR1", job_id)
    info = _wait_for(cluster, job_id, log, lambda info, text: info.get("JobState") == "COMPLETED", 420,
                     "the job did not requeue itself and finish")
    print(f"submitted -> requeued and completed: {time.monotonic() - start:.0f} s")
    text = log.read_text(errors="replace")

    assert info["Restarts"] == "1" and info["ExitCode"] == "0:0", info
    assert text.count("Generating the demo text shards") == 1, text[-6000:]  # one rank generated, once
    assert "restart 0 on" in text and "restart 1 on" in text
    stopped = re.findall(r"stopping at step (\d+) with a checkpoint", text)
    assert len(stopped) == 1 and 10 <= int(stopped[0]) < MAX_STEPS, text[-6000:]
    assert f"Requeued SLURM job {job_id}" in text
    resumed = re.findall(r"Resuming from \S+last\.ckpt \(step (\d+)\)", text)
    assert resumed and set(resumed) == {stopped[0]}, text[-6000:]  # each rank of the second launch, at that step
    assert len(re.findall(r"x 2 devices x 1 nodes", text)) == 2, text[-6000:]  # both launches: two tasks, DDP
    assert f"Exported stage 1 (step {MAX_STEPS})" in text

    # The export, and one TensorBoard curve: every step once, in order, over both launches.
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

    from linguadiff.models.adapter import QueryAdapter

    _, meta = QueryAdapter.from_file(run_dir / "export" / "adapter.safetensors")
    assert meta["stage"] == 1 and meta["global_step"] == MAX_STEPS
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={SCALARS: 0}, purge_orphaned_data=False)
    events.Reload()
    steps = [e.step for e in events.Scalars("train/loss")]
    assert steps == sorted(set(steps)), f"steps logged twice or out of order: {steps}"
    assert steps[0] < int(stopped[0]) <= steps[-1] and steps[-1] == MAX_STEPS - 1, steps
    assert len(list((run_dir / "tensorboard").glob("events.out.tfevents.*"))) >= 2  # two launches, one curve
