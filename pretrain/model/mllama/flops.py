"""Model FLOPs per trained token of Llama 3.2 Vision, the numerator of MFU: the text
decoder per token, plus the image side of every sample (the vision encoder, projector and
the cross-attention layers' keys and values, which run per image tile) spread over the
sample's tokens.

The conventions of ``llama/flops.py``: a matmul of W parameters applied to one position
is 2 W FLOPs forward and 4 W backward (input and weight gradients), 6 W in all; attention
scores (QK^T and scores x V) are 4 x heads x head_dim per query per key forward, 12 with
the backward, the full score matrix (no causal halving); no recomputation; norms, gates,
embedding lookups, biases and element-wise ops are not counted. One exception to 6 W: the
patch embedding's input is the pixels, which take no gradient, so it runs forward and
weight gradient only (4 W). Checked against torch's FlopCounterMode on a forward and
backward of a small Mllama (math attention): equal to the FLOP."""
from __future__ import annotations

from typing import Dict

from .args import MllamaArgs


def padded_patches(args: MllamaArgs) -> int:
    """Tokens per tile in the encoder's layers: patches + class token, padded to a multiple
    of 8 as the published encoder does."""
    n = args.patches_per_tile
    return n + (-n) % 8


def _forward_terms(args: MllamaArgs, seq_len: int) -> Dict[str, int]:
    """Forward FLOPs, by kind: per text token (``text_*``) and per image tile (``tile_*``);
    ``*_weights`` are matmuls with parameters (x3 for forward + backward), ``*_scores``
    attention scores (x3), ``tile_patch_embed`` the patch embedding (x2: no input gradient)."""
    hd, d = args.resolved_head_dim, args.dim
    n_cross = len(args.cross_attention_layers)
    n_self = args.n_layers - n_cross
    tiles, n, padded = args.max_num_tiles, args.patches_per_tile, padded_patches(args)
    keys = args.max_images * tiles * n  # image states every cross-attention layer reads
    ffn = 3 * d * args.ffn_hidden_dim
    # Self-attention layers: q, k, v, o and the SwiGLU; cross-attention layers: q and o on
    # the token (k and v run on the image states, below), the SwiGLU (on every token: the
    # mask multiplies its hidden units); the head.
    text_weights = (n_self * (d * hd * (2 * args.n_heads + 2 * args.n_kv_heads) + ffn)
                    + n_cross * (2 * d * hd * args.n_heads + ffn) + d * args.vocab_size)
    # Causal self-attention over seq_len keys (in full), cross-attention over every image state.
    text_scores = args.n_heads * hd * (n_self * seq_len + n_cross * keys)
    vd, layers = args.vision_dim, args.vision_layers + args.vision_global_layers
    # Every encoder layer (local and global: q, k, v, o and fc1, fc2) on the tile's padded
    # patches; the projector and each cross-attention layer's k and v on its real ones.
    tile_weights = (padded * layers * (4 * vd * vd + 2 * vd * args.vision_ffn_hidden_dim)
                    + n * (args.vision_output_dim * d + n_cross * 2 * d * args.n_kv_heads * hd))
    # Each of the tile's padded queries attends to every padded patch of the image's tiles.
    tile_scores = layers * vd * padded * tiles * padded
    tile_patch_embed = (n - 1) * args.num_channels * args.patch_size ** 2 * vd
    return {"text_weights": 2 * text_weights, "text_scores": 4 * text_scores,
            "tile_weights": 2 * tile_weights, "tile_scores": 4 * tile_scores,
            "tile_patch_embed": 2 * tile_patch_embed}


def breakdown(args: MllamaArgs, seq_len: int) -> Dict[str, float]:
    """Forward + backward FLOPs (see the module's docstring for the conventions):

    - ``text_per_token``: self-attention layers (q/k/v/o, SwiGLU, causal attention over
      ``seq_len`` counted in full), cross-attention layers (q and o on the token, SwiGLU,
      attention over every image state: ``max_images x max_num_tiles x patches_per_tile``
      keys), the head.
    - ``image_per_tile``: per tile of an image of ``max_num_tiles`` tiles: the patch
      embedding (real patches; forward + weight gradient), every encoder layer (local and
      global) on its padded patches, the encoder's attention over all tiles of the image,
      the projector, and each cross-attention layer's k and v projections of its image
      states.
    - ``tiles_per_sample``: ``max_images x max_num_tiles`` (fixed shapes: a sample always
      runs that many tiles, padding included)."""
    f = _forward_terms(args, seq_len)
    return {"text_per_token": float(3 * (f["text_weights"] + f["text_scores"])),
            "image_per_tile": float(3 * (f["tile_weights"] + f["tile_scores"]) + 2 * f["tile_patch_embed"]),
            "tiles_per_sample": float(args.max_images * args.max_num_tiles)}


