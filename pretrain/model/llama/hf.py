"""Convert Llama weights and configs between Hugging Face's layout and ours.

Ours keeps Meta's RoPE layout (rotated pairs are adjacent), HF's rotates halves, so
q/k projection rows are permuted on the way through; everything else is renamed."""
from __future__ import annotations

import re
from typing import Any, Dict, Optional, Tuple

import torch

from .args import LlamaArgs, RopeScaling

# config.json model_type values this converter reads.
model_types = ("llama",)
# Our LoRA target names -> Hugging Face / PEFT module names (adapter export).
lora_names = {"wq": "q_proj", "wk": "k_proj", "wv": "v_proj", "wo": "o_proj",
              "w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}

_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_LAYER_NAMES = {
    "self_attn.q_proj.weight": "attention.wq.weight",
    "self_attn.k_proj.weight": "attention.wk.weight",
    "self_attn.v_proj.weight": "attention.wv.weight",
    "self_attn.o_proj.weight": "attention.wo.weight",
    "mlp.gate_proj.weight": "feed_forward.w1.weight",
    "mlp.up_proj.weight": "feed_forward.w3.weight",
    "mlp.down_proj.weight": "feed_forward.w2.weight",
    "input_layernorm.weight": "attention_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
}
_TOP_NAMES = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
}


