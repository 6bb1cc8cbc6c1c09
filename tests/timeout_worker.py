"""Run under torchrun (4 processes, gloo) with the timeout as argv[1]: the trainer's
process groups (the world group, the dp_shard, tp, pp and dp_replicate groups of a
dp_shard 2 x tp 2 and a pp 2 x dp_replicate 2 mesh, the async checkpoint writer's group)
and the timeout each carries. Prints one JSON
line (rank 0): group name -> seconds."""
from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist

from parallel import distributed as pdist
from parallel.dims import ParallelDims
from parallel.env import detect_launch_env
from pretrain.checkpoint import Checkpointer
from pretrain.config import CheckpointConfig

CPU = torch.device("cpu")


def seconds(group) -> float:
    return group._get_backend(CPU).options._timeout.total_seconds()


def main():
    env = detect_launch_env()
    pdist.init_distributed(env, CPU, timeout_s=float(sys.argv[1]))
    out = {"world": seconds(dist.distributed_c10d._get_default_group())}
    # Every group a 2-rank part of the 4: the case where torch would not pass the timeout on.
    for dims in (ParallelDims(dp_replicate=1, dp_shard=2, tp=2, pp=1, world_size=4), ParallelDims(dp_replicate=2, dp_shard=1, tp=1, pp=2, world_size=4)):
        mesh = pdist.build_device_mesh(dims, CPU)
        for name in mesh.mesh_dim_names:
            if mesh[name].size() > 1:
                out[f"mesh:{name}"] = seconds(mesh[name].get_group())
    with tempfile.TemporaryDirectory() as d:
        ckpt = Checkpointer(Path(d), CheckpointConfig(interval=1, async_save=True), rank=env.rank,
                            world_size=env.world_size)
        out["checkpoint writer"] = seconds(ckpt._pg)
    if env.rank == 0:
        print(json.dumps(out), flush=True)
    pdist.shutdown_distributed()


if __name__ == "__main__":
    main()
