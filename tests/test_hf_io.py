"""Hugging Face import/export through the real CLI and real files: a random
LlamaForCausalLM saved by transformers as sharded safetensors -> our checkpoint -> logits;
our export -> transformers -> logits and bit-equal weights; ``model.init_from`` under
FSDP2 on 2 processes; errors that name the file, the key and both values."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO, _env, died_after, losses, read_metrics, run_job

transformers = pytest.importorskip("transformers")

from pretrain.checkpoint import CheckpointError  # noqa: E402
from pretrain.interop.hf import HFWeights, import_hf, parse_size  # noqa: E402
from pretrain.interop.hf import main as hf_main  # noqa: E402
from pretrain.model.llama.args import LlamaArgs, RopeScaling  # noqa: E402
from pretrain.model.llama.hf import args_from_hf_config, hf_config_from_args  # noqa: E402

# The TINY model of the job tests (conftest), with a rope scaling band that matters at
# the sequence lengths used here (original context 16 < 32, 64).
HF_CFG = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, rms_norm_eps=1e-5, max_position_embeddings=131072,
              rope_theta=500000.0, rope_scaling=dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0,
                                                     high_freq_factor=4.0, original_max_position_embeddings=16),
              attention_bias=False, mlp_bias=False)
RUN_ROPE = ["model.rope_scaling.original_max_position_embeddings=16"]
# One short training run with a checkpoint, shared by the export tests (read-only).
EXPORT_RUN = [*RUN_ROPE, "train.steps=2", "checkpoint.interval=2"]
SHARD = "40KB"


def save_hf(path: Path, tied: bool, seed: int = 0):
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**HF_CFG, tie_word_embeddings=tied)).float()
    with torch.no_grad():  # random norms, so a swapped norm shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    model.save_pretrained(path, max_shard_size=SHARD)
    return model.eval()


def cli(*args, check=True):
    proc = subprocess.run([sys.executable, "-m", "pretrain.hf", *map(str, args)], cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=300)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def our_model_from(ckpt: Path):
    import torch.distributed.checkpoint as dcp
    import yaml

    from pretrain.model.llama import build_llama
    from pretrain.model.llama.args import LlamaArgs, RopeScaling

    cfg = yaml.safe_load((ckpt / "model.yaml").read_text())
    assert cfg.pop("defaults") == ["llama_schema", "_self_"]  # a model file of the Llama family
    rs = cfg.pop("rope_scaling")
    args = LlamaArgs(**cfg, rope_scaling=RopeScaling(**rs) if rs else None)
    model = build_llama(args, rope_cache_len=64, device="meta")
    model.to_empty(device="cpu")
    model.init_buffers()
    state = {"model": {k: torch.full_like(v, float("nan")) for k, v in model.state_dict().items()
                       if not k.endswith("freqs_cis")}}
    dcp.load(state, checkpoint_id=str(ckpt), no_dist=True)
    model.load_state_dict(state["model"], strict=False)
    return model.eval(), args


TOKENS = torch.randint(0, 512, (2, 64), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_import_export_round_trip(tmp_path, tied):
    hf = save_hf(tmp_path / "hf", tied)
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 3, "the fixture must be sharded"

    proc = cli("import", tmp_path / "hf", tmp_path / "ck")
    assert "100%" in proc.stderr  # the progress bar reached its end
    meta = json.loads((tmp_path / "ck" / "meta.json").read_text())
    assert meta["weights_only"] and meta["step"] == 0 and meta["model"]["tie_embeddings"] is tied
    ours, args = our_model_from(tmp_path / "ck")
    assert args.rope_scaling.original_max_position_embeddings == 16 and args.rope_theta == 500000.0
    assert all(not torch.isnan(p).any() for p in ours.parameters()), "a weight was not loaded"
    with torch.no_grad():
        ref, got = hf(TOKENS).logits, ours(TOKENS)
    assert (ref - got).abs().max().item() <= 1e-4

    cli("export", tmp_path / "ck", tmp_path / "out", "--dtype", "fp32", "--max-shard-size", SHARD)
    out = tmp_path / "out"
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is tied
    assert cfg["rope_scaling"]["original_max_position_embeddings"] == 16 and cfg["rope_theta"] == 500000.0
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) > 3 and (out / "model.safetensors.index.json").is_file()
    biggest_tensor = max(p.numel() * 4 for p in hf.parameters())
    assert all(s.stat().st_size <= max(parse_size(SHARD), biggest_tensor) + 4096 for s in shards)
    back = transformers.LlamaForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        assert (back(TOKENS).logits - got).abs().max().item() <= 1e-4
    # Exact both ways: every weight is bit-identical to the original.
    for (k, a), (k2, b) in zip(sorted(hf.state_dict().items()), sorted(back.state_dict().items())):
        assert k == k2 and torch.equal(a, b), k
    assert back.config.tie_word_embeddings is tied


def test_export_of_a_training_run_loads_in_transformers(tmp_path, shared_run):
    """A run dir (its newest checkpoint) exports in bf16, the default dtype."""
    run = shared_run(EXPORT_RUN)[0]
    cli("export", run, tmp_path / "out")
    back = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "out")
    assert back.dtype == torch.bfloat16 and (tmp_path / "out" / "model.safetensors").is_file()
    import torch.distributed.checkpoint as dcp

    from pretrain.model.llama.hf import args_from_hf_config, hf_to_ours

    ck = sorted((run / "checkpoints").glob("step-*"))[-1]
    sd = hf_to_ours({k: v.float() for k, v in back.state_dict().items()}, args_from_hf_config(back.config.to_dict()))
    state = {"model": {k: torch.empty_like(v) for k, v in sd.items()}}
    dcp.load(state, checkpoint_id=str(ck), no_dist=True)
    for k, v in sd.items():  # bf16 rounding of the fp32 masters, nothing else
        assert torch.equal(v, state["model"][k].bfloat16().float()), k


def test_export_fp16_is_the_fp32_export_rounded(tmp_path, shared_run):
    """--dtype fp16: every exported tensor is float16 and equals the fp32 export's value rounded to fp16."""
    from safetensors.torch import load_file

    run = shared_run(EXPORT_RUN)[0]
    for dtype in ("fp16", "fp32"):
        assert hf_main(["export", str(run), str(tmp_path / dtype), "--dtype", dtype, "--no-progress"]) == 0
    t16, t32 = ({k: v for f in sorted((tmp_path / d).glob("*.safetensors")) for k, v in load_file(f).items()}
                for d in ("fp16", "fp32"))
    assert t16 and sorted(t16) == sorted(t32)
    for k, v in t16.items():
        assert t32[k].dtype == torch.float32 and v.dtype == torch.float16, k
        assert torch.equal(v, t32[k].to(torch.float16)), k
    assert json.loads((tmp_path / "fp16" / "config.json").read_text())["torch_dtype"] == "float16"


