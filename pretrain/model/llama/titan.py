"""torchtitan's names and layouts for a Llama 3.x (its ``llama3`` model, torchtitan
0.3.0), for ``pretrain.interop.titan``.

What differs from ours, read from torchtitan 0.3.0's own modules (``models/llama3``,
``models/common/attention.py``) and checkpoints its ``CheckpointManager`` wrote:

- Weights: q/k/v live in ``layers.<i>.attention.qkv_linear.w{q,k,v}.weight`` (a state-dict
  hook splits its fused parameter into these on save and merges them on load), the head
  is ``lm_head.weight``; every other name is ours. Neither side permutes q/k rows: both
  keep Meta's interleaved RoPE pairs, so weights carry as they are.
- Optimizer state is keyed by parameter, and torchtitan's q/k/v parameter is one fused
  ``...qkv_linear.wqkv.weight`` laid out per KV head: (n_kv_heads, heads_per_kv + 2,
  head_dim, dim), each KV group's q heads followed by its k and its v head. AdamW's
  moments are elementwise, so they split and merge in that layout exactly.
- Tied embeddings (its 1B and 3B flavors, ``enable_weight_tying``): the model state
  holds ``lm_head.weight`` and ``tok_embeddings.weight``, the same tensor, and the
  optimizer one state, under ``tok_embeddings.weight``. Ours ties by holding no
  ``output.weight`` at all, so a tied model maps both ways without loss.
- RoPE: its flavors build ``ComplexRoPE(scaling="llama")`` with ``scaling_factor=8``
  (Llama 3.1's) for every size; Llama 3.2's published 1B/3B use 32. A checkpoint does
  not record it: ``TITAN_ROPE`` is what an import assumes unless told otherwise."""
from __future__ import annotations

import re
from typing import Optional, Tuple

import torch

# torchtitan's llama3 flavors (1B ... 405B): ComplexRoPE.Config defaults with scaling="llama".
TITAN_ROPE = {"theta": 500000.0, "scaling_factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": 8192}

_QKV = re.compile(r"(layers\.\d+\.attention\.)(w[qkv])\.weight")
_TITAN_QKV = re.compile(r"(layers\.\d+\.attention\.)qkv_linear\.(w[qkv])\.weight")


def unsupported(args) -> Optional[str]:
    """Why torchtitan's llama3 cannot be this model (None: it can)."""
    if args.head_dim is not None and args.head_dim * args.n_heads != args.dim:
        return (f"model.head_dim={args.head_dim} with n_heads={args.n_heads} is not dim={args.dim}: torchtitan's "
                "llama3 derives head_dim from dim / n_heads and cannot build this model")
    return None


def titan_name(ours: str) -> str:
    """Our parameter name -> torchtitan's model-state key."""
    if ours == "output.weight":
        return "lm_head.weight"
    m = _QKV.fullmatch(ours)
    return f"{m.group(1)}qkv_linear.{m.group(2)}.weight" if m else ours


def ours_name(titan: str) -> Optional[str]:
    """torchtitan's model-state key -> our parameter name (None: ``lm_head.weight`` of a
    tied model has no name of its own here; the caller decides)."""
    if titan == "lm_head.weight":
        return "output.weight"
    m = _TITAN_QKV.fullmatch(titan)
    return f"{m.group(1)}{m.group(2)}.weight" if m else titan


def titan_param(ours: str) -> Tuple[str, Optional[str]]:
    """Our parameter -> (torchtitan's parameter that holds it, its part of a fused q/k/v
    parameter: "wq", "wk", "wv", or None for a parameter of its own). Optimizer state is
    keyed by torchtitan's parameter."""
    m = _QKV.fullmatch(ours)
    if m:
        return f"{m.group(1)}qkv_linear.wqkv.weight", m.group(2)
    return titan_name(ours), None


def _groups(args) -> Tuple[int, int, int]:
    hd = args.resolved_head_dim
    return args.n_kv_heads, args.n_heads // args.n_kv_heads, hd


def split_qkv(fused: torch.Tensor, args) -> dict:
    """torchtitan's fused q/k/v tensor (a weight or its AdamW moment) -> {"wq", "wk", "wv"}."""
    n_kv, per, hd = _groups(args)
    t = fused.reshape(n_kv, per + 2, hd, *fused.shape[1:])
    tail = fused.shape[1:]
    return {"wq": t[:, :per].reshape(-1, *tail).clone(), "wk": t[:, per].reshape(-1, *tail).clone(),
            "wv": t[:, per + 1].reshape(-1, *tail).clone()}


def merge_qkv(wq: torch.Tensor, wk: torch.Tensor, wv: torch.Tensor, args) -> torch.Tensor:
    """Our q, k, v tensors (weights or moments) -> torchtitan's fused layout."""
    n_kv, per, hd = _groups(args)
    tail = wq.shape[1:]
    return torch.cat([wq.reshape(n_kv, per, hd, *tail), wk.reshape(n_kv, 1, hd, *tail),
                      wv.reshape(n_kv, 1, hd, *tail)], dim=1).reshape(-1, *tail)


def fused_shape(args) -> Tuple[int, int]:
    n_kv, per, hd = _groups(args)
    return n_kv * (per + 2) * hd, args.dim


def rope_of(args) -> dict:
    """The ``ComplexRoPE.Config`` settings torchtitan needs to run ``args``' model."""
    r = args.rope_scaling
    return {"theta": float(args.rope_theta), "scaling": "llama" if r is not None else "none",
            **({"scaling_factor": float(r.factor), "low_freq_factor": float(r.low_freq_factor),
                "high_freq_factor": float(r.high_freq_factor),
                "original_max_position_embeddings": int(r.original_max_position_embeddings)} if r is not None else {})}
