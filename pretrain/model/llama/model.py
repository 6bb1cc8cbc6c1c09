"""Llama 3.x decoder: RMSNorm -> GQA attention with llama3-scaled RoPE -> SwiGLU.

Plain nn.Modules that know nothing of parallelism. Built on the meta device, then
materialized with ``to_empty`` + ``init_weights`` so any size can be constructed free."""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from parallel.attention_core import AttentionCore

from ..family import InitFn, seeded_trunc_normal_
from .args import LlamaArgs, RopeScaling


def llama3_inv_freq(head_dim: int, theta: float, scaling: Optional[RopeScaling]) -> torch.Tensor:
    """Inverse frequencies of RoPE, with Llama 3's long-context scaling applied:
    long wavelengths are divided by ``factor``, short ones kept, the band between
    interpolated smoothly."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    if scaling is None:
        return inv_freq.float()
    old_ctx = scaling.original_max_position_embeddings
    low_wavelen = old_ctx / scaling.low_freq_factor
    high_wavelen = old_ctx / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    smooth = (old_ctx / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    interpolated = (1 - smooth) * inv_freq / scaling.factor + smooth * inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / scaling.factor, interpolated)
    scaled = torch.where(wavelen < high_wavelen, inv_freq, scaled)
    return scaled.float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate consecutive pairs (x[2i], x[2i+1]) of the last dim (Meta's layout).

    x: (B, S, H, D); cos/sin: (B, S, D/2). Computed in fp32 and cast back."""
    xf = x.float().unflatten(-1, (-1, 2))
    x0, x1 = xf[..., 0], xf[..., 1]
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
    return out.flatten(-2).type_as(x)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.type_as(x)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)


class Attention(nn.Module):
    def __init__(self, args: LlamaArgs):
        super().__init__()
        self.n_heads = args.n_heads
        self.n_kv_heads = args.n_kv_heads
        self.head_dim = args.resolved_head_dim
        self.wq = nn.Linear(args.dim, self.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(self.n_heads * self.head_dim, args.dim, bias=False)
        # softmax(q k^T) v under the causal / document mask: a slot context parallelism swaps.
        self.core = AttentionCore()

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        doc_ids: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        bsz, seqlen, _ = x.shape
        # -1 instead of n_heads: under tensor parallel each rank holds a slice of heads.
        q = self.wq(x).view(bsz, seqlen, -1, self.head_dim)
        k = self.wk(x).view(bsz, seqlen, -1, self.head_dim)
        v = self.wv(x).view(bsz, seqlen, -1, self.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        return self.wo(self.core(q, k, v, doc_ids).reshape(bsz, seqlen, -1))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)  # gate
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)  # up
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)  # down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, args: LlamaArgs):
        super().__init__()
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.attention = Attention(args)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        self.feed_forward = FeedForward(args.dim, args.ffn_hidden_dim)

    def forward(self, x, cos, sin, doc_ids=None):
        h = x + self.attention(self.attention_norm(x), cos, sin, doc_ids)
        return h + self.feed_forward(self.ffn_norm(h))


