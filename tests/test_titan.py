"""torchtitan interop (``python -m pretrain.titan``), tested against torchtitan 0.3.0's own
code: its ``Llama3Model``, AdamW container and ``CheckpointManager`` write and read the
checkpoints. Needs the optional extra (``pip install -e '.[titan]'``, a venv of its own:
torchtitan pins ``datasets<4.8``); without it the file is skipped with the reason, and
with ``PRETRAIN_TEST_REQUIRE_TITAN=1`` (``.ci/run`` sets it) a missing torchtitan fails."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO, _env

try:
    import torchtitan.models.llama3 as tt_llama3
    from torchtitan.components.checkpoint import CheckpointManager
    from torchtitan.components.optimizer import LRSchedulersContainer, OptimizersContainer
    from torchtitan.components.optimizer.optimizer import ParamGroupConfig
    from torchtitan.models.common import ComplexRoPE, Embedding, Linear, RMSNorm
except ImportError as e:  # the optional extra is not installed
    if os.environ.get("PRETRAIN_TEST_REQUIRE_TITAN"):
        raise
    pytest.skip(f"torchtitan is not installed ({e}); pip install -e '.[titan]' in a venv of its own runs these "
                "tests (.ci/run does)", allow_module_level=True)

from pretrain.interop.titan import main as titan_main  # noqa: E402

# Our tiny Llama (tests/conftest.py TINY), as torchtitan builds it.
DIM, LAYERS, HEADS, KV, FFN, VOCAB = 64, 2, 4, 2, 128, 512
OURS = [f"model.dim={DIM}", f"model.n_layers={LAYERS}", f"model.n_heads={HEADS}", f"model.n_kv_heads={KV}",
        f"model.ffn_hidden_dim={FFN}", f"model.vocab_size={VOCAB}"]
BETAS, WD = (0.9, 0.95), 0.1


@pytest.fixture(scope="module", autouse=True)
def process_group():
    """torchtitan's CheckpointManager asks for the rank: a one-process gloo group."""
    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def titan_config(tie: bool, rope_factor: float = 8.0):
    L = tt_llama3
    return L.Llama3Model.Config(
        dim=DIM, vocab_size=VOCAB, enable_weight_tying=tie,
        tok_embeddings=Embedding.Config(num_embeddings=VOCAB, embedding_dim=DIM, param_init=L._EMBEDDING_INIT),
        norm=RMSNorm.Config(normalized_shape=DIM, param_init=L._NORM_INIT),
        lm_head=Linear.Config(in_features=DIM, out_features=VOCAB, param_init=L._output_linear_init(DIM)),
        layers=L._build_llama3_layers(
            fuse_qkv=True, n_layers=LAYERS, dim=DIM, n_heads=HEADS, n_kv_heads=KV, hidden_dim=FFN,
            rope=ComplexRoPE.Config(dim=DIM // HEADS, max_seq_len=256, theta=500000, scaling="llama",
                                    scaling_factor=rope_factor),
            attn_backend="flex"))


def titan_parts(tie: bool, seed: int, rope_factor: float = 8.0):
    torch.manual_seed(seed)
    model = titan_config(tie, rope_factor).build()
    model.init_weights()
    opt = OptimizersContainer.Config(
        param_groups=[ParamGroupConfig(pattern=".*", optimizer_name="AdamW",
                                       optimizer_kwargs=dict(lr=1e-3, betas=BETAS, eps=1e-8, weight_decay=WD))],
        implementation="for-loop").build(model_parts=[model])
    sched = LRSchedulersContainer.Config(warmup_steps=2).build(optimizers=opt, training_steps=10)
    return model, opt, sched


class TrainState:
    def __init__(self):
        self.step, self.ntokens_seen = 0, 0

    def state_dict(self):
        return {"step": self.step, "ntokens_seen": self.ntokens_seen}

    def load_state_dict(self, sd):
        self.step, self.ntokens_seen = sd["step"], sd["ntokens_seen"]


def manager(dump: Path, model, opt, sched, state, **kw):
    return CheckpointManager.Config(enable=True, folder="checkpoint", interval=1, last_save_model_only=False,
                                    keep_latest_k=0, **kw).build(
        dataloader=None, model_parts=[model], optimizers=opt, lr_schedulers=sched, states={"train_state": state},
        sd_adapter=None, base_folder=str(dump))


def titan_logits(model, tokens):
    """torchtitan's forward (flex attention runs forward on CPU) with its causal mask, one
    document per row: positions 0..S-1. S is a multiple of flex's block size (128): at 40 or
    48 tokens its CPU forward differs between two instances of one model (0.02-0.03, NaN
    at times; torch 2.13), at 128 it is exact."""
    positions = torch.arange(tokens.shape[1]).expand(tokens.shape[0], -1)
    with torch.no_grad():
        return model(tokens, positions, model.get_attention_masks(positions)).float()


