"""Run under torchrun (2 processes, gloo): one backward of the tiny Llama on a fixed
batch under FSDP2, TP 2 (+SP) and PP 2 (1F1B, tied embeddings), then the trainer's
``clip_grad_norm_`` with a max_norm far below the norm. Every rank also computes the
same step on one process and clips it with ``torch.nn.utils.clip_grad_norm_``; the
gathered clipped gradients of each layout are compared with it. Prints one JSON line
per layout (rank 0): the norms and the worst gradient difference."""
from __future__ import annotations

import json
import os

import torch
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

from parallel import distributed as pdist
from parallel import pp as ppar
from parallel.dims import ParallelDims
from parallel.env import detect_launch_env
from parallel.init import clip_grad_norm_, settle_grads, shard_aware_init
from parallel.parallelize import parallelize
from pretrain.config import ParallelConfig
from pretrain.model.llama.args import LlamaArgs
from pretrain.model.llama import LAYOUT, build_llama, seeded_trunc_normal_

ARGS = LlamaArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden_dim=128, vocab_size=256)
SEQ, BATCH, MAX_NORM = 16, 4, 0.05
init = shard_aware_init(lambda t, std, fqn: seeded_trunc_normal_(t, std, fqn, 0))


def batch():
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, ARGS.vocab_size, (BATCH, SEQ + 1), generator=g)
    return tokens[:, :-1], tokens[:, 1:]


def loss_fn(logits, labels):
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten())


def full_grads(parts) -> dict:
    """name -> full clipped gradient, gathered from every rank and stage."""
    mine = {}
    for part in parts:
        for name, p in part.named_parameters():
            if p.grad is not None:
                g = p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
                mine[name] = g.detach().clone()
    out = {}
    for got in pdist.all_gather_object(mine):
        out.update(got)
    return out


def reference():
    model = build_llama(ARGS, rope_cache_len=SEQ, device="meta")
    model.to_empty(device="cpu")
    model.init_weights(init_fn=init)
    inputs, labels = batch()
    loss_fn(model(inputs), labels).backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM)
    return norm.item(), {n: p.grad.clone() for n, p in model.named_parameters()}


def run_layout(name, dims, pc, env):
    mesh = pdist.build_device_mesh(dims, torch.device("cpu"))
    inputs, labels = batch()
    skip, group, tied = set(), None, None
    if dims.pp > 1:
        stages = ppar.stage_ids(mesh["pp"].get_local_rank(), dims.pp, 1, "1f1b")
        parts = [ppar.build_stage(build_llama(ARGS, rope_cache_len=SEQ, device="meta"), LAYOUT, s, dims.pp) for s in stages]
    else:
        stages, parts = [0], [build_llama(ARGS, rope_cache_len=SEQ, device="meta")]
    for part in parts:
        parallelize(part, LAYOUT, mesh, dims, pc, param_dtype=torch.float32, reduce_dtype=torch.float32)
        part.to_empty(device="cpu")
        part.init_weights(init_fn=init)
    if dims.pp > 1:
        n_mb = 2
        runner = ppar.PipelineRunner(parts, stages, dims.pp, mesh, "1f1b", n_mb,
                                     lambda lg, lb: loss_fn(lg, lb) / n_mb, torch.device("cpu"))
        runner.step((inputs,), labels)
        tied = ppar.TiedEmbeddingSync(parts, LAYOUT, stages, dims.pp, mesh, dims.pp, 1, "1f1b")
        tied()
        if tied.duplicate is not None:
            skip = {id(tied.duplicate)}
        group = mesh["pp"].get_group()
    else:
        loss_fn(parts[0](inputs), labels).backward()
    params = [p for part in parts for p in part.parameters()]
    if dims.uses_tp:
        settle_grads(params)
    norm = clip_grad_norm_(params, MAX_NORM, skip=skip, group=group).item()
    return norm, full_grads(parts)


def main():
    env = detect_launch_env()
    torch.set_num_threads(1)
    pdist.init_distributed(env, torch.device("cpu"))
    ref_norm, ref = reference()
    layouts = {
        "fsdp2": (ParallelDims(1, 2, 1, 1, 2), ParallelConfig()),
        "tp2+sp": (ParallelDims(1, 1, 2, 1, 2), ParallelConfig(tp=2)),
        "pp2-1f1b": (ParallelDims(1, 1, 1, 2, 2), ParallelConfig(pp=2)),
    }
    for name, (dims, pc) in layouts.items():
        norm, grads = run_layout(name, dims, pc, env)
        worst = max((grads[k] - ref[k]).abs().max().item() for k in ref)
        scale = max(g.abs().max().item() for g in ref.values())
        clipped = sum(g.pow(2).sum() for k, g in grads.items()).sqrt().item()
        if env.rank == 0:
            print(json.dumps({"layout": name, "norm": norm, "ref_norm": ref_norm, "clipped_norm": clipped,
                              "max_abs_diff": worst, "max_abs_grad": scale,
                              "names": sorted(grads) == sorted(ref)}), flush=True)
    pdist.shutdown_distributed()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
