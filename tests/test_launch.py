"""The cluster launchers in launch/: each is run against stand-ins for srun, scontrol and gcloud,
and the `deepseek-jax train` command line it builds goes through the real CLI (with `train`
itself replaced) to check the config and distributed settings every process would get."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess

import pytest
import yaml

from deepseek_jax import cli
from deepseek_jax.config import Config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SLURM = os.path.join(ROOT, "launch", "slurm.sbatch")
TPU_POD = os.path.join(ROOT, "launch", "tpu_pod.sh")
JOBSET = os.path.join(ROOT, "launch", "jobset.yaml")

# Records its argv, working folder and JAX_LOCAL_DEVICE_IDS as one JSON line.
RECORD_TRAIN = """#!/usr/bin/env python3
import json, os, sys
with open(os.environ["RECORD"], "a") as f:
    f.write(json.dumps({"argv": sys.argv[1:], "cwd": os.getcwd(),
                        "local_devices": os.environ.get("JAX_LOCAL_DEVICE_IDS")}) + "\\n")
"""

# srun: drop srun's own options and run the command as task 1 of 2.
FAKE_SRUN = """#!/bin/bash
while [[ $1 == --* ]]; do shift; done
SLURM_PROCID=1 SLURM_NTASKS=2 exec "$@"
"""

FAKE_SCONTROL = """#!/bin/bash
[[ "$*" == "show hostnames node[07-08]" ]] && printf 'node07\\nnode08\\n'
"""

# gcloud: `scp` puts the file in $HOME, `ssh` runs --command in bash: one worker, emulated.
FAKE_GCLOUD = """#!/bin/bash
printf '%s\\0' "$@" > "$GCLOUD_LOG.$4"
if [[ $4 == scp ]]; then cp "$5" "$HOME/${6#*:}"; fi
if [[ $4 == ssh ]]; then
  while [[ $# -gt 0 && $1 != --command ]]; do shift; done
  exec bash -c "$2"
fi
"""


def write_exe(path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
    os.chmod(path, os.stat(path).st_mode | stat.S_IXUSR)


def fake_bin(tmp_path, **scripts: str) -> str:
    """A bin folder with the stand-ins plus a venv whose activate script puts it first on PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    write_exe(bin_dir / "deepseek-jax", RECORD_TRAIN)
    for name, text in scripts.items():
        write_exe(bin_dir / name, text)
    venv = tmp_path / "venv" / "bin"
    venv.mkdir(parents=True)
    (venv / "activate").write_text(f'export PATH="{bin_dir}:$PATH"\n')
    return str(bin_dir)


def run_script(script: str, args: list[str], env: dict) -> None:
    result = subprocess.run(["bash", script, *args], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def records(path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f]


def config_of(argv: list[str], monkeypatch) -> Config:
    """The Config that `deepseek-jax <argv>` would train with."""
    seen = []
    monkeypatch.setattr("deepseek_jax.train.loop.train", seen.append)
    monkeypatch.chdir(ROOT)  # CONFIG paths are relative to the repository root
    assert cli.main(argv) == 0
    return seen[0]


@pytest.mark.parametrize("script", [SLURM, TPU_POD])
def test_shell_syntax(script):
    subprocess.run(["bash", "-n", script], check=True)


def run_slurm(tmp_path, args: list[str], **env: str) -> dict:
    bin_dir = fake_bin(tmp_path, srun=FAKE_SRUN, scontrol=FAKE_SCONTROL)
    environ = {
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "HOME": str(tmp_path),
        "RECORD": str(tmp_path / "record.jsonl"),
        "VENV": str(tmp_path / "venv"),
        "SLURM_SUBMIT_DIR": str(tmp_path),
        "SLURM_JOB_NAME": "deepseek-jax",
        "SLURM_JOB_ID": "42",
        "SLURM_JOB_NODELIST": "node[07-08]",
        "SLURM_NNODES": "2",
        "SLURM_GPUS_ON_NODE": "4",
        **env,
    }
    run_script(SLURM, args, environ)
    (record,) = records(tmp_path / "record.jsonl")
    return record


def test_slurm_lets_jax_detect_the_cluster(tmp_path, monkeypatch):
    rec = run_slurm(tmp_path, ["tiny", "mesh.data=2", "train.run_dir=/shared/my run's dir"])
    run_dir = str(tmp_path / "runs" / "deepseek-jax-42")
    assert rec["argv"] == [
        "train",
        "tiny",
        f"train.run_dir={run_dir}",
        "mesh.data=2",
        "train.run_dir=/shared/my run's dir",
        "distributed.enabled=true",
    ]
    assert os.path.isdir(run_dir)
    assert rec["local_devices"] == "0,1,2,3"  # all of the node's GPUs, not just the task's own
    cfg = config_of(rec["argv"], monkeypatch)
    assert cfg.train.run_dir == "/shared/my run's dir"  # overrides given to sbatch win
    assert cfg.mesh.data == 2
    assert cfg.distributed.enabled and cfg.distributed.coordinator_address is None


def test_slurm_with_an_explicit_coordinator(tmp_path, monkeypatch):
    rec = run_slurm(tmp_path, ["tiny", "train.steps=7"], EXPLICIT_COORDINATOR="1")
    cfg = config_of(rec["argv"], monkeypatch)
    assert cfg.train.steps == 7
    assert cfg.distributed.enabled
    assert cfg.distributed.coordinator_address == "node07:12355"
    assert (cfg.distributed.num_processes, cfg.distributed.process_id) == (2, 1)


def test_slurm_needs_a_config(tmp_path):
    result = subprocess.run(["bash", SLURM], capture_output=True, text=True)
    assert result.returncode == 2 and "usage: sbatch launch/slurm.sbatch CONFIG" in result.stderr


@pytest.mark.skipif(
    shutil.which("git") is None or not os.path.isdir(os.path.join(ROOT, ".git")),
    reason="tpu_pod.sh ships `git archive HEAD`: needs a git checkout",
)
def test_tpu_pod_runs_the_same_command_on_every_worker(tmp_path, monkeypatch):
    fake_bin(tmp_path, gcloud=FAKE_GCLOUD, pip="#!/bin/bash\n")
    home = tmp_path / "home"
    (home / "deepseek-jax-venv").mkdir(parents=True)
    shutil.copytree(tmp_path / "venv" / "bin", home / "deepseek-jax-venv" / "bin")
    environ = {
        **os.environ,
        "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}",
        "HOME": str(home),
        "RECORD": str(tmp_path / "record.jsonl"),
        "GCLOUD_LOG": str(tmp_path / "gcloud.log"),
        "PROJECT": "my-project",
    }
    args = ["my-v5p-64", "us-east5-a", "configs/deepseek-v2-lite.yaml"]
    args += ["mesh.expert=8", "train.run_dir=/tmp/it's a run"]
    run_script(TPU_POD, args, environ)

    scp, ssh = ((tmp_path / f"gcloud.log.{c}").read_text().split("\0")[:-1] for c in ("scp", "ssh"))
    where = ["--zone", "us-east5-a", "--worker=all", "--project", "my-project"]
    assert scp[:4] == ["compute", "tpus", "tpu-vm", "scp"]
    assert scp[5:] == ["my-v5p-64:deepseek-jax.tar.gz", *where]
    assert ssh[:-1] == ["compute", "tpus", "tpu-vm", "ssh", "my-v5p-64", *where, "--command"]
    (rec,) = records(tmp_path / "record.jsonl")
    # The worker trains inside the unpacked commit, with the user's arguments intact.
    assert rec["cwd"] == str(home / "deepseek-jax")
    assert os.path.isfile(home / "deepseek-jax" / "configs" / "deepseek-v2-lite.yaml")
    assert rec["argv"] == [
        "train",
        "configs/deepseek-v2-lite.yaml",
        f"train.run_dir={home}/runs/deepseek-v2-lite",
        "mesh.expert=8",
        "train.run_dir=/tmp/it's a run",
        "distributed.enabled=true",
    ]
    cfg = config_of(rec["argv"], monkeypatch)
    assert cfg.mesh.expert == 8 and cfg.train.run_dir == "/tmp/it's a run"
    assert cfg.distributed.enabled and cfg.distributed.num_processes is None


def test_tpu_pod_usage():
    result = subprocess.run(["bash", TPU_POD, "only-a-name"], capture_output=True, text=True)
    assert (
        result.returncode == 2 and "usage: launch/tpu_pod.sh TPU_NAME ZONE CONFIG" in result.stderr
    )


def test_jobset_manifest(monkeypatch):
    with open(JOBSET) as f:
        manifest = yaml.safe_load(f)
    assert manifest["apiVersion"] == "jobset.x-k8s.io/v1alpha2"
    assert manifest["kind"] == "JobSet"
    spec = manifest["spec"]
    assert spec["network"]["enableDNSHostnames"] is True
    (rjob,) = spec["replicatedJobs"]
    job = rjob["template"]["spec"]
    assert job["completionMode"] == "Indexed"
    n = job["parallelism"]
    assert job["completions"] == n
    (container,) = job["template"]["spec"]["containers"]
    assert container["command"] == ["deepseek-jax", "train"]
    port = container["ports"][0]["containerPort"]

    # Pod 0's DNS name: <jobset>-<replicatedJob>-<job index>-<pod index>.<subdomain>.
    host = f"{manifest['metadata']['name']}-{rjob['name']}-0-0.{spec['network']['subdomain']}"
    args = container["args"]
    assert f"--coordinator={host}:{port}" in args
    assert f"--num-processes={n}" in args
    assert "--process-id=$(JOB_COMPLETION_INDEX)" in args

    # What pod 2 runs, after Kubernetes expands $(JOB_COMPLETION_INDEX).
    argv = ["train", *(a.replace("$(JOB_COMPLETION_INDEX)", "2") for a in args)]
    cfg = config_of(argv, monkeypatch)
    assert cfg.distributed.enabled
    assert cfg.distributed.coordinator_address == f"{host}:{port}"
    assert (cfg.distributed.num_processes, cfg.distributed.process_id) == (n, 2)
