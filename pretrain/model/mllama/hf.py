"""Hugging Face ``MllamaForConditionalGeneration`` (transformers 5 names) <-> our Mllama:
weights and ``config.json``.

Renames only, except: the text self-attention layers' q/k rows are permuted between
rotate-half (HF) and adjacent pairs (ours), as for Llama; the patch convolution's weight
(d, C, p, p) is our linear's (d, C*p*p). Folders saved by transformers 4 (the published
Llama 3.2 Vision checkpoints: ``language_model.model.*``, ``vision_model.*``, ...; transformers
5's ``save_pretrained`` still writes them) are read through ``canonical_hf_key``, the renaming
transformers 5 applies when it loads them; export writes them back (``stored_hf_key``), as
``save_pretrained`` does. ``hf_name`` and ``ours_name`` speak the transformers 5 names
(module paths, as PEFT adapters use them). A Llama 3.1 text model's folder starts the
decoder's self-attention layers (``from_text_model``)."""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Dict, List, Optional

import torch

from ..llama.hf import ConfigReader as _Reader
from ..llama.hf import _hf_to_meta_rows, _meta_to_hf_rows, rope_from_hf_config, rope_to_hf_config
from ..llama.hf import _rope_heads as _llama_rope_heads
from ..llama.hf import special_token_ids as _llama3_token_ids
from ..llama.hf import lora_names as _llama_lora_names
from .args import MllamaArgs

# config.json model_type values this converter reads.
model_types = ("mllama",)

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
    "post_attention_layernorm": "ffn_norm", "cross_attn_attn_gate": "attn_gate.weight",
    "cross_attn_mlp_gate": "ffn_gate.weight",
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


_OTHER_BACK = {v: k for k, v in _OTHER.items()}
_VISION_BACK = {v: k for k, v in _VISION.items()}
_VISION_BLOCK_BACK = {v: k for k, v in _VISION_BLOCK.items()}
_VISION_BLOCK_BACK.update({"attn_gate": "gate_attn", "ffn_gate": "gate_ffn"})
_TEXT_BLOCK_BACK = {v: k for k, v in _TEXT_BLOCK.items()}
# transformers 4 prefixes -> 5 (transformers' own conversion mapping for mllama, in order).
_V4_PREFIXES = (("language_model.lm_head.", "lm_head."), ("language_model.model.", "model.language_model."),
                ("vision_model.", "model.vision_model."), ("multi_modal_projector.", "model.multi_modal_projector."))


def canonical_hf_key(stored: str) -> str:
    """The transformers 5 name (the module path) of a weight as a folder stores it (4 or 5 names)."""
    for old, new in _V4_PREFIXES:
        if stored.startswith(old):
            return new + stored[len(old):]
    return stored


def stored_hf_key(key: str) -> str:
    """The name under which transformers' ``save_pretrained`` stores weight ``key``: still the
    transformers 4 spelling (5 renames on load, back on save), which every version reads."""
    for old, new in _V4_PREFIXES:
        if key.startswith(new):
            return old + key[len(new):]
    return key


def ours_name(hf_key: str) -> Optional[str]:
    """Our parameter name for a HF weight name (transformers 5); None for a derived buffer
    we recompute. Unknown names raise, naming them."""
    if hf_key.endswith("rotary_emb.inv_freq"):
        return None
    if hf_key in _OTHER:
        return _OTHER[hf_key]
    m = re.fullmatch(r"model\.vision_model\.(transformer|global_transformer)\.layers\.(\d+)\.(.+?)(\.weight|\.bias)?",
                     hf_key)
    part = None
    if m:
        stack = "layers" if m[1] == "transformer" else "global_layers"
        part = {"gate_attn": "attn_gate", "gate_ffn": "ffn_gate"}.get(m[3]) or _VISION_BLOCK.get(m[3])
        if part and (m[4] is None) == (part in ("attn_gate", "ffn_gate")):
            return f"vision.{stack}.{m[2]}.{part}{m[4] or ''}"
    m = re.fullmatch(r"model\.vision_model\.(.+)", hf_key)
    if m and m[1] in _VISION:
        return f"vision.{_VISION[m[1]]}"
    m = re.fullmatch(r"model\.language_model\.layers\.(\d+)\.(.+?)(\.weight)?", hf_key)
    if m and m[2] in _TEXT_BLOCK and (m[3] is None) == _TEXT_BLOCK[m[2]].endswith(".weight"):
        return f"layers.{m[1]}.{_TEXT_BLOCK[m[2]]}{m[3] or ''}"
    raise KeyError(f"unexpected Hugging Face weight {hf_key!r} (not a parameter of MllamaForConditionalGeneration)")


