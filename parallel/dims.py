"""The parallel mesh of a job as one description: named dimensions with their degrees,
outermost first, from which every product, coordinate and check is derived. Resolved and
checked against the world size before any process group exists (``parallel/`` never
imports ``pretrain``: rules that need a model family live in ``pretrain/validate.py``).

The mesh is ``pp x dp_replicate x dp_shard x cp x tp`` in row-major order (tp fastest):
the ranks of a tensor-parallel group are neighbours (one node), then the context-parallel
ones. Two different sets of ranks see "the same data":

- ``batch_replicas``: the ranks that receive the same loader batch (the CP, TP and PP
  ranks of one data-parallel coordinate). Loader counts summed over the world are
  divided by this.
- ``loss_replicas``: the ranks that hold the same loss tokens (the TP and PP ranks of one
  (dp, cp) coordinate; CP ranks hold different slices of the sequence). Trained-token
  counts taken after the sequence split are divided by this.

FSDP2 shards parameters over ``dp_shard x cp`` (CP ranks hold different activations but
the same parameters) and averages gradients over ``grad_ranks`` = dp x cp."""
from __future__ import annotations

from dataclasses import dataclass
from math import prod
from typing import Dict, Optional, Tuple

PP_SCHEDULES = ("gpipe", "1f1b", "interleaved_1f1b", "interleaved_zb", "zbv")
CP_IMPLS = ("allgather", "ring")

# Outermost to innermost.
DIM_NAMES = ("pp", "dp_replicate", "dp_shard", "cp", "tp")
# The flattened dimension FSDP2 shards over (dp_shard x cp).
FSDP_SHARD = "dp_shard_cp"


class LayoutError(ValueError):
    """An impossible parallel layout; ``key`` names the config key at fault."""

    def __init__(self, key: str, value, expected: str):
        self.key, self.value, self.expected = key, value, expected
        super().__init__(f"{key}={value!r}: {expected}")


@dataclass(frozen=True, kw_only=True)
class ParallelDims:
    pp: int
    dp_replicate: int
    dp_shard: int
    cp: int = 1
    tp: int
    world_size: int

    @property
    def degrees(self) -> Dict[str, int]:
        """{dimension name: degree}, outermost first."""
        return {name: getattr(self, name) for name in DIM_NAMES}

    def size(self, *names: str) -> int:
        """The number of ranks spanned by the named dimensions."""
        return prod(getattr(self, n) for n in names)

    @property
    def dp(self) -> int:
        return self.size("dp_replicate", "dp_shard")

    @property
    def uses_tp(self) -> bool:
        return self.tp > 1

    @property
    def uses_cp(self) -> bool:
        return self.cp > 1

    @property
    def uses_fsdp(self) -> bool:
        """Parameters are sharded (and gradients averaged) over dp x cp ranks."""
        return self.world_size > 1 and self.grad_ranks > 1

    @property
    def grad_ranks(self) -> int:
        """Ranks whose gradients FSDP2 averages: the data-parallel and context-parallel ones."""
        return self.size("dp_replicate", "dp_shard", "cp")

    @property
    def fsdp_dims(self) -> Tuple[str, ...]:
        """The mesh dimensions FSDP2 runs on: (dp_replicate, dp_shard_cp) for HSDP."""
        return ("dp_replicate", FSDP_SHARD) if self.dp_replicate > 1 else (FSDP_SHARD,)

    @property
    def batch_replicas(self) -> int:
        """Ranks that receive the same loader batch (CP, TP and PP ranks of one DP rank)."""
        return self.size("pp", "cp", "tp")

    @property
    def loss_replicas(self) -> int:
        """Ranks that hold the same loss tokens (TP and PP ranks of one (dp, cp) coordinate)."""
        return self.size("pp", "tp")

    def coordinates(self, rank: int) -> Dict[str, int]:
        """{dimension: index} of a global rank in the row-major mesh."""
        out = {}
        for name in reversed(DIM_NAMES):
            degree = getattr(self, name)
            out[name] = rank % degree
            rank //= degree
        return {name: out[name] for name in DIM_NAMES}

    def dp_coordinates(self, rank: int) -> Tuple[int, int, bool]:
        """(dp rank, dp world, leader) of a global rank. The ranks of one data-parallel
        coordinate run identical loaders; one of them (the leader: the first of its pp,
        cp and tp coordinates) writes the loader state and the data audit."""
        c = self.coordinates(rank)
        dp_rank = c["dp_replicate"] * self.dp_shard + c["dp_shard"]
        leader = c["pp"] == 0 and c["cp"] == 0 and c["tp"] == 0
        return dp_rank, self.dp, leader


