"""Gradient clipping (``train.max_norm``) against an independent reference.

One process: the trainer's ``parallel.init.clip_grad_norm_`` on real gradients of the
tiny Llama equals ``torch.nn.utils.clip_grad_norm_`` on a copy of the same gradients,
bit for bit (norm and every clipped gradient), with a max_norm 33x below the norm so
clipping happens. Under FSDP2, TP 2 (+SP) and PP 2 (tied embeddings), the clipped
gradients gathered from every rank equal the single-process ones clipped by torch (also
a tiny Llama 3.2 Vision under TP 2 + SP; tests/clip_worker.py, 2 gloo processes): fp32, only the order of the reductions
differs (measured: 7e-10 absolute on gradients of magnitude up to 2.7e-3), asserted
within 1e-5 of the largest gradient. A layout that clipped with its local norm, or not
at all, is off by a factor of 2 to 33."""
import copy

import torch
import torch.nn.functional as F

from conftest import run_worker
from parallel.init import clip_grad_norm_
from pretrain.model.llama.args import LlamaArgs
from pretrain.model.llama import build_llama

ARGS = LlamaArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden_dim=128, vocab_size=256)


def model_with_grads():
    torch.manual_seed(0)
    model = build_llama(ARGS, rope_cache_len=16, device="cpu")
    model.init_weights(seed=0)
    tokens = torch.randint(0, ARGS.vocab_size, (4, 17))
    F.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten()).backward()
    return model


def test_single_process_equals_torch_clip_grad_norm():
    ours = model_with_grads()
    ref = copy.deepcopy(ours)
    for p, q in zip(ours.parameters(), ref.parameters()):
        q.grad = p.grad.clone()
    before = {n: p.grad.clone() for n, p in ours.named_parameters()}
    norm = torch.nn.utils.get_total_norm([p.grad for p in ours.parameters()])
    max_norm = norm.item() / 33
    got = clip_grad_norm_(list(ours.parameters()), max_norm)
    want = torch.nn.utils.clip_grad_norm_(ref.parameters(), max_norm)
    assert torch.equal(got, want)
    for (name, p), q in zip(ours.named_parameters(), ref.parameters()):
        assert torch.equal(p.grad, q.grad), name
        assert not torch.equal(p.grad, before[name]), name  # it clipped
    clipped = torch.nn.utils.get_total_norm([p.grad for p in ours.parameters()]).item()
    assert abs(clipped - max_norm) <= 1e-6 * max_norm


def test_no_clip_below_max_norm_and_with_zero():
    for max_norm in (1e9, 0.0):
        model = model_with_grads()
        before = [p.grad.clone() for p in model.parameters()]
        norm = clip_grad_norm_(list(model.parameters()), max_norm)
        assert norm.item() > 0
        assert all(torch.equal(p.grad, b) for p, b in zip(model.parameters(), before))


def test_skipped_copy_is_clipped_but_not_counted():
    """A tied embedding's second copy (PP's last stage) is left out of the norm but
    scaled by the same coefficient."""
    model = model_with_grads()
    params = list(model.parameters())
    dup = torch.nn.Parameter(torch.zeros(3))
    dup.grad = torch.full((3,), 100.0)
    norm = clip_grad_norm_([*params, dup], 0.01, skip={id(dup)})
    ref = torch.nn.utils.get_total_norm([p.grad for p in model_with_grads().parameters()])
    assert torch.equal(norm, ref)  # the 173-norm copy did not count
    assert torch.allclose(dup.grad, torch.full((3,), 100.0 * 0.01 / (norm.item() + 1e-6)), rtol=1e-6)


def test_layouts_clip_like_one_process():
    """Also each gradient tensor against its own largest entry, within 1e-4 (measured
    1.2e-6 at worst): a norm left out of a layout's sequence-parallel norms (Llama's
    ``ffn_norm``, Mllama's cross-attention ``ffn_norm`` or q/k head norms) gets a gradient
    from its rank's sequence shard only, half the right one, which hides under the global
    bound (its tensors are small beside the embedding's) and in the losses."""
    rows = run_worker("clip_worker.py")
    assert [r["layout"] for r in rows] == ["fsdp2", "tp2+sp", "pp2-1f1b", "mllama-tp2+sp"]
    for r in rows:
        assert r["names"], r
        assert abs(r["norm"] - r["ref_norm"]) <= 1e-5 * r["ref_norm"], r
        assert r["ref_norm"] > 20 * 0.05  # clipping happened
        assert abs(r["clipped_norm"] - 0.05) <= 1e-5, r
        assert r["max_abs_diff"] <= 1e-5 * r["max_abs_grad"], r
        assert r["worst_tensor_rel"] <= 1e-4, r
    norms = rows[-1]["norm_weights"]  # the vision model's norms are among the tensors compared
    assert "layers.1.ffn_norm.weight" in norms and "layers.1.cross_attention.q_norm.weight" in norms, norms


def test_train_step_clips_to_train_max_norm_like_torch():
    """The trainer's step (``TrainStep``, the object ``train.max_norm`` is given to) on one
    process: with SGD at lr 1 the update is minus the clipped gradient, so it must equal
    the gradient torch's ``clip_grad_norm_`` leaves on a copy; the step reports the norm
    before clipping, as torch returns it."""
    from parallel.config import ParallelConfig
    from parallel.dims import ParallelDims
    from pretrain.model.llama import FAMILY
    from pretrain.step import TrainStep

    torch.manual_seed(0)
    ours = build_llama(ARGS, rope_cache_len=16, device="cpu")
    ours.init_weights(seed=0)
    ref = copy.deepcopy(ours)
    tokens = torch.randint(0, ARGS.vocab_size, (4, 17))
    F.cross_entropy(ref(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten()).backward()
    norm = torch.nn.utils.get_total_norm([p.grad for p in ref.parameters()]).item()
    max_norm = norm / 33
    want_norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), max_norm)
    before = {n: p.detach().clone() for n, p in ours.named_parameters()}
    step = TrainStep(FAMILY, [ours], torch.optim.SGD(ours.parameters(), lr=1.0), dims=ParallelDims(dp_replicate=1, dp_shard=1, tp=1, pp=1, world_size=1),
                     pc=ParallelConfig(), grad_accum_steps=1, max_norm=max_norm, chat=False,
                     device=torch.device("cpu"), param_dtype=torch.float32)
    out = step([{"input_ids": tokens[:, :-1], "labels": tokens[:, 1:]}], lr=1.0)
    assert torch.equal(out.grad_norm, want_norm)
    for (name, p), q in zip(ours.named_parameters(), ref.parameters()):
        update = before[name] - p.detach()
        assert torch.allclose(update, q.grad, rtol=0, atol=1e-7), name  # fp32 subtraction rounding only
    total = torch.nn.utils.get_total_norm([before[n] - p.detach() for n, p in ours.named_parameters()]).item()
    assert abs(total - max_norm) <= 1e-4 * max_norm, (total, max_norm)