def hf_name(name: str) -> str:
    """The HF weight name (transformers 5) of one of our parameter names."""
    if name in _OTHER_BACK:
        return _OTHER_BACK[name]
    m = re.fullmatch(r"vision\.(layers|global_layers)\.(\d+)\.(.+?)(\.weight|\.bias)?", name)
    if m and m[3] in _VISION_BLOCK_BACK:
        stack = "transformer" if m[1] == "layers" else "global_transformer"
        return f"model.vision_model.{stack}.layers.{m[2]}.{_VISION_BLOCK_BACK[m[3]]}{m[4] or ''}"
    m = re.fullmatch(r"vision\.(.+)", name)
    if m and m[1] in _VISION_BACK:
        return f"model.vision_model.{_VISION_BACK[m[1]]}"
    m = re.fullmatch(r"layers\.(\d+)\.(.+?)(\.weight|\.bias)?", name)
    if m:
        sub = m[2] + (m[3] or "")  # "attn_gate.weight" is one entry; "attention.wq" + ".weight" another
        if sub in _TEXT_BLOCK_BACK:
            return f"model.language_model.layers.{m[1]}.{_TEXT_BLOCK_BACK[sub]}"
        if m[2] in _TEXT_BLOCK_BACK:
            return f"model.language_model.layers.{m[1]}.{_TEXT_BLOCK_BACK[m[2]]}{m[3] or ''}"
    raise KeyError(f"parameter {name!r} has no Hugging Face counterpart")


def _rope_heads(name: str, args: MllamaArgs) -> Optional[int]:
    """Heads of a text self-attention q or k weight (RoPE layout differs), else None: the
    vision encoder and the cross-attention layers use no RoPE."""
    if name.startswith("vision.") or ".cross_" in name:
        return None
    return _llama_rope_heads(name, args)


def to_ours(name: str, w: torch.Tensor, args: MllamaArgs) -> torch.Tensor:
    """A HF tensor, already renamed to ``name``, in our layout."""
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
    """A HF state dict (transformers 4 or 5 names) -> ours. Unknown keys raise (naming them)."""
    out = {}
    for key, w in hf_sd.items():
        name = ours_name(canonical_hf_key(key))
        if name is not None:
            out[name] = to_ours(name, w, args)
    return out


def ours_to_hf(sd: Dict[str, torch.Tensor], args: MllamaArgs) -> Dict[str, torch.Tensor]:
    """Our state dict -> ``MllamaForConditionalGeneration``'s (transformers 5 names)."""
    return {hf_name(k): to_hf(k, w, args) for k, w in sd.items()}


# LoRA target names as Hugging Face spells them (peft's target_modules) -> ours.
lora_names = {**_llama_lora_names, "fc1": "fc1", "fc2": "fc2"}


# -- config.json ------------------------------------------------------------------------
# transformers' defaults (MllamaTextConfig / MllamaVisionConfig / MllamaConfig) for keys a
# config.json may leave out: a missing key means what it means to transformers.
_TEXT_DEFAULTS = {"vocab_size": 128256, "hidden_size": 4096, "hidden_act": "silu", "num_hidden_layers": 40,
                  "num_attention_heads": 32, "num_key_value_heads": 8, "intermediate_size": 14336,
                  "rms_norm_eps": 1e-5, "max_position_embeddings": 131072, "tie_word_embeddings": False,
                  "cross_attention_layers": [3, 8, 13, 18, 23, 28, 33, 38]}
_TEXT_THETA = 500000.0  # MllamaTextConfig.default_theta
_VISION_DEFAULTS = {"hidden_size": 1280, "hidden_act": "gelu", "num_hidden_layers": 32, "num_global_layers": 8,
                    "attention_heads": 16, "num_channels": 3, "intermediate_size": 5120, "vision_output_dim": 7680,
                    "image_size": 448, "patch_size": 14, "norm_eps": 1e-5, "max_num_tiles": 4,
                    "intermediate_layers_indices": [3, 7, 15, 23, 30],
                    "supported_aspect_ratios": [[1, 1], [1, 2], [1, 3], [1, 4], [2, 1], [2, 2], [3, 1], [4, 1]]}


def _subconfig(cfg: Dict[str, Any], key: str) -> Dict[str, Any]:
    sub = cfg.get(key)
    if sub is None:
        return {}  # transformers builds the default sub-config
    if not isinstance(sub, dict):
        raise ValueError(f"{key}={sub!r}: expected an object of config keys")
    return sub


