"""LoRA adapters for a model's linear layers (the family's ``LoRASpec`` names them): the
base weights frozen, a low-rank update ``W x + (alpha / r) B A dropout(x)`` trained, with
B = 0 at the start (the adapted model starts as the base model).

Adapters are child modules of the adapted ``nn.Linear`` (``wq.lora_a``, ``wq.lora_b``),
so the base weights keep their names: Hugging Face import, checkpoints and FSDP2 see the
same model, plus two small matrices per target. The update is added by a forward hook."""
from __future__ import annotations

import math
from typing import Dict, Iterable, List, Sequence

import torch
from torch import nn

from .model.family import LoRASpec, ModelFamily

def resolve_targets(names: Sequence[str], spec: LoRASpec) -> List[str]:
    """Our layer names from config names: ours (wq), an alias (Hugging Face's q_proj), a
    group of the family's (attention, mlp) or ``all``."""
    out: List[str] = []
    for n in names:
        if n == "all":
            picked = spec.names
        elif n in spec.groups:
            picked = spec.groups[n]
        elif n in spec.names:
            picked = (n,)
        elif n in spec.aliases:
            picked = (spec.aliases[n],)
        else:
            raise ValueError(f"finetune.lora.target_modules: unknown target {n!r}; expected some of "
                             f"{list(spec.names)}, their Hugging Face names {list(spec.aliases)}, "
                             f"{', '.join(spec.groups)} or all")
        out += [p for p in picked if p not in out]
    return out


class _LoRAHook:
    def __init__(self, scale: float, dropout: nn.Module):
        self.scale, self.dropout = scale, dropout

    def __call__(self, module: nn.Linear, args, output):
        x = args[0]
        return output + module.lora_b(module.lora_a(self.dropout(x))) * self.scale


def apply_lora(model: nn.Module, family: ModelFamily, *, rank: int, alpha: float, dropout: float,
               targets: Iterable[str]) -> int:
    """Freezes every parameter, then adds trainable adapters to the target linears of
    every block of the family's layout (on the model's device, meta included). Returns
    the number of trainable parameters."""
    targets = resolve_targets(list(targets), family.lora)
    for p in model.parameters():
        p.requires_grad_(False)
    added = 0
    for block in family.layout.block_list(model):
        added += _adapt_block(block, targets, rank, alpha, dropout)
    if not added:
        raise ValueError(f"finetune.lora.target_modules={list(targets)} matched no linear layer")
    return added


def _adapt_block(block: nn.Module, targets: List[str], rank: int, alpha: float, dropout: float) -> int:
    added = 0
    for name, module in block.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if leaf not in targets or not isinstance(module, nn.Linear):
            continue
        device = module.weight.device
        module.lora_a = nn.Linear(module.in_features, rank, bias=False, device=device)
        module.lora_b = nn.Linear(rank, module.out_features, bias=False, device=device)
        module.lora_rank, module.lora_alpha = rank, alpha
        drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        module.lora_dropout = drop
        module.register_forward_hook(_LoRAHook(alpha / rank, drop))
        added += rank * (module.in_features + module.out_features)
    return added


def is_lora_param(name: str) -> bool:
    return ".lora_a." in name or ".lora_b." in name


@torch.no_grad()
def init_lora(model: nn.Module, init_fn) -> None:
    """A from ``init_fn`` (the trainer's layout-invariant seeded init) with std
    1/sqrt(3 in_features), the std of PEFT's default Kaiming-uniform (bound
    1/sqrt(in_features)); B zeros."""
    for name, module in model.named_modules():
        if hasattr(module, "lora_a") and hasattr(module, "lora_b"):
            init_fn(module.lora_a.weight, 1.0 / math.sqrt(3 * module.in_features), f"{name}.lora_a.weight")
            module.lora_b.weight.zero_()


def merge_lora_state(state: Dict[str, torch.Tensor], alpha: float, rank: int) -> Dict[str, torch.Tensor]:
    """A full (unsharded) state dict with adapters -> the base names with W + (alpha/r) B A,
    adapters dropped: what a merged export writes."""
    out = {k: v for k, v in state.items() if not is_lora_param(k)}
    for k in [k for k in state if k.endswith(".lora_a.weight")]:
        base = k[: -len(".lora_a.weight")]
        a, b = state[k].float(), state[f"{base}.lora_b.weight"].float()
        w = out[f"{base}.weight"]
        out[f"{base}.weight"] = (w.float() + (alpha / rank) * (b @ a)).to(w.dtype)
    return out