def our_model(ckpt: Path):
    """Our model built from a checkpoint's meta.json, its weights loaded."""
    from pretrain.checkpoint import read_meta
    from pretrain.interop.hf import _checkpoint_args, _load_model_tensors, _saved_metadata
    from pretrain.model import family_of

    meta = read_meta(ckpt)
    args = _checkpoint_args(ckpt, meta)
    model = family_of(args).build(args, 256)
    model.load_state_dict(_load_model_tensors(ckpt, _saved_metadata(ckpt, meta)), strict=True)
    model.init_buffers()  # the RoPE table
    return model.eval()


def our_tensors(ckpt: Path, prefix: str):
    from pretrain.checkpoint.files import load_dcp, read_dcp_metadata

    saved = read_dcp_metadata(ckpt).state_dict_metadata
    state = {k: torch.empty(tuple(v.size), dtype=v.properties.dtype) for k, v in saved.items()
             if k.startswith(prefix) and hasattr(v, "size")}
    load_dcp(state, ckpt, no_dist=True)
    return state


def fused(opt, model, name):
    return opt.optimizers[0].state[dict(model.named_parameters())[name]]


@pytest.fixture(scope="module")
def titan_run(tmp_path_factory):
    """torchtitan's own checkpoint of a tiny untied and a tied Llama3 after two AdamW steps
    (gradients set by hand: its backward needs flex attention, which has none on CPU)."""
    runs = {}
    for tie in (False, True):
        dump = tmp_path_factory.mktemp(f"titan-tie{tie}")
        model, opt, sched = titan_parts(tie, seed=1)
        state = TrainState()
        cm = manager(dump, model, opt, sched, state)
        g = torch.Generator().manual_seed(2)
        for step in (1, 2):
            for p in model.parameters():
                p.grad = torch.randn(p.shape, generator=g)
            opt.step()
            sched.step()
            state.step, state.ntokens_seen = step, state.ntokens_seen + 4 * 32
        cm.save(curr_step=2)
        cm.close()
        runs[tie] = (dump / "checkpoint" / "step-2", model, opt)
    return runs


@pytest.mark.parametrize("tie", [False, True])
def test_import_gives_torchtitans_logits_and_its_moments_bit_for_bit(titan_run, tie, tmp_path):
    step_dir, model, opt = titan_run[tie]
    out = tmp_path / "imported"
    assert titan_main(["import", str(step_dir), str(out), "--model", "debug", *OURS,
                       f"model.tie_embeddings={str(tie).lower()}", "--no-progress"]) == 0
    meta = json.loads((out / "meta.json").read_text())
    assert (meta["step"], meta["tokens_seen"], meta.get("weights_only")) == (2, 256, None)
    assert meta["model"]["rope_scaling"]["factor"] == 8.0  # torchtitan's, not llama3_2's 32
    tokens = torch.randint(0, VOCAB, (2, 128), generator=torch.Generator().manual_seed(3))
    ours = our_model(out)(tokens).float()
    theirs = titan_logits(model, tokens)
    assert (ours - theirs).abs().max().item() < 1e-5, (ours - theirs).abs().max().item()
    # AdamW's moments and step counts: equal bit for bit to torchtitan's live optimizer state
    # (q/k/v split out of its fused parameter per KV group).
    state = our_tensors(out, "optim.state.")
    per = HEADS // KV
    hd = DIM // HEADS
    for i in range(LAYERS):
        st = fused(opt, model, f"layers.{i}.attention.qkv_linear.wqkv.weight")
        for k in ("exp_avg", "exp_avg_sq"):
            t = st[k].reshape(KV, per + 2, hd, DIM)
            assert torch.equal(state[f"optim.state.layers.{i}.attention.wq.weight.{k}"], t[:, :per].reshape(-1, DIM))
            assert torch.equal(state[f"optim.state.layers.{i}.attention.wk.weight.{k}"], t[:, per].reshape(-1, DIM))
            assert torch.equal(state[f"optim.state.layers.{i}.attention.wv.weight.{k}"], t[:, per + 1].reshape(-1, DIM))
        w2 = fused(opt, model, f"layers.{i}.feed_forward.w2.weight")
        assert torch.equal(state[f"optim.state.layers.{i}.feed_forward.w2.weight.exp_avg_sq"], w2["exp_avg_sq"])
        assert float(state[f"optim.state.layers.{i}.attention.wk.weight.step"]) == 2.0
    assert ("optim.state.output.weight.exp_avg" in state) == (not tie)
    if not tie:
        assert torch.equal(state["optim.state.output.weight.exp_avg"], fused(opt, model, "lm_head.weight")["exp_avg"])