class TiedHead(nn.Module):
    """Output projection by the embedding matrix, which it receives in forward: it has no
    parameter of its own (a shared Parameter would come apart under to_empty and
    sharding), but it is a module, so tensor parallelism can lay out its input and output."""

    def forward(self, h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.linear(h, weight)


class Llama(nn.Module):
    """Decoder-only Llama 3.x. ``forward`` returns logits (or, with ``hidden_only``, the
    final-normed hidden states: the chunked loss applies the head itself); the loss lives
    in the trainer."""

    def __init__(self, args: LlamaArgs, rope_cache_len: Optional[int] = None):
        super().__init__()
        self.args = args
        # Positions index the RoPE tables: they run up to the window length (train.seq_len).
        self.rope_cache_len = rope_cache_len or min(args.max_position_embeddings, 8192)
        self.hidden_only = False
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        # A ModuleDict keyed "0".."n-1" keeps FQNs stable when pipeline stages drop layers.
        self.layers = nn.ModuleDict({str(i): TransformerBlock(args) for i in range(args.n_layers)})
        self.norm = RMSNorm(args.dim, args.norm_eps)
        # A tied head reuses the embedding matrix in forward (TiedHead) instead of sharing a
        # Parameter between two modules.
        self.output = None if args.tie_embeddings else nn.Linear(args.dim, args.vocab_size, bias=False)
        self.tied_head = TiedHead() if args.tie_embeddings else None
        half = args.resolved_head_dim // 2
        self.register_buffer("rope_cos", torch.empty(self.rope_cache_len, half), persistent=False)
        self.register_buffer("rope_sin", torch.empty(self.rope_cache_len, half), persistent=False)

    @torch.no_grad()
    def init_buffers(self) -> None:
        """(Re)compute the RoPE tables; needed after ``to_empty`` and before loading weights."""
        a = self.args
        inv_freq = llama3_inv_freq(a.resolved_head_dim, a.rope_theta, a.rope_scaling)
        pos = torch.arange(self.rope_cache_len, dtype=torch.float32)
        angles = torch.outer(pos, inv_freq)
        self.rope_cos.copy_(angles.cos())
        self.rope_sin.copy_(angles.sin())

    @torch.no_grad()
    def init_weights(self, seed: int = 0, init_fn: Optional[InitFn] = None) -> None:
        """Truncated-normal init (cut at 3 std); attention and MLP output projections are
        depth-scaled by 1/sqrt(2 * n_layers), an untied head uses dim**-0.5.

        ``init_fn`` lets the parallel layer fill sharded tensors so that the values do
        not depend on the layout; by default each tensor draws from its own seeded
        generator."""
        if init_fn is None:
            init_fn = lambda t, std, fqn: seeded_trunc_normal_(t, std, fqn, seed)  # noqa: E731
        self.init_buffers()
        a = self.args
        std = a.init_std
        out_std = std / math.sqrt(2 * a.n_layers)
        for fqn, p in self.named_parameters():
            if fqn.endswith("norm.weight"):
                p.fill_(1.0)
            elif fqn.endswith(("attention.wo.weight", "feed_forward.w2.weight")):
                init_fn(p, out_std, fqn)
            elif fqn == "output.weight":
                init_fn(p, a.dim**-0.5, fqn)
            else:
                init_fn(p, std, fqn)

    def forward(self, tokens: torch.Tensor, positions: Optional[torch.Tensor] = None,
                doc_ids: Optional[torch.Tensor] = None):
        """``tokens`` (B, S) ids, or a later pipeline stage's hidden states; ``positions``
        (B, S) each token's RoPE position (0..S-1 by default; restarting per document
        under document masking; under context parallelism this rank's share of them);
        ``doc_ids`` (B, S): attention stays within a document (None: one per window).

        A pipeline stage is this module with parts removed: without ``norm`` it returns
        (hidden states, positions[, doc_ids]) for the next stage; fed hidden states (floats)
        instead of token ids it skips the lookup (a last stage may hold the embedding only
        for its tied head). Positions index the RoPE tables whatever the local length (no
        stage assumes a prefix of the window)."""
        if positions is None:
            if tokens.is_floating_point():
                raise ValueError("a later pipeline stage needs the positions its first stage passed on")
            # contiguous: a pipeline stage sends them on
            positions = torch.arange(tokens.shape[1], device=tokens.device).expand(tokens.shape[0], -1).contiguous()
        if tokens.is_floating_point():
            # A later pipeline stage infers its shapes by running once on uninitialised
            # inputs (torch.distributed.pipelining): clamped there. The first stage indexes
            # what it was given (out of range: an IndexError).
            positions = positions.clamp(0, self.rope_cache_len - 1)
        cos, sin = self.rope_cos[positions], self.rope_sin[positions]
        h = self.tok_embeddings(tokens) if not tokens.is_floating_point() else tokens
        for layer in self.layers.values():
            h = layer(h, cos, sin, doc_ids)
        if self.norm is None:
            return (h, positions) if doc_ids is None else (h, positions, doc_ids)
        h = self.norm(h)
        if self.hidden_only:
            return h
        if self.output is None:
            return self.tied_head(h, self.tok_embeddings.weight)
        return self.output(h)


def build_llama(args: LlamaArgs, rope_cache_len: Optional[int] = None, device="meta") -> Llama:
    with torch.device(device):
        return Llama(args, rope_cache_len)
