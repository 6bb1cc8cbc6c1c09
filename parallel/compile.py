"""torch.compile per transformer block, in place (``nn.Module.compile``: parameter names
are unchanged). Applied after TP and activation checkpointing, before FSDP2, so FSDP's
hooks stay outside the compiled region and every block reuses one compiled graph."""
from __future__ import annotations


def apply_compile(blocks) -> None:
    for block in blocks:
        block.compile(fullgraph=True)


def compiled_graphs() -> int:
    """Graphs torch.compile has built in this process so far (dynamo's own count)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])
