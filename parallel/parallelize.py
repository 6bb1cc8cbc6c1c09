"""``parallelize``: the one place that applies the layout to a meta-device model of any
family, in the order that works with FSDP2 (docs/architecture.md): float8 linears
(``train.float8``) -> the context-parallel attention core (and every core's kernel) -> TP/SP -> activation
checkpointing -> compile per block -> FSDP2 per block then the root. What is a block, which
linears split how, where the embedding and head are: the family's ``ModelLayout``
(``parallel/layout.py``). The caller materializes and inits after."""
from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from .ac import apply_activation_checkpointing, checkpointed_mode
from .compile import apply_compile
from .config import ParallelConfig
from .dims import ParallelDims
from .float8 import convert_float8, converted
from .fsdp import apply_fsdp
from .layout import ModelLayout
from .tp import apply_tp


def _own_output(module, args, output):
    return output.clone()


def parallelize(model: nn.Module, layout: ModelLayout, mesh: DeviceMesh, dims: ParallelDims, pc: ParallelConfig, *,
                param_dtype: torch.dtype, reduce_dtype: torch.dtype, float8: str = "none") -> nn.Module:
    """``pc``: the ``parallel`` config (sequence_parallel, loss_parallel,
    activation_checkpoint, ac_every_n, compile, reshard_after_forward, attention_kernel).
    ``float8``: ``train.float8``, the recipe the blocks' linears train with (none: as they are)."""
    if float8 != "none":
        convert_float8(model, layout, float8, fsdp=dims.uses_fsdp)
    blocks = layout.block_list(model)
    if dims.uses_cp:
        from .cp import apply_cp

        apply_cp(model, layout, mesh["cp"])
    set_attention_kernel(blocks, layout, pc.attention_kernel)
    if dims.uses_tp:
        frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
        apply_tp(model, layout, mesh["tp"], sequence_parallel=pc.sequence_parallel, loss_parallel=pc.loss_parallel,
                 float8=float8)
        # The TP styles re-wrap parameters they replicate (the norms under SequenceParallel
        # or none) as trainable: a frozen base (LoRA) must stay frozen.
        for name, p in model.named_parameters():
            if name in frozen:
                p.requires_grad_(False)
    apply_activation_checkpointing(blocks, pc.activation_checkpoint, pc.ac_every_n)
    if pc.compile:
        apply_compile(blocks)
        embedding = layout.part(model, layout.embedding)
        if dims.uses_tp and embedding is not None:
            # TP hands the first block the embedding's output as ``DTensor.to_local()``, a
            # view made inside an autograd Function. A compiled block whose input is that
            # view returns a gradient the Function's backward cannot take (torch 2.13:
            # "'Tensor' object has no attribute '_local_tensor'"); a copy (b x s/tp x dim,
            # once per step) gives the compiled graph an input of its own.
            embedding.register_forward_hook(_own_output)
    if dims.uses_fsdp:
        apply_fsdp(model, mesh, param_dtype=param_dtype, reduce_dtype=reduce_dtype,
                   reshard_after_forward=pc.reshard_after_forward, dims=dims.fsdp_dims, blocks=blocks)
    return model


def set_attention_kernel(blocks, layout: ModelLayout, kernel: str) -> int:
    """Every block's attention core (single-device or context-parallel) computes masked
    attention with ``kernel`` (``parallel.attention_kernel``); returns how many were set."""
    if layout.attention_core is None:
        return 0
    n = 0
    for block in blocks:
        core = layout.part(block, layout.attention_core)
        if core is not None:
            core.kernel = kernel
            n += 1
    return n


def describe_blocks(parts, layout: ModelLayout) -> str:
    """What the blocks of this rank's ``parts`` run under, read back from the modules (not
    from the config): how many are activation-checkpointed (by mode), compiled, FSDP2 units,
    and how many attention cores are context-parallel."""
    from torch.distributed.fsdp import FSDPModule

    blocks = [b for part in parts for b in layout.block_list(part)]
    modes = [checkpointed_mode(b) for b in blocks]
    ac = ", ".join(f"{m} {modes.count(m)}" for m in sorted(set(modes)) if m != "none") or "none"
    compiled = sum(getattr(b, "_compiled_call_impl", None) is not None for b in blocks)
    fsdp = sum(isinstance(b, FSDPModule) for b in blocks)
    from .cp import ContextParallelCore

    cp = sum(isinstance(m, ContextParallelCore) for b in blocks for m in b.modules())
    f8 = sum(converted(b) for b in blocks)
    linears = sum(isinstance(m, nn.Linear) for b in blocks for m in b.modules())
    return (f"{len(blocks)} blocks here: activation checkpointing {ac} | compiled {compiled} | "
            f"FSDP2 units {fsdp} | context-parallel cores {cp} | float8 linears {f8} of {linears}")
