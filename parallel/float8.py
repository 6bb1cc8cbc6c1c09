"""Float8 training of the blocks' linears through torchao (``train.float8``).

``convert_float8`` swaps each eligible ``nn.Linear`` inside the layout's blocks for
torchao's ``Float8Linear`` (``torchao.float8.convert_to_float8_training``): its matmuls
cast input, weight and output gradient to float8 with dynamic scales (one per tensor,
``tensorwise``, or one per row, ``rowwise``) and run ``torch._scaled_mm``; the weight
stays a high-precision parameter of the same name, so checkpoints, the seeded init and the
optimizer see no difference and a run can resume with float8 switched on or off.

Not converted: what lies outside the blocks (the embedding and the output head, whose
float8 error would land straight on the logits) and linears whose in or out features are
not multiples of 16 (``torch._scaled_mm`` needs them; small debug models keep most of
theirs). It runs first in ``parallelize``, on the meta model, before TP and FSDP2, which
then see Float8Linear modules:

- tensorwise + FSDP2: the weights are all-gathered in float8 (half the bytes of bf16),
  their scales precomputed once per step for all of them (``after_optimizer_step``,
  one fused amax instead of one per linear);
- tensorwise + TP: torchao's float8 TP styles (the sequence-parallel all-gather runs in
  float8, the scales are global over the shards);
- rowwise: FSDP2 all-gathers high-precision weights and TP keeps torch's own styles,
  whose DTensors Float8Linear casts per row after the gather.

Selective activation checkpointing keeps ``_scaled_mm``'s outputs and the amax
reductions (``parallel/ac.py``). This module imports torchao only when a recipe is on."""
from __future__ import annotations

import dataclasses
from typing import Iterable, List

from torch import nn

from .layout import ModelLayout

FLOAT8_RECIPES = ("none", "tensorwise", "rowwise")
# torch._scaled_mm: both dims of each operand must be multiples of 16.
MULTIPLE = 16


def load_torchao():
    """``torchao.float8``. Without a GPU, torchao's import warns once per CUDA extension it
    cannot load (``Failed to load ..._C_cutlass_90a.abi3.so``) and that triton is missing;
    float8 training uses none of them (its casts are torch ops, its matmul
    ``torch._scaled_mm``), so on a machine without CUDA those warnings are dropped. On every
    machine torch's pytree registry warns that torchao registers enums it now handles
    itself (a deprecation note to torchao's authors, nothing for a user to act on): dropped."""
    import logging

    import torch

    quiet = [logging.getLogger("torch.utils._pytree")]
    if not torch.cuda.is_available():
        quiet.append(logging.getLogger("torchao"))
    levels = [log.level for log in quiet]
    for log in quiet:
        log.setLevel(logging.ERROR)
    try:
        import torchao.float8 as f8
    finally:
        for log, level in zip(quiet, levels):
            log.setLevel(level)
    return f8


def eligible(module: nn.Module) -> bool:
    """A linear float8 can run: both feature counts multiples of 16."""
    return (isinstance(module, nn.Linear) and module.in_features % MULTIPLE == 0
            and module.out_features % MULTIPLE == 0)


def float8_config(recipe: str, *, fsdp: bool):
    """torchao's config for ``recipe``; tensorwise under FSDP2 all-gathers in float8."""
    if recipe not in FLOAT8_RECIPES or recipe == "none":
        raise ValueError(f"train.float8={recipe!r}: expected one of {', '.join(FLOAT8_RECIPES[1:])}")
    config = load_torchao().Float8LinearConfig.from_recipe_name(recipe)
    if recipe == "tensorwise" and fsdp:
        config = dataclasses.replace(config, enable_fsdp_float8_all_gather=True)
    return config


def convert_float8(model: nn.Module, layout: ModelLayout, recipe: str, *, fsdp: bool) -> int:
    """Swap the eligible linears of every block for Float8Linear; returns how many. Marks
    the model for the per-step scale precompute when its weights are all-gathered in float8."""
    if recipe == "none":
        return 0
    convert_to_float8_training = load_torchao().convert_to_float8_training
    config = float8_config(recipe, fsdp=fsdp)
    before = converted(model)
    for block in layout.block_list(model):
        # The filter sees every module; only linears are swapped (fqn unused).
        convert_to_float8_training(block, config=config, module_filter_fn=lambda mod, fqn: eligible(mod))
    n = converted(model) - before
    model._float8_precompute = bool(n) and config.enable_fsdp_float8_all_gather
    return n


def converted(model: nn.Module) -> int:
    """How many of ``model``'s linears are float8 (read back from the modules; by class
    name, so a run without float8 never imports torchao)."""
    return sum(is_float8(m) for m in model.modules())


def is_float8(module: nn.Module) -> bool:
    """torchao's Float8Linear (or a subclass), told without importing torchao."""
    return any(c.__name__ == "Float8Linear" and c.__module__.startswith("torchao.") for c in type(module).__mro__)


def after_optimizer_step(parts: Iterable[nn.Module]) -> None:
    """The weights changed: recompute their float8 scales for the next all-gathers, one
    fused amax over all of a part's float8 weights (torchao's
    ``precompute_float8_dynamic_scale_for_fsdp``). A no-op for parts without float8
    all-gather."""
    todo: List[nn.Module] = [p for p in parts if getattr(p, "_float8_precompute", False)]
    if not todo:
        return
    from torchao.float8 import precompute_float8_dynamic_scale_for_fsdp

    for part in todo:
        precompute_float8_dynamic_scale_for_fsdp(part)
