"""The attention core: softmax(q k^T / sqrt(d) + mask) v of a causal decoder, where the
mask is causal on positions in the window and, with document masking, block-diagonal over
documents. A family's attention module computes q, k, v (and RoPE) and hands them to its
core (a child module the layout names, ``ModelLayout.attention_core``); ``parallel/cp.py``
swaps that child for a context-parallel one. Nothing here imports ``torch.distributed``.

The mask is never materialised for a whole window unless the scores are small: it is built from
each query's and key's index in the window and document id, per block of queries against
the keys it can see (``blockwise_attention``: online softmax in the forward, the scores
recomputed block by block in the backward, so memory grows with the sequence, not its
square). Short windows take torch's SDPA with a dense boolean mask (faster on CPU), and
a window without document ids takes SDPA's own causal kernel."""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

# Above this many attention scores (batch x query heads x queries x keys), the blockwise path
# runs instead of SDPA with a dense mask. SDPA turns a boolean mask into an fp32 one that
# each layer keeps for its backward (and with grouped-query heads may hold every score in
# its math kernel): at 2^22 scores that is at most 16 MB per layer. bench/long_context.py:
# above 2^26 the masks were a third of a context-parallel rank's peak at 4K tokens.
DENSE_SCORES_MAX = 1 << 22
# Queries and keys per block of the blockwise path: (batch x heads x 512 x 512) fp32 scores.
BLOCK = 512


def visible(q_index: torch.Tensor, k_index: torch.Tensor, q_doc: Optional[torch.Tensor],
            k_doc: Optional[torch.Tensor]) -> torch.Tensor:
    """(B or 1, Sq, Sk) boolean: query i may attend key j (j's index <= i's, same document)."""
    ok = (q_index[:, None] >= k_index[None, :]).unsqueeze(0)
    if q_doc is not None:
        ok = ok & (q_doc[:, :, None] == k_doc[:, None, :])
    return ok


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_index: Optional[torch.Tensor] = None,
              q_doc: Optional[torch.Tensor] = None, k_doc: Optional[torch.Tensor] = None, *,
              dense_max: int = DENSE_SCORES_MAX, block: int = BLOCK) -> torch.Tensor:
    """q (B, Sq, Hq, D), k/v (B, Sk, Hkv, D) with Hkv dividing Hq (grouped-query: query head
    h reads kv head h // (Hq / Hkv)). Keys are the window's positions 0..Sk-1 in order;
    ``q_index`` (Sq,) the queries' positions in the window (None: 0..Sq-1, Sq == Sk).
    ``q_doc`` (B, Sq) / ``k_doc`` (B, Sk): document ids (None: one document). Returns
    (B, Sq, Hq, D)."""
    b, sq, hq, _ = q.shape
    sk = k.shape[1]
    if q_index is None and q_doc is None and sq == sk:
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             is_causal=True, enable_gqa=True)
        return out.transpose(1, 2)
    if q_index is None:
        q_index = torch.arange(sq, device=q.device)
    k_index = torch.arange(sk, device=q.device)
    if b * hq * sq * sk <= dense_max:
        mask = visible(q_index, k_index, q_doc, k_doc).unsqueeze(1)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             attn_mask=mask, enable_gqa=True)
        return out.transpose(1, 2)
    return BlockwiseAttention.apply(q, k, v, q_index, q_doc, k_doc, block)


