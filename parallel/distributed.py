"""Process-group start-up and teardown, device choice, and the few collectives the
trainer needs (scalar reductions, object broadcast)."""
from __future__ import annotations

import os
from datetime import timedelta
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from .dims import DIM_NAMES, FSDP_SHARD, ParallelDims
from .env import LaunchEnv


def pick_device(requested: str, env: LaunchEnv) -> torch.device:
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("train.device=cuda but no CUDA device is visible")
        torch.cuda.set_device(env.local_rank % torch.cuda.device_count())
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


_TIMEOUT = timedelta(seconds=600)  # parallel.timeout_s, for every group made after init


def group_timeout() -> timedelta:
    """The timeout the world group was made with (``parallel.timeout_s``): new groups take it too."""
    return _TIMEOUT


def init_distributed(env: LaunchEnv, device: torch.device, timeout_s: float = 600) -> None:
    """gloo on CPU, nccl on CUDA; nothing for a single process. ``timeout_s``
    (``parallel.timeout_s``): how long any collective of the world group, and of every
    group made later through this module's timeout, may wait."""
    global _TIMEOUT
    _TIMEOUT = timeout = timedelta(seconds=timeout_s)
    if env.world_size == 1:
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    common = dict(backend=backend, rank=env.rank, world_size=env.world_size, timeout=timeout,
                  device_id=device if device.type == "cuda" else None)
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == str(True):
        # torchrun's agent hosts the store, and its static rendezvous keeps the same store
        # across `--max-restarts` attempts: the next attempt would read the failed one's
        # keys (peer addresses of dead workers: connection refused, or a hang). Scope every
        # key by the attempt.
        store = dist.TCPStore(env.master_addr, env.master_port, env.world_size, is_master=False, timeout=timeout)
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        dist.init_process_group(store=dist.PrefixStore(f"pretrain/attempt-{attempt}", store), **common)
    else:
        # srun tasks and other launchers: rank 0 hosts the store.
        dist.init_process_group(init_method=f"tcp://{env.master_addr}:{env.master_port}", **common)


_HOST_GROUP = None  # gloo group for small host-side collectives when training uses nccl


def shutdown_distributed() -> None:
    global _HOST_GROUP
    _HOST_GROUP = None
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def host_all_reduce(values: torch.Tensor, op=None) -> torch.Tensor:
    """All-reduce a small CPU tensor without touching the accelerator: per-step control
    flags must not force a device synchronization. Uses a gloo group beside nccl."""
    global _HOST_GROUP
    if not dist.is_initialized():
        return values
    group = None
    if dist.get_backend() != "gloo":
        if _HOST_GROUP is None:
            _HOST_GROUP = dist.new_group(backend="gloo", timeout=_TIMEOUT)
        group = _HOST_GROUP
    values = values.clone()
    dist.all_reduce(values, op=op if op is not None else dist.ReduceOp.SUM, group=group)
    return values


def build_device_mesh(dims: ParallelDims, device: torch.device) -> Optional[DeviceMesh]:
    """The mesh of ``DIM_NAMES`` (pp, dp_replicate, dp_shard, cp, tp; tp fastest), plus the
    flattened ``dp_shard_cp`` FSDP2 shards over; None for one process."""
    if dims.world_size == 1:
        return None
    names = DIM_NAMES
    options = _group_options(device)  # every dimension's groups wait parallel.timeout_s
    mesh = init_device_mesh(device.type, tuple(dims.degrees.values()), mesh_dim_names=names,
                            backend_override={n: options for n in names})
    mesh["dp_shard", "cp"]._flatten(FSDP_SHARD, backend_override=options)
    return mesh


def _group_options(device: torch.device):
    """(backend: the world group's, options carrying ``parallel.timeout_s``) for the mesh's
    groups. Without them torch makes a group smaller than the world with its backend's
    default (gloo 30 min, nccl 10 min); tests/timeout_worker.py reads every group back."""
    if device.type == "cuda":
        from torch.distributed import ProcessGroupNCCL

        opts = ProcessGroupNCCL.Options()
        opts.is_high_priority_stream = False
    else:
        from torch._C._distributed_c10d import Backend

        opts = Backend.Options("gloo", _TIMEOUT)
    opts._timeout = _TIMEOUT
    return None, opts


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        values = values.clone()
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def all_reduce_max(values: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        values = values.clone()
        dist.all_reduce(values, op=dist.ReduceOp.MAX)
    return values


def broadcast_object(obj: Any, src: int = 0) -> Any:
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj: Any) -> list:
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0
