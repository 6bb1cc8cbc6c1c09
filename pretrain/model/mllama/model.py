"""Llama 3.2 Vision (Mllama): vision encoder -> projector -> a Llama decoder whose
cross-attention layers read the projected image states.

Inputs of one batch (shapes fixed by the config, never by the data):
- ``tokens`` (B, S); ``<|image|>`` is ``args.image_token_id``.
- ``pixels`` (B, I, T, C, H, W): I = ``max_images`` images of T = ``max_num_tiles`` tiles,
  zeros where a sample has fewer.
- ``aspect_ratio_ids`` (B, I): 1 + the index of the image's tiling in
  ``supported_aspect_ratios``, 0 for no image; ``aspect_ratio_mask`` (B, I, T): 1 for a real tile.
- ``cross_attention_mask`` (B, S, I, T): 1 where token s may read tile t of image i.
- optionally ``positions`` (B, S) int64: each token's RoPE position (0..S-1 when absent),
  and then ``doc_ids`` (B, S) int64 (document masking): several samples packed in a row,
  positions restarting at each, self-attention block-causal per document. Cross-attention
  needs nothing more: the mask is per token, so a packed row's mask lets each token see
  only its own document's images (the data side's job).
A token that sees no tile (text before its image, a text-only sample) passes every
cross-attention layer unchanged, as in Meta's reference (llama-models,
``models/llama3/multimodal/model.py``): its logits do not depend on the pixels. A
text-only sample therefore equals transformers' forward without images (which skips the
layers); transformers 5 lets text before an image attend to it (it zeroes the MLP only,
its issue 39379), so it is the reference only where every token sees an image."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..family import InitFn, seeded_trunc_normal_
from ..llama.model import FeedForward, RMSNorm, TransformerBlock, llama3_inv_freq
from .args import MllamaArgs


# -- vision encoder ----------------------------------------------------------------------

class VisionAttention(nn.Module):
    def __init__(self, dim: int, n_heads: int):
        super().__init__()
        self.head_dim = dim // n_heads
        self.wq = nn.Linear(dim, dim, bias=False)
        self.wk = nn.Linear(dim, dim, bias=False)
        self.wv = nn.Linear(dim, dim, bias=False)
        self.wo = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = (w(x).view(b, n, -1, self.head_dim).transpose(1, 2) for w in (self.wq, self.wk, self.wv))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self.wo(out.transpose(1, 2).reshape(b, n, -1))


class VisionMLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class VisionBlock(nn.Module):
    """Pre-norm ViT block (LayerNorm, attention, GELU MLP); a global block scales both
    branches by tanh of a learned gate."""

    def __init__(self, args: MllamaArgs, gated: bool):
        super().__init__()
        d = args.vision_dim
        self.attention_norm = nn.LayerNorm(d, eps=args.vision_norm_eps)
        self.attention = VisionAttention(d, args.vision_heads)
        self.ffn_norm = nn.LayerNorm(d, eps=args.vision_norm_eps)
        self.mlp = VisionMLP(d, args.vision_ffn_hidden_dim)
        self.gated = gated
        if gated:
            self.attn_gate = nn.Parameter(torch.empty(1))
            self.ffn_gate = nn.Parameter(torch.empty(1))

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        h = self.attention(self.attention_norm(x), bias)
        x = x + (self.attn_gate.tanh() * h if self.gated else h)
        h = self.mlp(self.ffn_norm(x))
        return x + (self.ffn_gate.tanh() * h if self.gated else h)


class TileEmbedding(nn.Module):
    """A learned vector per (aspect ratio, tile), added to every patch of the tile, gated."""

    def __init__(self, args: MllamaArgs):
        super().__init__()
        self.tiles, self.dim = args.max_num_tiles, args.vision_dim
        self.embedding = nn.Embedding(len(args.supported_aspect_ratios) + 1, args.max_num_tiles * args.vision_dim)
        self.gate = nn.Parameter(torch.empty(1))

    def forward(self, x: torch.Tensor, aspect_ratio_ids: torch.Tensor) -> torch.Tensor:
        e = self.embedding(aspect_ratio_ids).reshape(-1, self.tiles, 1, self.dim)
        return x + e * self.gate.tanh()


class VisionEncoder(nn.Module):
    def __init__(self, args: MllamaArgs):
        super().__init__()
        self.args = args
        d, n = args.vision_dim, args.patches_per_tile
        # The patch convolution (stride = kernel) as a linear map of each flattened patch.
        self.patch_embed = nn.Linear(args.num_channels * args.patch_size ** 2, d, bias=False)
        self.class_embedding = nn.Parameter(torch.empty(d))
        self.pre_tile = TileEmbedding(args)
        self.pos_embedding = nn.Parameter(torch.empty(n, d))
        self.tile_pos_embedding = nn.Embedding(len(args.supported_aspect_ratios) + 1, args.max_num_tiles * n * d)
        self.pos_gate = nn.Parameter(torch.empty(1))
        self.ln_pre = nn.LayerNorm(d)
        self.layers = nn.ModuleDict({str(i): VisionBlock(args, gated=False) for i in range(args.vision_layers)})
        self.ln_post = nn.LayerNorm(d)
        self.post_tile = TileEmbedding(args)
        self.global_layers = nn.ModuleDict({str(i): VisionBlock(args, gated=True)
                                            for i in range(args.vision_global_layers)})

    def _patches(self, pixels: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, patches, C x p x p), patches row by row, each flattened as
        (channel, row, column): the layout of the published convolution's weight."""
        p = self.args.patch_size
        x = pixels.unfold(2, p, p).unfold(3, p, p)  # N, C, H/p, W/p, p, p
        return x.permute(0, 2, 3, 1, 4, 5).flatten(3).flatten(1, 2)

    @staticmethod
    def _attention_bias(tile_mask: torch.Tensor, real: int, padded: int, dtype: torch.dtype) -> torch.Tensor:
        """(B*I, 1, T*padded, T*padded): the published rule, kept exactly: a query and a key
        that are both padding (a padded tile, or a patch past the tile's ``real``) do not
        meet; every other pair does."""
        pad = (tile_mask[:, :, None] == 0) | (torch.arange(padded, device=tile_mask.device) >= real)
        pad = pad.flatten(1)
        bias = torch.zeros(pad.shape + pad.shape[-1:], dtype=dtype, device=tile_mask.device)
        return bias.masked_fill(pad[:, :, None] & pad[:, None, :], torch.finfo(dtype).min)[:, None]

    def forward(self, pixels: torch.Tensor, aspect_ratio_ids: torch.Tensor,
                aspect_ratio_mask: torch.Tensor) -> torch.Tensor:
        """(B, I, T, C, H, W) -> (B, I, T, patches + 1, vision_output_dim)."""
        a = self.args
        b, i, t = pixels.shape[:3]
        ids = aspect_ratio_ids.reshape(b * i)
        x = self.patch_embed(self._patches(pixels.flatten(0, 2).to(self.patch_embed.weight.dtype)))
        d = x.shape[-1]
        x = self.pre_tile(x.reshape(b * i, t, -1, d), ids)
        cls = self.class_embedding.to(x.dtype).expand(b * i, t, 1, d)
        x = torch.cat([cls, x], dim=2)  # (B*I, T, n, d)
        n = x.shape[2]
        gate = self.pos_gate.tanh()
        x = x + (1 - gate) * self.pos_embedding + gate * self.tile_pos_embedding(ids).reshape(b * i, t, n, d)
        x = self.ln_pre(x)
        padded = n + (-n) % 8  # the published encoder pads each tile's patches to a multiple of 8
        x = F.pad(x, (0, 0, 0, padded - n)).reshape(b * i, t * padded, d)
        bias = self._attention_bias(aspect_ratio_mask.reshape(b * i, t), n, padded, x.dtype)
        kept = []
        for idx, block in enumerate(self.layers.values()):
            x = block(x, bias)
            if idx in a.intermediate_layers:
                kept.append(x)
        x = self.post_tile(self.ln_post(x).reshape(b * i, t, padded, d), ids).reshape(b * i, t * padded, d)
        for block in self.global_layers.values():
            x = block(x, bias)
        x = x.reshape(b * i, t, padded, d)[:, :, :n]
        if not kept:  # no intermediate layers: the final output alone
            return x.reshape(b, i, t, n, -1)
        inter = torch.stack(kept, dim=-1).reshape(b * i, t, padded, -1)[:, :, :n]
        return torch.cat([x, inter], dim=-1).reshape(b, i, t, n, -1)


