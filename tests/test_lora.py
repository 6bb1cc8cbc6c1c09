"""LoRA: trainable parameter count by formula, frozen base bit-identical after training,
the adapted model starts as the base model, loss falls, merging equals the adapters."""
import json

import pytest
import torch
import torch.nn.functional as F

from pretrain.lora import apply_lora, init_lora, merge_lora_state, resolve_targets
from pretrain.model.llama import FAMILY, LORA, lora_param_count
from pretrain.model.llama.args import LlamaArgs
from pretrain.model.llama import build_llama
from pretrain.optim import build_optimizer
from pretrain.model.llama import seeded_trunc_normal_

ARGS = LlamaArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden_dim=128, vocab_size=256)


def tiny(targets=("attention",), rank=4, alpha=8.0):
    model = build_llama(ARGS, rope_cache_len=32, device="cpu")
    model.init_weights(seed=1)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    n = apply_lora(model, FAMILY, rank=rank, alpha=alpha, dropout=0.0, targets=targets)
    init_lora(model, lambda t, std, fqn: seeded_trunc_normal_(t, std, fqn, 7))
    return model, base, n


@pytest.mark.parametrize("targets", [["attention"], ["q_proj", "v_proj"], ["all"], ["mlp", "wq"]])
def test_trainable_count_equals_formula(targets):
    model, _, n = tiny(targets)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == n == lora_param_count(ARGS, 4, targets)
    assert all(("lora_" in k) == p.requires_grad for k, p in model.named_parameters())


def test_formula_by_hand_for_llama3_2_1b():
    """dim 2048, 16 layers, 32 heads / 8 kv heads of 64, ffn 8192; rank 16."""
    a = LlamaArgs(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, ffn_hidden_dim=8192, vocab_size=128256)
    q = o = 16 * (2048 + 2048)
    k = v = 16 * (2048 + 512)
    mlp = 3 * 16 * (2048 + 8192)
    assert lora_param_count(a, 16, ["attention"]) == 16 * (q + k + v + o) == 3_407_872
    assert lora_param_count(a, 16, ["all"]) == 16 * (q + k + v + o + mlp) == 11_272_192


def test_unknown_target_is_named():
    with pytest.raises(ValueError, match="finetune.lora.target_modules: unknown target 'qkv'"):
        resolve_targets(["qkv"], LORA)


def test_starts_as_base_trains_adapters_only_and_merges():
    model, base, _ = tiny(["all"])
    ref = build_llama(ARGS, rope_cache_len=32, device="cpu")
    ref.load_state_dict(base)
    ref.init_buffers()
    torch.manual_seed(0)
    tokens = torch.randint(0, ARGS.vocab_size, (4, 33))
    x, y = tokens[:, :-1], tokens[:, 1:]
    assert torch.equal(model(x), ref(x))  # B = 0: the adapted model is the base model

    class Cfg:
        lr, betas, eps, weight_decay = 2e-2, (0.9, 0.95), 1e-8, 0.0

    opt = build_optimizer(model, Cfg)
    assert sum(len(g["params"]) for g in opt.param_groups) == 2 * 7 * ARGS.n_layers  # adapters only
    losses = []
    for _ in range(30):
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.4, losses  # it fits the batch through the adapters alone
    after = model.state_dict()
    for k, v in base.items():
        assert torch.equal(after[k], v), k  # the base, bit for bit
    merged = merge_lora_state(after, alpha=8.0, rank=4)
    assert merged.keys() == base.keys()
    ref.load_state_dict(merged)
    with torch.no_grad():
        diff = (ref(x) - model(x)).abs().max().item()
    assert diff < 1e-4, diff


@pytest.mark.parametrize("mode", ["full", "selective_op"])
def test_dropout_under_activation_checkpointing_recomputes_the_same_masks(mode):
    """Backward of a checkpointed block recomputes its forward: with LoRA dropout the
    recompute must draw the forward's masks, or the gradients belong to another model."""
    from parallel.ac import apply_activation_checkpointing

    grads = []
    for ac in ("none", mode):
        model = build_llama(ARGS, rope_cache_len=32, device="cpu")
        model.init_weights(seed=1)
        apply_lora(model, FAMILY, rank=4, alpha=8.0, dropout=0.3, targets=["all"])
        init_lora(model, lambda t, std, fqn: seeded_trunc_normal_(t, std, fqn, 7))
        with torch.no_grad():  # B != 0, so A's gradient and the masks matter
            for name, p in model.named_parameters():
                if ".lora_b." in name:
                    p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.1)
        assert apply_activation_checkpointing(list(model.layers.values()), ac) == (0 if ac == "none" else 2)
        torch.manual_seed(3)
        x = torch.randint(0, ARGS.vocab_size, (2, 32))
        model(x).float().pow(2).mean().backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    for name, g in grads[0].items():
        assert torch.allclose(grads[1][name], g, rtol=1e-5, atol=1e-7), name