@pytest.mark.parametrize("scaling", [RopeScaling(factor=8.0, low_freq_factor=2.0, high_freq_factor=3.0,
                                                 original_max_position_embeddings=16), None], ids=["llama3", "plain"])
def test_transformers5_config_form_reads_back_the_same_args(scaling):
    """A config.json in the transformers 5 form (rope_parameters only) parses back to the same args."""
    args = LlamaArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden_dim=128, vocab_size=512,
                     rope_theta=123456.0, rope_scaling=scaling)
    v4 = hf_config_from_args(args)
    v5 = {k: v for k, v in v4.items() if k not in ("rope_theta", "rope_scaling", "rope_parameters")}
    v5["rope_parameters"] = {**(v4["rope_scaling"] or {"rope_type": "default"}), "rope_theta": v4["rope_theta"]}
    if int(transformers.__version__.split(".")[0]) >= 5:  # the layout transformers 5 itself writes
        written = transformers.LlamaConfig(**v4).to_dict()
        assert "rope_scaling" not in written and "rope_theta" not in written
        assert written["rope_parameters"] == v5["rope_parameters"]
        assert args_from_hf_config(written, name=args.name) == args
    assert args_from_hf_config(v5, name=args.name) == args


class _Payload:
    """Unpickling this creates the file ``path``: the mark of a weights file that was unpickled."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_bin_weights_are_refused_with_the_fix_and_never_unpickled(tmp_path):
    """A folder with only pytorch_model.bin is refused naming the fix; the pickle is never loaded."""
    hf, marker = tmp_path / "hf", tmp_path / "unpickled"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps(hf_config_from_args(LlamaArgs(dim=64, n_layers=2))))
    torch.save({"model.norm.weight": _Payload(str(marker))}, hf / "pytorch_model.bin")
    fix = r"PyTorch \.bin weights are not read: re-save them with .*save_pretrained\(\.\.\., safe_serialization=True\)"
    with pytest.raises(CheckpointError, match=fix):
        HFWeights(hf)
    with pytest.raises(CheckpointError, match=fix):
        import_hf(hf, tmp_path / "ck", progress=False)
    assert not marker.exists() and not (tmp_path / "ck").exists()
    # Control: the file is a live payload, so the assertion above means something.
    torch.load(hf / "pytorch_model.bin", weights_only=False)["model.norm.weight"].close()
    assert marker.exists()


def test_init_from_under_fsdp_matches_weights_only_start(tmp_path, tok_cache):
    """model.init_from on 2 FSDP2 ranks trains exactly like 1 process started from the
    imported checkpoint, and unlike a random start."""
    save_hf(tmp_path / "hf", tied=True, seed=3)
    cli("import", tmp_path / "hf", tmp_path / "ck", "--no-progress")
    common = [*RUN_ROPE, "train.steps=3", "logging.every=1", "train.deterministic=true",
              "optim.warmup_steps=0", "optim.schedule=constant"]
    fsdp = run_job(tmp_path / "a", [*common, f"model.init_from={tmp_path / 'hf'}"], tok_cache=tok_cache,
                   nproc=2, launcher="torchrun")
    assert "initialized weights from Hugging Face folder" in fsdp.stderr + fsdp.stdout
    run_job(tmp_path / "b", [*common, "train.local_batch_size=16", f"checkpoint.load_path={tmp_path / 'ck'}",
                                      "checkpoint.load_weights_only=true"], tok_cache=tok_cache)
    run_job(tmp_path / "c", [*common, "train.local_batch_size=16", "train.steps=4", "checkpoint.interval=3"],
            tok_cache=tok_cache)
    a, b, c = losses(tmp_path / "a"), losses(tmp_path / "b"), losses(tmp_path / "c")
    assert len(a) == len(b) == 3
    for x, y in zip(a, b):  # fp32; reduction order differs between 1 and 2 ranks
        assert abs(x - y) <= 1e-5 * abs(y), (a, b)
    assert abs(a[0] - c[0]) > 1e-3, "init_from gave the random init's loss"
    # init_from is ignored once the run dir has a checkpoint of its own: the random-init run
    # c, as if it had died after its step-3 save, resumed with init_from set, continues its
    # own curve (step 4 equals c's), not the HF weights.
    d = died_after(tmp_path / "c", tmp_path / "d", 3)
    again = run_job(d, [*common, "train.local_batch_size=16", "train.steps=4", "checkpoint.interval=3",
                        f"model.init_from={tmp_path / 'hf'}"], tok_cache=tok_cache)
    out = again.stderr + again.stdout
    assert "resumed from step 3" in out and "initialized weights from Hugging Face folder" not in out
    assert {m["step"]: m["loss"] for m in read_metrics(d)}[4] == c[3]


def test_errors_name_file_key_and_values(tmp_path, tok_cache):
    hf_dir = tmp_path / "hf"
    save_hf(hf_dir, tied=True)
    # The configured model differs from the folder's: both values, model.<key> named; exit 4.
    bad = run_job(tmp_path / "run", [*RUN_ROPE, "train.steps=1", "model.n_layers=3", f"model.init_from={hf_dir}"],
                  tok_cache=tok_cache, check=False)
    assert bad.returncode == 4, bad.stderr[-2000:]
    assert "model.n_layers=3 but config.json has num_hidden_layers=2" in bad.stderr
    # A weights-only checkpoint used as a full one says what to set.
    cli("import", hf_dir, tmp_path / "ck", "--no-progress")
    full = run_job(tmp_path / "run2", [*RUN_ROPE, "train.steps=1", f"checkpoint.load_path={tmp_path / 'ck'}"],
                   tok_cache=tok_cache, check=False)
    assert full.returncode == 4 and "checkpoint.load_weights_only=true" in full.stderr
    # Export into a non-empty folder refuses without --force, and writes nothing.
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("x")
    proc = cli("export", tmp_path / "ck", tmp_path / "busy", check=False)
    assert proc.returncode == 4 and "--force" in proc.stderr
    assert sorted(p.name for p in (tmp_path / "busy").iterdir()) == ["keep.txt"]

    # A shard listed in the index but missing: that file is named.
    broken = tmp_path / "broken"
    shutil.copytree(hf_dir, broken)
    victim = sorted(broken.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=victim.name):
        HFWeights(broken)
    # A corrupt shard: named too.
    shutil.rmtree(broken)
    shutil.copytree(hf_dir, broken)
    victim.write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match=victim.name):
        import_hf(broken, tmp_path / "ck2", progress=False)
    assert not (tmp_path / "ck2").exists()
    # A weight of another shape: key and both shapes.
    from safetensors.torch import load_file, save_file

    shutil.rmtree(broken)
    shutil.copytree(hf_dir, broken)
    index = json.loads((broken / "model.safetensors.index.json").read_text())["weight_map"]
    key = "model.layers.1.mlp.up_proj.weight"
    f = broken / index[key]
    tensors = load_file(f)
    tensors[key] = torch.zeros(100, 64)
    save_file(tensors, f, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"up_proj.weight \(our layers.1.feed_forward.w3.weight\) has shape "
                                              r"\[100, 64\] but this model expects \[128, 64\]"):
        import_hf(broken, tmp_path / "ck3", progress=False)
    with pytest.raises(CheckpointError, match="config.json: missing"):
        (broken / "config.json").unlink()
        HFWeights(broken)