# -- text decoder ------------------------------------------------------------------------

class CrossAttention(nn.Module):
    """Text queries over image keys/values (GQA), with RMSNorm on each head's q and k; no
    position encoding. The output of a token that sees no image tile is 0 (Meta's
    reference multiplies it by ``full_text_row_masked_out_mask`` before ``wo``), so text
    before its image gets no image signal at all."""

    def __init__(self, args: MllamaArgs):
        super().__init__()
        self.head_dim = args.resolved_head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * self.head_dim, args.dim, bias=False)
        self.q_norm = RMSNorm(self.head_dim, args.norm_eps)
        self.k_norm = RMSNorm(self.head_dim, args.norm_eps)

    def forward(self, x: torch.Tensor, images: torch.Tensor, mask: torch.Tensor, sees: torch.Tensor) -> torch.Tensor:
        """``sees`` (B, S, 1): 1 for tokens that see an image tile. Applied to a rank's
        heads before ``wo`` (under tensor parallelism both are plain tensors there); ``wo``
        has no bias, so a masked row's output is an exact 0 and sends no gradient back."""
        b, s, _ = x.shape
        q = self.q_norm(self.wq(x).view(b, s, -1, self.head_dim)).transpose(1, 2)
        k = self.k_norm(self.wk(images).view(b, images.shape[1], -1, self.head_dim)).transpose(1, 2)
        v = self.wv(images).view(b, images.shape[1], -1, self.head_dim).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        out = out * sees[:, None].to(out.dtype)
        return self.wo(out.transpose(1, 2).reshape(b, s, -1))


