"""Learning-rate schedules at their landmarks."""
import math

import pytest

from pretrain.optim import lr_multiplier


def m(step, schedule, total=100, warmup=10, min_ratio=0.1, decay_fraction=0.2, start=0):
    return lr_multiplier(step, total=total, warmup=warmup, schedule=schedule, min_ratio=min_ratio,
                         decay_fraction=decay_fraction, start=start)


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


@pytest.mark.parametrize("schedule", ["cosine", "linear", "wsd", "constant"])
def test_schedule_start_shifts_the_whole_schedule(schedule):
    """optim.schedule_start=N: step N+k of a run to train.steps=T has the multiplier of step k of a
    run of T-N steps (warmup from N+1, decay ending at T)."""
    n, total = 1000, 1100
    for k in range(0, total - n + 1):
        staged = lr_multiplier(n + k, total=total, warmup=10, schedule=schedule, min_ratio=0.1, decay_fraction=0.2,
                               start=n)
        assert staged == pytest.approx(m(k, schedule, total=total - n)), k


def _staged(step, schedule, start=1000, total=1100, warmup=10):
    return m(step, schedule, total=total, warmup=warmup, start=start)


@pytest.mark.parametrize("schedule", ["cosine", "linear", "wsd", "constant"])
def test_schedule_start_restarts_warmup(schedule):
    assert _staged(1001, schedule) == pytest.approx(0.1)
    assert _staged(1005, schedule) == pytest.approx(0.5)
    assert _staged(1010, schedule) == pytest.approx(1.0)
    # without it the same global step is no warmup step but one late in the decay (or the plateau)
    assert _staged(1001, schedule, start=0) != pytest.approx(0.1)


@pytest.mark.parametrize("schedule", ["cosine", "linear", "wsd"])
def test_schedule_start_decay_ends_at_train_steps(schedule):
    assert _staged(1100, schedule) == pytest.approx(0.1)
    assert _staged(1099, schedule) > 0.1
    assert _staged(1055, schedule) == pytest.approx(m(55, schedule))  # cosine/linear: half-way through decay
    assert _staged(1090, schedule) == pytest.approx(m(90, schedule))  # wsd: half-way through its decay


def test_steps_at_or_before_schedule_start_take_the_schedule_step_0():
    """Never taken by a run resumed at or past schedule_start, but defined: schedule step 0's
    multiplier (0 with a warmup: no update; the peak without one)."""
    for step in (1, 500, 1000):
        assert _staged(step, "cosine") == 0.0
        assert _staged(step, "cosine", warmup=0) == 1.0
        assert _staged(step, "wsd", warmup=0) == 1.0


def test_build_lr_fn_reads_schedule_start():
    from pretrain.config import OptimConfig
    from pretrain.optim import build_lr_fn

    lr_at = build_lr_fn(OptimConfig(lr=2e-5, warmup_steps=10, schedule_start=1000), 1100)
    assert lr_at(1001) == pytest.approx(2e-6) and lr_at(1010) == pytest.approx(2e-5)
    assert lr_at(1100) == pytest.approx(2e-6)


@pytest.mark.parametrize("start", [100, 101, 5000])
def test_schedule_start_must_be_before_train_steps(start):
    from conftest import compose_job
    from pretrain.validate import ConfigError, validate_job

    cfg = compose_job("train.steps=100", f"optim.schedule_start={start}")
    with pytest.raises(ConfigError, match="train.steps=100") as e:
        validate_job(cfg, 1)
    assert e.value.key == "optim.schedule_start"
    validate_job(compose_job("train.steps=100", "optim.schedule_start=99"), 1)


def test_schedule_start_is_refused_below_0():
    from conftest import compose_job
    from pretrain.validate import ConfigError, validate_job

    with pytest.raises(ConfigError) as e:
        validate_job(compose_job("optim.schedule_start=-1"), 1)
    assert e.value.key == "optim.schedule_start"


def _recipe_stages():
    """The stage commands written in the long-context recipe's comments, as overrides (hydra.*
    left out)."""
    import re

    from conftest import REPO

    text = (REPO / "configs" / "experiment" / "long_context_llama3_2_1b.yaml").read_text()
    stages = {}
    for n, block in re.findall(r"^# Stage (\d).*\n((?:#   .*\n)+)", text, re.M):
        words = " ".join(line[1:].replace("\\", " ") for line in block.splitlines()).split()
        stages[int(n)] = [w for w in words if "=" in w and not w.startswith(("hydra.", "--"))]
    return stages


def test_long_context_recipe_stages_compose_validate_and_restart_the_schedule():
    """Stages 1-3 as the recipe's comments launch them: each validates (8 ranks), loads the previous
    stage's last step, keeps 524,288 tokens per step, and warms up and decays afresh."""
    import dataclasses

    from conftest import compose_job
    from parallel.config import ParallelConfig
    from pretrain.optim import build_lr_fn
    from pretrain.validate import validate_job

    stages = _recipe_stages()
    assert sorted(stages) == [1, 2, 3]
    assert all(s[0] == "experiment=long_context_llama3_2_1b" for s in stages.values())
    # parallel.cp is left out while the schema has no such key (its tokens per step still counted)
    has_cp = "cp" in {f.name for f in dataclasses.fields(ParallelConfig)}
    cfgs = {n: compose_job(*(w for w in overrides if has_cp or not w.startswith("parallel.cp=")))
            for n, overrides in stages.items()}
    want = {1: (8192, 0, 4000, None), 2: (32768, 4000, 6000, "runs/lc_8k/checkpoints/step-4000"),
            3: (131072, 6000, 7000, "runs/lc_32k/checkpoints/step-6000")}
    tokens_per_step = set()
    for n, cfg in cfgs.items():
        dims = validate_job(cfg, 8)
        t, o = cfg.train, cfg.optim
        assert (t.seq_len, o.schedule_start, t.steps, cfg.checkpoint.load_path) == want[n], n
        assert cfg.data.document_masking and cfg.parallel.activation_checkpoint == "full"
        assert cfg.checkpoint.resume_data == (n == 1) and (cfg.model.init_from is None) == (n > 1)
        cp = int(next((w.split("=")[1] for w in stages[n] if w.startswith("parallel.cp=")), 1))
        assert not has_cp or dims.cp == cp
        tokens_per_step.add(8 // cp * t.local_batch_size * t.grad_accum_steps * t.seq_len)
        lr_at = build_lr_fn(o, t.steps)
        first = o.schedule_start + 1
        assert lr_at(first) == pytest.approx(o.lr / o.warmup_steps)  # the warmup starts over
        assert lr_at(first + o.warmup_steps - 1) == pytest.approx(o.lr)
        assert lr_at(t.steps) == pytest.approx(o.lr * o.min_lr_ratio)  # decayed at the stage's last step
    assert tokens_per_step == {524288}
    assert cfgs[1].model.rope_scaling.factor == 32 and cfgs[1].model.rope_scaling.original_max_position_embeddings == 8192
    assert cfgs[3].train.seq_len <= cfgs[3].model.max_position_embeddings
