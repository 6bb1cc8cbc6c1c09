"""Run under torchrun (2 processes, gloo): one backward of the tiny Llama on a fixed
batch under FSDP2, TP 2 (+SP) and PP 2 (1F1B, tied embeddings), and of a tiny Llama 3.2
Vision (every gate open, test images) under TP 2 (+SP), then the trainer's
``clip_grad_norm_`` with a max_norm far below the norm. Every rank also computes the
same step on one process and clips it with ``torch.nn.utils.clip_grad_norm_``; the
gathered clipped gradients of each layout are compared with it, each tensor against its
own largest entry too (a norm weight's gradient left unsummed over the sequence shards
is half the right one, yet a small part of the whole). Prints one JSON line per layout
(rank 0): the norms, the worst gradient difference and the worst tensor."""
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
from pretrain.model.mllama import LAYOUT as MLLAMA_LAYOUT
from pretrain.model.mllama.args import MllamaArgs
from tests import mllama_images

ARGS = LlamaArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden_dim=128, vocab_size=256)
VISION = MllamaArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden_dim=128, vocab_size=256,
                    cross_attention_layers=[1], vision_dim=32, vision_layers=2, vision_global_layers=1, vision_heads=2,
                    vision_ffn_hidden_dim=64, image_size=28, patch_size=14, max_num_tiles=2,
                    supported_aspect_ratios=[[1, 1], [1, 2], [2, 1]], intermediate_layers=[0])
SEQ, BATCH, MAX_NORM = 16, 4, 0.05
init = shard_aware_init(lambda t, std, fqn: seeded_trunc_normal_(t, std, fqn, 0))


def build(args):
    if isinstance(args, MllamaArgs):
        with torch.device("meta"):
            return mllama_images.OpenGates(args, rope_cache_len=SEQ)
    return build_llama(args, rope_cache_len=SEQ, device="meta")


def batch(args):
    """(the model's inputs, labels): tokens, and for the vision model its test images."""
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, args.vocab_size, (BATCH, SEQ + 1), generator=g)
    if isinstance(args, MllamaArgs):
        return mllama_images.inputs({"input_ids": tokens[:, :-1]}, torch.device("cpu"), args), tokens[:, 1:]
    return (tokens[:, :-1],), tokens[:, 1:]


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


def reference(args):
    model = build(args)
    model.to_empty(device="cpu")
    model.init_weights(init_fn=init)
    inputs, labels = batch(args)
    loss_fn(model(*inputs), labels).backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM)
    return norm.item(), {n: p.grad.clone() for n, p in model.named_parameters()}


def run_layout(args, layout, dims, pc):
    mesh = pdist.build_device_mesh(dims, torch.device("cpu"))
    inputs, labels = batch(args)
    skip, group, tied = set(), None, None
    if dims.pp > 1:
        stages = ppar.stage_ids(mesh["pp"].get_local_rank(), dims.pp, 1, "1f1b")
        parts = [ppar.build_stage(build(args), layout, s, dims.pp) for s in stages]
    else:
        stages, parts = [0], [build(args)]
    for part in parts:
        parallelize(part, layout, mesh, dims, pc, param_dtype=torch.float32, reduce_dtype=torch.float32)
        part.to_empty(device="cpu")
        part.init_weights(init_fn=init)
    if dims.pp > 1:
        n_mb = 2
        runner = ppar.PipelineRunner(parts, stages, dims.pp, mesh, "1f1b", n_mb,
                                     lambda lg, lb: loss_fn(lg, lb) / n_mb, torch.device("cpu"))
        runner.step(inputs, labels)
        tied = ppar.TiedEmbeddingSync(parts, layout, stages, dims.pp, mesh, dims.pp, 1, "1f1b")
        tied()
        if tied.duplicate is not None:
            skip = {id(tied.duplicate)}
        group = mesh["pp"].get_group()
    else:
        loss_fn(parts[0](*inputs), labels).backward()
    params = [p for part in parts for p in part.parameters()]
    if dims.uses_tp:
        settle_grads(params)
    norm = clip_grad_norm_(params, MAX_NORM, skip=skip, group=group).item()
    return norm, full_grads(parts)


def main():
    env = detect_launch_env()
    torch.set_num_threads(1)
    pdist.init_distributed(env, torch.device("cpu"))
    tp2 = (ParallelDims(dp_replicate=1, dp_shard=1, tp=2, pp=1, world_size=2), ParallelConfig(tp=2))
    layouts = {
        "fsdp2": (ARGS, LAYOUT, ParallelDims(dp_replicate=1, dp_shard=2, tp=1, pp=1, world_size=2), ParallelConfig()),
        "tp2+sp": (ARGS, LAYOUT, *tp2),
        "pp2-1f1b": (ARGS, LAYOUT, ParallelDims(dp_replicate=1, dp_shard=1, tp=1, pp=2, world_size=2), ParallelConfig(pp=2)),
        "mllama-tp2+sp": (VISION, MLLAMA_LAYOUT, *tp2),
    }
    refs = {}
    for name, (args, layout, dims, pc) in layouts.items():
        if id(args) not in refs:
            refs[id(args)] = reference(args)
        ref_norm, ref = refs[id(args)]
        norm, grads = run_layout(args, layout, dims, pc)
        worst = max((grads[k] - ref[k]).abs().max().item() for k in ref)
        scale = max(g.abs().max().item() for g in ref.values())
        # Each tensor against its own largest entry (gradients that are exactly 0, such as
        # a gate's whose branch sees nothing, against 0).
        per_tensor = {k: (grads[k] - ref[k]).abs().max().item() / max(ref[k].abs().max().item(), 1e-30)
                      for k in ref}
        worst_tensor = max(per_tensor, key=per_tensor.get)
        clipped = sum(g.pow(2).sum() for k, g in grads.items()).sqrt().item()
        if env.rank == 0:
            print(json.dumps({"layout": name, "norm": norm, "ref_norm": ref_norm, "clipped_norm": clipped,
                              "max_abs_diff": worst, "max_abs_grad": scale, "worst_tensor": worst_tensor,
                              "worst_tensor_rel": per_tensor[worst_tensor],
                              "norm_weights": sorted(k for k in ref if "norm" in k.rsplit(".", 2)[-2]),
                              "names": sorted(grads) == sorted(ref)}), flush=True)
    pdist.shutdown_distributed()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
