"""Layout-invariant weight init and gradient clipping over sharded (DTensor) params."""
from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch.distributed.tensor import DTensor, Replicate, distribute_tensor

InitFn = Callable[[torch.Tensor, float, str], None]


def shard_aware_init(init_fn: InitFn) -> InitFn:
    """Wrap a plain-tensor init so a sharded parameter gets exactly the slice of what the
    unsharded one would have: the full tensor is drawn (one parameter at a time) and each
    rank keeps its own shard. Init then depends on the seed, never on the layout."""

    def fn(t: torch.Tensor, std: float, fqn: str) -> None:
        if not isinstance(t, DTensor):
            init_fn(t, std, fqn)
            return
        local = t.to_local()
        full = torch.empty(t.shape, dtype=t.dtype, device=local.device)
        init_fn(full, std, fqn)
        # src_data_rank=None: every rank slices its own copy, no communication.
        mine = distribute_tensor(full, t.device_mesh, t.placements, src_data_rank=None).to_local()
        with torch.no_grad():
            local.copy_(mine)

    return fn


@torch.no_grad()
def clip_grad_norm_(params: Iterable[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
    """Global L2 norm of all gradients across every rank and shard; clips when
    ``max_norm`` > 0. Returns the norm before clipping, as a plain tensor.

    Gradients come in kinds that cannot be stacked together (plain tensors, DTensors on
    the FSDP mesh, on the TP mesh, on both): the norm is taken per kind (one reduction
    each), then combined. A plain or replicated gradient counts once."""
    grads = [p.grad for p in params if p.grad is not None]
    groups: dict = {}
    for g in grads:
        key = (g.device_mesh, tuple(g.placements)) if isinstance(g, DTensor) else None
        groups.setdefault(key, []).append(g)
    norms = []
    for group in groups.values():
        n = torch.nn.utils.get_total_norm(group, norm_type=2.0)
        norms.append(n.full_tensor() if isinstance(n, DTensor) else n)
    total = torch.linalg.vector_norm(torch.stack(norms)) if len(norms) > 1 else norms[0]
    if max_norm > 0:
        for key, group in groups.items():
            # Scale by the norm in the grads' own kind: DTensor and plain do not mix.
            norm = total if key is None else DTensor.from_local(total, key[0], [Replicate()] * key[0].ndim,
                                                                run_check=False)
            torch.nn.utils.clip_grads_with_norm_(group, max_norm, norm)
    return total