def args_from_hf_config(cfg: Dict[str, Any], name: str = "hf") -> MllamaArgs:
    """``config.json`` of a HF ``MllamaForConditionalGeneration`` (``text_config`` and
    ``vision_config`` nested; rope in ``rope_parameters`` or the transformers 4
    ``rope_theta`` + ``rope_scaling``) -> MllamaArgs. A key it leaves out takes transformers'
    default; a value our model cannot be raises ValueError naming the key."""
    tc, vc = _subconfig(cfg, "text_config"), _subconfig(cfg, "vision_config")
    t = _Reader(tc, "text_config.", _TEXT_DEFAULTS)
    v = _Reader(vc, "vision_config.", _VISION_DEFAULTS)
    t.exactly("hidden_act", "silu")
    v.exactly("hidden_act", "gelu")
    for where, r in (("text_config.", t), ("", _Reader(cfg, "", {"tie_word_embeddings": False}))):
        if r.raw("tie_word_embeddings") is not False:
            raise ValueError(f"{where}tie_word_embeddings={r.raw('tie_word_embeddings')!r} is not supported "
                             "(Mllama's head is untied: the embedding has 8 more rows than the vocabulary)")
    theta, scaling = rope_from_hf_config(tc, default_theta=_TEXT_THETA, where="text_config.")
    vocab = t.int("vocab_size")
    image_token = _Reader(cfg, "", {"image_token_index": 128256}).int("image_token_index", alias="image_token_id")
    if image_token != vocab:
        raise ValueError(f"image_token_index={image_token} is not supported: this model's <|image|> token is the "
                         f"first id past the vocabulary (text_config.vocab_size={vocab})")
    for key in ("image_size", "patch_size"):
        if type(v.raw(key)) is not int:  # transformers also allows [h, w]; the encoder uses a square
            raise ValueError(f"vision_config.{key}={v.raw(key)!r}: expected one integer (square tiles)")
    args = MllamaArgs(
        name=name,
        dim=t.int("hidden_size"),
        n_layers=t.int("num_hidden_layers"),
        n_heads=t.int("num_attention_heads"),
        n_kv_heads=t.int("num_key_value_heads"),
        head_dim=None,  # transformers' Mllama always uses hidden_size // num_attention_heads
        ffn_hidden_dim=t.int("intermediate_size"),
        vocab_size=vocab,
        norm_eps=t.float("rms_norm_eps"),
        rope_theta=theta,
        rope_scaling=scaling,
        max_position_embeddings=t.int("max_position_embeddings"),
        tie_embeddings=False,
        cross_attention_layers=t.ints("cross_attention_layers"),
        vision_dim=v.int("hidden_size"),
        vision_layers=v.int("num_hidden_layers"),
        vision_global_layers=v.int("num_global_layers"),
        vision_heads=v.int("attention_heads", alias="num_attention_heads"),
        vision_ffn_hidden_dim=v.int("intermediate_size"),
        vision_norm_eps=v.float("norm_eps"),
        image_size=v.int("image_size"),
        patch_size=v.int("patch_size"),
        num_channels=v.int("num_channels"),
        max_num_tiles=v.int("max_num_tiles"),
        supported_aspect_ratios=_aspect_ratios(v.raw("supported_aspect_ratios")),
        intermediate_layers=v.ints("intermediate_layers_indices"),
    )
    out_dim = v.int("vision_output_dim")
    if out_dim != args.vision_output_dim:
        raise ValueError(
            f"vision_config.vision_output_dim={out_dim} disagrees with the encoder: vision_config.hidden_size="
            f"{args.vision_dim} x (1 + {len(args.intermediate_layers)} intermediate_layers_indices) = "
            f"{args.vision_output_dim} (the final layer's output joined by the intermediate layers')")
    return args


def _aspect_ratios(x) -> List[List[int]]:
    if not isinstance(x, list) or not all(isinstance(r, list) and len(r) == 2 and all(type(n) is int for n in r)
                                          for r in x):
        raise ValueError(f"vision_config.supported_aspect_ratios={x!r}: expected a list of [rows, columns] "
                         "pairs of integers")
    return [list(r) for r in x]


def special_token_ids(args: MllamaArgs) -> Dict[str, Any]:
    """bos/eos/pad of the text config: Llama 3's for its vocabulary; for another, whose ids
    we do not know, no eos and no pad (transformers makes ``pad_token_id`` the embedding's
    padding row, so its default 128004 would not even build) and bos left to transformers'
    default (it must be an integer)."""
    ids = _llama3_token_ids(args)
    if ids:
        return {**ids, "pad_token_id": 128004}  # <|finetune_right_pad_id|>
    return {"eos_token_id": None, "pad_token_id": None}


