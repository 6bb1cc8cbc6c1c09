"""Config errors fail before any process group, naming the key; the schema covers every
file under configs/."""
import subprocess
import sys
import time

import pytest

from conftest import REPO, compose_job, free_port, run_job
from pretrain.validate import ConfigError, validate_job


@pytest.mark.parametrize("override,key", [
    ("train.stpes=5", "stpes"),
    ("train.deterministic=maybe", "train.deterministic"),
])
def test_bad_keys_and_types_exit_nonzero_naming_the_key(tmp_path, tok_cache, override, key):
    proc = run_job(tmp_path, [override], tok_cache=tok_cache, check=False)
    assert proc.returncode == 1  # Hydra's own rejection (README, "Exit codes")
    assert key in proc.stderr
    assert not (tmp_path / "metrics.jsonl").exists()


@pytest.mark.parametrize("override,key", [("optim.lrr=0.1", "optim.lrr"), ("train.steps=abc", "train.steps")])
def test_bad_keys_and_types_in_other_groups_name_the_key(override, key):
    """The same rejection in-process for the other groups and types (a launch shows nothing
    more than the two above)."""
    with pytest.raises(Exception, match=key.replace(".", r"\.")):
        compose_job(override)


@pytest.mark.parametrize("rank", [0, 1])
def test_impossible_layout_fails_in_every_worker_before_process_group(tmp_path, tok_cache, rank):
    """Each rank of a 2-process job started alone, its peer never coming, the master port
    closed: a rank that joined the process group first would wait there (600 s). Each
    exits 2 at once, naming the key: the check ran before any rendezvous."""
    env = {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
           "GROUP_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
           "TORCHELASTIC_RUN_ID": "lonely"}
    t0 = time.monotonic()
    proc = run_job(tmp_path, ["parallel.dp_shard=3"], tok_cache=tok_cache, check=False, env=env, timeout=120)
    took = time.monotonic() - t0
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out[-3000:]
    assert "config error: parallel.dp_shard=3" in out and "must equal the world size 2" in out
    assert took < 60 and "run dir" not in out  # training never started


