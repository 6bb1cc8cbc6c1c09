"""Who am I in the job: rank, world size, local rank and rendezvous address, read from
torchrun's variables or from SLURM's (srun tasks), or a lone process."""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import List, Mapping, Optional


@dataclass(frozen=True)
class LaunchEnv:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str
    master_port: int
    launcher: str  # single | torchrun | slurm


def expand_hostlist(spec: str) -> List[str]:
    """Expand SLURM's compressed host lists: ``node[01-03,07],gpu-a[1-2]-x`` ->
    node01 node02 node03 node07 gpu-a1-x gpu-a2-x. Zero padding is kept."""
    hosts: List[str] = []
    for item in _split_top_level(spec.strip()):
        hosts.extend(_expand_one(item))
    return hosts


def _split_top_level(spec: str) -> List[str]:
    parts, depth, cur = [], 0, []
    for ch in spec:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"unbalanced ']' in host list {spec!r}")
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if depth:
        raise ValueError(f"unbalanced '[' in host list {spec!r}")
    parts.append("".join(cur))
    return [p for p in parts if p]


def _expand_one(item: str) -> List[str]:
    m = re.search(r"\[([^\]]*)\]", item)
    if not m:
        return [item]
    prefix, suffix = item[: m.start()], item[m.end():]
    out = []
    for rng in m.group(1).split(","):
        if "-" in rng:
            lo, hi = rng.split("-", 1)
            if not (lo.isdigit() and hi.isdigit()) or int(lo) > int(hi):
                raise ValueError(f"bad range {rng!r} in host list item {item!r}")
            width = len(lo)
            values = [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
        else:
            values = [rng]
        for v in values:
            out.extend(_expand_one(prefix + v + suffix))
    return out


def _slurm_port(job_id: Optional[str]) -> int:
    # Deterministic per job so every task agrees without talking; away from the
    # ephemeral range, and distinct for neighbouring job ids on one node.
    return 20000 + (int(job_id) % 10000 if job_id and job_id.isdigit() else 0)


def detect_launch_env(environ: Optional[Mapping[str, str]] = None) -> LaunchEnv:
    """torchrun (RANK/WORLD_SIZE set) wins over SLURM, so torchrun inside srun works;
    SLURM task mode needs SLURM_STEP_NUM_TASKS, which srun sets and a batch script
    itself does not, so a plain `python` inside an sbatch script stays single."""
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        world = int(env["WORLD_SIZE"])
        return LaunchEnv(
            rank=int(env["RANK"]),
            world_size=world,
            local_rank=int(env.get("LOCAL_RANK", 0)),
            local_world_size=int(env.get("LOCAL_WORLD_SIZE", world)),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=int(env.get("MASTER_PORT", 29500)),
            launcher="torchrun",
        )
    if "SLURM_STEP_NUM_TASKS" in env and "SLURM_PROCID" in env:
        world = int(env["SLURM_STEP_NUM_TASKS"])
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or "127.0.0.1"
        hosts = expand_hostlist(nodelist)
        tasks_per_node = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE", "")
        local_world = _first_tasks_per_node(tasks_per_node) or max(1, world // max(1, len(hosts)))
        return LaunchEnv(
            rank=int(env["SLURM_PROCID"]),
            world_size=world,
            local_rank=int(env.get("SLURM_LOCALID", 0)),
            local_world_size=local_world,
            master_addr=env.get("MASTER_ADDR", hosts[0]),
            master_port=int(env.get("MASTER_PORT", _slurm_port(env.get("SLURM_JOB_ID")))),
            launcher="slurm",
        )
    if "SUBMITIT_LOCAL_GLOBALID" in env and "SUBMITIT_LOCAL_NTASKS" in env:
        # hydra/launcher=local: submitit's local executor starts the point's tasks itself.
        world = int(env["SUBMITIT_LOCAL_NTASKS"])
        return LaunchEnv(
            rank=int(env["SUBMITIT_LOCAL_GLOBALID"]),
            world_size=world,
            local_rank=int(env.get("SUBMITIT_LOCAL_LOCALID", 0)),
            local_world_size=world,
            master_addr="127.0.0.1",
            master_port=int(env.get("MASTER_PORT", _slurm_port(env.get("SUBMITIT_LOCAL_JOB_ID")))),
            launcher="submitit_local",
        )
    return LaunchEnv(0, 1, 0, 1, "127.0.0.1", 0, "single")


def _first_tasks_per_node(spec: str) -> Optional[int]:
    # "2(x3),1" -> 2 : tasks on the first node (the usual homogeneous case).
    m = re.match(r"^(\d+)", spec or "")
    return int(m.group(1)) if m else None
