"""Tensor parallelism (Megatron-style) and sequence parallelism, by the family's layout
(``parallel/layout.py``).

Per block, the plan's column-wise linears (Llama: q/k/v and w1/w3, so each rank holds
n_heads/tp query heads, n_kv_heads/tp kv heads and ffn/tp hidden units: GQA groups stay
on one rank) and row-wise ones (wo, w2). The embedding is sharded over the vocabulary;
the output head column-wise (a tied head reuses the vocabulary-sharded embedding). With
sequence parallel the residual stream between blocks and the plan's norms are sharded
along the sequence (all-gather before attention/MLP, reduce-scatter after); without it
they are replicated (all-reduce after).
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

from typing import Optional

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import (ColwiseParallel, PrepareModuleInput, PrepareModuleOutput,
                                               RowwiseParallel, SequenceParallel, parallelize_module)

from .float8 import is_float8
from .layout import BlockPlan, ModelLayout


def apply_tp(model: nn.Module, layout: ModelLayout, tp_mesh: DeviceMesh, *, sequence_parallel: bool,
             loss_parallel: bool, float8: str = "none") -> None:
    """``float8``: the ``train.float8`` recipe the blocks' linears were converted with
    (``parallel/float8.py``): under tensorwise their styles are torchao's float8 ones."""
    stream = Shard(1) if sequence_parallel else Replicate()  # layout of the residual stream
    logits = Shard(-1) if loss_parallel else Replicate()
    # A pipeline stage lacks some of these parts: plan only those it holds.
    top = {}
    if layout.part(model, layout.embedding) is not None:
        top[layout.embedding] = RowwiseParallel(input_layouts=Replicate(), output_layouts=stream)
    if sequence_parallel and layout.part(model, layout.norm) is not None:
        # A local output: the head takes it as the sequence shard it is, and a model that
        # returns its hidden states (the chunked loss) returns a plain tensor.
        top[layout.norm] = SequenceParallel(use_local_output=True)
    if layout.part(model, layout.head) is not None:
        top[layout.head] = ColwiseParallel(input_layouts=stream, output_layouts=logits,
                                           use_local_output=not loss_parallel)
    if top:
        parallelize_module(model, tp_mesh, top)
    tied = layout.part(model, layout.tied_head)
    if tied is not None:  # logits = h @ embedding^T, the embedding sharded over the vocabulary
        parallelize_module(tied, tp_mesh, PrepareModuleInput(
            input_layouts=(stream, None), desired_input_layouts=(Replicate(), None), use_local_output=False))
        parallelize_module(tied, tp_mesh, PrepareModuleOutput(
            output_layouts=Shard(-1), desired_output_layouts=logits, use_local_output=not loss_parallel))

    # torchao's float8 styles move float8 tensors through the sequence-parallel collectives
    # (forward all-gather, backward gradients); gloo has no float8 dtype ("Invalid scalar
    # type"), so on CPU with sequence parallel the float8 linears keep torch's styles (their
    # DTensor weights and inputs are cast after the collectives, scales still global).
    float8_styles = float8 == "tensorwise" and (tp_mesh.device_type == "cuda" or not sequence_parallel)
    for block in layout.block_list(model):
        bp = layout.block_plan(block)
        adapters = _detach_lora(block, bp)  # the TP styles would shard every child parameter like the weight
        parallelize_module(block, tp_mesh, _block_plan(bp, stream if bp.sequence_sharded else Replicate(),
                                                       sequence_parallel and bp.sequence_sharded,
                                                       block if float8_styles else None))
        _attach_lora(block, adapters, tp_mesh, bp)


def _block_plan(bp: BlockPlan, stream, sequence_parallel: bool, float8_block: Optional[nn.Module] = None) -> dict:
    """``float8_block``: the block, when its float8 linears take torchao's float8 styles
    (tensorwise): each float8 linear is split by Float8Colwise/RowwiseParallel (its input
    cast to float8 with a scale global over the shards), and under sequence parallel a
    stream input whose column-wise linears are all float8 is cast once, before its
    all-gather (PrepareFloat8ModuleInput: the gather moves float8 bytes)."""
    def f8(path: str) -> bool:
        return float8_block is not None and is_float8(float8_block.get_submodule(path))

    def prepare(path: str, n: int):
        inner = [c for c in bp.colwise if c.startswith(path + ".")]
        cls = (PrepareFloat8ModuleInput if sequence_parallel and inner and all(f8(c) for c in inner)
               else PrepareModuleInput)
        rest = (None,) * (n - 1)
        return cls(input_layouts=(stream,) + rest, desired_input_layouts=(Replicate(),) + rest)

    if float8_block is not None:
        from torchao.float8.float8_tensor_parallel import (Float8ColwiseParallel, Float8RowwiseParallel,
                                                           PrepareFloat8ModuleInput)
    else:
        Float8ColwiseParallel = Float8RowwiseParallel = PrepareFloat8ModuleInput = None
    plan = {
        **{path: prepare(path, n) for path, n in bp.stream_inputs},
        **{path: (Float8ColwiseParallel if f8(path) else ColwiseParallel)() for path in bp.colwise},
        **{path: (Float8RowwiseParallel if f8(path) else RowwiseParallel)(output_layouts=stream)
           for path in bp.rowwise},
        # A rank's heads are a shard of the heads dimension (2) of (batch, seq, heads, head_dim).
        **{path: SequenceParallel(sequence_dim=2, use_local_output=True) for path in bp.head_norms},
    }
    if sequence_parallel:
        plan.update({path: SequenceParallel() for path in bp.seq_norms})
        plan.update({path: SequenceParallel(use_local_output=True) for path in bp.seq_gates})
    return plan


def _detach_lora(block: nn.Module, bp: BlockPlan) -> dict:
    """Takes the adapters (and their dropout) off the block's linears: {linear path:
    (lora_a, lora_b, lora_dropout)}."""
    out = {}
    for path in (*bp.colwise, *bp.rowwise):
        linear = block.get_submodule(path)
        if "lora_a" in linear._modules:
            out[path] = tuple(linear._modules.pop(k) for k in ("lora_a", "lora_b", "lora_dropout"))
    return out


def _attach_lora(block: nn.Module, adapters: dict, tp_mesh: DeviceMesh, bp: BlockPlan) -> None:
    for path, (a, b, drop) in adapters.items():
        a_place, b_place = (Replicate(), Shard(0)) if path in bp.colwise else (Shard(1), Replicate())
        for child, place in ((a, a_place), (b, b_place)):
            w = child.weight
            child.weight = nn.Parameter(distribute_tensor(w, tp_mesh, [place]), requires_grad=w.requires_grad)
        linear = block.get_submodule(path)
        linear.lora_a, linear.lora_b, linear.lora_dropout = a, b, drop