@pytest.mark.parametrize("overrides,world,key", [
    # A cross-field rule fails like a range (in-process: test_knobs launches one job to see
    # a config error exit 2 before training).
    (["model.n_kv_heads=3"], 1, "model.n_kv_heads"),  # 8 % 3
    (["model.n_heads=6"], 1, "model.n_kv_heads"),  # 6 % 4
    (["model.dim=250", "model.n_heads=4", "model.n_kv_heads=2"], 1, "model.n_heads"),
    (["train.seq_len=300000"], 1, "train.seq_len"),
    (["train.local_batch_size=0"], 1, "train.local_batch_size"),
    (["train.grad_accum_steps=0"], 1, "train.grad_accum_steps"),
    (["optim.schedule=step"], 1, "optim.schedule"),
    (["train.mixed_precision=fp8"], 1, "train.mixed_precision"),
    (["parallel.dp_replicate=3"], 4, "parallel.dp_replicate"),
    (["parallel.dp_shard=2"], 4, "parallel.dp_shard"),
    (["parallel.tp=3"], 3, "model.n_heads"),  # 8 heads over 3 ranks
    (["parallel.tp=8"], 8, "model.n_kv_heads"),  # 8 heads fit, 4 kv heads do not
    (["parallel.tp=2", "model.vocab_size=4097", "data.tokenizer.vocab_size=4000"], 2, "model.vocab_size"),
    (["parallel.tp=2", "train.seq_len=255"], 2, "train.seq_len"),  # sequence parallel splits it
    (["parallel.loss_parallel=true"], 1, "parallel.loss_parallel"),
    (["eval.interval=2"], 1, "eval.data.path"),  # evaluation needs held-out data
    (["finetune.lora.rank=4", "checkpoint.load_path=/ck"], 1, "checkpoint.load_path"),
    (["eval.interval=2", "eval.data.path=/d", "parallel.pp=2", "train.local_batch_size=4", "eval.local_batch_size=2"],
     2, "eval.local_batch_size"),
    (["parallel.activation_checkpoint=some"], 1, "parallel.activation_checkpoint"),
    (["parallel.activation_checkpoint=every_n", "parallel.ac_every_n=0"], 1, "parallel.ac_every_n"),
    (["parallel.pp=3"], 3, "model.n_layers"),  # 4 layers into 3 stages
    (["parallel.pp=2", "parallel.pp_schedule=zbv", "model.n_layers=6"], 2, "model.n_layers"),  # 4 stages
    (["parallel.pp=2", "parallel.pp_microbatches=3"], 2, "parallel.pp_microbatches"),  # batch 8
    (["parallel.pp=2", "parallel.pp_microbatches=1"], 2, "parallel.pp_microbatches"),  # 1f1b: >= stages
    # Context parallel: 2 x cp chunks per window; a family without an attention core; the
    # ring implementation (CUDA kernels only); compile; a degree that does not fit.
    (["parallel.cp=3"], 3, "train.seq_len"),
    (["parallel.cp=2", "parallel.tp=2", "train.seq_len=34"], 4, "train.seq_len"),  # 4 chunks of 8.5
    (["parallel.cp=2", "parallel.tp=4", "model.n_heads=8", "model.n_kv_heads=4", "train.seq_len=20"], 8,
     "train.seq_len"),  # 10 tokens per CP rank cannot split over 4 TP ranks (sequence parallel)
    (["parallel.cp=5"], 4, "parallel.cp"),
    (["parallel.cp=2", "parallel.pp=2"], 2, "parallel.cp"),  # the product is at fault: a degree the user set
    (["optim.schedule_start=3", "checkpoint.load_path=/c", "checkpoint.load_weights_only=true"], 1,
     "optim.schedule_start"),  # weights-only restarts the count at 0
    (["parallel.cp=2", "parallel.cp_impl=ring"], 2, "parallel.cp_impl"),
    (["parallel.cp=2", "parallel.cp_impl=zigzag"], 2, "parallel.cp_impl"),
    (["parallel.cp=2", "parallel.compile=true"], 2, "parallel.compile"),
    (["model=mllama_debug", "parallel.cp=2"], 2, "parallel.cp"),
    (["train.loss_chunk=-2"], 1, "train.loss_chunk"),
    (["eval.interval=2", "eval.data.path=/d", "eval.format=chat", "data.tokenizer.kind=llama3",
      "model.vocab_size=128256", "data.sft_packing=pad"], 1, "eval.data.source"),  # chat held-out records are JSONL
    (["eval.interval=2", "eval.data.path=/d", "eval.data.source=jsonl", "eval.format=chat",
      "data.tokenizer.kind=llama3", "model.vocab_size=128256"], 1, "data.sft_packing"),  # packed, unmasked
    (["data=chat", "data.path=/c", "model.vocab_size=128256", "data.document_masking=false"], 1,
     "data.sft_packing"),  # packed conversations would attend to each other
    (["eval.interval=2", "eval.data.path=/d", "eval.data.source=jsonl", "eval.format=dialog"], 1, "eval.format"),
    (["eval.interval=2", "eval.data.path=/d", "eval.data.source=jsonl", "eval.format=chat",
      "data.sft_packing=pad"], 1, "data.tokenizer.kind"),  # the corpus BPE has no chat special tokens
    (["parallel.pp=2", "parallel.tp=2", "parallel.loss_parallel=true"], 4, "parallel.loss_parallel"),
    (["parallel.pp_stages_per_rank=0"], 1, "parallel.pp_stages_per_rank"),
    (["parallel.pp_schedule=foo"], 1, "parallel.pp_schedule"),
    (["data.tokenizer.vocab_size=9000"], 1, "data.tokenizer.vocab_size"),
    (["data.source=csv"], 1, "data.source"),
    (["data=jsonl", "model=llama3_2_1b"], 1, "data.path"),
    (["data=jsonl", "data.path=/x"], 1, "model.vocab_size"),  # llama3 tokenizer needs 128256
    (["data.tokenizer.kind=tiktoken"], 1, "data.tokenizer.path"),
    (["data.num_workers=-1"], 1, "data.num_workers"),
    (["logging.wandb_mode=cloud"], 1, "logging.wandb_mode"),
    (["data=mixture", "model=llama3_2_1b", "data.mixture.0.path=/a", "data.mixture.1.path=/b",
      "data.mixture.1.weight=0"], 1, "data.mixture.1.weight"),
    # 65536 rows x 8 streams: the loader's states alone grew memory at 55 MB/s in start-up
    (["train.local_batch_size=65536"], 1, "train.local_batch_size"),
    (["finetune.lora.rank=4", "finetune.lora.target_modules=[]"], 1, "finetune.lora.target_modules"),
    # Float8 (parallel/float8.py): LoRA's adapters would be dropped by the module swap; a model
    # whose blocks have no linear with dims that are multiples of 16; an unknown recipe.
    (["train.float8=tensorwise", "finetune.lora.rank=4", "model.init_from=/base"], 1, "train.float8"),
    (["train.float8=rowwise", "model.dim=72", "model.n_heads=4", "model.n_kv_heads=2", "model.ffn_hidden_dim=200"],
     1, "train.float8"),
    (["train.float8=fp8"], 1, "train.float8"),
    # flex attention has no CPU backward; an unknown kernel.
    (["train.device=cpu", "parallel.attention_kernel=flex"], 1, "parallel.attention_kernel"),
    (["parallel.attention_kernel=flash"], 1, "parallel.attention_kernel"),
])
def test_validation_names_the_key(overrides, world, key):
    cfg = compose_job(*overrides)
    with pytest.raises(ConfigError) as e:
        validate_job(cfg, world)
    assert e.value.key == key


