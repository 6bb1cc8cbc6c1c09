"""Convert Llama weights and configs between Hugging Face's layout and ours.

Ours keeps Meta's RoPE layout (rotated pairs are adjacent), HF's rotates halves, so
q/k projection rows are permuted on the way through; everything else is renamed."""
from __future__ import annotations

import re
from typing import Any, Dict, List, Optional, Tuple

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


def unused_hf_keys(args: LlamaArgs) -> Tuple[str, ...]:
    """Weights a folder may hold that this model has no parameter for: the head of a tied
    model (transformers may save it beside the embedding it equals)."""
    return ("lm_head.weight",) if args.tie_embeddings else ()


class ConfigReader:
    """Typed reads of one (sub)config, naming ``<where><key>`` in every error."""

    def __init__(self, cfg: Dict[str, Any], where: str, defaults: Dict[str, Any]):
        self.cfg, self.where, self.defaults = cfg, where, defaults

    def raw(self, key: str, alias: Optional[str] = None):
        if key in self.cfg and self.cfg[key] is not None:
            return self.cfg[key]
        if alias is not None and self.cfg.get(alias) is not None:
            return self.cfg[alias]
        return self.defaults[key]

    def int(self, key: str, alias: Optional[str] = None) -> int:
        v = self.raw(key, alias)
        if type(v) is not int:  # its range is the args field's (checked with them, naming both keys)
            raise ValueError(f"{self.where}{key}={v!r}: expected an integer")
        return v

    def float(self, key: str) -> float:
        v = self.raw(key)
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ValueError(f"{self.where}{key}={v!r}: expected a number")
        return float(v)

    def ints(self, key: str) -> List[int]:
        v = self.raw(key)
        if not isinstance(v, list) or any(type(x) is not int for x in v):
            raise ValueError(f"{self.where}{key}={v!r}: expected a list of integers")
        return list(v)

    def bool(self, key: str) -> bool:
        v = self.raw(key)
        if type(v) is not bool:  # bool("false") is True: an untied head read as tied would be dropped
            raise ValueError(f"{self.where}{key}={v!r}: expected true or false")
        return v

    def exactly(self, key: str, want) -> None:
        v = self.raw(key)
        if v != want:
            raise ValueError(f"{self.where}{key}={v!r} is not supported (this model has {want!r})")


def rope_from_hf_config(cfg: Dict[str, Any], default_theta: float = 10000.0,
                        where: str = "") -> Tuple[float, Optional[RopeScaling]]:
    """(rope_theta, llama3 scaling or None) of a HF text config, in either form: transformers
    4 (``rope_theta`` + ``rope_scaling``) or 5 (``rope_parameters`` holding theta and the
    scaling); ``rope_scaling`` wins where both exist, as in transformers. ``where``: the
    prefix of the keys in messages (``text_config.``)."""
    rs = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}
    src = "rope_scaling" if cfg.get("rope_scaling") else "rope_parameters"
    if not isinstance(rs, dict):
        raise ValueError(f"{where}rope_scaling / rope_parameters={rs!r}: expected an object")
    if "rope_theta" in rs and cfg.get("rope_theta") is not None and rs["rope_theta"] != cfg["rope_theta"]:
        raise ValueError(f"{where}rope_theta={cfg['rope_theta']!r} and {where}{src}.rope_theta={rs['rope_theta']!r} "
                         "disagree: which one the weights were trained with is not known")
    theta = ConfigReader({**cfg, **rs}, where, {"rope_theta": default_theta}).float("rope_theta")
    kind = rs.get("rope_type", rs.get("type", "default"))
    if kind == "default":
        return theta, None
    if kind != "llama3":
        raise ValueError(f"{where}{src}.rope_type={kind!r} is not supported (expected 'llama3' or 'default')")
    r = ConfigReader(rs, f"{where}{src}.", {})
    return theta, RopeScaling(factor=r.float("factor"), low_freq_factor=r.float("low_freq_factor"),
                              high_freq_factor=r.float("high_freq_factor"),
                              original_max_position_embeddings=r.int("original_max_position_embeddings"))


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
    r = ConfigReader(cfg, "", {"head_dim": 0, "rms_norm_eps": 1e-5, "max_position_embeddings": 8192,
                               "tie_word_embeddings": False})
    dim, n_heads = r.int("hidden_size"), r.int("num_attention_heads")
    r.defaults["num_key_value_heads"] = n_heads
    head_dim = r.int("head_dim") or None
    if n_heads and head_dim == dim // n_heads:
        head_dim = None  # the default; keeps configs round-tripping equal
    return LlamaArgs(
        name=name,
        dim=dim,
        n_layers=r.int("num_hidden_layers"),
        n_heads=n_heads,
        n_kv_heads=r.int("num_key_value_heads"),
        head_dim=head_dim,
        ffn_hidden_dim=r.int("intermediate_size"),
        vocab_size=r.int("vocab_size"),
        norm_eps=r.float("rms_norm_eps"),
        rope_theta=theta,
        rope_scaling=scaling,
        max_position_embeddings=r.int("max_position_embeddings"),
        tie_embeddings=r.bool("tie_word_embeddings"),
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