def generation_config(args: MllamaArgs) -> Dict[str, Any]:
    """``generation_config.json`` of an export (the published one for the Llama 3 vocabulary)."""
    ids = _llama3_token_ids(args)
    if not ids:
        return {}
    return {"bos_token_id": ids["bos_token_id"], "eos_token_id": [128001, 128008, 128009], "pad_token_id": 128004,
            "do_sample": True, "temperature": 0.6, "top_p": 0.9}


def hf_config_from_args(args: MllamaArgs) -> Dict[str, Any]:
    """The ``config.json`` (transformers 5 form, plus the transformers 4 rope keys) of an
    ``MllamaForConditionalGeneration`` with these args. ValueError names a field that
    transformers cannot express."""
    if args.head_dim is not None and args.head_dim != args.dim // args.n_heads:
        raise ValueError(f"model.head_dim={args.head_dim}: transformers' Mllama uses hidden_size // "
                         f"num_attention_heads = {args.dim // args.n_heads}")
    if args.tie_embeddings:
        raise ValueError("model.tie_embeddings=True: Mllama's head is untied")
    text = {
        "model_type": "mllama_text_model",
        "vocab_size": args.vocab_size,
        "hidden_size": args.dim,
        "hidden_act": "silu",
        "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.n_kv_heads,
        "intermediate_size": args.ffn_hidden_dim,
        "rms_norm_eps": args.norm_eps,
        "max_position_embeddings": args.max_position_embeddings,
        "tie_word_embeddings": False,
        "cross_attention_layers": list(args.cross_attention_layers),
        "dropout": 0.0,
        **rope_to_hf_config(args),
        **special_token_ids(args),
    }
    vision = {
        "model_type": "mllama_vision_model",
        "hidden_size": args.vision_dim,
        "hidden_act": "gelu",
        "num_hidden_layers": args.vision_layers,
        "num_global_layers": args.vision_global_layers,
        "attention_heads": args.vision_heads,
        "num_channels": args.num_channels,
        "intermediate_size": args.vision_ffn_hidden_dim,
        "vision_output_dim": args.vision_output_dim,
        "image_size": args.image_size,
        "patch_size": args.patch_size,
        "norm_eps": args.vision_norm_eps,
        "max_num_tiles": args.max_num_tiles,
        "intermediate_layers_indices": list(args.intermediate_layers),
        "supported_aspect_ratios": [list(r) for r in args.supported_aspect_ratios],
    }
    return {"architectures": ["MllamaForConditionalGeneration"], "model_type": "mllama",
            "image_token_index": args.image_token_id, "tie_word_embeddings": False,
            "text_config": text, "vision_config": vision}


# Our config fields -> the config.json keys that hold them: a folder's config is compared
# with the configured model (``model.init_from``) on these, naming both.
config_keys = (
    ("dim", "text_config.hidden_size"), ("n_layers", "text_config.num_hidden_layers"),
    ("n_heads", "text_config.num_attention_heads"), ("n_kv_heads", "text_config.num_key_value_heads"),
    ("resolved_head_dim", "text_config.hidden_size // num_attention_heads"),
    ("ffn_hidden_dim", "text_config.intermediate_size"), ("vocab_size", "text_config.vocab_size"),
    ("norm_eps", "text_config.rms_norm_eps"), ("rope_theta", "text_config.rope_theta"),
    ("rope_scaling", "text_config.rope_scaling"), ("tie_embeddings", "text_config.tie_word_embeddings"),
    ("cross_attention_layers", "text_config.cross_attention_layers"),
    ("vision_dim", "vision_config.hidden_size"), ("vision_layers", "vision_config.num_hidden_layers"),
    ("vision_global_layers", "vision_config.num_global_layers"), ("vision_heads", "vision_config.attention_heads"),
    ("vision_ffn_hidden_dim", "vision_config.intermediate_size"), ("vision_norm_eps", "vision_config.norm_eps"),
    ("image_size", "vision_config.image_size"), ("patch_size", "vision_config.patch_size"),
    ("num_channels", "vision_config.num_channels"), ("max_num_tiles", "vision_config.max_num_tiles"),
    ("supported_aspect_ratios", "vision_config.supported_aspect_ratios"),
    ("intermediate_layers", "vision_config.intermediate_layers_indices"),
)


