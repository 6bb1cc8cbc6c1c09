"""Flex attention as the masked-attention kernel (parallel/attention_core.py,
``parallel.attention_kernel``): on CPU only its forward exists (torch 2.13 raises
NotImplementedError in flex's CPU backward), so these tests compare forwards under
no_grad with the SDPA dense-mask path and the blockwise path, check that ``auto`` keeps
CPU on SDPA (backward included), and that the block mask is built once per set of
document-id / position tensors, not once per layer.

Measured (fp32, CPU, torch 2.13): flex against SDPA dense and against blockwise differ by
at most 7.2e-7 over every case below (1 ulp-scale; the order of the softmax sums differs)."""
import pytest
import torch
import torch.nn.functional as F

import parallel.attention_core as core
from parallel.attention_core import attend
from parallel.cp import local_positions, split_sequence

B, HQ, HKV, D = 2, 4, 2, 16
TOL = 1e-5


def _qkv(sq: int, sk: int, seed: int = 0, requires_grad: bool = False):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, sq, HQ, D, generator=g)
    k = torch.randn(B, sk, HKV, D, generator=g)
    v = torch.randn(B, sk, HKV, D, generator=g)
    return [t.requires_grad_(requires_grad) for t in (q, k, v)]


def _documents(s: int, seed: int = 0) -> torch.Tensor:
    """(B, s) document ids with a few random cut points, different per batch row."""
    g = torch.Generator().manual_seed(seed + 1)
    rows = []
    for _ in range(B):
        cuts = torch.zeros(s, dtype=torch.long)
        cuts[torch.randperm(s - 1, generator=g)[:4] + 1] = 1
        rows.append(torch.cumsum(cuts, 0))
    return torch.stack(rows)


def _three_ways(q, k, v, q_index, q_doc, k_doc):
    """flex, SDPA with a dense mask, blockwise (dense_max=0 forces it; blocks of 64 do not
    divide 100 or 300): max |flex - sdpa|, max |flex - blockwise|."""
    with torch.no_grad():
        flex = attend(q, k, v, q_index, q_doc, k_doc, kernel="flex")
        dense = attend(q, k, v, q_index, q_doc, k_doc, kernel="sdpa")
        blockwise = attend(q, k, v, q_index, q_doc, k_doc, kernel="sdpa", dense_max=0, block=64)
    assert flex.shape == dense.shape == q.shape and flex.dtype == q.dtype
    return (flex - dense).abs().max().item(), (flex - blockwise).abs().max().item()


@pytest.mark.parametrize("s", [128, 100, 300])
@pytest.mark.parametrize("docs", ["several", "single", "mixed"])
def test_flex_forward_equals_sdpa_and_blockwise(s, docs):
    """Document masking over a whole window, lengths a multiple of flex's 128-block and
    not (partial last block): several documents per row (cut points differ per row), a
    single document (all ids equal: plain causal through the document path), or row 0 one
    document and row 1 several (row 0's off-diagonal blocks are full, row 1's are not: a
    block mask broadcast over the batch would skip row 1's mask there)."""
    q, k, v = _qkv(s, s)
    doc = _documents(s) if docs != "single" else torch.zeros(B, s, dtype=torch.long)
    if docs == "mixed":
        doc[0] = 0
    d_dense, d_block = _three_ways(q, k, v, None, doc, doc)
    print(f"s={s} {docs}: max|flex-sdpa|={d_dense:.2e} max|flex-blockwise|={d_block:.2e}")
    assert d_dense <= TOL and d_block <= TOL


@pytest.mark.parametrize("window,cp,docs", [(256, 2, True), (200, 2, True), (384, 3, True), (200, 2, False)],
                         ids=["256-cp2-documents", "200-cp2-documents", "384-cp3-documents", "200-cp2-causal"])
