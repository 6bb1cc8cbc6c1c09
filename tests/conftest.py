"""Shared helpers: run real training jobs as subprocesses (single, torchrun, srun-like)
on a tiny Llama and the standard library's json package as corpus."""
from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

TINY = [
    "model.dim=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2",
    "model.ffn_hidden_dim=128", "model.vocab_size=512",
    "data.glob=json/*.py", "data.tokenizer.vocab_size=512",
    "train.seq_len=32", "train.steps=5", "optim.lr=1e-3", "optim.warmup_steps=2",
    "logging.tensorboard=false",
]


# Under pytest-xdist (make test: --dist loadfile) whole files go to the workers in
# collection order: the longest files first, so that no worker ends alone on one of them.
LONGEST_FIRST = ("test_parallel_parity.py", "test_checkpoint.py", "test_mllama_parallel.py", "test_lora.py",
                 "test_hostile.py", "test_slurm.py", "test_distributed.py", "test_eval.py", "test_demo.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: file order kept otherwise


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def tok_cache(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("tokenizers"))


@pytest.fixture(scope="session")
def shared_run(tmp_path_factory, tok_cache):
    """``shared_run(overrides, nproc=1, launcher="single")``: (run dir, process) of a job
    run once per session, for the tests that read the same reference run (its losses,
    checkpoints). Read-only: a test that resumes or damages a run makes its own."""
    cache: Dict[tuple, tuple] = {}

    def get(overrides: Sequence[str], nproc: int = 1, launcher: str = "single"):
        key = (tuple(overrides), nproc, launcher)
        if key not in cache:
            d = tmp_path_factory.mktemp("shared")
            cache[key] = (d, run_job(d, list(overrides), tok_cache=tok_cache, nproc=nproc, launcher=launcher))
        return cache[key]

    return get


# The single-process reference of the tiny model, global batch 4, a checkpoint at step 5
# (its final weights): test_distributed, test_parallel_parity.
SINGLE4 = ["train.local_batch_size=4", "checkpoint.interval=5", "logging.every=1"]
# FSDP2 over two torchrun processes, the same global batch: test_distributed, test_precision.
FSDP2 = (["train.local_batch_size=2"], 2, "torchrun")


def _env(extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "TORCHELASTIC_")) and k not in
           ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


def run_job(run_dir: Path, overrides: Sequence[str], *, tok_cache: str, nproc: int = 1,
            launcher: str = "single", check: bool = True, timeout: int = 300,
            tiny: bool = True, env: Optional[Dict[str, str]] = None) -> subprocess.CompletedProcess:
    """`env`: extra environment variables for the job (single and torchrun launchers)."""
    args = [*(TINY if tiny else []), f"data.tokenizer.cache_dir={tok_cache}", *overrides,
            f"hydra.run.dir={run_dir}"]
    if launcher == "single":
        cmd = [sys.executable, "-m", "pretrain", *args]
        proc = subprocess.run(cmd, cwd=REPO, env=_env(env), capture_output=True, text=True, timeout=timeout)
    elif launcher == "torchrun":
        cmd = [str(BIN / "torchrun"), "--nnodes", "1", "--nproc_per_node", str(nproc),
               "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
               "-m", "pretrain", *args]
        proc = subprocess.run(cmd, cwd=REPO, env=_env(env), capture_output=True, text=True, timeout=timeout)
    elif launcher == "srun":
        proc = _simulated_srun(args, nproc, timeout)
    else:
        raise ValueError(launcher)
    if check and proc.returncode != 0:
        raise AssertionError(f"job failed (rc={proc.returncode}):\nSTDOUT\n{proc.stdout[-4000:]}\n"
                             f"STDERR\n{proc.stderr[-6000:]}")
    return proc


def run_worker(script: str, *args: str, nproc: int = 2) -> List[dict]:
    """``tests/<script>`` under torchrun (``nproc`` gloo processes); the JSON lines it
    printed (rank 0's rows). Fails with the workers' stderr when it does not exit 0."""
    import json

    cmd = [str(BIN / "torchrun"), "--nnodes", "1", "--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), str(REPO / "tests" / script), *args]
    proc = subprocess.run(cmd, cwd=REPO, env=_env({"PYTHONPATH": str(REPO)}), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def _simulated_srun(args, nproc: int, timeout: int) -> subprocess.CompletedProcess:
    """What `srun --ntasks N` sets for each task, on one node; no torchrun involved."""
    port = free_port()
    procs = []
    for rank in range(nproc):
        env = _env({
            "SLURM_JOB_ID": "4242", "SLURM_STEP_ID": "0", "SLURM_PROCID": str(rank),
            "SLURM_LOCALID": str(rank), "SLURM_NODEID": "0", "SLURM_STEP_NUM_TASKS": str(nproc),
            "SLURM_NTASKS": str(nproc), "SLURM_STEP_NODELIST": "localhost",
            "SLURM_JOB_NODELIST": "localhost", "SLURM_STEP_TASKS_PER_NODE": str(nproc),
            "MASTER_PORT": str(port),
        })
        procs.append(subprocess.Popen([sys.executable, "-m", "pretrain", *args], cwd=REPO, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs, rc = [], 0
    for p in procs:
        o, e = p.communicate(timeout=timeout)
        outs.append((o, e))
        rc = rc or p.returncode
    return subprocess.CompletedProcess(procs[0].args, rc, "".join(o for o, _ in outs),
                                       "".join(e for _, e in outs))


def compose_job(*overrides: str):
    """The job config (dataclasses) that `python -m pretrain <overrides>` would get."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from pretrain.config import register_configs

    register_configs()
    with initialize_config_dir(str(REPO / "configs"), version_base="1.3"):
        return OmegaConf.to_object(compose("config", overrides=list(overrides)))


def read_metrics(run_dir: Path) -> List[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def losses(run_dir: Path) -> List[float]:
    return [m["loss"] for m in read_metrics(run_dir)]


def died_after(src: Path, dst: Path, step: int) -> Path:
    """A copy of run dir ``src`` as if its job had died right after saving ``step``: its
    later checkpoints and its metrics.jsonl left out (the resumed run writes its own)."""
    def later(folder, names):
        if Path(folder) == Path(src):
            return ["metrics.jsonl"]
        if Path(folder) == Path(src) / "checkpoints":
            return [n for n in names if re.fullmatch(r"step-\d+", n) and int(n[5:]) > step]
        return []

    shutil.copytree(src, dst, ignore=later)
    return dst
