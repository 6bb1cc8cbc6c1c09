"""Parallel degrees of a job, resolved and checked against the world size and the model
before any process group exists."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

PP_SCHEDULES = ("gpipe", "1f1b", "interleaved_1f1b", "interleaved_zb", "zbv")


class LayoutError(ValueError):
    """An impossible parallel layout; ``key`` names the config key at fault."""

    def __init__(self, key: str, value, expected: str):
        self.key, self.value, self.expected = key, value, expected
        super().__init__(f"{key}={value!r}: {expected}")


@dataclass(frozen=True)
class ParallelDims:
    dp_replicate: int
    dp_shard: int
    tp: int
    pp: int
    world_size: int

    @property
    def dp(self) -> int:
        return self.dp_replicate * self.dp_shard

    @property
    def uses_tp(self) -> bool:
        return self.tp > 1

    @property
    def uses_fsdp(self) -> bool:
        return self.world_size > 1 and self.dp > 1

    @property
    def replicas_per_dp_rank(self) -> int:
        """Ranks that see the same batches (the TP and PP ranks of one data-parallel
        coordinate): a count summed over the world is divided by this."""
        return self.tp * self.pp

    def dp_coordinates(self, rank: int) -> Tuple[int, int, bool]:
        """(dp rank, dp world, leader) of a global rank. The mesh is (pp, dp_replicate,
        dp_shard, tp), tp fastest: TP and PP ranks of one DP group run identical loaders,
        and one of them (the leader: tp 0 of the first stage) writes the loader state and
        the data audit."""
        dp_rank = (rank // self.tp) % self.dp
        leader = rank % self.tp == 0 and rank < self.dp * self.tp
        return dp_rank, self.dp, leader


def resolve_parallel_dims(
    *, dp_replicate: int, dp_shard: int, tp: int, pp: int, pp_schedule: str, world_size: int
) -> ParallelDims:
    for key, v in (("parallel.dp_replicate", dp_replicate), ("parallel.tp", tp), ("parallel.pp", pp)):
        if v < 1:
            raise LayoutError(key, v, "must be >= 1")
    if pp_schedule not in PP_SCHEDULES:
        raise LayoutError("parallel.pp_schedule", pp_schedule, f"one of {', '.join(PP_SCHEDULES)}")
    others = dp_replicate * tp * pp
    if dp_shard == -1:
        # Name the degree the user set that cannot fit, with the world size.
        for key, v in (("parallel.tp", tp), ("parallel.pp", pp), ("parallel.dp_replicate", dp_replicate)):
            if world_size % v:
                raise LayoutError(key, v, f"must divide the world size {world_size} (the number of processes)")
        if world_size % others:
            raise LayoutError(
                "parallel.tp", tp,
                f"dp_replicate*tp*pp = {dp_replicate}*{tp}*{pp} = {others} must divide the world size {world_size} "
                "(the number of processes)",
            )
        dp_shard = world_size // others
    elif dp_shard < 1:
        raise LayoutError("parallel.dp_shard", dp_shard, "must be >= 1, or -1 for the rest of the world size")
    product = dp_replicate * dp_shard * tp * pp
    if product != world_size:
        raise LayoutError(
            "parallel.dp_shard", dp_shard,
            f"dp_replicate*dp_shard*tp*pp = {dp_replicate}*{dp_shard}*{tp}*{pp} = {product} "
            f"must equal the world size {world_size}",
        )
    return ParallelDims(dp_replicate, dp_shard, tp, pp, world_size)
