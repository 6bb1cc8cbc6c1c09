"""Pipeline parallelism with ``torch.distributed.pipelining``.

The model is split by the layout's ``pipeline_blocks`` into ``pp x stages_per_rank``
stages of equal depth. A stage is the family's module with the other parts removed
(parameter names unchanged, so checkpoints and the name-seeded init are those of the whole
model): the first holds the layout's ``first_stage`` parts (Llama: the embedding), the
last its ``last_stage`` parts (the final norm and the head). What a stage returns is the
next stage's positional inputs: the hidden states, or a tuple the family declares
(hidden states plus what later stages need). Placement: loop style (stage s on pp
rank s mod pp) for gpipe, 1f1b, interleaved_1f1b and interleaved_zb; V style for zbv
(rank r holds stages r and 2*pp-1-r).

Tied embeddings: the last stage holds its own copy of the embedding matrix for the head
(same name, same init). After backward the two copies' gradients are summed (across the
first and last pp ranks of each data/context/tensor-parallel coordinate, or on one rank in V
style), so both get the same update and stay equal; the gradient norm counts the matrix
once.

Each stage is its own FSDP2 root; TP, activation checkpointing and compile apply to each
stage as to a whole model. The schedule splits every local batch into
``parallel.pp_microbatches`` micro-batches; each one's loss is the token mean divided by
the number of micro-batches (and gradient accumulation steps), so gradients equal the
unpipelined ones."""
from __future__ import annotations

from typing import Callable, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.pipelining import PipelineStage
from torch.distributed.pipelining.schedules import (Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B,
                                                    ScheduleInterleavedZeroBubble, ScheduleZBVZeroBubble)

from . import distributed as pdist
from .layout import ModelLayout

SINGLE = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}
MULTI = {"interleaved_1f1b": ScheduleInterleaved1F1B, "interleaved_zb": ScheduleInterleavedZeroBubble,
         "zbv": ScheduleZBVZeroBubble}


def stages_per_rank(schedule: str, requested: int) -> int:
    if schedule in SINGLE:
        return 1
    if schedule == "zbv":
        return 2
    return 2 if requested == -1 else requested


def stage_ids(pp_rank: int, pp: int, per_rank: int, schedule: str) -> List[int]:
    if schedule == "zbv":
        return [pp_rank, 2 * pp - 1 - pp_rank]
    return [pp_rank + i * pp for i in range(per_rank)]


def last_stage_rank(pp: int, per_rank: int, schedule: str) -> int:
    return 0 if schedule == "zbv" else (pp * per_rank - 1) % pp


def build_stage(model: nn.Module, layout: ModelLayout, stage: int, num_stages: int) -> nn.Module:
    """Cut a meta-device model down to ``stage``'s part, in place: its share of the
    layout's ``pipeline_blocks`` (keys kept), the first stage's parts only on the first,
    the last stage's only on the last. A tied head's last stage keeps the embedding."""
    blocks = layout.part(model, layout.pipeline_blocks)
    n = len(blocks)
    per = n // num_stages
    keep = set(list(blocks.keys())[stage * per:(stage + 1) * per])
    for key in list(blocks.keys()):
        if key not in keep:
            del blocks[key]
    first, last = stage == 0, stage == num_stages - 1
    tied = layout.is_tied(model)
    drop = [] if first else [p for p in layout.first_stage if not (last and tied and p == layout.embedding)]
    drop += [] if last else list(layout.last_stage)
    for path in drop:
        parent, _, name = path.rpartition(".")
        setattr(layout.part(model, parent) if parent else model, name, None)
    return model


