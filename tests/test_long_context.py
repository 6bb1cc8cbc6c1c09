"""Long context: the attention core (block-causal masks from positions and document ids,
built block by block), context parallelism (head-tail chunks, K/V all-gathered), the
chunked loss, and their parity with one process on real training steps.

Parity tolerance as in test_parallel_parity.py (fp32, 5 AdamW steps: losses and grad
norms within 1e-5 relative, final weights within 1e-5): CP changes only the order of
sums (attention over gathered keys, FSDP2's reduce-scatter over dp x cp, the loss averaged
over ranks). The document-masked runs train at 16x the model's original RoPE context
(``original_max_position_embeddings=4``, windows of 64 tokens), so positions past the
original context reach RoPE's scaled frequencies on every rank."""
import math
import re

import pytest
import torch

from conftest import run_job
from test_parallel_parity import CKPT, assert_parity, reference  # noqa: F401 (reference: a fixture)

# Document masking at 16x the original RoPE context (windows of 64 tokens, original 4):
# documents cut to 150 bytes (about 50 tokens of the corpus BPE), so every window holds
# boundaries and positions run to ~50, far past 4. (At 400 bytes no window of these 5
# steps held a boundary: masked and unmasked runs were bit-identical, measured.)
DM = ["data.document_masking=true", "data.max_doc_bytes=150", "train.seq_len=64",
      "model.rope_scaling.original_max_position_embeddings=4"]


# -- the attention core ---------------------------------------------------------------------

def _reference_attention(q, k, v, q_index, q_doc, k_doc):
    """Plain softmax attention with an explicit mask, kv heads repeated (Meta's GQA)."""
    from parallel.attention_core import visible

    mask = visible(q_index, torch.arange(k.shape[1]), q_doc, k_doc).unsqueeze(1)
    rep = q.shape[2] // k.shape[2]
    qq, kk, vv = q.transpose(1, 2), k.transpose(1, 2).repeat_interleave(rep, 1), v.transpose(1, 2).repeat_interleave(rep, 1)
    s = (qq @ kk.transpose(-1, -2) / q.shape[-1] ** 0.5).masked_fill(~mask, float("-inf"))
    return (s.softmax(-1) @ vv).transpose(1, 2)


@pytest.mark.parametrize("subset", [False, True], ids=["all-queries", "head-tail-queries"])
@pytest.mark.parametrize("docs", [False, True], ids=["causal", "documents"])
def test_blockwise_attention_equals_the_masked_reference(subset, docs):
    """The blockwise path (online softmax forward, recomputed backward), with blocks that
    do not divide the length, equals explicit masked attention in fp64, output and q/k/v
    gradients, for GQA (4 query heads on 2 kv heads), documents, and a rank's head-tail
    query subset against all keys; the dense-mask SDPA path too."""
    from parallel.attention_core import attend

    torch.manual_seed(0)
    b, s, d = 2, 70, 8
    q = torch.randn(b, s, 4, d, dtype=torch.float64, requires_grad=True)
    k = torch.randn(b, s, 2, d, dtype=torch.float64, requires_grad=True)
    v = torch.randn(b, s, 2, d, dtype=torch.float64, requires_grad=True)
    doc = torch.cumsum((torch.rand(b, s) < 0.1).long(), 1) if docs else None
    q_index = torch.cat([torch.arange(10, 30), torch.arange(50, 70)]) if subset else torch.arange(s)
    qs = q[:, q_index]
    q_doc = doc[:, q_index] if docs else None
    want = _reference_attention(qs, k, v, q_index, q_doc, doc)
    g = torch.randn_like(want)
    want_grads = torch.autograd.grad(want, (q, k, v), g, retain_graph=True)
    for dense_max, block in ((1 << 28, 512), (0, 16), (0, 7)):
        got = attend(qs, k, v, q_index if subset else None, q_doc, doc, dense_max=dense_max, block=block)
        grads = torch.autograd.grad(got, (q, k, v), g, retain_graph=True)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        for x, y in zip(grads, want_grads):
            torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-12)