# -- through the trainer, FSDP2, checkpoints and both exports ----------------------------
def test_lora_run_fsdp_tp_parity_checkpoint_and_exports(tmp_path, tok_cache):
    """LoRA from a HF folder trains the same (fp32, 1e-5 relative: only reduction order
    differs; dropout 0) on 1 process, 2 FSDP2 ranks, TP 2 with loss parallel, PP 2
    (zero bubble; the base loaded per stage), and FSDP2 2 x TP 2 + SP (adapters sharded like
    their linears); checkpoints hold the adapters
    only (the frozen base stays frozen under TP); both exports of the 2-D sharded
    checkpoint (merged HF folder, PEFT adapter on the base) give our adapted logits."""
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    import torch.distributed.checkpoint as dcp

    from tests.conftest import died_after, losses, read_metrics, run_job
    from tests.test_hf_io import RUN_ROPE, cli, save_hf
    from pretrain.model.llama.hf import hf_to_ours

    base_model = save_hf(tmp_path / "hf", tied=True, seed=5)
    common = [*RUN_ROPE, f"model.init_from={tmp_path / 'hf'}", "finetune.lora.rank=4", "finetune.lora.alpha=8",
              "finetune.lora.target_modules=[all]", "optim.lr=1e-2", "optim.warmup_steps=0",
              "optim.schedule=constant", "train.steps=4", "logging.every=1", "checkpoint.interval=4"]
    one = run_job(tmp_path / "one", [*common, "train.local_batch_size=4"], tok_cache=tok_cache)
    assert "LoRA rank 4 alpha 8 on all: 8,192 trainable parameters" in one.stdout + one.stderr
    # FSDP2 alone: test_sft_with_lora_fsdp_matches_one_process, and under FSDP2 x TP 2 below.
    layouts = {
        "tp2+lossp": (2, ["train.local_batch_size=4", "parallel.tp=2", "parallel.loss_parallel=true"]),
        # zero bubble splits backward into input and weight gradients: frozen weights have none
        "pp2-interleaved_zb": (2, ["train.local_batch_size=4", "parallel.pp=2", "parallel.pp_schedule=interleaved_zb",
                                   "parallel.pp_stages_per_rank=1"]),
        "fsdp2xtp2+sp": (4, ["train.local_batch_size=2", "parallel.dp_shard=2", "parallel.tp=2",
                             "parallel.sequence_parallel=true"]),
        # HSDP (2 replicas of 1 shard) with full activation checkpointing and compiled blocks
        "hsdp2+ac+compile": (2, ["train.local_batch_size=2", "parallel.dp_replicate=2", "parallel.dp_shard=1",
                                 "parallel.activation_checkpoint=full", "parallel.compile=true"]),
    }
    a = losses(tmp_path / "one")
    assert len(a) == 4 and a[-1] < a[0]
    # Resume: checkpoints hold the adapters only, so a resumed run takes its frozen base
    # from model.init_from again; with dropout (masks from the global torch generator,
    # restored from the checkpoint: nothing at start-up may draw from it after that, the
    # MFU probe and the loader included) steps 3-4 equal the straight run's bit for bit.
    # The straight run saves at step 2 as well; a copy of it as if it had died there resumes.
    dropout = [*common, "train.local_batch_size=4", "finetune.lora.dropout=0.3", "checkpoint.interval=2"]
    run_job(tmp_path / "straight", dropout, tok_cache=tok_cache)
    straight = losses(tmp_path / "straight")
    assert straight[:1] == a[:1] and straight[1] != a[1]  # dropout draws from step 1 on (B = 0 before it)
    resumed = died_after(tmp_path / "straight", tmp_path / "resumed", 2)
    again = run_job(resumed, dropout, tok_cache=tok_cache)
    assert "resumed from step 2" in again.stdout + again.stderr
    tail = {m["step"]: m["loss"] for m in read_metrics(resumed)}
    assert [tail[3], tail[4]] == straight[2:], (tail, straight)
    # What its checkpoint records is what a resume compares (before loading; a mismatch is
    # exit 4 with nothing moved: test_hostile): the adapters of other targets, or on another
    # base (without model.init_from they went onto a random base, with no word).
    from pretrain.build import _lora_meta
    from pretrain.checkpoint import CheckpointMismatch, read_meta
    from pretrain.checkpoint.fit import check_fits
    from pretrain.config import load_job_config

    cfg = load_job_config(resumed / ".hydra" / "config.yaml")
    meta = read_meta(resumed / "checkpoints" / "step-4")
    check_fits("ck", meta, cfg.model, _lora_meta(cfg, FAMILY), [])
    cfg.finetune.lora.target_modules, cfg.model.init_from = ["attention"], None
    with pytest.raises(CheckpointMismatch) as e:
        check_fits("ck", meta, cfg.model, _lora_meta(cfg, FAMILY), [])
    assert "finetune.lora.target_modules=['wq', 'wk', 'wv', 'wo'] (the checkpoint: ['wq'," in str(e.value)
    assert f"model.init_from=None (the checkpoint's adapters were trained on {str(tmp_path / 'hf')!r}" in str(e.value)
    import shutil

    shutil.copytree(tmp_path / "hf", tmp_path / "local" / "hf")  # the base copied to a node's disk: accepted
    cfg.finetune.lora.target_modules, cfg.model.init_from = ["all"], str(tmp_path / "local" / "hf")
    check_fits("ck", meta, cfg.model, _lora_meta(cfg, FAMILY), [])
    for name, (nproc, extra) in layouts.items():
        proc = run_job(tmp_path / name, [*common, *extra], tok_cache=tok_cache, nproc=nproc, launcher="torchrun")
        if name.startswith("hsdp"):  # read back from the blocks by the run itself
            out = proc.stderr + proc.stdout
            assert "2 blocks here: activation checkpointing full 2 | compiled 2 | FSDP2 units 2" in out
            assert "dp_replicate=2 dp_shard=1" in out
        b = losses(tmp_path / name)
        print(f"{name}: max relative loss difference {max(abs(x - y) / abs(x) for x, y in zip(a, b)):.1e}")
        assert len(b) == 4 and all(abs(x - y) <= 1e-5 * abs(y) for x, y in zip(a, b)), (name, a, b)
        ck = tmp_path / name / "checkpoints" / "step-4"
        md = dcp.FileSystemReader(str(ck)).read_metadata().state_dict_metadata
        model_keys = [k for k in md if k.startswith("model.")]
        assert len(model_keys) == 2 * 7 * 2 and all(".lora_" in k for k in model_keys), (name, model_keys)

    # Our adapted model: the HF base in our layout + the trained adapters.
    args = LlamaArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden_dim=128, vocab_size=512)
    args.rope_scaling.original_max_position_embeddings = 16
    ours = build_llama(args, rope_cache_len=32, device="cpu")
    ours.init_buffers()
    ours.load_state_dict(hf_to_ours(base_model.state_dict(), args), strict=False)
    apply_lora(ours, FAMILY, rank=4, alpha=8.0, dropout=0.0, targets=["all"])
    state = {"model": {k: v for k, v in ours.state_dict().items() if ".lora_" in k}}
    dcp.load(state, checkpoint_id=str(ck), no_dist=True)
    ours.load_state_dict(state["model"], strict=False)
    torch.manual_seed(1)
    x = torch.randint(0, 512, (2, 32))
    with torch.no_grad():
        want = ours(x)

        cli("export", ck, tmp_path / "merged", "--dtype", "fp32", "--no-progress")
        merged = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "merged", torch_dtype=torch.float32).eval()
        d_merged = (merged(x).logits - want).abs().max().item()

        cli("export-adapter", ck, tmp_path / "adapter")
        cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
        assert cfg["r"] == 4 and cfg["lora_alpha"] == 8.0 and "q_proj" in cfg["target_modules"]
        fresh = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf", torch_dtype=torch.float32)
        adapted = peft.PeftModel.from_pretrained(fresh, tmp_path / "adapter").eval()
        d_peft = (adapted(input_ids=x).logits - want).abs().max().item()
        d_base = (base_model(x).logits - want).abs().max().item()
    print(f"max |logits diff| merged {d_merged:.1e}, PEFT {d_peft:.1e}; base vs adapted {d_base:.1e}")
    assert d_merged <= 1e-4 and d_peft <= 1e-4
    assert d_base > 1e-3  # the adapters changed the model: the equalities above are not vacuous


