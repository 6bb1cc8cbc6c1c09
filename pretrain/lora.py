"""LoRA adapters for the Llama's linear layers: the base weights frozen, a low-rank update
``W x + (alpha / r) B A dropout(x)`` trained, with B = 0 at the start (the adapted model
starts as the base model).

Adapters are child modules of the adapted ``nn.Linear`` (``wq.lora_a``, ``wq.lora_b``),
so the base weights keep their names: Hugging Face import, checkpoints and FSDP2 see the
same model, plus two small matrices per target. The update is added by a forward hook."""
from __future__ import annotations

import math
from typing import Dict, Iterable, List, Sequence

import torch
from torch import nn

# Linear layers a target name picks, by their attribute name in the model.
ATTENTION = ("wq", "wk", "wv", "wo")
MLP = ("w1", "w2", "w3")
TARGETS = (*ATTENTION, *MLP)
# Hugging Face / PEFT module names of ours (for adapter export and users who know them).
HF_NAMES = {"wq": "q_proj", "wk": "k_proj", "wv": "v_proj", "wo": "o_proj",
            "w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}
_FROM_HF = {v: k for k, v in HF_NAMES.items()}


def resolve_targets(names: Sequence[str]) -> List[str]:
    """Our layer names from config names: ours (wq), Hugging Face's (q_proj), or the
    shorthands ``attention``, ``mlp`` and ``all``."""
    out: List[str] = []
    for n in names:
        if n == "all":
            picked = TARGETS
        elif n == "attention":
            picked = ATTENTION
        elif n == "mlp":
            picked = MLP
        elif n in TARGETS:
            picked = (n,)
        elif n in _FROM_HF:
            picked = (_FROM_HF[n],)
        else:
            raise ValueError(f"finetune.lora.target_modules: unknown target {n!r}; expected some of "
                             f"{list(TARGETS)}, their Hugging Face names {list(_FROM_HF)}, attention, mlp or all")
        out += [p for p in picked if p not in out]
    return out


class _LoRAHook:
    def __init__(self, scale: float, dropout: nn.Module):
        self.scale, self.dropout = scale, dropout

    def __call__(self, module: nn.Linear, args, output):
        x = args[0]
        return output + module.lora_b(module.lora_a(self.dropout(x))) * self.scale


def apply_lora(model: nn.Module, *, rank: int, alpha: float, dropout: float, targets: Iterable[str]) -> int:
    """Freezes every parameter, then adds trainable adapters to the target linears of
    every transformer block (on the model's device, meta included). Returns the number of
    trainable parameters."""
    targets = resolve_targets(list(targets))
    for p in model.parameters():
        p.requires_grad_(False)
    added = 0
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if leaf not in targets or not isinstance(module, nn.Linear) or ".layers." not in f".{name}":
            continue
        device = module.weight.device
        module.lora_a = nn.Linear(module.in_features, rank, bias=False, device=device)
        module.lora_b = nn.Linear(rank, module.out_features, bias=False, device=device)
        module.lora_rank, module.lora_alpha = rank, alpha
        drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        module.lora_dropout = drop
        module.register_forward_hook(_LoRAHook(alpha / rank, drop))
        added += rank * (module.in_features + module.out_features)
    if not added:
        raise ValueError(f"finetune.lora.target_modules={list(targets)} matched no linear layer")
    return added


def lora_param_count(args, rank: int, targets: Iterable[str]) -> int:
    """r x (in + out) per adapted linear, per layer: the formula the tests check."""
    hd = args.resolved_head_dim
    shapes = {"wq": (args.dim, args.n_heads * hd), "wk": (args.dim, args.n_kv_heads * hd),
              "wv": (args.dim, args.n_kv_heads * hd), "wo": (args.n_heads * hd, args.dim),
              "w1": (args.dim, args.ffn_hidden_dim), "w3": (args.dim, args.ffn_hidden_dim),
              "w2": (args.ffn_hidden_dim, args.dim)}
    return args.n_layers * sum(rank * (shapes[t][0] + shapes[t][1]) for t in resolve_targets(list(targets)))


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
