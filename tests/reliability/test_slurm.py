"""Issue 11 item 7: launch/slurm.sbatch on a real single-node SLURM cluster (Debian's slurm-wlm:
munged, slurmctld and slurmd started here, in a temporary folder, on free ports). A 2-task job
trains to the end; a second one is preempted with `scontrol requeue` after its first step: it
saves on SIGTERM, is requeued, resumes in the same run folder and ends with the same losses as
the uninterrupted job. Needs root and the slurm-wlm and munge packages; skipped without them."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time

import pytest

from .helpers import REPO, TINY, metrics

pytestmark = pytest.mark.slurm
DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol")
needs_slurm = pytest.mark.skipif(
    any(shutil.which(d) is None for d in DAEMONS) or os.geteuid() != 0,
    reason="needs root and slurm-wlm (apt-get install slurm-wlm)",
)
MESH = ["mesh.data=2", "mesh.expert=2", "mesh.fsdp=1", "mesh.dcn_data=2"]

CONF = """ClusterName=dsjtest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={d_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={d}/munge.sock
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd.pid
SlurmctldLogFile={d}/slurmctld.log
SlurmdLogFile={d}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
SchedulerType=sched/builtin
ReturnToService=2
JobRequeue=1
KillWait=120
InactiveLimit=0
SlurmdTimeout=300
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory=1000 State=UNKNOWN
PartitionName=test Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A single-node SLURM cluster for this module; its daemons are stopped afterwards."""
    d = tmp_path_factory.mktemp("slurm")
    for sub in ("state", "spool"):
        (d / sub).mkdir()
    (d / "munge.key").write_bytes(os.urandom(128))
    os.chmod(d / "munge.key", 0o600)
    host = socket.gethostname()
    conf = d / "slurm.conf"
    conf.write_text(
        CONF.format(host=host, d=d, ctld_port=free_port(), d_port=free_port(), cpus=os.cpu_count())
    )
    env = {**os.environ, "SLURM_CONF": str(conf)}
    subprocess.run(
        ["munged", "--force", f"--socket={d}/munge.sock", f"--key-file={d}/munge.key"]
        + [f"--pid-file={d}/munged.pid", f"--log-file={d}/munged.log"]
        + [f"--seed-file={d}/munged.seed"],
        check=True,
    )
    subprocess.run(["slurmctld", "-f", str(conf)], env=env, check=True)
    subprocess.run(["slurmd", "-f", str(conf)], env=env, check=True)
    try:
        for _ in range(120):
            info = subprocess.run(["sinfo", "-h", "-o", "%T"], env=env, capture_output=True)
            if info.stdout.strip() == b"idle":
                break
            time.sleep(0.5)
        else:
            pytest.fail(f"the test cluster did not come up: {(d / 'slurmctld.log').read_text()}")
        yield env, d
    finally:
        # Jobs first (a failed test may leave one running), so that no process outlives the test.
        subprocess.run(["scancel", "--full", f"--user={os.getuid()}"], env=env)
        for _ in range(60):
            if not subprocess.run(["squeue", "-h"], env=env, capture_output=True).stdout.strip():
                break
            time.sleep(0.5)
        for pid_file in ("slurmd.pid", "slurmctld.pid", "munged.pid"):
            try:
                os.kill(int((d / pid_file).read_text()), 15)
            except (OSError, ValueError):
                pass


def submit(env: dict, d, steps: int) -> tuple[str, str]:
    """sbatch launch/slurm.sbatch, 2 tasks on the one node; returns the job id and run folder."""
    job_env = {
        **env,
        "VENV": sys.prefix,
        "RUN_ROOT": str(d / "runs"),
        "PYTHONPATH": str(REPO),
        "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
    }
    cmd = ["sbatch", "--parsable", "--open-mode=append", "--nodes=1", "--ntasks-per-node=2"]
    cmd += ["--cpus-per-task=1"]
    cmd += ["--gpus-per-node=0", f"--output={d}/%j.out", "launch/slurm.sbatch", "tiny"]
    cmd += [*TINY, *MESH, f"train.steps={steps}", "train.checkpoint_every=1000"]
    out = subprocess.run(cmd, cwd=REPO, env=job_env, capture_output=True, text=True, check=True)
    job = out.stdout.strip().split(";")[0]
    return job, str(d / "runs" / f"deepseek-jax-{job}")


def job_state(env: dict, job: str) -> dict:
    out = subprocess.run(
        ["scontrol", "show", "job", job], env=env, capture_output=True, text=True
    ).stdout
    return dict(f.split("=", 1) for f in out.split() if "=" in f)


def wait(env, job, until, timeout=900) -> dict:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        state = job_state(env, job)
        if until(state):
            return state
        time.sleep(0.5)
    pytest.fail(f"job {job} timed out in state {job_state(env, job).get('JobState')}")


@needs_slurm
def test_sbatch_trains_and_a_requeued_job_resumes_to_the_same_losses(cluster):
    env, d = cluster
    steps = 16  # long enough for the requeue to land mid-run (asserted below)
    job, run = submit(env, d, steps)
    state = wait(env, job, lambda s: s.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED"))
    log = (d / f"{job}.out").read_text()
    assert state["JobState"] == "COMPLETED" and state["ExitCode"] == "0:0", log[-3000:]
    reference = metrics(run)
    assert [m["step"] for m in reference] == list(range(1, steps + 1))

    job, run = submit(env, d, steps)
    wait(env, job, lambda s: len(_lines(run)) >= 1, timeout=900)
    subprocess.run(["scontrol", "requeue", job], env=env, check=True)
    # SLURM holds a requeued job back for 2 minutes; let it start as soon as it is pending.
    wait(env, job, lambda s: s.get("JobState") == "PENDING" and s.get("Restarts") == "1")
    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], env=env, check=True)
    state = wait(
        env,
        job,
        lambda s: s.get("JobState") in ("COMPLETED", "FAILED") and s.get("Restarts") == "1",
        timeout=1200,
    )
    log = (d / f"{job}.out").read_text()
    assert state["JobState"] == "COMPLETED", log[-3000:]
    assert "SIGTERM: saved a checkpoint at step" in log  # the first start, before the requeue
    assert "Exited with exit code 75" in log
    assert "resumed from the checkpoint at step" in log
    resumed = metrics(run)
    keys = ("loss", "lm_loss", "mtp_loss", "grad_norm", "expert_load")
    assert [m["step"] for m in resumed] == list(range(1, steps + 1))
    assert [[m[k] for k in keys] for m in resumed] == [[m[k] for k in keys] for m in reference]


def _lines(run) -> list[str]:
    path = os.path.join(run, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [line for line in f if line.strip()]