def _grouped(q: torch.Tensor, hkv: int) -> torch.Tensor:
    """(B, S, Hq, D) -> (B, Hkv, G, S, D): the query heads of each kv head together."""
    b, s, hq, d = q.shape
    return q.view(b, s, hkv, hq // hkv, d).permute(0, 2, 3, 1, 4)


def _blocks(q_index: torch.Tensor, block: int):
    """(start, end, last visible key + 1) per block of queries: read from the host once
    (one device sync per call, not one per block)."""
    ends = q_index.detach().cpu().tolist()
    for s in range(0, len(ends), block):
        e = min(s + block, len(ends))
        yield s, e, max(ends[s:e]) + 1


class BlockwiseAttention(torch.autograd.Function):
    """Exact attention, block by block: each block of queries against the blocks of keys
    it can see (up to its last position), its mask built from indices and document ids
    for that block pair only. The forward keeps a running max and sum (online softmax) and
    saves only the output and the log-sum-exp; the backward recomputes each block's scores.
    Accumulates in fp32 at least (bf16 inputs too)."""

    @staticmethod
    def forward(ctx, q, k, v, q_index, q_doc, k_doc, block):
        hkv, d = k.shape[2], k.shape[3]
        scale = 1.0 / math.sqrt(d)
        acc_dtype = torch.promote_types(q.dtype, torch.float32)
        qg = _grouped(q, hkv).to(acc_dtype)  # (B, Hkv, G, Sq, D)
        kt = k.permute(0, 2, 1, 3).to(acc_dtype)  # (B, Hkv, Sk, D)
        vt = v.permute(0, 2, 1, 3).to(acc_dtype)
        out = torch.empty_like(qg)
        lse = torch.empty(qg.shape[:-1], dtype=acc_dtype, device=q.device)
        k_index = torch.arange(k.shape[1], device=q.device)
        for qs, qe, kmax in _blocks(q_index, block):
            qb = qg[:, :, :, qs:qe] * scale
            m = torch.full(qb.shape[:-1], float("-inf"), dtype=acc_dtype, device=q.device)
            l = torch.zeros_like(m)
            acc = torch.zeros_like(qb)
            for ks in range(0, kmax, block):
                ke = min(ks + block, kmax)
                s = qb @ kt[:, :, None, ks:ke].transpose(-1, -2)  # (B, Hkv, G, bq, bk)
                ok = visible(q_index[qs:qe], k_index[ks:ke], None if q_doc is None else q_doc[:, qs:qe],
                             None if k_doc is None else k_doc[:, ks:ke])
                s = s.masked_fill(~ok[:, None, None], float("-inf"))
                m_new = torch.maximum(m, s.amax(-1))
                m_safe = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)
                p = torch.exp(s - m_safe[..., None])
                corr = torch.exp(m - m_safe)
                l = l * corr + p.sum(-1)
                acc = acc * corr[..., None] + p @ vt[:, :, None, ks:ke]
                m = m_new
            out[:, :, :, qs:qe] = acc / l[..., None]
            lse[:, :, :, qs:qe] = m + torch.log(l)
        ctx.save_for_backward(q, k, v, q_index, q_doc, k_doc, out, lse)
        ctx.block, ctx.scale = block, scale
        b, sq, hq, _ = q.shape
        return out.permute(0, 3, 1, 2, 4).reshape(b, sq, hq, d).to(q.dtype)

    @staticmethod
    def backward(ctx, dout):
        q, k, v, q_index, q_doc, k_doc, out, lse = ctx.saved_tensors
        block, scale = ctx.block, ctx.scale
        hkv = k.shape[2]
        acc_dtype = out.dtype
        qg = _grouped(q, hkv).to(acc_dtype)
        kt = k.permute(0, 2, 1, 3).to(acc_dtype)
        vt = v.permute(0, 2, 1, 3).to(acc_dtype)
        do = _grouped(dout, hkv).to(acc_dtype)
        delta = (do * out).sum(-1)  # (B, Hkv, G, Sq)
        dq = torch.zeros_like(qg)
        dk = torch.zeros_like(kt)
        dv = torch.zeros_like(vt)
        k_index = torch.arange(k.shape[1], device=q.device)
        for qs, qe, kmax in _blocks(q_index, block):
            qb, dob = qg[:, :, :, qs:qe], do[:, :, :, qs:qe]
            for ks in range(0, kmax, block):
                ke = min(ks + block, kmax)
                kb, vb = kt[:, :, None, ks:ke], vt[:, :, None, ks:ke]
                s = (qb * scale) @ kb.transpose(-1, -2)
                ok = visible(q_index[qs:qe], k_index[ks:ke], None if q_doc is None else q_doc[:, qs:qe],
                             None if k_doc is None else k_doc[:, ks:ke])
                p = torch.exp(s - lse[:, :, :, qs:qe, None]).masked_fill(~ok[:, None, None], 0.0)
                dv[:, :, ks:ke] += (p.transpose(-1, -2) @ dob).sum(2)
                ds = p * (dob @ vb.transpose(-1, -2) - delta[:, :, :, qs:qe, None])
                dq[:, :, :, qs:qe] += (ds @ kb) * scale
                dk[:, :, ks:ke] += (ds.transpose(-1, -2) @ qb).sum(2) * scale
        b, sq, hq, d = q.shape
        dq = dq.permute(0, 3, 1, 2, 4).reshape(b, sq, hq, d).to(q.dtype)
        return dq, dk.permute(0, 2, 1, 3).to(k.dtype), dv.permute(0, 2, 1, 3).to(v.dtype), None, None, None, None


class AttentionCore(nn.Module):
    """The single-device core: ``forward(q, k, v, doc_ids)`` with q (B, S, Hq, D), k/v
    (B, S, Hkv, D) after RoPE, ``doc_ids`` (B, S) or None. Holds no parameters; the
    context-parallel core (``parallel/cp.py``) takes its place under ``parallel.cp``."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                doc_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        return attend(q, k, v, None, doc_ids, doc_ids)