def resolve_parallel_dims(*, dp_replicate: int, dp_shard: int, tp: int, pp: int, pp_schedule: str, world_size: int,
                          cp: int = 1) -> ParallelDims:
    """The degrees, ``dp_shard=-1`` taking what the others leave of the world size;
    ``LayoutError`` naming the key when they cannot fit."""
    set_by_user = {"parallel.dp_replicate": dp_replicate, "parallel.cp": cp, "parallel.tp": tp, "parallel.pp": pp}
    for key, v in set_by_user.items():
        if v < 1:
            raise LayoutError(key, v, "must be >= 1")
    if pp_schedule not in PP_SCHEDULES:
        raise LayoutError("parallel.pp_schedule", pp_schedule, f"one of {', '.join(PP_SCHEDULES)}")
    others = prod(set_by_user.values())
    formula = "dp_replicate*cp*tp*pp = " + "*".join(str(set_by_user[f"parallel.{n}"])
                                                      for n in ("dp_replicate", "cp", "tp", "pp"))
    if dp_shard == -1:
        # Name the degree the user set that cannot fit, with the world size.
        for key, v in (("parallel.tp", tp), ("parallel.cp", cp), ("parallel.pp", pp),
                       ("parallel.dp_replicate", dp_replicate)):
            if world_size % v:
                raise LayoutError(key, v, f"must divide the world size {world_size} (the number of processes)")
        if world_size % others:
            # Name a degree the user raised (the product of several is at fault).
            key, v = next(((k, x) for k, x in set_by_user.items() if x > 1 and k != "parallel.dp_replicate"),
                          ("parallel.dp_replicate", dp_replicate))
            raise LayoutError(key, v, f"{formula} = {others} must divide the world size {world_size} "
                              "(the number of processes)")
        dp_shard = world_size // others
    elif dp_shard < 1:
        raise LayoutError("parallel.dp_shard", dp_shard, "must be >= 1, or -1 for the rest of the world size")
    product = others * dp_shard
    if product != world_size:
        raise LayoutError("parallel.dp_shard", dp_shard,
                          f"dp_replicate*dp_shard*cp*tp*pp = {dp_replicate}*{dp_shard}*{cp}*{tp}*{pp} = {product} "
                          f"must equal the world size {world_size}")
    return ParallelDims(pp=pp, dp_replicate=dp_replicate, dp_shard=dp_shard, cp=cp, tp=tp, world_size=world_size)


def sequence_problem(dims: ParallelDims, seq_len: int, sequence_parallel: bool) -> Optional[LayoutError]:
    """How ``train.seq_len`` must divide under this mesh: CP cuts each window into 2 x cp
    equal chunks (rank i holds chunks i and 2cp-1-i: head-tail load balancing of the
    causal mask), and sequence parallel splits a rank's part over the TP ranks."""
    if dims.cp > 1 and seq_len % (2 * dims.cp):
        return LayoutError("train.seq_len", seq_len,
                           f"must divide by 2 x parallel.cp = {2 * dims.cp} (each context-parallel rank holds "
                           "two equal chunks of every window)")
    local = seq_len // dims.cp
    if dims.tp > 1 and sequence_parallel and local % dims.tp:
        per = f"train.seq_len / parallel.cp = {local}" if dims.cp > 1 else f"train.seq_len={seq_len}"
        return LayoutError("train.seq_len", seq_len,
                           f"{per} must divide by parallel.tp={dims.tp} with parallel.sequence_parallel=true")
    return None
