"""Layout-invariant weight init and gradient clipping over sharded (DTensor) params."""
from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch.distributed.tensor import DTensor, distribute_tensor

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
    ``max_norm`` > 0. Returns the norm before clipping, as a plain tensor."""
    grads = [p.grad for p in params if p.grad is not None]
    total = torch.nn.utils.get_total_norm(grads, norm_type=2.0)
    if max_norm > 0:
        # Scaled with the norm in the grads' own kind (DTensor or not) to avoid mixing.
        torch.nn.utils.clip_grads_with_norm_(grads, max_norm, total)
    return total.full_tensor() if isinstance(total, DTensor) else total
