"""The batch scripts and the Hydra SLURM launcher on a real one-node SLURM cluster
(tests/slurm_cluster.py: Debian's slurmctld + slurmd + munge, started here as root).
These tests fail, never skip, when the cluster cannot start.

Every job trains the same deterministic 2-process run; each must end with the per-step
losses of that run launched by torchrun directly, bit for bit (same ranks, same
reductions), including a job that is signalled, checkpoints, requeues itself and resumes."""
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, TINY, losses, read_metrics, run_job
from tests.slurm_cluster import LocalSlurmCluster

DET = ["train.deterministic=true", "optim.schedule=constant", "optim.warmup_steps=0", "train.seq_len=64",
       "model.dim=128", "model.ffn_hidden_dim=256", "logging.every=1", "train.local_batch_size=2"]
STEPS = 40


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = LocalSlurmCluster(tmp_path_factory.mktemp("slurm"))
    c.up()
    try:
        yield c
    finally:
        c.down()


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tok_cache):
    d = tmp_path_factory.mktemp("torchrun_ref")
    run_job(d, [*DET, f"train.steps={STEPS}"], tok_cache=tok_cache, nproc=2, launcher="torchrun")
    return losses(d)


def job_overrides(tok_cache: str):
    return [*TINY, f"data.tokenizer.cache_dir={tok_cache}", *DET, f"train.steps={STEPS}"]


def sbatch(cluster, script: str, args, runs: Path, env=None, sbatch_opts=()) -> int:
    out = subprocess.run(["sbatch", "--parsable", "--cpus-per-task", "2", "-o", str(runs / "slurm-%j.out"),
                          *sbatch_opts, str(REPO / "slurm" / script), *args],
                         cwd=REPO, env={**cluster.env, "RUNS_ROOT": str(runs), **(env or {})},
                         capture_output=True, text=True, check=True)
    return int(out.stdout.strip().split(";")[0])


def job_info(cluster, job_id: int) -> dict:
    out = subprocess.run(["scontrol", "show", "job", "-o", str(job_id)], env=cluster.env, capture_output=True,
                         text=True, check=True).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


