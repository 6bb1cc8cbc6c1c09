"""Run under torchrun (2 processes, gloo): the tiny Llama under FSDP2 with
``parallel.reshard_after_forward`` true and false. A hook on the root, after the whole
forward, records what each block's parameters are at that moment: sharded DTensors
(resharded after its forward) or full plain tensors (kept gathered for backward); then
backward runs. Prints one JSON line per setting (rank 0)."""
from __future__ import annotations

import json
import os

import torch
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

from parallel import distributed as pdist
from parallel.config import ParallelConfig
from parallel.dims import ParallelDims
from parallel.env import detect_launch_env
from parallel.init import shard_aware_init
from parallel.parallelize import parallelize
from pretrain.model.llama import LAYOUT, build_llama, seeded_trunc_normal_
from pretrain.model.llama.args import LlamaArgs

ARGS = LlamaArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden_dim=128, vocab_size=256)
SEQ = 16


def after_forward(reshard: bool) -> dict:
    dims = ParallelDims(dp_replicate=1, dp_shard=2, tp=1, pp=1, world_size=2)
    mesh = pdist.build_device_mesh(dims, torch.device("cpu"))
    model = build_llama(ARGS, rope_cache_len=SEQ, device="meta")
    parallelize(model, LAYOUT, mesh, dims, ParallelConfig(reshard_after_forward=reshard),
                param_dtype=torch.float32, reduce_dtype=torch.float32)
    model.to_empty(device="cpu")
    model.init_weights(init_fn=shard_aware_init(lambda t, std, fqn: seeded_trunc_normal_(t, std, fqn, 0)))
    seen = {}

    def look(module, args, output):
        for i, block in enumerate(LAYOUT.block_list(module)):
            kinds = {"sharded" if isinstance(p, DTensor) else "full" for p in block.parameters()}
            shapes = sorted({tuple(p.shape) if not isinstance(p, DTensor) else tuple(p.to_local().shape)
                             for p in block.parameters()})
            seen[f"block{i}"] = {"kinds": sorted(kinds), "local_shapes": shapes}

    model.register_forward_hook(look)
    tokens = torch.randint(0, ARGS.vocab_size, (2, SEQ + 1), generator=torch.Generator().manual_seed(0))
    F.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten()).backward()
    return seen


def main():
    env = detect_launch_env()
    torch.set_num_threads(1)
    pdist.init_distributed(env, torch.device("cpu"))
    for reshard in (True, False):
        seen = after_forward(reshard)
        if env.rank == 0:
            print(json.dumps({"reshard_after_forward": reshard, "blocks": seen}), flush=True)
    pdist.shutdown_distributed()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
