"""Learning-rate schedules at their landmarks."""
import math

import pytest

from pretrain.optim import lr_multiplier


def m(step, schedule, total=100, warmup=10, min_ratio=0.1, decay_fraction=0.2):
    return lr_multiplier(step, total=total, warmup=warmup, schedule=schedule, min_ratio=min_ratio,
                         decay_fraction=decay_fraction)


@pytest.mark.parametrize("schedule", ["cosine", "linear", "wsd", "constant"])
def test_warmup_is_linear(schedule):
    assert m(1, schedule) == pytest.approx(0.1)
    assert m(5, schedule) == pytest.approx(0.5)
    assert m(10, schedule) == pytest.approx(1.0)


def test_cosine():
    assert m(55, "cosine") == pytest.approx(0.1 + 0.9 * 0.5)  # half-way through decay
    assert m(100, "cosine") == pytest.approx(0.1)
    assert m(32.5, "cosine") == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4)))


def test_linear():
    assert m(55, "linear") == pytest.approx(1 - 0.9 * 0.5)
    assert m(100, "linear") == pytest.approx(0.1)


def test_wsd_stays_flat_then_decays():
    assert m(11, "wsd") == 1.0 and m(80, "wsd") == 1.0
    assert m(90, "wsd") == pytest.approx(1 - 0.9 * 0.5)
    assert m(100, "wsd") == pytest.approx(0.1)


def test_constant():
    assert m(11, "constant") == m(100, "constant") == 1.0


def _tiny_model():
    from pretrain.model.llama.args import LlamaArgs
    from pretrain.model.llama import build_llama

    model = build_llama(LlamaArgs(dim=32, n_layers=1, n_heads=4, n_kv_heads=2, ffn_hidden_dim=64, vocab_size=64),
                        rope_cache_len=8, device="cpu")
    model.init_weights()
    return model


def test_cpu_update_loop_equals_foreach_bitwise():
    """Plain CPU parameters get the per-tensor loop (faster there), the same update bit for bit."""
    import copy

    import torch
    import torch.nn.functional as F

    from pretrain.config import OptimConfig
    from pretrain.optim import build_optimizer

    a = _tiny_model()
    b = copy.deepcopy(a)
    opt_a = build_optimizer(a, OptimConfig(lr=1e-2))
    assert all(g["foreach"] is False for g in opt_a.param_groups)
    opt_b = build_optimizer(b, OptimConfig(lr=1e-2))
    for g in opt_b.param_groups:
        g["foreach"] = True
    tokens = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    for _ in range(3):
        for model, opt in ((a, opt_a), (b, opt_b)):
            F.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten()).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_checkpoint_load_keeps_this_process_update_implementation():
    import torch

    from pretrain.checkpoint import get_states, set_states
    from pretrain.config import OptimConfig
    from pretrain.optim import build_optimizer

    model = _tiny_model()
    saved = build_optimizer(model, OptimConfig())
    for g in saved.param_groups:
        g["foreach"] = True  # as a DTensor / GPU run would have saved it
    model(torch.zeros(1, 4, dtype=torch.long)).sum().backward()
    saved.step()
    model_sd, optim_sd = get_states(model, saved)
    fresh = build_optimizer(model, OptimConfig())
    set_states(model, fresh, model_sd, optim_sd)
    assert len(fresh.state) > 0 and all(g["foreach"] is False for g in fresh.param_groups)


def test_weight_decay_on_matrices_not_on_norm_weights():
    """optim.weight_decay decays exactly the matrices (embedding included), by (1 - lr * wd) a step; norms get none."""
    import torch

    from pretrain.config import OptimConfig
    from pretrain.optim import build_optimizer

    model = _tiny_model()
    cfg = OptimConfig(lr=0.5, weight_decay=0.1)
    opt = build_optimizer(model, cfg)
    by_id = {id(p): n for n, p in model.named_parameters()}
    groups = {g["weight_decay"]: sorted(by_id[id(p)] for p in g["params"]) for g in opt.param_groups}
    assert groups == {0.1: sorted(n for n, p in model.named_parameters() if p.ndim == 2),
                      0.0: sorted(n for n, p in model.named_parameters() if "norm" in n)}
    assert "tok_embeddings.weight" in groups[0.1] and "norm.weight" in groups[0.0]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    for n, p in model.named_parameters():
        want = before[n] * (1 - cfg.lr * cfg.weight_decay) if p.ndim == 2 else before[n]
        assert torch.equal(p.detach(), want), n
