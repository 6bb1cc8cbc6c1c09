"""Activation checkpointing per transformer block, applied in place (parameter names do
not change, so checkpoints and the name-seeded init are the same with and without it).

Modes: ``none``; ``full`` (every block keeps only its input and recomputes the rest in
backward); ``every_n`` (blocks 0, n, 2n, ... as in full, the others keep everything);
``selective_op`` (every block keeps the outputs of matmuls and attention, the expensive
ops, and recomputes the cheap elementwise ones: norms, RoPE, SiLU, products)."""
from __future__ import annotations

import torch
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from .config import AC_MODES  # declared beside its field

_aten = torch.ops.aten
# Outputs kept by selective_op: matrix products and attention (the costly recomputations).
SAVE_OPS = {
    _aten.mm.default, _aten.addmm.default, _aten.bmm.default, _aten.linear.default,
    _aten._scaled_dot_product_flash_attention.default,
    _aten._scaled_dot_product_efficient_attention.default,
    _aten._scaled_dot_product_cudnn_attention.default,
    _aten._scaled_dot_product_flash_attention_for_cpu.default,
    # Float8 training (parallel/float8.py): its matmuls, and the amax of each cast's scale
    # (a scalar for tensorwise, max; a row of them for rowwise, amax): small, and
    # recomputing one would read the whole tensor again.
    _aten._scaled_mm.default, _aten.max.default, _aten.amax.default,
}
# Flex attention (parallel/attention_core.py on CUDA) is a higher-order op.
_flex = getattr(torch.ops.higher_order, "flex_attention", None)
if _flex is not None:
    SAVE_OPS.add(_flex)


def _policy(ctx, op, *args, **kwargs):
    return CheckpointPolicy.MUST_SAVE if op in SAVE_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def _selective_context():
    return create_selective_checkpoint_contexts(_policy)


def _checkpointed(inner, selective: bool, preserve_rng: bool):
    def forward(*args, **kwargs):
        extra = {"context_fn": _selective_context} if selective else {}
        return checkpoint(inner, *args, use_reentrant=False, preserve_rng_state=preserve_rng, **extra, **kwargs)

    return forward


def apply_activation_checkpointing(blocks, mode: str, every_n: int = 2) -> int:
    """Wrap the forward of the chosen ``blocks``; returns how many were wrapped. A block
    that draws random numbers (LoRA dropout) recomputes with the RNG state of its
    forward, so backward sees the same dropout masks; the others skip that save."""
    if mode not in AC_MODES:
        raise ValueError(f"parallel.activation_checkpoint={mode!r}: expected one of {', '.join(AC_MODES)}")
    wrapped = 0
    for i, block in enumerate(blocks):
        if mode == "none" or (mode == "every_n" and i % every_n):
            continue
        random = any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in block.modules())
        block.forward = _checkpointed(block.forward, selective=(mode == "selective_op"), preserve_rng=random)
        block.forward.activation_checkpoint = mode  # what checkpointed_mode() reads back
        wrapped += 1
    return wrapped


def checkpointed_mode(block) -> str:
    """The activation-checkpointing mode this block's forward runs under ("none" if unwrapped)."""
    return getattr(block.__dict__.get("forward"), "activation_checkpoint", "none")


__all__ = ["AC_MODES", "apply_activation_checkpointing", "checkpointed_mode"]
