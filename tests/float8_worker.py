"""Run under torchrun (2 processes, gloo): the tiny Llama trains ``STEPS`` steps with
``train.float8`` through the trainer's own ``build_model`` + ``TrainStep`` under

- ``tpnosp_tensorwise``: TP 2 with torchao's float8 TP styles (no sequence parallel: its
  float8 all-gathers need a backend with float8 dtypes, which gloo lacks);
- ``tp2_tensorwise``: TP 2 + sequence parallel, on gloo under torch's own styles;
- ``tp2_rowwise``: TP 2 + sequence parallel, rowwise float8 under torch's own styles;
- ``fsdp2_tensorwise``: FSDP2 over 2 ranks with the float8 weight all-gather and the
  per-step scale precompute (``parallel/float8.py``);
- ``fsdp2_tensorwise_hp_gather``: the same, the weights all-gathered in high precision.

TP ranks take the whole batch, FSDP ranks half of it each (rows r::2). Prints one JSON line
per layout (rank 0): the losses (FSDP: the mean over the ranks) and what the modules
became (float8 linears, float8-cast weight parameters)."""
from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist

import parallel.float8 as f8
from parallel.config import ParallelConfig
from parallel.dims import ParallelDims
from pretrain.build import build_model
from pretrain.config import FinetuneConfig, JobConfig, OptimConfig, TrainConfig
from pretrain.model.llama.args import LlamaArgs
from pretrain.optim import OptimizerParts, build_optimizer
from pretrain.step import TrainStep

ARGS = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden_dim=128, vocab_size=512,
            max_position_embeddings=4096)
STEPS, SEQ, BATCH, LR = 5, 64, 8, 3e-3


def data() -> torch.Tensor:
    """The fixed global batch (BATCH, SEQ + 1): tokens from the first 64 ids, so the loss falls."""
    return torch.randint(0, 64, (BATCH, SEQ + 1), generator=torch.Generator().manual_seed(1))


def train(recipe: str, dims: ParallelDims, rows: slice = slice(None), steps: int = STEPS, sp: bool = True,
          **model):
    """Losses of ``steps`` steps (local: this rank's rows) and the built model (``model``:
    fields of LlamaArgs that differ from ARGS)."""
    args = LlamaArgs(**{**ARGS, **model})
    pc = ParallelConfig(sequence_parallel=sp)
    cfg = JobConfig(model=args, parallel=pc, train=TrainConfig(seq_len=SEQ, seed=0, float8=recipe,
                                                               mixed_precision="fp32"),
                    optim=OptimConfig(lr=LR, warmup_steps=0), finetune=FinetuneConfig())
    built = build_model(cfg, dims, torch.device("cpu"))
    model = built.parts[0]
    step = TrainStep(built.family, built.parts, OptimizerParts([build_optimizer(model, cfg.optim)]), dims=dims,
                     pc=pc, grad_accum_steps=1, max_norm=1.0, chat=False, device=torch.device("cpu"),
                     param_dtype=built.param_dtype, mesh=built.mesh, model_args=args)
    tokens = data()[rows]
    out = [step([{"input_ids": tokens[:, :-1], "labels": tokens[:, 1:]}], LR).loss_sum.item() for _ in range(steps)]
    return out, model


def float8_styled(model) -> int:
    """Linears split by torchao's float8 TP styles, read from their input hooks (closures
    over the style's ``_prepare_input_fn``)."""
    def qualnames(fn, depth=0):
        fn = getattr(fn, "func", fn)  # functools.partial
        out = [getattr(fn, "__qualname__", "")]
        for cell in (getattr(fn, "__closure__", None) or ()) if depth < 3 else ():
            try:
                out += qualnames(cell.cell_contents, depth + 1)
            except ValueError:  # an empty cell
                pass
        return out

    def styled(m) -> bool:
        names = [n for h in m._forward_pre_hooks.values() for n in qualnames(h)]
        return any(n.startswith(("Float8ColwiseParallel.", "Float8RowwiseParallel.")) for n in names)

    return sum(styled(m) for m in model.modules())


def main() -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    which = sys.argv[1:] or ["tpnosp_tensorwise", "tp2_tensorwise", "tp2_rowwise", "fsdp2_tensorwise",
                             "fsdp2_tensorwise_hp_gather"]
    for name in which:
        tp = name.startswith("tp")
        recipe = "rowwise" if "rowwise" in name else "tensorwise"
        dims = (ParallelDims(dp_replicate=1, dp_shard=1, tp=world, pp=1, world_size=world) if tp
                else ParallelDims(dp_replicate=1, dp_shard=world, tp=1, pp=1, world_size=world))
        original = f8.float8_config
        if name.endswith("hp_gather"):  # float8 compute, high-precision all-gather
            f8.float8_config = lambda recipe, fsdp: original(recipe, fsdp=False)
        try:
            losses, model = train(recipe, dims, slice(None) if tp else slice(rank, None, world), sp="nosp" not in name)
        finally:
            f8.float8_config = original
        if not tp:  # each rank's loss is the mean over its rows: the global mean is their mean
            t = torch.tensor(losses)
            dist.all_reduce(t)
            losses = (t / world).tolist()
        weights = [getattr(p, "_local_tensor", p) for p in model.parameters()]
        cast = sum(type(w).__name__ == "WeightWithDynamicFloat8CastTensor" for w in weights)
        # Set by parallel.float8.after_optimizer_step (torchao's precompute) after each step.
        precomputed = sum(getattr(w, "_precomputed_scale", None) is not None for w in weights)
        if rank == 0:
            print(json.dumps({"layout": name, "losses": losses, "float8_linears": f8.converted(model),
                              "float8_cast_weights": cast, "precomputed_scales": precomputed,
                              "float8_tp_styles": float8_styled(model)}), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