def _arith_chats(path, n=64, seed=0):
    import random

    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n):
            a, b = rng.randrange(100), rng.randrange(100)
            msgs = [{"role": "system", "content": "You add numbers."},
                    {"role": "user", "content": f"What is {a} plus {b}?"},
                    {"role": "assistant", "content": f"{a} plus {b} is {a + b}."}]
            f.write(json.dumps({"messages": msgs}) + "\n")


def test_sft_with_lora_fsdp_matches_one_process(tmp_path, tok_cache):
    """Chat SFT (assistant tokens only) with LoRA: the loss is the sum over trained tokens
    / their global count, so 2 FSDP2 ranks (each with its own trained-token count) train
    like 1 process on the same global batch; the loss falls."""
    from tests.conftest import losses, read_metrics, run_job

    _arith_chats(tmp_path / "chat.jsonl")
    common = ["data=chat", f"data.path={tmp_path / 'chat.jsonl'}", "model.vocab_size=128256", "train.seq_len=64",
              "finetune.lora.rank=8", "finetune.lora.target_modules=[all]", "optim.lr=1e-2", "optim.warmup_steps=0",
              "optim.schedule=constant", "train.steps=6", "logging.every=1", "data.num_workers=0",
              "data.tokenizer.vocab_size=512"]
    run_job(tmp_path / "one", [*common, "train.local_batch_size=4"], tok_cache=tok_cache)
    run_job(tmp_path / "two", [*common, "train.local_batch_size=2"], tok_cache=tok_cache, nproc=2,
            launcher="torchrun")
    a, b = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(a) == 6 and all(abs(x - y) <= 1e-5 * abs(y) for x, y in zip(a, b)), (a, b)
    assert a[-1] < a[0] - 0.5, a  # random base, LoRA only: it falls, slowly
    assert read_metrics(tmp_path / "one")[-1]["data/truncated"] == 0
