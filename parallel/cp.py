"""Context parallelism: each window is cut into 2 x cp equal chunks along the sequence and
context-parallel rank i holds chunks i and 2cp-1-i (head-tail load balancing: under a
causal mask the early chunks attend to little and the late ones to much, so each rank
gets one of each). Every layer works on the rank's tokens only, except attention: the
family's attention core (``ModelLayout.attention_core``) is swapped for
``ContextParallelCore``, which all-gathers K and V (and the document ids) along the
sequence from the CP ranks (the Llama 3 paper's approach; with grouped-query attention K/V
are a fraction of q), puts them back in window order and attends its queries to them
under a mask built from positions in the window and document ids, block by block
(``parallel/attention_core.py``). The all-gather's backward reduce-scatters dK/dV. Runs on
gloo and NCCL alike; torch's ring ``context_parallel`` covers only CUDA kernels.

The step splits every input the layout lists in ``sequence_inputs`` (and the labels) with
``split_sequence`` before the forward; positions are computed on the whole window first."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from torch.distributed._functional_collectives import all_gather_single, all_gather_single_autograd
from torch.distributed.device_mesh import DeviceMesh

from .attention_core import _tensor_key, attend
from .layout import ModelLayout


def chunk_ids(rank: int, cp: int):
    """The two chunks (of 2 x cp) that CP rank ``rank`` holds, in order."""
    return rank, 2 * cp - 1 - rank


def split_sequence(x: torch.Tensor, dim: int, rank: int, cp: int) -> torch.Tensor:
    """This rank's part of ``x`` along ``dim`` (whole windows): chunks i and 2cp-1-i, joined."""
    chunks = x.chunk(2 * cp, dim=dim)
    a, b = chunk_ids(rank, cp)
    return torch.cat([chunks[a], chunks[b]], dim=dim)


def local_positions(rank: int, cp: int, local_len: int, device) -> torch.Tensor:
    """(local_len,) the window positions of this rank's tokens."""
    c = local_len // 2
    a, b = chunk_ids(rank, cp)
    return torch.cat([torch.arange(a * c, (a + 1) * c, device=device), torch.arange(b * c, (b + 1) * c, device=device)])


def _window_order(x: torch.Tensor, cp: int) -> torch.Tensor:
    """Gathered ranks' parts (rank order along dim 1: chunks 0, 2cp-1, 1, 2cp-2, ...) put
    back in window order."""
    gathered = [c for r in range(cp) for c in chunk_ids(r, cp)]
    where = [gathered.index(g) for g in range(2 * cp)]
    shape = x.shape
    parts = x.reshape(shape[0], 2 * cp, shape[1] // (2 * cp), *shape[2:])
    return parts[:, where].reshape(shape)


class ContextParallelCore(nn.Module):
    """The attention core of one CP rank: its queries against every rank's keys.
    ``kernel`` picks the masked-attention kernel (``parallel.attention_kernel``; see
    ``attend``)."""

    kernel: str = "auto"

    def __init__(self, group, rank: int, cp: int):
        super().__init__()
        self.group, self.rank, self.cp = group, rank, cp

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                doc_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        k_all = _window_order(all_gather_single_autograd(k.contiguous(), gather_dim=1, group=self.group), self.cp)
        v_all = _window_order(all_gather_single_autograd(v.contiguous(), gather_dim=1, group=self.group), self.cp)
        doc_all = None if doc_ids is None else self._gathered_docs(doc_ids)
        q_index = self._positions(q.shape[1], q.device)
        return attend(q, k_all, v_all, q_index, doc_ids, doc_all, kernel=self.kernel)

    # Every layer's core sees the same document ids and window positions in a step: they are
    # made (and the ids gathered, one collective) once and shared by all the cores, so that
    # the flex block mask, cached on the identity of these tensors, is built once per step
    # too. Every rank of the cp group runs the same calls in the same order, so they agree
    # on each hit and miss (a miss is a collective).
    _shared_positions: dict = {}
    _shared_docs: list = []  # [(key of doc_ids, doc_ids, the gathered ids)], at most one

    def _positions(self, length: int, device) -> torch.Tensor:
        key = (self.rank, self.cp, length, str(device))
        if key not in self._shared_positions:
            self._shared_positions.clear()
            self._shared_positions[key] = local_positions(self.rank, self.cp, length, device)
        return self._shared_positions[key]

    def _gathered_docs(self, doc_ids: torch.Tensor) -> torch.Tensor:
        key = _tensor_key(doc_ids)
        if key and self._shared_docs and self._shared_docs[0][0] == (key, id(self.group)):
            return self._shared_docs[0][2]
        doc_all = _window_order(all_gather_single(doc_ids.contiguous(), gather_dim=1, group=self.group), self.cp)
        self._shared_docs[:] = [((key, id(self.group)), doc_ids, doc_all)] if key else []
        return doc_all

    def extra_repr(self) -> str:
        return f"rank {self.rank} of cp={self.cp}" + ("" if self.kernel == "auto" else f", kernel={self.kernel}")


def apply_cp(model: nn.Module, layout: ModelLayout, cp_mesh: DeviceMesh) -> int:
    """Swap every block's attention core for this rank's context-parallel one; returns how
    many were swapped."""
    if layout.attention_core is None:
        raise ValueError("the layout has no attention_core: this family cannot run context parallel")
    group, rank, cp = cp_mesh.get_group(), cp_mesh.get_local_rank(), cp_mesh.size()
    parent_path, _, name = layout.attention_core.rpartition(".")
    n = 0
    for block in layout.block_list(model):
        parent = block.get_submodule(parent_path) if parent_path else block
        if isinstance(getattr(parent, name, None), nn.Module):
            setattr(parent, name, ContextParallelCore(group, rank, cp))
            n += 1
    return n