class TiedEmbeddingSync:
    """Sums the gradients of the two embedding copies (first stage's, last stage's)."""

    def __init__(self, parts: List[nn.Module], layout: ModelLayout, ids: List[int], num_stages: int,
                 mesh: DeviceMesh, pp: int, per_rank: int, schedule: str):
        self.grads_of: List[nn.Parameter] = []
        self.duplicate: Optional[nn.Parameter] = None  # the copy the norm does not count
        for part, sid in zip(parts, ids):
            emb = layout.part(part, layout.embedding)
            if sid in (0, num_stages - 1) and emb is not None:
                self.grads_of.append(emb.weight)
                if sid == num_stages - 1 and sid != 0:
                    self.duplicate = emb.weight
        self.group = None
        last = last_stage_rank(pp, per_rank, schedule)
        if last != 0:
            grid = mesh.mesh.flatten(1)  # (pp, every other coordinate) global ranks, pp first
            me = dist.get_rank()
            for other in range(grid.shape[1]):  # groups are made by every rank, in the same order
                ranks = [int(grid[0, other]), int(grid[last, other])]
                g = dist.new_group(ranks=ranks, timeout=pdist.group_timeout())
                if me in ranks:
                    self.group = g

    def __call__(self) -> None:
        local = []
        for p in self.grads_of:
            g = p.grad
            if g is None:
                continue
            if hasattr(g, "placements") and g.placements != p.placements:
                # DTensor may leave an embedding's gradient replicated though the weight
                # is sharded: lay it out like the weight so both copies' shards match.
                g = p.grad = g.redistribute(p.device_mesh, p.placements)
            local.append(g.to_local() if hasattr(g, "to_local") else g)
        if len(local) == 2:  # both copies on this rank (V placement)
            total = local[0] + local[1]
            for g in local:
                g.copy_(total)
        elif len(local) == 1 and self.group is not None:
            dist.all_reduce(local[0], group=self.group)


    @torch.no_grad()
    def max_divergence(self) -> float:
        """Largest |difference| between the two copies of the tied embedding (0 when they
        stayed equal); every rank of the pair gets the value."""
        local = [p.to_local() if hasattr(p, "to_local") else p for p in self.grads_of]
        if len(local) == 2:
            return (local[0] - local[1]).abs().max().item()
        if len(local) == 1 and self.group is not None:
            total = local[0].clone()
            dist.all_reduce(total, group=self.group)
            dev = (total / 2 - local[0]).abs().max().reshape(1)
            dist.all_reduce(dev, op=dist.ReduceOp.MAX, group=self.group)
            return 2 * dev.item()
        return 0.0


class PipelineRunner:
    """One training micro-step through the schedule: forward and backward of all of this
    rank's stages for one local batch; returns the loss on the last stage's rank."""

    def __init__(self, parts: List[nn.Module], ids: List[int], num_stages: int, mesh: DeviceMesh, schedule: str,
                 n_microbatches: int, loss_fn: Callable, device: torch.device):
        group = mesh["pp"].get_group()
        self.stages = [PipelineStage(part, sid, num_stages, device, group=group) for part, sid in zip(parts, ids)]
        self.has_first = 0 in ids
        self.has_last = num_stages - 1 in ids
        if schedule in SINGLE:
            self.schedule = SINGLE[schedule](self.stages[0], n_microbatches=n_microbatches, loss_fn=loss_fn,
                                             scale_grads=False)
        else:
            self.schedule = MULTI[schedule](self.stages, n_microbatches=n_microbatches, loss_fn=loss_fn,
                                            scale_grads=False)

    def step(self, inputs: Tuple[torch.Tensor, ...], labels: torch.Tensor) -> Optional[torch.Tensor]:
        return self._run(self.schedule.step, inputs, labels)

    @torch.no_grad()
    def eval_step(self, inputs: Tuple[torch.Tensor, ...], labels: torch.Tensor) -> Optional[torch.Tensor]:
        """Forward only through the same schedule (validation)."""
        return self._run(self.schedule.eval, inputs, labels)

    def _run(self, run, inputs: Tuple[torch.Tensor, ...], labels: torch.Tensor) -> Optional[torch.Tensor]:
        """``run`` (the schedule's step or eval) over this rank's stages, ``inputs`` the
        first stage's positional inputs (split into micro-batches along dim 0): the summed
        micro-batch losses on the last stage's rank, None elsewhere."""
        losses: List[torch.Tensor] = []
        args = tuple(inputs) if self.has_first else ()
        run(*args, target=labels if self.has_last else None, losses=losses if self.has_last else None,
            return_outputs=False)
        if not self.has_last:
            return None
        return torch.stack([x.full_tensor() if hasattr(x, "full_tensor") else x for x in losses]).sum()
