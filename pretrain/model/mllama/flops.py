"""Model FLOPs per trained token of Llama 3.2 Vision, the numerator of MFU: the text
decoder per token, plus the image side of every sample (the vision encoder, projector and
the cross-attention layers' keys and values, which run per image tile) spread over the
sample's tokens."""
from __future__ import annotations

from typing import Dict

from .args import MllamaArgs


def padded_patches(args: MllamaArgs) -> int:
    """Tokens per tile in the encoder's layers: patches + class token, padded to a multiple
    of 8 as the published encoder does."""
    n = args.patches_per_tile
    return n + (-n) % 8


def breakdown(args: MllamaArgs, seq_len: int) -> Dict[str, float]:
    """Forward + backward FLOPs (6 per matmul parameter per token, 12 x heads x head_dim
    per attended key per token; the conventions of ``llama/flops.py``):

    - ``text_per_token``: self-attention layers (q/k/v/o, SwiGLU, causal attention over
      ``seq_len`` counted in full), cross-attention layers (q and o on the token, SwiGLU,
      attention over every image state: ``max_images x max_num_tiles x patches_per_tile``
      keys), the head.
    - ``image_per_tile``: per tile of an image of ``max_num_tiles`` tiles: the patch
      embedding (real patches), every encoder layer (local and global) on its padded
      patches, the encoder's attention over all tiles of the image, the projector, and
      each cross-attention layer's k and v projections of its image states.
    - ``tiles_per_sample``: ``max_images x max_num_tiles`` (fixed shapes: a sample always
      runs that many tiles, padding included)."""
    hd, d = args.resolved_head_dim, args.dim
    n_cross = len(args.cross_attention_layers)
    n_self = args.n_layers - n_cross
    tiles = args.max_num_tiles
    keys = args.max_images * tiles * args.patches_per_tile
    ffn = 3 * d * args.ffn_hidden_dim
    self_params = n_self * (d * hd * (2 * args.n_heads + 2 * args.n_kv_heads) + ffn)
    cross_params = n_cross * (2 * d * hd * args.n_heads + ffn)
    text = (6 * (self_params + cross_params + d * args.vocab_size)
            + 12 * args.n_heads * hd * (n_self * seq_len + n_cross * keys))
    vd, padded = args.vision_dim, padded_patches(args)
    layers = args.vision_layers + args.vision_global_layers
    per_tile = (6 * (args.patches_per_tile - 1) * args.num_channels * args.patch_size ** 2 * vd
                + 6 * padded * layers * (4 * vd * vd + 2 * vd * args.vision_ffn_hidden_dim)
                + 12 * layers * vd * padded * (tiles * padded)  # each query attends to the image's tiles
                + 6 * args.patches_per_tile * (args.vision_output_dim * d
                                               + n_cross * 2 * d * args.n_kv_heads * hd))
    return {"text_per_token": float(text), "image_per_tile": float(per_tile),
            "tiles_per_sample": float(args.max_images * tiles)}


def flops_per_token(args: MllamaArgs, seq_len: int, lora_params: int = 0) -> float:
    """``text_per_token + image_per_tile x tiles_per_sample / seq_len``. With LoRA the
    frozen base computes no weight gradients: its matmuls count 4 instead of 6, plus 6 per
    adapter parameter (``llama/flops.py``)."""
    b = breakdown(args, seq_len)
    total = b["text_per_token"] + b["image_per_tile"] * b["tiles_per_sample"] / seq_len
    if lora_params:
        attention = breakdown_attention(args, seq_len)
        return (total - attention) * 4 / 6 + attention + 6.0 * lora_params
    return total


def breakdown_attention(args: MllamaArgs, seq_len: int) -> float:
    """The attention-score part of ``flops_per_token`` (no weights: unchanged by LoRA)."""
    hd, tiles, padded = args.resolved_head_dim, args.max_num_tiles, padded_patches(args)
    n_cross = len(args.cross_attention_layers)
    keys = args.max_images * tiles * args.patches_per_tile
    text = 12 * args.n_heads * hd * ((args.n_layers - n_cross) * seq_len + n_cross * keys)
    vision = 12 * (args.vision_layers + args.vision_global_layers) * args.vision_dim * padded * tiles * padded
    return float(text + vision * args.max_images * tiles / seq_len)
