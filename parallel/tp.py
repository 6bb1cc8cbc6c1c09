"""Tensor parallelism (Megatron-style) and sequence parallelism for the Llama blocks.

Per block: q/k/v and w1/w3 column-wise (each rank holds n_heads/tp query heads,
n_kv_heads/tp kv heads and ffn/tp hidden units: GQA groups stay on one rank), wo and w2
row-wise. The embedding is sharded over the vocabulary; the output head column-wise (a
tied head reuses the vocabulary-sharded embedding). With sequence parallel the residual
stream between blocks and the RMSNorms are sharded along the sequence (all-gather before
attention/MLP, reduce-scatter after); without it they are replicated (all-reduce after).
``loss_parallel`` keeps the logits sharded over the vocabulary for the loss (the trainer
computes cross-entropy under ``torch.distributed.tensor.parallel.loss_parallel``).

LoRA adapters (``pretrain/lora.py``: ``lora_a``/``lora_b`` children of an adapted linear,
their update added by a forward hook that runs before the TP output hook) follow their
linear: on a column-wise linear A (r x in) is replicated and B (out x r) sharded like the
weight, so B A x is the local output shard; on a row-wise linear A is sharded over its
input like the weight and B replicated, so B A x is a partial sum reduced with the base
output. No extra communication in the forward. The gradients of the replicated halves
(A column-wise, B row-wise) stay partial sums until FSDP2 reduce-scatters them or, with
TP alone, until the clipping and optimizer read them (each read all-reduces them)."""
from __future__ import annotations

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import (ColwiseParallel, PrepareModuleInput, PrepareModuleOutput,
                                               RowwiseParallel, SequenceParallel, parallelize_module)


# A block's linears by how TP splits them (the LoRA adapters follow).
_COLWISE = ("attention.wq", "attention.wk", "attention.wv", "feed_forward.w1", "feed_forward.w3")
_ROWWISE = ("attention.wo", "feed_forward.w2")


def apply_tp(model: nn.Module, tp_mesh: DeviceMesh, *, sequence_parallel: bool, loss_parallel: bool) -> None:
    stream = Shard(1) if sequence_parallel else Replicate()  # layout of the residual stream
    logits = Shard(-1) if loss_parallel else Replicate()
    # A pipeline stage lacks some of these parts: plan only those it holds.
    top = {}
    if model.tok_embeddings is not None:
        top["tok_embeddings"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=stream)
    if sequence_parallel and model.norm is not None:
        top["norm"] = SequenceParallel()
    if model.output is not None:
        top["output"] = ColwiseParallel(input_layouts=stream, output_layouts=logits,
                                        use_local_output=not loss_parallel)
    if top:
        parallelize_module(model, tp_mesh, top)
    if model.tied_head is not None:  # logits = h @ embedding^T, the embedding sharded over the vocabulary
        parallelize_module(model.tied_head, tp_mesh, PrepareModuleInput(
            input_layouts=(stream, None), desired_input_layouts=(Replicate(), None), use_local_output=False))
        parallelize_module(model.tied_head, tp_mesh, PrepareModuleOutput(
            output_layouts=Shard(-1), desired_output_layouts=logits, use_local_output=not loss_parallel))

    for block in model.layers.values():
        adapters = _detach_lora(block)  # the TP styles would shard every child parameter like the weight
        plan = {
            # x, cos, sin, attn_mask: only x is sharded.
            "attention": PrepareModuleInput(input_layouts=(stream, None, None, None),
                                            desired_input_layouts=(Replicate(), None, None, None)),
            "feed_forward": PrepareModuleInput(input_layouts=(stream,), desired_input_layouts=(Replicate(),)),
            **{path: ColwiseParallel() for path in _COLWISE},
            **{path: RowwiseParallel(output_layouts=stream) for path in _ROWWISE},
        }
        if sequence_parallel:
            plan["attention_norm"] = SequenceParallel()
            plan["ffn_norm"] = SequenceParallel()
        parallelize_module(block, tp_mesh, plan)
        _attach_lora(block, adapters, tp_mesh)


def _detach_lora(block: nn.Module) -> dict:
    """Takes the adapters (and their dropout) off the block's linears: {linear path:
    (lora_a, lora_b, lora_dropout)}."""
    out = {}
    for path in (*_COLWISE, *_ROWWISE):
        linear = block.get_submodule(path)
        if "lora_a" in linear._modules:
            out[path] = tuple(linear._modules.pop(k) for k in ("lora_a", "lora_b", "lora_dropout"))
    return out


def _attach_lora(block: nn.Module, adapters: dict, tp_mesh: DeviceMesh) -> None:
    for path, (a, b, drop) in adapters.items():
        a_place, b_place = (Replicate(), Shard(0)) if path in _COLWISE else (Shard(1), Replicate())
        for child, place in ((a, a_place), (b, b_place)):
            w = child.weight
            child.weight = nn.Parameter(distribute_tensor(w, tp_mesh, [place]), requires_grad=w.requires_grad)
        linear = block.get_submodule(path)
        linear.lora_a, linear.lora_b, linear.lora_dropout = a, b, drop
