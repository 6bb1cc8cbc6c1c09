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
a window without document ids takes SDPA's own causal kernel.

Which kernel computes masked attention (``parallel.attention_kernel``, the core's
``kernel``): ``sdpa`` is the path above (dense mask or blockwise); ``flex`` is torch's flex
attention with a ``BlockMask`` built from the same positions and document ids, so blocks
of keys a block of queries cannot see are skipped and no dense mask is kept for the
backward; ``auto`` (the default) takes flex on CUDA and sdpa elsewhere, because flex has
no CPU backward (torch 2.13: NotImplementedError, eager and compiled; its forward runs).
Unmasked causal attention is SDPA's causal kernel whatever the kernel. The block mask is
built once per step, not per layer: it is cached on the identity of the position and
document-id tensors that every layer (and the activation-checkpoint recompute) receives."""
from __future__ import annotations

import math
import warnings
from collections import OrderedDict
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

from .config import ATTENTION_KERNELS

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
              kernel: str = "auto", dense_max: int = DENSE_SCORES_MAX, block: int = BLOCK) -> torch.Tensor:
    """q (B, Sq, Hq, D), k/v (B, Sk, Hkv, D) with Hkv dividing Hq (grouped-query: query head
    h reads kv head h // (Hq / Hkv)). Keys are the window's positions 0..Sk-1 in order;
    ``q_index`` (Sq,) the queries' positions in the window (None: 0..Sq-1, Sq == Sk).
    ``q_doc`` (B, Sq) / ``k_doc`` (B, Sk): document ids (None: one document). ``kernel``
    (one of ``ATTENTION_KERNELS``) picks masked attention's kernel: flex, or SDPA with a
    dense mask up to ``dense_max`` scores and blockwise above (blocks of ``block``); auto is
    flex on CUDA. Returns (B, Sq, Hq, D)."""
    if kernel not in ATTENTION_KERNELS:
        raise ValueError(f"parallel.attention_kernel={kernel!r}: expected one of {', '.join(ATTENTION_KERNELS)}")
    b, sq, hq, _ = q.shape
    sk = k.shape[1]
    if q_index is None and q_doc is None and sq == sk:
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             is_causal=True, enable_gqa=True)
        return out.transpose(1, 2)
    if kernel == "flex" or (kernel == "auto" and q.device.type == "cuda"):
        return flex_attend(q, k, v, q_index, q_doc, k_doc)
    if q_index is None:
        q_index = torch.arange(sq, device=q.device)
    k_index = torch.arange(sk, device=q.device)
    if b * hq * sq * sk <= dense_max:
        mask = visible(q_index, k_index, q_doc, k_doc).unsqueeze(1)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             attn_mask=mask, enable_gqa=True)
        return out.transpose(1, 2)
    return BlockwiseAttention.apply(q, k, v, q_index, q_doc, k_doc, block)


# -- flex attention ------------------------------------------------------------------------

# flex_attention per device type, made on first use. On CUDA it must run compiled: eager
# flex materialises every score (no fused kernel), so it is compiled here even when
# parallel.compile=false (dynamic=False: one kernel per shape, as a step's shapes repeat).
# On CPU eager flex is enough for the forward it supports, and compiling it is slow.
_FLEX: Dict[str, Callable] = {}


def _eager_flex(*args, **kwargs) -> torch.Tensor:
    """Eager flex_attention without its warning that eager flex materialises the scores
    (meant for GPUs; on CPU that is the point). Under dynamo flex does not warn, and
    catch_warnings would break the graph."""
    if torch.compiler.is_compiling():
        return flex_attention(*args, **kwargs)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        return flex_attention(*args, **kwargs)


def _flex_for(device_type: str) -> Callable:
    fn = _FLEX.get(device_type)
    if fn is None:
        fn = torch.compile(flex_attention, dynamic=False) if device_type == "cuda" else _eager_flex
        _FLEX[device_type] = fn
    return fn


def flex_mask_mod(q_index: Optional[torch.Tensor], q_doc: Optional[torch.Tensor],
                  k_doc: Optional[torch.Tensor]) -> Callable:
    """flex's mask_mod for ``visible``: query i sees key j iff i's window position
    (``q_index[i]``, or i) >= j and, with document ids, both are in the same document."""
    if q_index is None:
        def causal(b, h, qi, kj):
            return qi >= kj
    else:
        def causal(b, h, qi, kj):
            return q_index[qi] >= kj
    if q_doc is None:
        return causal

    def documents(b, h, qi, kj):
        return causal(b, h, qi, kj) & (q_doc[b, qi] == k_doc[b, kj])
    return documents


# The last few block masks built, keyed on the identity (and in-place version) of the
# tensors they were built from. Every layer of a step gets the same doc_ids tensor, and the
# activation-checkpoint recompute (non-reentrant) gets the same objects again, so one mask
# serves them all. Each entry holds its key tensors, so their ids cannot be reused by new
# tensors while it is cached.
_MASK_CACHE_SIZE = 4
_mask_cache: "OrderedDict[tuple, Tuple[tuple, BlockMask]]" = OrderedDict()
# How many block masks were built (a miss of the cache): read by the tests.
mask_builds = 0


def _tensor_key(t: Optional[torch.Tensor]):
    """Identity of a key tensor: its id, version counter and shape; False if it has no
    version counter (an inference-mode tensor can change in place unseen: never cached).
    A write that bypasses the version counter (through a numpy array sharing the memory,
    ``.data``) is not seen: the mask of the old ids would be served, and on CUDA, where flex
    skips the mask function on full blocks, queries would attend across documents. The
    trainer's ids are a fresh tensor per batch (the loader allocates each batch's arrays;
    on CUDA they are a device copy), which nothing writes after."""
    if t is None:
        return None
    if t.is_inference():
        return False
    return id(t), t._version, tuple(t.shape)


def _build_block_mask(q_index: Optional[torch.Tensor], q_doc: Optional[torch.Tensor],
                      k_doc: Optional[torch.Tensor], sq: int, sk: int, device: torch.device) -> BlockMask:
    """The BlockMask of ``flex_mask_mod`` for Sq queries and Sk keys (any lengths: the last
    block may be partial), per batch row with document ids, broadcast over the batch
    without; from the cache when the same tensors were seen unchanged."""
    global mask_builds
    keys = (_tensor_key(q_index), _tensor_key(q_doc), _tensor_key(k_doc))
    key = keys + (sq, sk, str(device))
    cacheable = False not in keys
    if cacheable and key in _mask_cache:
        _mask_cache.move_to_end(key)
        return _mask_cache[key][1]
    batch = None if q_doc is None else q_doc.shape[0]
    # On CUDA the construction itself is compiled: eagerly it would hold the whole (B, Sq, Sk)
    # boolean mask for a moment (16 GB for one 128K window), compiled it works block by block.
    mask = create_block_mask(flex_mask_mod(q_index, q_doc, k_doc), batch, None, sq, sk, device=device,
                             _compile=torch.device(device).type == "cuda")
    mask_builds += 1
    if cacheable:
        _mask_cache[key] = ((q_index, q_doc, k_doc), mask)
        while len(_mask_cache) > _MASK_CACHE_SIZE:
            _mask_cache.popitem(last=False)
    return mask


# _build_block_mask behind torch.compiler.disable, made on first use (disable imports
# dynamo, seconds at import time). Disabled so that a block compiled under
# parallel.compile=true graph-breaks around the mask's construction and runs it eagerly
# (the cache is Python state keyed on tensor identity, which tracing would bake into the
# graph) and passes the BlockMask into the compiled remainder. Not recursive: the
# construction's own compile (CUDA) still runs inside it (checked on CPU with _compile=True
# from a compiled module: one build, equal outputs).
_block_mask_fn: Optional[Callable] = None


def block_mask(q_index: Optional[torch.Tensor], q_doc: Optional[torch.Tensor], k_doc: Optional[torch.Tensor],
               sq: int, sk: int, device: torch.device) -> BlockMask:
    """``flex_attend``'s BlockMask (cached, built eagerly even inside a compiled block)."""
    global _block_mask_fn
    if _block_mask_fn is None:
        _block_mask_fn = torch.compiler.disable(_build_block_mask, recursive=False)
    return _block_mask_fn(q_index, q_doc, k_doc, sq, sk, device)


def flex_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_index: Optional[torch.Tensor] = None,
                q_doc: Optional[torch.Tensor] = None, k_doc: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``attend``'s masked attention with flex attention: same arguments, (B, Sq, Hq, D) in
    q's dtype. The mask never exists densely past its construction: flex skips the blocks
    a block of queries cannot see and applies the mask_mod on the partial ones. Forward
    only on CPU (torch 2.13 has no CPU backward for flex)."""
    sq, sk = q.shape[1], k.shape[1]
    mask = block_mask(q_index, q_doc, k_doc, sq, sk, q.device)
    out = _flex_for(q.device.type)(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                   block_mask=mask, enable_gqa=True)
    return out.transpose(1, 2).to(q.dtype)


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
    context-parallel core (``parallel/cp.py``) takes its place under ``parallel.cp``.
    ``kernel`` (``parallel.attention_kernel``, set by ``parallel/parallelize.py``) picks the
    masked-attention kernel; see ``attend``."""

    kernel: str = "auto"

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                doc_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        return attend(q, k, v, None, doc_ids, doc_ids, kernel=self.kernel)

    def extra_repr(self) -> str:
        return "" if self.kernel == "auto" else f"kernel={self.kernel}"