def _frozen_flops(args: MllamaArgs, seq_len: int, frozen) -> float:
    """Per token with whole towers frozen (``finetune.freeze``): a frozen weight computes no
    weight gradient, and a part with nothing trainable upstream no backward at all.

    ``[vision]``: the encoder, projector and the cross-attention layers' k/v run forward
    only (2 per weight, scores 4); the cross-attention layers' q, o and MLP pass input
    gradients to the trained text below them (4), and their scores 8 (the gradients of the
    queries, not of the frozen image keys and values). ``[text]``: the self-attention layers
    below the first cross-attention layer run forward only (nothing under them trains); the
    ones above it and the head pass input gradients (4 per weight, scores 12); the vision
    side trains (6, the patch embedding 4)."""
    hd, d = args.resolved_head_dim, args.dim
    cross = sorted(args.cross_attention_layers)
    n_cross, n_self = len(cross), args.n_layers - len(cross)
    self_layer = d * hd * (2 * args.n_heads + 2 * args.n_kv_heads) + 3 * d * args.ffn_hidden_dim
    cross_layer = 2 * d * hd * args.n_heads + 3 * d * args.ffn_hidden_dim
    keys = args.max_images * args.max_num_tiles * args.patches_per_tile
    self_scores, cross_scores = 4 * args.n_heads * hd * seq_len, 4 * args.n_heads * hd * keys
    f = _forward_terms(args, seq_len)
    cross_kv = 2 * args.patches_per_tile * n_cross * 2 * d * args.n_kv_heads * hd  # per tile, forward
    encoder = f["tile_weights"] - cross_kv  # encoder layers + projector, per tile, forward
    per_sample = args.max_images * args.max_num_tiles / seq_len
    if "vision" in frozen:
        text = (6 * (n_self * self_layer + d * args.vocab_size) + 4 * n_cross * cross_layer
                + 3 * n_self * self_scores + 2 * n_cross * cross_scores)
        return text + (encoder + cross_kv + f["tile_scores"] + f["tile_patch_embed"]) * per_sample
    below = sum(1 for i in range(cross[0]) if i not in cross)  # self layers under the first cross layer
    text = (2 * below * self_layer + 4 * (n_self - below) * self_layer + 4 * d * args.vocab_size
            + 6 * n_cross * cross_layer + below * self_scores + 3 * (n_self - below) * self_scores
            + 3 * n_cross * cross_scores)
    return text + (3 * (encoder + cross_kv + f["tile_scores"]) + 2 * f["tile_patch_embed"]) * per_sample


def flops_per_token(args: MllamaArgs, seq_len: int, lora_params: int = 0, frozen=()) -> float:
    """``text_per_token + image_per_tile x tiles_per_sample / seq_len``.

    With LoRA (``lora_params`` adapter parameters) the frozen base computes no weight
    gradients: its matmuls count 4 instead of 6 (the patch embedding 2: forward only),
    attention scores stay at 12, plus 6 per adapter parameter, as in ``llama/flops.py``.
    Approximations, since only the count of adapter parameters is known here: every
    adapter is counted once per text token, though one in a vision block runs on
    ``max_images x max_num_tiles x`` padded patches per sample and one on a cross-attention
    k or v on the image states (0.78 runs per token at 11B, seq_len 8192); the first
    layers' input gradients are counted, as in ``llama/flops.py``; and the image side is
    counted with its input gradients, right when the vision blocks or the cross-attention
    k/v hold adapters (the default ``attention`` targets), not when only text linears do
    (then the image side runs forward only). Against torch's FlopCounterMode at 11B,
    seq_len 8192, rank 16: ``attention`` +0.12%, ``all`` +0.14%, ``w1,w2,w3`` +9.2%.
    ``frozen``: the towers ``finetune.freeze`` keeps (``_frozen_flops``)."""
    if frozen:
        return float(_frozen_flops(args, seq_len, frozen))
    f = _forward_terms(args, seq_len)
    per_sample = args.max_images * args.max_num_tiles / seq_len
    if lora_params:
        return (2 * f["text_weights"] + 3 * f["text_scores"] + 6.0 * lora_params
                + (2 * f["tile_weights"] + 3 * f["tile_scores"] + f["tile_patch_embed"]) * per_sample)
    b = breakdown(args, seq_len)
    return b["text_per_token"] + b["image_per_tile"] * per_sample
