"""Layout-invariant weight init and gradient clipping over sharded (DTensor) params."""
from __future__ import annotations

from typing import Callable, Iterable

import torch
import torch.distributed as dist
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
def settle_grads(params: Iterable[torch.nn.Parameter]) -> int:
    """Lays every DTensor gradient out like its parameter. Under TP a replicated
    parameter's gradient can come out of backward as a partial sum (the LoRA halves
    that are replicated, SP's norms): reduced here once, rather than by every later read
    (the norm, each optimizer op). Returns how many were reduced."""
    n = 0
    for p in params:
        g = p.grad
        if isinstance(g, DTensor) and g.placements != p.placements:
            p.grad = g.redistribute(p.device_mesh, p.placements)
            n += 1
    return n


@torch.no_grad()
def clip_grad_norm_(params: Iterable[torch.nn.Parameter], max_norm: float, *, skip=frozenset(),
                    group=None) -> torch.Tensor:
    """Global L2 norm of all gradients across every rank and shard; when ``max_norm`` > 0
    every gradient is scaled by ``min(1, max_norm / (norm + 1e-6))``, the coefficient of
    ``torch.nn.utils.clip_grad_norm_``. Returns the norm before clipping, as a plain tensor.

    Gradients come in kinds that cannot be stacked together (plain tensors, DTensors on
    the FSDP mesh, on the TP mesh, on both): the norm is taken per kind (one reduction
    each), then combined. A plain or replicated gradient counts once. ``group``: ranks
    holding other parameters (pipeline stages), whose squared norms are added;
    ``skip``: ids of parameters left out of the norm (a second copy of a tied
    embedding), still clipped. Scaling is elementwise, so each rank scales its local
    shards in place; the coefficient stays a device tensor (no host sync)."""
    kinds: dict = {}  # (mesh, placements) or None -> [(grad, counted in the norm)]
    for p in params:
        g = p.grad
        if g is not None:
            key = (g.device_mesh, tuple(g.placements)) if isinstance(g, DTensor) else None
            kinds.setdefault(key, []).append((g, id(p) not in skip))
    norms = []
    for members in kinds.values():
        counted = [g for g, c in members if c]
        if counted:
            n = torch.nn.utils.get_total_norm(counted, norm_type=2.0)
            norms.append(n.full_tensor() if isinstance(n, DTensor) else n)
    device = next(iter(kinds.values()))[0][0].device if kinds else torch.device("cpu")
    if len(norms) == 1 and group is None:
        total = norms[0]  # one kind: exactly torch's norm (no square and root)
    else:
        total_sq = torch.stack([n ** 2 for n in norms]).sum() if norms else torch.zeros((), device=device)
        if group is not None:
            total_sq = total_sq.clone()
            dist.all_reduce(total_sq, group=group)
        total = total_sq.sqrt()
    if max_norm > 0 and kinds:
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        by_device: dict = {}
        for members in kinds.values():
            for g, _ in members:
                local = g.to_local() if isinstance(g, DTensor) else g
                by_device.setdefault((local.device, local.dtype), []).append(local)
        for (dev, _), grads in by_device.items():
            torch._foreach_mul_(grads, coef.to(dev))
    return total