class Gate(nn.Module):
    """tanh(weight) x h: a learned scalar gate (0 at init). A module of its own so that
    sequence parallel can lay its weight out against the sequence-sharded stream."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(1))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.weight.tanh() * h


class MaskedFeedForward(FeedForward):
    """SwiGLU on the tokens that see an image tile, 0 elsewhere: the published MLP's output
    times the row mask, applied to the hidden units (the down projection has no bias, so a
    masked row gives an exact 0 and no gradient, and a kept row is unchanged). There, under
    tensor parallelism, both are plain tensors: a rank's hidden units and the whole mask."""

    def forward(self, x: torch.Tensor, sees: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x) * sees)


class CrossAttentionBlock(nn.Module):
    """x + tanh(g_attn) * cross-attention; then + tanh(g_mlp) * MLP, both zeroed on tokens
    that see no image tile (Meta's reference; transformers zeroes the MLP only, its issue
    39379): such a token leaves the block as it entered."""

    def __init__(self, args: MllamaArgs):
        super().__init__()
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.cross_attention = CrossAttention(args)
        self.attn_gate = Gate()
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        self.feed_forward = MaskedFeedForward(args.dim, args.ffn_hidden_dim)
        self.ffn_gate = Gate()

    def forward(self, x, images, mask, sees):
        x = x + self.attn_gate(self.cross_attention(self.attention_norm(x), images, mask, sees))
        return x + self.ffn_gate(self.feed_forward(self.ffn_norm(x), sees))


def cross_attention_mask(mask: torch.Tensor, patches: int):
    """(B, S, I, T) mask -> the boolean attention mask (B, 1, S, I*T*patches) and (B, S, 1):
    1 for tokens that see any tile. A token that sees none may attend to every tile (a row
    with no key would give NaN), and its attention output and MLP are zeroed. Boolean, not an
    additive float bias: a quarter of the bytes at 11B sizes (S x 4 tiles x 1601 patches per
    sample)."""
    b, s = mask.shape[:2]
    m = (mask != 0).repeat_interleave(patches, dim=3).reshape(b, s, -1)
    sees = m.any(-1, keepdim=True)
    return (m | ~sees)[:, None], sees


