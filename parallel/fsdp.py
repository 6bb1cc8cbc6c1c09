"""FSDP2 (fully_shard) per block (the layout's ``blocks``) then the root, over dp_shard x cp
(context-parallel ranks hold the same parameters); HSDP when the mesh has a replicate dim
larger than one."""
from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard


def apply_fsdp(
    model: nn.Module,
    mesh: DeviceMesh,
    *,
    param_dtype: torch.dtype,
    reduce_dtype: torch.dtype,
    reshard_after_forward: bool,
    dims: tuple,
    blocks: list,
) -> nn.Module:
    """``dims``: the mesh dimensions to shard over (``ParallelDims.fsdp_dims``: dp_shard x cp,
    with dp_replicate first for HSDP)."""
    dp_mesh = mesh[dims] if len(dims) > 1 else mesh[dims[0]]
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    for i, block in enumerate(blocks):
        # The last block's params are needed at once by backward: keep them gathered.
        fully_shard(
            block,
            mesh=dp_mesh,
            mp_policy=mp,
            reshard_after_forward=reshard_after_forward and i < len(blocks) - 1,
        )
    # The root's own parameters (embedding, final norm, head) stay gathered from its forward
    # to the end of backward, which needs them first anyway (FSDP2's default for a root):
    # the chunked loss applies the head after the forward returned.
    fully_shard(model, mesh=dp_mesh, mp_policy=mp, reshard_after_forward=False)
    return model
