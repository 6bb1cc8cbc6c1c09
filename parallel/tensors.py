"""What the trainer needs to know about distributed tensors, without importing
``torch.distributed.tensor`` itself: whether a tensor is one, its full value, the
loss-parallel context and the seeding of tensor-parallel random numbers."""
from __future__ import annotations

from contextlib import nullcontext

import torch
from torch.distributed.tensor import DTensor


def is_distributed(t: torch.Tensor) -> bool:
    """True for a DTensor (sharded or replicated over a mesh)."""
    return isinstance(t, DTensor)


def full_value(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor: a DTensor's full value (a collective when sharded), else ``t``."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def local_values(tensors: list) -> list:
    """Each tensor's local part: a DTensor's shard on this rank, a plain tensor itself."""
    return [t.to_local() if isinstance(t, DTensor) else t for t in tensors]


def describe_layout(t: torch.Tensor) -> str:
    """How ``t`` is laid out: "full (shape)" for a plain tensor, or its placements over its
    mesh and the local shard's shape ("Shard(dim=2) over tp=2, local (4, 32, 128)")."""
    if not isinstance(t, DTensor):
        return f"full {tuple(t.shape)}"
    mesh = t.device_mesh
    over = " x ".join(f"{n}={s}" for n, s in zip(mesh.mesh_dim_names or ("mesh",) * mesh.ndim, mesh.shape))
    return f"{','.join(map(str, t.placements))} over {over}, local {tuple(t.to_local().shape)}"


def loss_context(loss_parallel: bool):
    """A context for the loss's forward and backward: cross-entropy over vocabulary-sharded
    logits (``parallel.loss_parallel``), or nothing."""
    if loss_parallel:
        from torch.distributed.tensor.parallel import loss_parallel as ctx

        return ctx()
    return nullcontext()


def seed_tensor_parallel_rng(seed: int, tp_mesh) -> None:
    """DTensor's RNG tracker (dropout on DTensor activations: LoRA), made now without the
    world broadcast its lazy creation runs, which would deadlock pipeline stages that
    reach their first random op at different times. Every rank passes the same seed."""
    from torch.distributed.tensor._random import manual_seed

    manual_seed(seed, tp_mesh)