def _meta_to_hf_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    head_dim = w.shape[0] // n_heads
    return w.view(n_heads, head_dim // 2, 2, -1).transpose(1, 2).reshape(w.shape)


def _hf_to_meta_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    head_dim = w.shape[0] // n_heads
    return w.view(n_heads, 2, head_dim // 2, -1).transpose(1, 2).reshape(w.shape)


def ours_name(hf_key: str) -> Optional[str]:
    """Our parameter name for a HF weight name; None for derived buffers we recompute.
    Unknown names raise, naming them."""
    if hf_key.endswith("rotary_emb.inv_freq"):
        return None
    if hf_key in _TOP_NAMES:
        return _TOP_NAMES[hf_key]
    m = _LAYER.match(hf_key)
    if not m or m.group(2) not in _LAYER_NAMES:
        raise KeyError(f"unexpected Hugging Face weight {hf_key!r}")
    return f"layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}"


_TOP_BACK = {v: k for k, v in _TOP_NAMES.items()}
_LAYER_BACK = {v: k for k, v in _LAYER_NAMES.items()}


def hf_name(name: str) -> str:
    """HF weight name for one of our parameter names."""
    if name in _TOP_BACK:
        return _TOP_BACK[name]
    head, idx, sub = name.split(".", 2)
    if head != "layers" or sub not in _LAYER_BACK:
        raise KeyError(f"parameter {name!r} has no Hugging Face counterpart")
    return f"model.layers.{idx}.{_LAYER_BACK[sub]}"


def _rope_heads(name: str, args: LlamaArgs) -> Optional[int]:
    """Heads of a q/k projection, whose rows the two RoPE layouts order differently;
    None for every other weight."""
    if name.endswith("attention.wq.weight"):
        return args.n_heads
    if name.endswith("attention.wk.weight"):
        return args.n_kv_heads
    return None


def to_ours(name: str, w: torch.Tensor, args: LlamaArgs) -> torch.Tensor:
    """A HF tensor, already renamed to ``name``, in our layout (q/k rows permuted)."""
    heads = _rope_heads(name, args)
    return w if heads is None else _hf_to_meta_rows(w, heads)


def to_hf(name: str, w: torch.Tensor, args: LlamaArgs) -> torch.Tensor:
    heads = _rope_heads(name, args)
    return w if heads is None else _meta_to_hf_rows(w, heads)


def hf_to_ours(hf_sd: Dict[str, torch.Tensor], args: LlamaArgs) -> Dict[str, torch.Tensor]:
    """HF ``LlamaForCausalLM`` state dict -> ours. Unknown keys raise (naming them)."""
    out: Dict[str, torch.Tensor] = {}
    for key, w in hf_sd.items():
        name = ours_name(key)
        if name is None or (name == "output.weight" and args.tie_embeddings):
            continue
        out[name] = to_ours(name, w, args)
    if not args.tie_embeddings and "output.weight" not in out:
        raise KeyError("untied model but the Hugging Face weights have no 'lm_head.weight'")
    return out


def ours_to_hf(sd: Dict[str, torch.Tensor], args: LlamaArgs) -> Dict[str, torch.Tensor]:
    out = {hf_name(k): to_hf(k, w, args) for k, w in sd.items()}
    if args.tie_embeddings:
        out.pop("lm_head.weight", None)
    return out


def rope_from_hf_config(cfg: Dict[str, Any], default_theta: float = 10000.0,
                        where: str = "") -> Tuple[float, Optional[RopeScaling]]:
    """(rope_theta, llama3 scaling or None) of a HF text config, in either form: transformers
    4 (``rope_theta`` + ``rope_scaling``) or 5 (``rope_parameters`` holding theta and the
    scaling); ``rope_scaling`` wins where both exist, as in transformers. ``where``: the
    prefix of the keys in messages (``text_config.``)."""
    rs = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}
    if not isinstance(rs, dict):
        raise ValueError(f"{where}rope_scaling / rope_parameters={rs!r}: expected an object")
    theta = rs.get("rope_theta", cfg.get("rope_theta", default_theta))
    kind = rs.get("rope_type", rs.get("type", "default"))
    if kind == "default":
        return float(theta), None
    if kind != "llama3":
        src = "rope_scaling" if cfg.get("rope_scaling") else "rope_parameters"
        raise ValueError(f"{where}{src}.rope_type={kind!r} is not supported (expected 'llama3' or 'default')")
    return float(theta), RopeScaling(
        factor=float(rs["factor"]),
        low_freq_factor=float(rs["low_freq_factor"]),
        high_freq_factor=float(rs["high_freq_factor"]),
        original_max_position_embeddings=rs["original_max_position_embeddings"],  # an int: checked with the args
    )


def rope_to_hf_config(args: LlamaArgs) -> Dict[str, Any]:
    """``rope_theta``, ``rope_scaling`` and ``rope_parameters`` of a HF text config: both
    forms (transformers 4 reads the first two, 5 reads rope_parameters and still accepts
    the old keys; they agree here)."""
    out: Dict[str, Any] = {"rope_theta": args.rope_theta, "rope_scaling": None}
    params: Dict[str, Any] = {"rope_type": "default", "rope_theta": args.rope_theta}
    if args.rope_scaling is not None:
        rs = args.rope_scaling
        out["rope_scaling"] = {
            "rope_type": "llama3",
            "factor": rs.factor,
            "low_freq_factor": rs.low_freq_factor,
            "high_freq_factor": rs.high_freq_factor,
            "original_max_position_embeddings": rs.original_max_position_embeddings,
        }
        params.update(out["rope_scaling"])
    out["rope_parameters"] = params
    return out


# Llama 3 special tokens (<|begin_of_text|>, <|end_of_text|>), for a model with the Llama 3
# vocabulary (128256 tokens and up).
LLAMA3_BOS, LLAMA3_EOS = 128000, 128001


def special_token_ids(args: LlamaArgs) -> Dict[str, Any]:
    """bos/eos ids of the config (empty for another vocabulary: we do not know its ids)."""
    if args.vocab_size >= 128256:
        return {"bos_token_id": LLAMA3_BOS, "eos_token_id": LLAMA3_EOS}
    return {}


def generation_config(args: LlamaArgs) -> Dict[str, Any]:
    """``generation_config.json`` of an export: Llama 3's sampling defaults with its token ids."""
    ids = special_token_ids(args)
    return {**ids, "do_sample": True, "temperature": 0.6, "top_p": 0.9} if ids else {}


def args_from_hf_config(cfg: Dict[str, Any], name: str = "hf") -> LlamaArgs:
    """``config.json`` of a HF Llama -> LlamaArgs, in either rope form (``rope_from_hf_config``)."""
    theta, scaling = rope_from_hf_config(cfg)
    n_heads = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim")
    if head_dim == cfg["hidden_size"] // n_heads:
        head_dim = None  # the default; keeps configs round-tripping equal
    return LlamaArgs(
        name=name,
        dim=cfg["hidden_size"],
        n_layers=cfg["num_hidden_layers"],
        n_heads=n_heads,
        n_kv_heads=cfg.get("num_key_value_heads", n_heads),
        head_dim=head_dim,
        ffn_hidden_dim=cfg["intermediate_size"],
        vocab_size=cfg["vocab_size"],
        norm_eps=cfg.get("rms_norm_eps", 1e-5),
        rope_theta=theta,
        rope_scaling=scaling,
        max_position_embeddings=cfg.get("max_position_embeddings", 8192),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
    )


def hf_config_from_args(args: LlamaArgs) -> Dict[str, Any]:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": args.dim,
        "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.n_kv_heads,
        "head_dim": args.resolved_head_dim,
        "intermediate_size": args.ffn_hidden_dim,
        "vocab_size": args.vocab_size,
        "rms_norm_eps": args.norm_eps,
        "max_position_embeddings": args.max_position_embeddings,
        "tie_word_embeddings": args.tie_embeddings,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        **rope_to_hf_config(args),
        **special_token_ids(args),
    }


# Our config fields -> the config.json keys that hold them: a folder's config is compared
# with the configured model (``model.init_from``) on these, naming both.
config_keys = (("dim", "hidden_size"), ("n_layers", "num_hidden_layers"), ("n_heads", "num_attention_heads"),
               ("n_kv_heads", "num_key_value_heads"), ("resolved_head_dim", "head_dim"),
               ("ffn_hidden_dim", "intermediate_size"), ("vocab_size", "vocab_size"), ("norm_eps", "rms_norm_eps"),
               ("rope_theta", "rope_theta"), ("rope_scaling", "rope_scaling"),
               ("tie_embeddings", "tie_word_embeddings"))