def wait_job(cluster, job_id: int, timeout: float = 300, cond=None) -> dict:
    """Until the job is finished (or cond(info) holds); the job's output on a timeout."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        info = job_info(cluster, job_id)
        if cond(info) if cond else info["JobState"] in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT",
                                                        "NODE_FAIL", "OUT_OF_MEMORY"):
            return info
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} still {job_info(cluster, job_id)['JobState']} after {timeout}s\n"
                         f"{cluster.logs()[-3000:]}")


def job_output(runs: Path, job_id: int) -> str:
    f = runs / f"slurm-{job_id}.out"
    return f.read_text() if f.exists() else ""


def test_sbatch_torchrun_job_completes_with_every_step(cluster, reference, tmp_path, tok_cache):
    """Also: a hydra.run.dir among the overrides is the run dir (the script's default,
    runs/<job name>-<id>, is not used), and NCCL_SOCKET_IFNAME sets GLOO_SOCKET_IFNAME."""
    run = tmp_path / "my-run"
    job = sbatch(cluster, "train.sbatch", [*job_overrides(tok_cache), f"hydra.run.dir={run}"], tmp_path,
                 env={"NPROC_PER_NODE": "2", "NCCL_SOCKET_IFNAME": "lo"}, sbatch_opts=["--job-name", "tiny"])
    info = wait_job(cluster, job)
    out = job_output(tmp_path, job)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", out[-4000:]
    assert f"run dir {run}" in out and not (tmp_path / f"tiny-{job}").exists()
    assert [m["step"] for m in read_metrics(run)] == list(range(1, STEPS + 1))
    assert "world 2 (torchrun)" in out
    # The host-side gloo group gets NCCL's interface (here the only one both ranks share).
    assert "GLOO_SOCKET_IFNAME=lo (from NCCL_SOCKET_IFNAME=lo)" in out
    assert losses(run) == reference
    assert json.loads((run / "status.json").read_text())["status"] == "completed"


@pytest.mark.parametrize("script", ["train.sbatch", "train_srun.sbatch"])
def test_usr1_checkpoints_requeues_and_resumes_exactly(cluster, reference, tmp_path, tok_cache, script):
    """`scancel --signal=USR1 --batch` (what --signal=B:USR1@secs sends before a time
    limit): the script forwards it to the trainer, which saves and exits 3; the script
    requeues the job (same id, same run dir), and the second start resumes from the
    checkpoint and ends with the uninterrupted run's losses."""
    opts = ["--ntasks-per-node", "2", "--cpus-per-task", "1"] if script == "train_srun.sbatch" else []
    job = sbatch(cluster, script, job_overrides(tok_cache), tmp_path,
                 env={"NPROC_PER_NODE": "2"}, sbatch_opts=opts)
    run = tmp_path / f"pretrain-{job}"

    def steps():
        try:
            return [m["step"] for m in read_metrics(run)]
        except (FileNotFoundError, json.JSONDecodeError):
            return []

    end = time.monotonic() + 240
    while max(steps(), default=0) < 5:
        assert time.monotonic() < end, job_output(tmp_path, job)[-4000:]
        time.sleep(0.05)
    subprocess.run(["scancel", "--signal=USR1", "--batch", str(job)], env=cluster.env, check=True)
    info = wait_job(cluster, job, timeout=360, cond=lambda i: i["JobState"] == "COMPLETED")
    out = job_output(tmp_path, job)
    assert info["Restarts"] == "1", out[-4000:]
    if script == "train_srun.sbatch":  # srun tasks, no torchrun: the entry point read SLURM_*
        assert "world 2 (slurm)" in out
    assert "SIGUSR1 received, forwarding" in out and "requeueing job" in out and "resumed from step" in out
    stopped = int(re.search(r"stopping at step (\d+)", out).group(1))
    assert 5 <= stopped < STEPS  # it really stopped mid-run
    # The last record of each step (steps after the checkpoint appear once per start).
    assert {m["step"]: m["loss"] for m in read_metrics(run)} == dict(enumerate(reference, start=1))
    assert json.loads((run / "status.json").read_text())["status"] == "completed"


def test_hydra_sweep_on_slurm_launcher(cluster, tmp_path, tok_cache):
    """`-m optim.lr=a,b hydra/launcher=slurm`: a job array whose points are 2-process runs,
    each in its own job dir; the summary command prints both."""
    sweep = tmp_path / "sweep"
    args = ["-m", *TINY, f"data.tokenizer.cache_dir={tok_cache}", "train.local_batch_size=2", "logging.every=1",
            "optim.lr=1e-3,3e-3", "hydra/launcher=slurm", "hydra.launcher.tasks_per_node=2",
            "hydra.launcher.cpus_per_task=1", f"hydra.sweep.dir={sweep}"]
    p = subprocess.run([sys.executable, "-m", "pretrain", *args], cwd=REPO, env=cluster.env, capture_output=True,
                       text=True, timeout=600)
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    finals = {}
    for num in (0, 1):
        job_dir = sweep / str(num)
        recs = read_metrics(job_dir)
        assert [m["step"] for m in recs] == [1, 2, 3, 4, 5]
        assert "world 2 (slurm)" in (job_dir / "pretrain.log").read_text()
        lr = [o for o in (job_dir / ".hydra" / "overrides.yaml").read_text().split() if "optim.lr" in o]
        finals[lr[0]] = recs[-1]["loss"]
    assert len(set(finals.values())) == 2, finals  # different learning rates, different curves
    assert len(list((sweep / ".submitit").glob("*_0"))) == 1  # one array, task 0 and task 1
    s = subprocess.run([sys.executable, "-m", "pretrain.sweep_summary", str(sweep)], cwd=REPO, capture_output=True,
                       text=True)
    assert s.returncode == 0, s.stdout + s.stderr
    for lr, loss in finals.items():
        line = next(ln for ln in s.stdout.splitlines() if lr.split("=")[1] in ln)
        assert f"{loss:.4f}" in line and "completed" in line, s.stdout
    print(s.stdout)