@pytest.fixture(scope="module")
def resumed(titan_run, tmp_path_factory):
    """The untied import resumed by a real run of ours for one more step (step 3)."""
    from tests.conftest import TINY

    tmp = tmp_path_factory.mktemp("resumed")
    step_dir = titan_run[False][0]
    assert titan_main(["import", str(step_dir), str(tmp / "imported"), "--model", "debug", *OURS,
                       "model.tie_embeddings=false", "--no-progress"]) == 0
    run = tmp / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "pretrain", *TINY, "model.tie_embeddings=false", "model.rope_scaling.factor=8",
         f"optim.betas=[{BETAS[0]},{BETAS[1]}]", "train.steps=3", "checkpoint.interval=1",
         f"checkpoint.load_path={tmp / 'imported'}", "checkpoint.resume_data=false",
         f"data.tokenizer.cache_dir={tmp / 'tok'}", f"hydra.run.dir={run}"],
        cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp / "imported", run / "checkpoints" / "step-3", proc.stderr + proc.stdout


def test_a_run_resumed_from_the_import_continues_its_moments(resumed):
    imported, step3, log = resumed
    assert "resumed from step 2" in log and "checkpoint.resume_data=false" in log
    assert json.loads((step3 / "meta.json").read_text())["step"] == 3
    before, after = our_tensors(imported, "optim.state."), our_tensors(step3, "optim.state.")
    # One more AdamW step on the imported state: its count goes on (3, not 1) and the second
    # moment is beta2 * the imported one + (1 - beta2) g^2 >= beta2 * the imported one (a
    # fresh optimizer would have (1 - beta2) g^2 only, far below it).
    for key, t in before.items():
        if key.endswith(".step"):
            assert float(after[key]) == 3.0, key
        elif key.endswith(".exp_avg_sq"):
            assert bool((after[key] >= BETAS[1] * t * (1 - 1e-6)).all()), key
    assert "optim.state.output.weight.exp_avg" in after


def test_export_loads_in_torchtitans_checkpoint_manager(resumed, tmp_path):
    _, step3, _ = resumed
    out = tmp_path / "dump" / "checkpoint" / "step-3"
    assert titan_main(["export", str(step3), str(out), "--no-progress"]) == 0
    note = json.loads((out / "pretrain_export.json").read_text())
    assert note["enable_weight_tying"] is False and note["rope"]["scaling_factor"] == 8.0 and note["step"] == 3
    tokens = torch.randint(0, VOCAB, (2, 128), generator=torch.Generator().manual_seed(4))
    ours = our_model(step3)(tokens).float()
    # Model only, as torchtitan starts from a seed: initial_load_path.
    model, opt, sched = titan_parts(False, seed=9)
    cm = manager(tmp_path / "fresh", model, opt, sched, TrainState(), initial_load_path=str(out))
    assert cm.load()
    cm.close()
    assert (titan_logits(model, tokens) - ours).abs().max().item() < 1e-5
    # A full load: optimizer, schedule and train state too (no data loader state to load).
    model, opt, sched = titan_parts(False, seed=10)
    state = TrainState()
    cm = manager(tmp_path / "fresh2", model, opt, sched, state, initial_load_path=str(out),
                 initial_load_model_only=False, exclude_from_loading=["dataloader"])
    assert cm.load()
    cm.close()
    assert (state.step, sched.schedulers[0].last_epoch) == (3, 3)
    assert (titan_logits(model, tokens) - ours).abs().max().item() < 1e-5
    mine = our_tensors(step3, "optim.state.")
    per, hd = HEADS // KV, DIM // HEADS
    for i in range(LAYERS):
        st = fused(opt, model, f"layers.{i}.attention.qkv_linear.wqkv.weight")
        for k in ("exp_avg", "exp_avg_sq"):
            merged = torch.cat([mine[f"optim.state.layers.{i}.attention.{w}.weight.{k}"].reshape(KV, -1, hd, DIM)
                                for w in ("wq", "wk", "wv")], dim=1).reshape(-1, DIM)
            assert torch.equal(st[k], merged), (i, k)
        assert float(st["step"]) == 3.0
    assert torch.equal(fused(opt, model, "lm_head.weight")["exp_avg"], mine["optim.state.output.weight.exp_avg"])