def test_head_tail_split_and_window_order_invert_each_other():
    """Rank i of n holds chunks i and 2n-1-i; the positions it reports are those chunks'
    and the gathered parts put back in window order are the window."""
    from parallel.cp import _window_order, local_positions, split_sequence

    x = torch.arange(3 * 48).reshape(3, 48)
    for cp in (1, 2, 3, 4):
        parts = [split_sequence(x, 1, r, cp) for r in range(cp)]
        for r, p in enumerate(parts):
            assert torch.equal(p[0], local_positions(r, cp, p.shape[1], "cpu"))
        assert torch.equal(_window_order(torch.cat(parts, dim=1), cp), x)
    assert split_sequence(torch.arange(8)[None], 1, 0, 2).tolist() == [[0, 1, 6, 7]]


# -- the chunked loss -----------------------------------------------------------------------

@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("summed", [False, True], ids=["mean", "sum"])
def test_chunked_loss_equals_the_whole_loss(tied, summed):
    """The head and cross-entropy chunk by chunk (chunks that do not divide the tokens),
    recomputed in backward: the same loss and gradients as the whole loss within 1e-6
    relative, tied and untied heads, mean (text) and sum (chat, labels -100 skipped)."""
    from pretrain.loss import chunked_next_token_loss, next_token_loss
    from pretrain.model.llama import FAMILY, LlamaArgs, build_llama

    args = LlamaArgs(dim=32, n_layers=1, n_heads=4, n_kv_heads=2, ffn_hidden_dim=64, vocab_size=300,
                     tie_embeddings=tied)
    model = build_llama(args, rope_cache_len=24, device="cpu")
    model.init_weights(seed=1)
    torch.manual_seed(0)
    tokens = torch.randint(0, 300, (3, 24))
    labels = torch.randint(0, 300, (3, 24))
    labels[0, :5] = -100

    def run(chunk):
        model.zero_grad()
        FAMILY.hidden_output(model, bool(chunk))
        out = model(tokens)
        if chunk:
            loss = chunked_next_token_loss(out, labels, lambda h: FAMILY.layout.logits(model, h), chunk, summed=summed)
        else:
            loss = next_token_loss(out, labels, summed=summed)
        loss.backward()
        return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}

    want, want_grads = run(0)
    for chunk in (7, 24, 1000):
        got, grads = run(chunk)
        assert math.isclose(got, want, rel_tol=1e-6), (chunk, got, want)
        for n, g in grads.items():
            err = (g - want_grads[n]).norm() / want_grads[n].norm()
            assert err <= 1e-6, (chunk, n, err.item())
    FAMILY.hidden_output(model, False)


def test_auto_loss_chunk_rule():
    """-1: on when one rank's fp32 logits exceed 1 GiB, chunks of 256 MiB of logits."""
    from pretrain.loss import resolve_loss_chunk

    # 1B at 131,072 tokens on one rank: 67 GB of logits -> 523-token chunks.
    assert resolve_loss_chunk(-1, local_batch_size=1, seq_len=131072, cp=1, vocab_size=128256) == 523
    # 4K tokens x 128,256 x 4 bytes = 2.1 GB: chunked; 2K: 1.05 GB < 1 GiB: whole.
    assert resolve_loss_chunk(-1, local_batch_size=1, seq_len=4096, cp=1, vocab_size=128256) == 523
    assert resolve_loss_chunk(-1, local_batch_size=1, seq_len=2048, cp=1, vocab_size=128256) == 0
    assert resolve_loss_chunk(-1, local_batch_size=2, seq_len=2048, cp=1, vocab_size=128256) == 523
    assert resolve_loss_chunk(-1, local_batch_size=1, seq_len=4096, cp=2, vocab_size=128256) == 0  # per rank
    assert resolve_loss_chunk(0, local_batch_size=8, seq_len=131072, cp=1, vocab_size=128256) == 0
    assert resolve_loss_chunk(100, local_batch_size=1, seq_len=8, cp=1, vocab_size=10) == 100


