"""Hugging Face ``MllamaForConditionalGeneration`` (transformers 5 names) <-> our Mllama.

Renames only, except: the text self-attention layers' q/k rows are permuted between
rotate-half (HF) and adjacent pairs (ours), as for Llama; the patch convolution's weight
(d, C, p, p) is our linear's (d, C*p*p)."""
from __future__ import annotations

import re
from typing import Dict, Optional

import torch

from ..llama.hf import _hf_to_meta_rows, _meta_to_hf_rows
from ..llama.hf import lora_names as _llama_lora_names
from .args import MllamaArgs

_VISION_BLOCK = {
    "self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk", "self_attn.v_proj": "attention.wv",
    "self_attn.o_proj": "attention.wo", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2",
    "input_layernorm": "attention_norm", "post_attention_layernorm": "ffn_norm",
}
_TEXT_BLOCK = {
    "self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk", "self_attn.v_proj": "attention.wv",
    "self_attn.o_proj": "attention.wo", "cross_attn.q_proj": "cross_attention.wq",
    "cross_attn.k_proj": "cross_attention.wk", "cross_attn.v_proj": "cross_attention.wv",
    "cross_attn.o_proj": "cross_attention.wo", "cross_attn.q_norm": "cross_attention.q_norm",
    "cross_attn.k_norm": "cross_attention.k_norm", "mlp.gate_proj": "feed_forward.w1",
    "mlp.up_proj": "feed_forward.w3", "mlp.down_proj": "feed_forward.w2", "input_layernorm": "attention_norm",
    "post_attention_layernorm": "ffn_norm", "cross_attn_attn_gate": "attn_gate.weight", "cross_attn_mlp_gate": "ffn_gate.weight",
}
_VISION = {
    "patch_embedding.weight": "patch_embed.weight", "class_embedding": "class_embedding",
    "gated_positional_embedding.embedding": "pos_embedding", "gated_positional_embedding.gate": "pos_gate",
    "gated_positional_embedding.tile_embedding.weight": "tile_pos_embedding.weight",
    "pre_tile_positional_embedding.embedding.weight": "pre_tile.embedding.weight",
    "pre_tile_positional_embedding.gate": "pre_tile.gate",
    "post_tile_positional_embedding.embedding.weight": "post_tile.embedding.weight",
    "post_tile_positional_embedding.gate": "post_tile.gate",
    "layernorm_pre.weight": "ln_pre.weight", "layernorm_pre.bias": "ln_pre.bias",
    "layernorm_post.weight": "ln_post.weight", "layernorm_post.bias": "ln_post.bias",
}
_OTHER = {
    "model.multi_modal_projector.weight": "projector.weight", "model.multi_modal_projector.bias": "projector.bias",
    "model.language_model.embed_tokens.weight": "tok_embeddings.weight",
    "model.language_model.norm.weight": "norm.weight", "lm_head.weight": "output.weight",
}


def ours_name(hf_key: str) -> Optional[str]:
    """Our parameter name for a HF weight name (None: not a weight of this model)."""
    if hf_key in _OTHER:
        return _OTHER[hf_key]
    m = re.fullmatch(r"model\.vision_model\.(transformer|global_transformer)\.layers\.(\d+)\.(.+?)(\.weight|\.bias)?",
                     hf_key)
    if m:
        stack = "layers" if m[1] == "transformer" else "global_layers"
        part = {"gate_attn": "attn_gate", "gate_ffn": "ffn_gate"}.get(m[3]) or _VISION_BLOCK.get(m[3])
        return f"vision.{stack}.{m[2]}.{part}{m[4] or ''}" if part else None
    m = re.fullmatch(r"model\.vision_model\.(.+)", hf_key)
    if m:
        return f"vision.{_VISION[m[1]]}" if m[1] in _VISION else None
    m = re.fullmatch(r"model\.language_model\.layers\.(\d+)\.(.+?)(\.weight)?", hf_key)
    if m and m[2] in _TEXT_BLOCK:
        return f"layers.{m[1]}.{_TEXT_BLOCK[m[2]]}{m[3] or ''}"
    return None


def _rope_heads(name: str, args: MllamaArgs) -> Optional[int]:
    """Heads of a text self-attention q or k weight (RoPE layout differs), else None."""
    if name.endswith("attention.wq.weight") and not name.startswith(("vision.",)) and ".cross_" not in name:
        return args.n_heads
    if name.endswith("attention.wk.weight") and not name.startswith(("vision.",)) and ".cross_" not in name:
        return args.n_kv_heads
    return None


def to_ours(name: str, w: torch.Tensor, args: MllamaArgs) -> torch.Tensor:
    if name == "vision.patch_embed.weight":
        return w.reshape(w.shape[0], -1)
    heads = _rope_heads(name, args)
    return _hf_to_meta_rows(w, heads) if heads else w


def to_hf(name: str, w: torch.Tensor, args: MllamaArgs) -> torch.Tensor:
    if name == "vision.patch_embed.weight":
        return w.reshape(w.shape[0], args.num_channels, args.patch_size, args.patch_size)
    heads = _rope_heads(name, args)
    return _meta_to_hf_rows(w, heads) if heads else w


def hf_to_ours(hf_sd: Dict[str, torch.Tensor], args: MllamaArgs) -> Dict[str, torch.Tensor]:
    out = {}
    for key, w in hf_sd.items():
        name = ours_name(key)
        if name is None:
            raise KeyError(f"{key}: not a weight of an Mllama model")
        out[name] = to_ours(name, w, args)
    return out

# LoRA target names as Hugging Face spells them (peft's target_modules) -> ours.
lora_names = {**_llama_lora_names, "fc1": "fc1", "fc2": "fc2"}