def test_flex_forward_context_parallel(window, cp, docs):
    """Context parallel: each rank's queries (its two head-tail chunks of the window) against
    the whole window's keys, positions from ``local_positions``; with and without documents.
    Windows of 200 and 384 give query/key lengths that are not multiples of 128."""
    _, k, v = _qkv(window, window, seed=1)
    q_all = _qkv(window, window, seed=2)[0]
    doc = _documents(window, seed=3) if docs else None
    for rank in range(cp):
        q = split_sequence(q_all, 1, rank, cp)
        q_index = local_positions(rank, cp, q.shape[1], q.device)
        q_doc = split_sequence(doc, 1, rank, cp) if docs else None
        d_dense, d_block = _three_ways(q, k, v, q_index, q_doc, doc)
        print(f"window={window} cp={cp} rank={rank} docs={docs}: max|flex-sdpa|={d_dense:.2e} "
              f"max|flex-blockwise|={d_block:.2e}")
        assert d_dense <= TOL and d_block <= TOL


def _block_sets(n: torch.Tensor, idx: torch.Tensor, b: int, i: int) -> set:
    return set(idx[b, 0, i, :n[b, 0, i]].tolist())


@pytest.mark.parametrize("case", ["mixed-300", "cp-200"])
def test_block_mask_blocks_match_the_dense_mask(case):
    """Eager flex (the CPU path above) evaluates mask_mod on every score and ignores the
    BlockMask's blocks; compiled flex (CUDA) skips the blocks the mask lists as empty and
    does not apply mask_mod on those it lists as full. So the blocks are checked here
    against ``visible`` for every batch row: listed (partial or full) iff some key is
    visible, full iff every (query, key) pair in the block is (partial last blocks count
    their real rows and columns only)."""
    if case == "mixed-300":
        s = 300
        doc = _documents(s)
        doc[0] = 0
        doc[1, 128:] += 10  # row 1: a document starting at block 1, so block (1, 0) is empty there
        q_index, q_doc, k_doc, sq, sk = None, doc, doc, s, s
    else:
        window, cp = 200, 2
        k_doc = _documents(window, seed=3)
        k_doc[0] = 0
        q_index = local_positions(1, cp, window // cp, torch.device("cpu"))
        q_doc, sq, sk = split_sequence(k_doc, 1, 1, cp), window // cp, window
    bm = core.block_mask(q_index, q_doc, k_doc, sq, sk, torch.device("cpu"))
    pos = torch.arange(sq) if q_index is None else q_index
    dense = core.visible(pos, torch.arange(sk), q_doc, k_doc)  # (B, Sq, Sk)
    bq, bk = bm.BLOCK_SIZE
    assert bm.kv_num_blocks.shape[0] == B  # one block structure per batch row, not broadcast
    for b in range(B):
        for i in range(-(-sq // bq)):
            partial = _block_sets(bm.kv_num_blocks, bm.kv_indices, b, i)
            full = _block_sets(bm.full_kv_num_blocks, bm.full_kv_indices, b, i)
            assert not partial & full
            for j in range(-(-sk // bk)):
                tile = dense[b, i * bq:(i + 1) * bq, j * bk:(j + 1) * bk]
                assert (j in partial or j in full) == bool(tile.any()), (b, i, j)
                if j in full:
                    assert tile.all(), (b, i, j)


def test_auto_on_cpu_is_sdpa_with_backward():
    """``auto`` on a CPU tensor takes the SDPA/blockwise path (flex has no CPU backward):
    backward runs and output and gradients equal ``kernel="sdpa"`` bit for bit, dense and
    blockwise; no block mask is built."""
    doc = _documents(100)
    builds = core.mask_builds
    for extra in ({}, {"dense_max": 0, "block": 64}):
        results = []
        for kernel in ("auto", "sdpa"):
            q, k, v = _qkv(100, 100, requires_grad=True)
            out = attend(q, k, v, None, doc, doc, kernel=kernel, **extra)
            out.pow(2).sum().backward()
            results.append((out.detach(), q.grad, k.grad, v.grad))
        for got, want in zip(*results):
            assert torch.equal(got, want)
    assert core.mask_builds == builds


def test_unknown_kernel_is_refused():
    q, k, v = _qkv(8, 8)
    with pytest.raises(ValueError, match="attention_kernel"):
        attend(q, k, v, kernel="flash")


@pytest.fixture
def counted(monkeypatch):
    """An empty block-mask cache and a count of create_block_mask calls."""
    monkeypatch.setattr(core, "_mask_cache", type(core._mask_cache)())
    calls = []
    real = core.create_block_mask

    def counting(*args, **kwargs):
        calls.append(args[1:5])  # B, H, Sq, Sk
        return real(*args, **kwargs)

    monkeypatch.setattr(core, "create_block_mask", counting)
    return calls


def test_block_mask_is_cached_on_the_tensors(counted):
    """The same doc tensor (every layer of a step) builds the mask once; an equal but
    different tensor, or the same one changed in place (its version bumped), builds again,
    and the rebuilt mask is the one used (the output follows the new documents)."""
    q, k, v = _qkv(100, 100)
    doc = _documents(100)
    with torch.no_grad():
        first = attend(q, k, v, None, doc, doc, kernel="flex")
        again = attend(q, k, v, None, doc, doc, kernel="flex")
        assert len(counted) == 1 and counted[0] == (B, None, 100, 100)
        assert torch.equal(first, again)
        other = doc.clone()
        attend(q, k, v, None, other, other, kernel="flex")
        assert len(counted) == 2
        doc[:, 50:] += 7  # a new document from position 50 in every row: in place
        changed = attend(q, k, v, None, doc, doc, kernel="flex")
        assert len(counted) == 3
        assert (changed - attend(q, k, v, None, doc, doc, kernel="sdpa")).abs().max() <= TOL
        assert (changed - first).abs().max() > 1e-2
        # context parallel: the same position tensor reuses, a new one rebuilds
        q_index = local_positions(0, 2, 50, q.device)
        attend(q[:, :50], k, v, q_index, doc[:, q_index], doc, kernel="flex")
        n = len(counted)
        q_doc = doc[:, q_index]
        attend(q[:, :50], k, v, q_index, q_doc, doc, kernel="flex")
        attend(q[:, :50], k, v, q_index, q_doc, doc, kernel="flex")
        assert len(counted) == n + 1
        attend(q[:, :50], k, v, q_index.clone(), q_doc, doc, kernel="flex")
        assert len(counted) == n + 2
    assert len(core._mask_cache) <= core._MASK_CACHE_SIZE


def test_activation_checkpoint_recompute_reuses_the_mask(counted, monkeypatch):
    """Non-reentrant activation checkpointing (parallel/ac.py) recomputes the block with
    the same doc tensor object: the recompute finds the forward's mask. flex itself has
    no CPU backward, so a differentiable stand-in (SDPA, mask ignored) takes its place."""
    monkeypatch.setitem(core._FLEX, "cpu", lambda q, k, v, block_mask, enable_gqa: F.scaled_dot_product_attention(
        q, k, v, enable_gqa=enable_gqa))
    q, k, v = _qkv(100, 100, requires_grad=True)
    doc = _documents(100)
    out = torch.utils.checkpoint.checkpoint(lambda q, k, v: attend(q, k, v, None, doc, doc, kernel="flex"),
                                            q, k, v, use_reentrant=False)
    assert len(counted) == 1
    out.sum().backward()
    assert q.grad is not None and len(counted) == 1


def test_kernel_attribute_on_the_cores():
    """The cores carry ``kernel`` (set from parallel.attention_kernel) into ``attend``."""
    from parallel.attention_core import AttentionCore
    from parallel.cp import ContextParallelCore

    c = AttentionCore()
    assert c.kernel == "auto" and "kernel" not in repr(c)
    c.kernel = "flex"
    assert "kernel=flex" in repr(c)
    assert ContextParallelCore(None, 0, 2).kernel == "auto"
    q, k, v = _qkv(100, 100)
    doc = _documents(100)
    with torch.no_grad():
        got = c(q, k, v, doc)
        assert (got - attend(q, k, v, None, doc, doc, kernel="sdpa")).abs().max() <= TOL