def test_a_run_that_starts_before_its_schedule_start_is_refused(tmp_path, tok_cache):
    """optim.schedule_start=3 with nothing to resume: steps 1-3 would train at lr 0 (the
    warmup's step 0). The job stops before its first step, naming the knob (exit 4, a
    checkpoint problem: the start step is known once checkpoints are read)."""
    proc = run_job(tmp_path, ["optim.schedule_start=3"], tok_cache=tok_cache, check=False)
    assert proc.returncode == 4, proc.stderr[-2000:]
    assert "optim.schedule_start=3 but the run starts at step 0" in proc.stderr
    assert not (tmp_path / "metrics.jsonl").exists() or not (tmp_path / "metrics.jsonl").read_text().strip()


# -- parity on real training steps ------------------------------------------------------------

@pytest.fixture(scope="module")
def reference_dm(tmp_path_factory, tok_cache):
    """One process, document masking at 16x the original RoPE context."""
    d = tmp_path_factory.mktemp("single_dm")
    run_job(d, [*DM, "train.local_batch_size=4", *CKPT], tok_cache=tok_cache)
    return d


# (id, overrides, processes, document-masked); the global batch is 4 sequences in every layout.
LAYOUTS = [
    ("cp2", ["parallel.cp=2", "train.local_batch_size=4"], 2, False),
    ("cp2+dm@16x-rope", ["parallel.cp=2", *DM, "train.local_batch_size=4"], 2, True),
    ("cp2xfsdp2+full_ac", ["parallel.cp=2", "train.local_batch_size=2", "parallel.activation_checkpoint=full"], 4,
     False),
    # the chunked loss over vocabulary-sharded logits (loss parallel)
    ("cp2xtp2+loss_parallel+loss_chunk", ["parallel.cp=2", "parallel.tp=2", "parallel.loss_parallel=true",
                                          "train.loss_chunk=24", "train.local_batch_size=4"], 4, False),
    ("cp2xpp2+dm+loss_chunk", ["parallel.cp=2", "parallel.pp=2", "train.loss_chunk=40", *DM, "train.local_batch_size=4"], 4, True),
    ("pp2+dm", ["parallel.pp=2", *DM, "train.local_batch_size=4"], 2, True),
    ("fsdp2xcp2xtp2+dm", ["parallel.cp=2", "parallel.tp=2", *DM, "train.local_batch_size=2"], 8, True),
]


@pytest.mark.parametrize("overrides,nproc,dm", [(o, n, m) for _, o, n, m in LAYOUTS], ids=[i for i, *_ in LAYOUTS])
def test_context_parallel_layout_matches_single_process(reference, reference_dm, tmp_path, tok_cache, overrides,
                                                        nproc, dm):
    proc = run_job(tmp_path, [*overrides, *CKPT], tok_cache=tok_cache, nproc=nproc, launcher="torchrun", timeout=600)
    out = proc.stderr + proc.stdout
    cp = 2 if "parallel.cp=2" in overrides else 1
    assert f"cp={cp} " in out, out[-2000:]
    # Read back from the modules: every attention core of this rank's blocks is the CP one.
    blocks = re.search(r"(\d+) blocks here: .* \| context-parallel cores (\d+)", out)
    assert blocks and int(blocks[2]) == (int(blocks[1]) if cp > 1 else 0), blocks and blocks[0]
    took = re.search(r"the loss took logits (.*?) \|", out)
    if "train.loss_chunk=24" in overrides:  # chunks of 24 tokens: 4 rows x 3 positions x 2 SP shards
        assert took and took[1] == "S(2) over tp=2, local (4, 6, 256) per chunk", took and took[1]
    elif "train.loss_chunk=40" in overrides:  # 2 rows per micro-batch x 20 positions
        assert took and took[1] == "full (2, 20, 512) per chunk", took and took[1]
    assert_parity(tmp_path, reference_dm if dm else reference)