class Mllama(nn.Module):
    def __init__(self, args: MllamaArgs, rope_cache_len: Optional[int] = None):
        super().__init__()
        self.args = args
        self.rope_cache_len = rope_cache_len or min(args.max_position_embeddings, 8192)
        self.vision = VisionEncoder(args)
        self.projector = nn.Linear(args.vision_output_dim, args.dim)
        self.tok_embeddings = nn.Embedding(args.vocab_size + 8, args.dim)  # + <|image|> and 7 spare rows
        cross = set(args.cross_attention_layers)
        self.layers = nn.ModuleDict({str(i): CrossAttentionBlock(args) if i in cross else TransformerBlock(args)
                                     for i in range(args.n_layers)})
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        half = args.resolved_head_dim // 2
        self.register_buffer("rope_cos", torch.empty(self.rope_cache_len, half), persistent=False)
        self.register_buffer("rope_sin", torch.empty(self.rope_cache_len, half), persistent=False)

    def init_buffers(self) -> None:
        a = self.args
        inv = llama3_inv_freq(a.resolved_head_dim, a.rope_theta, a.rope_scaling)
        freqs = torch.outer(torch.arange(self.rope_cache_len, dtype=torch.float32), inv.to(torch.float32))
        with torch.no_grad():
            self.rope_cos.copy_(freqs.cos())
            self.rope_sin.copy_(freqs.sin())

    def init_weights(self, seed: int = 0, init_fn: Optional[InitFn] = None) -> None:
        """Truncated normal for matrices and embeddings (output projections depth-scaled as
        Llama's), ones/zeros for norms and biases, every tanh gate at ``args.gate_init`` (0,
        the published init: the pretrained text model is unchanged until the gates open)."""
        if init_fn is None:
            init_fn = lambda t, std, fqn: seeded_trunc_normal_(t, std, fqn, seed)  # noqa: E731
        self.init_buffers()
        a = self.args
        std, out_std = a.init_std, a.init_std / (2 * a.n_layers) ** 0.5
        with torch.no_grad():
            for fqn, p in self.named_parameters():
                leaf = fqn.rsplit(".", 1)[-1]
                if "gate" in fqn.rsplit(".", 2)[-2] or leaf.endswith("gate"):
                    p.fill_(a.gate_init)
                elif "norm" in fqn.rsplit(".", 2)[-2] or fqn.startswith("vision.ln_"):
                    p.fill_(1.0) if leaf == "weight" else p.zero_()
                elif leaf == "bias":
                    p.zero_()
                elif fqn.endswith(("wo.weight", "w2.weight")) and not fqn.startswith("vision."):
                    init_fn(p, out_std, fqn)
                else:
                    init_fn(p, std, fqn)

    def image_states(self, pixels, aspect_ratio_ids, aspect_ratio_mask) -> torch.Tensor:
        """(B, I*T*(patches+1), dim): what every cross-attention layer reads. A padded
        image slot (aspect ratio id 0) gives zeros, whatever its pixels: a mask that marks
        such a slot as seen reads nothing from it."""
        x = self.projector(self.vision(pixels, aspect_ratio_ids, aspect_ratio_mask))
        x = x * (aspect_ratio_ids != 0)[:, :, None, None, None].to(x.dtype)
        return x.reshape(x.shape[0], -1, x.shape[-1])

    def forward(self, *inputs: torch.Tensor):
        """The whole model: (tokens, pixels, aspect_ratio_ids, aspect_ratio_mask,
        cross_attention_mask[, positions[, doc_ids]]) -> logits. ``positions`` (B, S) each
        token's RoPE position (0..S-1 by default; restarting per document under document
        masking); ``doc_ids`` (B, S): self-attention stays within a document (None: one per
        row). Cross-attention needs neither: ``cross_attention_mask`` is per token (the data
        side lets a packed token see its own document's images only).

        A pipeline stage is this module with parts removed: the first (with ``vision``)
        takes those inputs, a later one the previous stage's (hidden states, image states,
        cross_attention_mask[, positions[, doc_ids]]); a stage without ``norm`` returns
        (hidden states, image states, cross_attention_mask[, positions[, doc_ids]]) for the
        next: what it was given, positions included once a stage received them (int64,
        contiguous). The mask crosses as float (a stage boundary carries floating tensors);
        the image states carry the gradient of every later cross-attention layer back to the
        vision tower. Positions index the RoPE tables whatever the local length (no stage
        assumes a prefix of the window)."""
        first = self.vision is not None
        if first:
            tokens, pixels, aspect_ratio_ids, aspect_ratio_mask, mask, *rest = inputs
            images = self.image_states(pixels, aspect_ratio_ids, aspect_ratio_mask)
            h = self.tok_embeddings(tokens)
        else:
            h, images, mask, *rest = inputs
        if len(rest) > 2:
            raise TypeError(f"Mllama takes at most 2 inputs after cross_attention_mask (positions, doc_ids), got "
                            f"{len(rest)}")
        positions, doc_ids = (list(rest) + [None, None])[:2]
        if positions is None and doc_ids is not None:
            raise ValueError("doc_ids need the positions (restarting per document) beside them")
        attend, sees = cross_attention_mask(mask, self.args.patches_per_tile)
        sees = sees.to(h.dtype)
        if positions is None:
            # 0..S-1, S the full length (the mask's: also when sequence parallel splits h).
            rope_pos = torch.arange(mask.shape[1], device=mask.device)[None]
        else:
            positions = positions.long().contiguous()  # (B, S), the full length; a stage sends them on
            # A later pipeline stage infers its shapes by running once on uninitialised
            # inputs (torch.distributed.pipelining): clamped there. The first stage indexes
            # what it was given (out of range: an IndexError).
            rope_pos = positions if first else positions.clamp(0, self.rope_cache_len - 1)
        if doc_ids is not None:
            doc_ids = doc_ids.long().contiguous()
        cos, sin = self.rope_cos[rope_pos], self.rope_sin[rope_pos]
        for layer in self.layers.values():
            if isinstance(layer, CrossAttentionBlock):
                h = layer(h, images, attend, sees)
            else:
                h = layer(h, cos, sin, doc_ids)
        if self.norm is None:
            out = (h, images, mask.to(h.dtype) if not mask.is_floating_point() else mask)
            if positions is not None:
                out += (positions,) if doc_ids is None else (positions, doc_ids)
            return out
        h = self.norm(h)
        return h if getattr(self, "hidden_only", False) else self.output(h)


def build_mllama(args: MllamaArgs, rope_cache_len: Optional[int] = None, device="meta") -> Mllama:
    with torch.device(device):
        return Mllama(args, rope_cache_len)