# -- model.init_from a text model ---------------------------------------------------------
# Meta trained the 11B's adapter (vision encoder, projector, cross-attention layers) on top
# of Llama 3.1 8B's text weights: ``model.init_from`` may also name a folder of a text
# model of these families. Its layer j is the decoder's j-th self-attention layer; the
# embedding's first vocab_size rows, the final norm and the head are its own (a tied head:
# its embedding); the cross-attention layers, the projector, the vision encoder and the
# embedding's 8 image rows keep their init.
text_families = ("llama",)


def self_attention_layers(args: MllamaArgs) -> List[int]:
    """The decoder layers that are self-attention layers, in order."""
    cross = set(args.cross_attention_layers)
    return [i for i in range(args.n_layers) if i not in cross]


def text_model_problems(args: MllamaArgs, text) -> List[str]:
    """What keeps a text model (LlamaArgs, read from a folder's config.json) from starting
    this model, each naming both values: its layers must be the self-attention layers, its
    dims, heads, vocabulary, norm and rope this model's."""
    problems = []
    n_self = len(self_attention_layers(args))
    if text.n_layers != n_self:
        problems.append(f"model.n_layers={args.n_layers} less {len(args.cross_attention_layers)} "
                        f"model.cross_attention_layers leaves {n_self} self-attention layers but config.json has "
                        f"num_hidden_layers={text.n_layers}")
    for field, key in (("dim", "hidden_size"), ("n_heads", "num_attention_heads"),
                       ("n_kv_heads", "num_key_value_heads"), ("resolved_head_dim", "head_dim"),
                       ("ffn_hidden_dim", "intermediate_size"), ("vocab_size", "vocab_size"),
                       ("norm_eps", "rms_norm_eps"), ("rope_theta", "rope_theta"), ("rope_scaling", "rope_scaling")):
        ours, theirs = _plain(getattr(args, field)), _plain(getattr(text, field))
        if ours != theirs:
            problems.append(f"model.{'head_dim' if field == 'resolved_head_dim' else field}={ours!r} but "
                            f"config.json has {key}={theirs!r}")
    return problems


def _plain(x):
    """A config value as plain data (a dataclass, such as RopeScaling, as its dict)."""
    return dataclasses.asdict(x) if dataclasses.is_dataclass(x) else x


def from_text_model(args: MllamaArgs, text) -> Dict[str, str]:
    """Our parameter -> the text model's parameter (our Llama names) that starts it, for
    every parameter the text model holds; the others are absent (they keep their init).
    ``tok_embeddings.weight`` has 8 rows more than the text model's: its first rows."""
    names = {"tok_embeddings.weight": "tok_embeddings.weight", "norm.weight": "norm.weight",
             "output.weight": "tok_embeddings.weight" if text.tie_embeddings else "output.weight"}
    for j, i in enumerate(self_attention_layers(args)):
        for sub in ("attention.wq", "attention.wk", "attention.wv", "attention.wo", "feed_forward.w1",
                    "feed_forward.w2", "feed_forward.w3", "attention_norm", "ffn_norm"):
            names[f"layers.{i}.{sub}.weight"] = f"layers.{j}.{sub}.weight"
    return names


def preprocessor_config(spec) -> dict:
    """``preprocessor_config.json`` for transformers' ``MllamaImageProcessor`` (and
    ``AutoProcessor``) from the loader's ``data_pipeline.images.ImageSpec``: transformers
    then preprocesses images as our loader does."""
    from data_pipeline.images import BILINEAR, RESCALE_FACTOR, aspect_ratios_for

    if spec.aspect_ratios != aspect_ratios_for(spec.max_tiles):
        # transformers has no key for the grids: it derives them from max_image_tiles.
        raise ValueError(f"aspect_ratios {[list(r) for r in spec.aspect_ratios]} are not the grids transformers "
                         f"derives from max_image_tiles={spec.max_tiles}: "
                         f"{[list(r) for r in aspect_ratios_for(spec.max_tiles)]}")
    return {
        "image_processor_type": "MllamaImageProcessor",
        "processor_class": "MllamaProcessor",
        "do_convert_rgb": True,
        "do_resize": True,
        "size": {"height": spec.tile_size, "width": spec.tile_size},
        "resample": BILINEAR,
        "do_rescale": True,
        "rescale_factor": RESCALE_FACTOR,
        "do_normalize": True,
        "image_mean": list(spec.mean),
        "image_std": list(spec.std),
        "do_pad": True,
        "max_image_tiles": spec.max_tiles,
    }