def test_refusals_name_the_key_and_both_shapes(titan_run, tmp_path, capsys):
    step_dir = titan_run[False][0]
    out = tmp_path / "x"
    rc = titan_main(["import", str(step_dir), str(out), "--model", "debug", *OURS, "model.ffn_hidden_dim=96",
                     "model.tie_embeddings=false", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 4 and "layers.0.feed_forward.w1.weight has shape [128, 64] in the checkpoint but [96, 64]" in err
    assert not out.exists() and not out.with_name("x.partial").exists()
    rc = titan_main(["import", str(step_dir), str(out), "--model", "debug", *OURS, "--no-progress"])
    assert rc == 4 and "set model.tie_embeddings=false" in capsys.readouterr().err
    rc = titan_main(["import", str(titan_run[True][0]), str(out), "--model", "debug", *OURS,
                     "model.tie_embeddings=false", "--no-progress"])
    assert rc == 4 and "set model.tie_embeddings=true" in capsys.readouterr().err
    rc = titan_main(["import", str(step_dir), str(out), "--model", "debug", *OURS, "model.n_layers=1",
                     "model.tie_embeddings=false", "--no-progress"])
    assert rc == 4 and "this model lacks (e.g. layers.1." in capsys.readouterr().err
    rc = titan_main(["import", str(step_dir), str(out), "--model", "mllama_debug", "--no-progress"])
    assert rc == 4 and "model.family='mllama'" in capsys.readouterr().err
    # The composed config is checked as a run's model and optimizer: exit 2 naming the key.
    rc = titan_main(["import", str(step_dir), str(out), "--model", "debug", *OURS, "model.norm_eps=-1",
                     "model.tie_embeddings=false", "--no-progress"])
    assert rc == 2 and "model.norm_eps=-1" in capsys.readouterr().err
    # A forgotten output dir: the first override is not taken for it.
    with pytest.raises(SystemExit) as e:
        titan_main(["import", str(step_dir), "model.dim=64", *OURS, "--no-progress"])
    assert e.value.code == 2 and "looks like an override" in capsys.readouterr().err
    assert not out.exists() and not Path("model.dim=64").exists()
    # Our export's RoPE record beside a step dir is data: one that is not is refused, named.
    forged = tmp_path / "forged"
    import shutil
    shutil.copytree(step_dir, forged)
    (forged / "pretrain_export.json").write_text('{"rope": {"theta": "abc", "scaling": "none"}}')
    rc = titan_main(["import", str(forged), str(out), "--model", "debug", *OURS, "model.tie_embeddings=false",
                     "--no-progress"])
    assert rc == 4 and f"{forged / 'pretrain_export.json'}: not the RoPE record" in capsys.readouterr().err
    # Only the RoPE keys an override names are the user's: theta alone keeps torchtitan's factor 8.
    assert titan_main(["import", str(step_dir), str(out), "--model", "debug", *OURS, "model.rope_theta=500000",
                       "model.tie_embeddings=false", "--no-progress"]) == 0
    assert json.loads((out / "meta.json").read_text())["model"]["rope_scaling"]["factor"] == 8.0


def test_a_start_point_that_would_drop_a_trained_head_is_refused(titan_run):
    """model.init_from=titan: (and a LoRA base on export) with model.tie_embeddings=true
    from an untied torchtitan run would take tok_embeddings for the head and drop lm_head."""
    from tests.conftest import compose_job
    from pretrain.checkpoint import CheckpointError
    from pretrain.interop.titan import read_titan_weights

    args = compose_job("model=debug", *OURS, "model.rope_scaling.factor=8").model
    assert args.tie_embeddings
    with pytest.raises(CheckpointError, match="set model.tie_embeddings=false"):
        read_titan_weights(titan_run[False][0], args)
    assert set(read_titan_weights(titan_run[True][0], args)) == {n for n, _ in our_names(args)}


def our_names(args):
    from pretrain.model import family_of

    with torch.device("meta"):
        return list(family_of(args).build(args, 1).named_parameters())


@pytest.mark.parametrize("flavor,ours", [("1B", "llama3_2_1b"), ("3B", "llama3_2_3b"), ("8B", "llama3_1_8b")])
def test_parameter_and_flop_counts_match_torchtitans(flavor, ours):
    """torchtitan's ``get_dense_model_nparams_and_flops`` on its own flavor vs ours: the same
    parameters (a tied head counted once by both); FLOPs per token differ by one named term,
    the RMSNorm weights (2 per block + the final one), which torchtitan counts as matmul
    parameters (6 FLOPs each) and we do not (they multiply elementwise)."""
    from tests.conftest import compose_job
    from pretrain.model import family_of
    from pretrain.model.family import count_parameters

    seq = 8192
    cfg = tt_llama3.llama3_configs[flavor](attn_backend="flex")
    with torch.device("meta"):
        tt_model = cfg.build()
    nparams, flops = cfg.get_nparams_and_flops(tt_model, seq)
    args = compose_job(f"model={ours}").model
    fam = family_of(args)
    with torch.device("meta"):
        mine = fam.build(args, seq)
    assert count_parameters(mine) == nparams
    norms = (2 * args.n_layers + 1) * args.dim
    assert fam.flops_per_token(args, seq, 0) + 6 * norms == flops
    assert cfg.enable_weight_tying == args.tie_embeddings


def test_init_from_titan_under_tp_trains_as_the_imported_weights(titan_run, tmp_path, tok_cache):
    """``model.init_from=titan:<step dir>`` on 2 TP ranks gives the losses of 1 process
    started from the import's weights (and so torchtitan's weights, not a random init); a
    family without a torchtitan counterpart is refused before any process starts."""
    from tests.conftest import compose_job, read_metrics, run_job
    from pretrain.validate import ConfigError, validate_job

    step_dir = titan_run[False][0]
    assert titan_main(["import", str(step_dir), str(tmp_path / "ck"), "--model", "debug", *OURS,
                       "model.tie_embeddings=false", "--no-progress"]) == 0
    common = ["model.tie_embeddings=false", "model.rope_scaling.factor=8", "train.steps=2", "logging.every=1",
              "train.deterministic=true", "optim.warmup_steps=0", "optim.schedule=constant"]
    a = run_job(tmp_path / "a", [*common, "parallel.tp=2", f"model.init_from=titan:{step_dir}"], tok_cache=tok_cache,
                nproc=2, launcher="torchrun")
    assert "initialized weights from torchtitan step dir" in a.stderr + a.stdout
    run_job(tmp_path / "b", [*common, f"checkpoint.load_path={tmp_path / 'ck'}", "checkpoint.load_weights_only=true"],
            tok_cache=tok_cache)
    la = [m["loss"] for m in read_metrics(tmp_path / "a") if "loss" in m]
    lb = [m["loss"] for m in read_metrics(tmp_path / "b") if "loss" in m]
    assert len(la) == len(lb) == 2 and all(abs(x - y) <= 1e-5 * abs(y) for x, y in zip(la, lb)), (la, lb)
    with pytest.raises(ConfigError, match="model.init_from.*has no torchtitan counterpart"):
        validate_job(compose_job("model=mllama_debug", f"model.init_from=titan:{step_dir}"), 1)


def test_a_lora_run_on_a_titan_base_resumes_and_exports_merged(titan_run, tmp_path, tok_cache):
    """LoRA checkpoints hold the adapters only; the base comes from model.init_from at every
    start and on export: a torchtitan step dir is such a base (by content: its DCP metadata)."""
    from safetensors.torch import load_file

    from tests.conftest import read_metrics, run_job
    from pretrain.interop.hf import main as hf_main

    step_dir = titan_run[False][0]
    common = ["model.tie_embeddings=false", "model.rope_scaling.factor=8", "finetune.lora.rank=4",
              "finetune.lora.target_modules=[wq,wv]", "logging.every=1", "checkpoint.interval=2",
              f"model.init_from=titan:{step_dir}"]
    run_job(tmp_path / "run", [*common, "train.steps=2"], tok_cache=tok_cache)
    again = run_job(tmp_path / "run", [*common, "train.steps=3"], tok_cache=tok_cache)
    assert "resumed from step 2" in again.stderr + again.stdout
    meta = json.loads((tmp_path / "run" / "checkpoints" / "step-2" / "meta.json").read_text())
    assert meta["lora"]["base"] == f"titan:{step_dir}" and meta["lora"]["base_fingerprint"]
    assert [m["step"] for m in read_metrics(tmp_path / "run") if "loss" in m] == [1, 2, 3]
    assert hf_main(["export", str(tmp_path / "run"), str(tmp_path / "hf"), "--dtype", "fp32", "--no-progress"]) == 0
    exported = load_file(str(tmp_path / "hf" / "model.safetensors"))
    base = titan_run[False][1].state_dict()
    # Not adapted: the base's weights exactly (HF's names); adapted: the base plus B A.
    assert torch.equal(exported["model.embed_tokens.weight"], base["tok_embeddings.weight"])
    assert torch.equal(exported["model.layers.0.mlp.down_proj.weight"], base["layers.0.feed_forward.w2.weight"])
    assert not torch.equal(exported["model.layers.0.self_attn.v_proj.weight"],
                           base["layers.0.attention.qkv_linear.wv.weight"])