@pytest.mark.parametrize("overrides,world", [
    (["parallel.pp=2", "data.document_masking=true"], 2),  # positions and document ids cross stages
    (["data=chat", "data.path=/c", "model.vocab_size=128256", "parallel.pp=2"], 2),  # chat packs under PP
    (["parallel.cp=2", "parallel.pp=2", "parallel.tp=2", "data.document_masking=true"], 8),
    (["parallel.cp=4", "train.seq_len=256"], 4),
    (["train.float8=tensorwise", "parallel.tp=2", "parallel.dp_shard=2", "finetune.freeze=[]"], 4),
    (["train.float8=rowwise", "model=mllama_debug"], 1),
])
def test_layouts_that_compose(overrides, world):
    """Document masking under pipeline parallelism was refused before positions and
    document ids travelled between stages; context parallelism composes with the rest."""
    dims = validate_job(compose_job(*overrides), world)
    assert dims.world_size == world


def test_every_config_file_composes_and_validates():
    for group in ("model", "parallel", "data", "optim", "train", "logging", "checkpoint", "profiling", "eval",
                  "finetune", "experiment"):
        for f in sorted((REPO / "configs" / group).glob("*.yaml")):
            extra = []
            if group == "data" and f.stem != "stdlib":  # user data: a path and a Llama-size vocab
                extra = ["model=llama3_2_1b", "data.path=/tmp", "data.mixture.0.path=/tmp", "data.mixture.1.path=/tmp"]
                if f.stem != "mixture":
                    extra = extra[:2]
                if f.stem == "image_folder":  # pictures: an image-text model
                    extra[0] = "model=llama3_2_11b_vision"
            if group == "experiment" and f.stem.startswith(("finetune_", "pretrain_")):  # user weights and data
                extra = ["model.init_from=/models/llama", "data.path=/tmp"]
            if group == "experiment" and f.stem == "demo_vision":  # the demo writes its pictures first
                extra = ["data.path=/tmp", "eval.data.path=/tmp"]
            cfg = compose_job(f"{group}={f.stem}", *extra)
            world = {"hsdp": 4, "fsdp_tp": 4, "pp": 4}.get(f.stem, 1)
            validate_job(cfg, world)


