"""``finetune.freeze``: whole towers of a model kept frozen while the rest trains (Mllama:
``[text]`` trains the vision encoder, projector and cross-attention layers on a fixed
language model, as Meta trained the adapter; ``[vision]`` the opposite). The family says
which tower each parameter belongs to (``ModelFamily.tower_of``)."""
from __future__ import annotations

from typing import List, Sequence

import torch
from torch import nn

from .model.family import ModelFamily


def apply_freeze(model: nn.Module, family: ModelFamily, args, towers: Sequence[str]) -> None:
    """Turns off the gradient of every parameter in ``towers``. Names are the whole
    model's (a pipeline stage keeps them)."""
    for name, p in model.named_parameters():
        if family.tower_of(args, name) in towers:
            p.requires_grad_(False)


def stages_with_nothing_to_train(family: ModelFamily, args, seq_len: int, towers: Sequence[str],
                                 num_stages: int) -> List[int]:
    """The pipeline stages (of ``num_stages``) whose parameters would all be frozen: their
    optimizer would have nothing to step. Built on the meta device (no memory)."""
    from parallel.pp import build_stage

    empty = []
    for s in range(num_stages):
        with torch.device("meta"):
            stage = build_stage(family.build(args, seq_len), family.layout, s, num_stages)
        apply_freeze(stage, family, args, towers)
        if not any(p.requires_grad for p in stage.parameters()):
            empty.append(s)
    return empty