def test_hsdp_and_auto_shard_resolution():
    from parallel.dims import resolve_parallel_dims

    d = resolve_parallel_dims(dp_replicate=2, dp_shard=-1, tp=1, pp=1, pp_schedule="1f1b", world_size=8)
    assert (d.dp_replicate, d.dp_shard, d.dp) == (2, 4, 8)


def test_help_lists_groups():
    proc = subprocess.run([sys.executable, "-m", "pretrain", "--help"], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0
    for group in ("model:", "parallel:", "optim:", "experiment:"):
        assert group in proc.stdout
    assert "llama3_2_1b" in proc.stdout


def test_compile_without_a_compiler_or_python_headers_names_the_fix(tmp_path, monkeypatch):
    """parallel.compile=true on a node without a C/C++ compiler or Python.h: Inductor (CPU)
    or Triton (CUDA) would fail at the first step deep in a build log; the job stops at
    validation (exit 2) naming what is missing and how to get it."""
    import sysconfig

    from parallel.compile import missing_prerequisites

    cfg = compose_job("parallel.compile=true", "train.device=cpu")
    validate_job(cfg, 1)  # this machine has g++ and the headers (.ci/run installs them)
    from torch._inductor import cpp_builder

    monkeypatch.setenv("PATH", str(tmp_path))  # no compiler on PATH
    cpp_builder.cpp_compiler_search.cache_clear()  # Inductor remembers the compiler it found
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.delenv("CC", raising=False)
    with pytest.raises(ConfigError) as e:
        validate_job(cfg, 1)
    assert e.value.key == "parallel.compile" and "a C++ compiler for Inductor ($CXX, else g++" in str(e.value)
    assert "apt-get install g++" in str(e.value)
    assert "a C compiler for Triton (gcc or clang on PATH, or $CC)" in missing_prerequisites("cuda")[0]
    monkeypatch.setenv("CC", "/opt/nowhere/gcc")
    assert "$CC='/opt/nowhere/gcc' is not an executable file" in missing_prerequisites("cuda")[0]
    gcc = tmp_path / "bin" / "gcc"  # an executable gcc on PATH that builds nothing: found, then tried
    gcc.parent.mkdir()
    gcc.write_text("#!/bin/sh\n")
    gcc.chmod(0o755)
    monkeypatch.setenv("PATH", str(gcc.parent))
    monkeypatch.delenv("CC")
    assert f"{gcc} ($CC or the default) failed a one-line build (exit 0, no output)" in missing_prerequisites("cuda")[0]
    monkeypatch.setenv("CC", "gcc -m64")  # Triton would run "gcc -m64" as one file name
    assert "$CC='gcc -m64' is not an executable file" in missing_prerequisites("cuda")[0]
    # Compilers that exist but cannot build what Inductor builds passed validation and failed
    # at the first step: gcc as $CXX (no C++ standard library at link time), /bin/true.
    monkeypatch.undo()
    from torch._inductor import config as inductor_config

    for cxx, why in (("gcc", "built a library that does not load"), ("/bin/true", "failed a one-line build")):
        with inductor_config.patch({"cpp.cxx": (None, cxx)}):  # what $CXX=<cxx> gives at import
            cpp_builder.cpp_compiler_search.cache_clear()
            with pytest.raises(ConfigError, match=rf"needs on every node a C\+\+ compiler that builds what "
                                                  rf"torch.compile builds: {cxx} \(\$CXX or the default\) {why}"):
                validate_job(cfg, 1)
    cpp_builder.cpp_compiler_search.cache_clear()
    validate_job(cfg, 1)
    real = sysconfig.get_paths
    monkeypatch.setattr(sysconfig, "get_paths", lambda *a, **k: {**real(*a, **k), "include": str(tmp_path)})
    assert any(f"no {tmp_path}/Python.h (apt-get install python3-dev" in m for m in missing_prerequisites("cpu"))
