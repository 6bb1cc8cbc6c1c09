"""Training throughput of our trainer's step against a minimal hand-written PyTorch Llama
and transformers' LlamaForCausalLM: same model dims, batch, sequence, fp32, threads.

Default mode, one process, on CPU; the variants alternate (``--rounds`` rounds, each
running every variant for ``--steps`` timed steps, the order rotated per round, after
``--warmup`` untimed steps of each) and the median tokens/s over rounds is reported:
- ``ours``: the model built by the trainer's own ``pretrain.build.build_model`` for one
  process (the family's model on meta, ``parallel.parallelize``, ``to_empty``, the seeded
  layout-aware init), ``build_optimizer``, and the trainer's ``pretrain.step.TrainStep``
  called per step (lr into the param groups, forward, cross entropy on float logits,
  backward, ``parallel.init.clip_grad_norm_``, ``optimizer.step``, ``zero_grad``), the
  loss and norm read back;
- ``plain``: a compact Llama written in this file (RMSNorm, RoPE, GQA attention through
  ``F.scaled_dot_product_attention``, SwiGLU, tied head), ``torch.optim.AdamW`` on all
  parameters with its defaults, ``torch.nn.utils.clip_grad_norm_``;
- ``compiled``: ``ours`` with ``parallel.compile=true`` (each block through torch.compile /
  Inductor's C++ backend); its compile time is the warmup's overhead, reported apart;
- ``hf``: ``transformers.LlamaForCausalLM`` (sdpa attention) from the same dims,
  logits + ``F.cross_entropy``, the same plain AdamW loop.
Every variant clips at 1.0, reads the loss back each step and uses RoPE without Llama 3's
frequency scaling (a precomputed table either way). MFU = FLOPs/token
(``ModelFamily.flops_per_token``) x tokens/s / peak, where peak = threads x one core's
fp32 matmul rate (``pretrain.observe.flops.cpu_matmul_probe`` on 1024^2 matrices with one thread,
best of three 1 s probes, at the start). "cpu s/step" is the process's CPU time per step
(all threads): on a machine shared with other jobs it moves less than the wall time.

``--scaling``: our real trainer (``python -m pretrain``, stdlib corpus, loader in
process, 1 thread per process) as 1 process and as 2 processes under torchrun (FSDP2),
same per-rank batch: the median ``tokens_per_s_per_device`` after the first steps, and
the efficiency (2-process per-process rate / 1-process rate).

``--gpu``: on one CUDA device, Llama 3.2 1B and 3B (configs/model), bf16 autocast over
fp32 masters as the trainer does, the rows of ``GPU_ROWS`` (``--gpu-rows`` picks some):
compile on/off x selective activation checkpointing on/off at seq 4096; bf16 against
Float8 (``train.float8``) for 1B and 3B at 4096 and 8192; document masking through SDPA's
dense mask against flex attention's block mask. Each row in a fresh process finds the
largest micro-batch that fits (descending sizes, catching ``torch.cuda.OutOfMemoryError``)
and reports tokens/s, MFU (``pretrain.observe.flops.peak_flops``),
``torch.cuda.max_memory_allocated`` and, apart from tokens/s, the warmup's overhead
(compile) and the process's whole time.

The last line is machine-readable key=value pairs."""
from __future__ import annotations

import argparse
import gc
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from pretrain.observe.flops import cpu_matmul_probe  # noqa: E402
from pretrain.model.llama import flops_per_token  # noqa: E402
from pretrain.model.llama.args import LlamaArgs  # noqa: E402

VARIANTS = ("ours", "compiled", "plain", "hf")


# ---------------------------------------------------------------- ours: the trainer's step

def build_ours(args: LlamaArgs, seq: int, device: torch.device, *, compile_: bool = False, ac: str = "none",
               param_dtype=torch.float32, seed: int = 0, float8: str = "none", kernel: str = "auto"):
    """The one-process path of the trainer: ``pretrain.build.build_model`` (the family's
    model on meta, the layout, materialization, the seeded init), ``build_optimizer``, and
    the trainer's own ``pretrain.step.TrainStep`` called once per step (grad_accum_steps=1,
    no pipeline), its loss and norm read back. ``float8``: ``train.float8``; ``kernel``:
    ``parallel.attention_kernel``. ``step(inputs, labels, positions=None, doc_ids=None)``:
    with document ids, the document-masked path."""
    from parallel.config import ParallelConfig
    from parallel.dims import ParallelDims
    from pretrain.build import build_model
    from pretrain.config import FinetuneConfig, JobConfig, OptimConfig, TrainConfig
    from pretrain.optim import OptimizerParts, build_lr_fn, build_optimizer
    from pretrain.step import TrainStep

    torch.manual_seed(seed)
    pc = ParallelConfig(activation_checkpoint=ac, compile=compile_, attention_kernel=kernel)
    cfg = JobConfig(model=args, parallel=pc, train=TrainConfig(seq_len=seq, seed=seed, max_norm=1.0,
                                                               mixed_precision="bf16" if param_dtype != torch.float32
                                                               else "fp32", float8=float8),
                    optim=OptimConfig(), finetune=FinetuneConfig())
    dims = ParallelDims(dp_replicate=1, dp_shard=1, tp=1, pp=1, world_size=1)
    built = build_model(cfg, dims, device)
    model = built.parts[0]
    optimizer = OptimizerParts([build_optimizer(model, cfg.optim)])
    train_step = TrainStep(built.family, built.parts, optimizer, dims=dims, pc=pc, grad_accum_steps=1,
                           max_norm=1.0, chat=False, device=device, param_dtype=built.param_dtype,
                           model_args=args)
    lr_at = build_lr_fn(cfg.optim, 10_000)
    model.train()
    state = {"step": 0}

    def step(inputs, labels, positions=None, doc_ids=None) -> float:
        state["step"] += 1
        batch = {"input_ids": inputs, "labels": labels}
        if doc_ids is not None:
            batch.update(positions=positions, doc_ids=doc_ids)
        out = train_step([batch], lr_at(state["step"]))
        loss = out.loss_sum.item()
        out.grad_norm.item()
        return loss

    return model, step


# ---------------------------------------------------------------- plain: a minimal Llama

class PlainRMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps, self.weight = eps, nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rotate(x, cos, sin):  # x: (B, H, S, D); half-split RoPE
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class PlainBlock(nn.Module):
    def __init__(self, dim, n_heads, n_kv_heads, ffn):
        super().__init__()
        self.h, self.kv, self.hd = n_heads, n_kv_heads, dim // n_heads
        self.n1, self.n2 = PlainRMSNorm(dim), PlainRMSNorm(dim)
        self.qkv = nn.Linear(dim, (n_heads + 2 * n_kv_heads) * self.hd, bias=False)
        self.o = nn.Linear(dim, dim, bias=False)
        self.gate_up = nn.Linear(dim, 2 * ffn, bias=False)
        self.down = nn.Linear(ffn, dim, bias=False)

    def forward(self, x, cos, sin):
        b, s, _ = x.shape
        q, k, v = self.qkv(self.n1(x)).split([self.h * self.hd, self.kv * self.hd, self.kv * self.hd], dim=-1)
        q, k, v = (t.view(b, s, -1, self.hd).transpose(1, 2) for t in (q, k, v))
        a = F.scaled_dot_product_attention(rotate(q, cos, sin), rotate(k, cos, sin), v, is_causal=True,
                                           enable_gqa=True)
        x = x + self.o(a.transpose(1, 2).reshape(b, s, -1))
        g, u = self.gate_up(self.n2(x)).chunk(2, dim=-1)
        return x + self.down(F.silu(g) * u)


class PlainLlama(nn.Module):
    def __init__(self, a: LlamaArgs, seq: int):
        super().__init__()
        self.emb = nn.Embedding(a.vocab_size, a.dim)
        self.blocks = nn.ModuleList(PlainBlock(a.dim, a.n_heads, a.n_kv_heads, a.ffn_hidden_dim)
                                    for _ in range(a.n_layers))
        self.norm = PlainRMSNorm(a.dim, a.norm_eps)
        hd = a.dim // a.n_heads
        inv = 1.0 / a.rope_theta ** (torch.arange(0, hd, 2).float() / hd)
        ang = torch.outer(torch.arange(seq).float(), inv).repeat(1, 2)
        self.register_buffer("cos", ang.cos(), persistent=False)
        self.register_buffer("sin", ang.sin(), persistent=False)
        for p in self.parameters():
            if p.ndim == 2:
                nn.init.normal_(p, std=0.02)

    def forward(self, idx):
        x = self.emb(idx)
        for blk in self.blocks:
            x = blk(x, self.cos, self.sin)
        return F.linear(self.norm(x), self.emb.weight)


def plain_loop(model: nn.Module, hf: bool = False):
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1)
    model.train()

    def step(inputs, labels) -> float:
        logits = model(inputs).logits if hf else model(inputs)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return step


def build_plain(args: LlamaArgs, seq: int):
    torch.manual_seed(0)
    return plain_loop(PlainLlama(args, seq))


def build_hf(args: LlamaArgs, seq: int):
    import transformers

    from pretrain.model.llama.hf import hf_config_from_args

    torch.manual_seed(0)
    cfg = hf_config_from_args(args)
    cfg["max_position_embeddings"] = seq
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg, attn_implementation="sdpa")).float()
    return plain_loop(model, hf=True)


# ---------------------------------------------------------------- default mode (CPU)

def bench_args(a) -> LlamaArgs:
    return LlamaArgs(name="bench", dim=a.dim, n_layers=a.layers, n_heads=a.heads, n_kv_heads=a.kv_heads,
                     ffn_hidden_dim=a.ffn, vocab_size=a.vocab, rope_scaling=None, tie_embeddings=True)


def run_default(a) -> None:
    # Peak: threads x one core's matmul rate (the best of three 1 s single-thread probes of
    # 1024^2 fp32 matmuls). A multi-thread probe reads far too low on a shared machine:
    # one preempted thread stalls the others at every barrier (MFU came out above 100%).
    torch.set_num_threads(1)
    peak = a.threads * max(cpu_matmul_probe(n=1024, seconds=1.0) for _ in range(3))
    torch.set_num_threads(a.threads)
    args = bench_args(a)
    fpt = flops_per_token(args, a.seq)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, a.vocab, (a.batch, a.seq + 1), generator=gen)
    inputs, labels = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
    _, ours = build_ours(args, a.seq, torch.device("cpu"))
    _, compiled = build_ours(args, a.seq, torch.device("cpu"), compile_=True)
    steps = {"ours": ours, "compiled": compiled, "plain": build_plain(args, a.seq), "hf": build_hf(args, a.seq)}
    warm = {}
    for name in VARIANTS:
        t0 = time.perf_counter()
        for _ in range(a.warmup):
            steps[name](inputs, labels)
        warm[name] = time.perf_counter() - t0
    rates = {name: [] for name in VARIANTS}
    cpu = {name: [] for name in VARIANTS}  # process CPU seconds per step: less sensitive to other load
    for r in range(a.rounds):
        order = VARIANTS[r % len(VARIANTS):] + VARIANTS[:r % len(VARIANTS)]
        for name in order:
            c0, t0 = time.process_time(), time.perf_counter()
            for _ in range(a.steps):
                loss = steps[name](inputs, labels)
            rates[name].append(a.steps * a.batch * a.seq / (time.perf_counter() - t0))
            cpu[name].append((time.process_time() - c0) / a.steps)
            assert math.isfinite(loss)
    tps = {n: statistics.median(v) for n, v in rates.items()}
    cps = {n: statistics.median(v) for n, v in cpu.items()}
    # The compile time: the compiled variant's warmup beyond as many steady steps.
    compile_s = warm["compiled"] - a.warmup * a.batch * a.seq / tps["compiled"]
    print(f"Llama dim {a.dim}, {a.layers} layers, {a.heads} heads ({a.kv_heads} kv), ffn {a.ffn}, vocab "
          f"{a.vocab} (tied), seq {a.seq} x batch {a.batch}; fp32 CPU, {torch.get_num_threads()} threads; "
          f"{fpt / 1e6:.1f} MFLOP/token; probe peak {peak / 1e9:.1f} GFLOP/s; median of {a.rounds} rounds x "
          f"{a.steps} steps after {a.warmup} warmup; compile (the compiled variant's warmup beyond "
          f"{a.warmup} steady steps) {compile_s:.1f} s")
    print(f"{'variant':<9} {'tokens/s':>9} {'min':>8} {'max':>8} {'s/step':>7} {'cpu s/step':>10} {'MFU':>6} "
          f"{'ours/x':>7}")
    for n in VARIANTS:
        print(f"{n:<9} {tps[n]:>9.0f} {min(rates[n]):>8.0f} {max(rates[n]):>8.0f} {a.batch * a.seq / tps[n]:>7.3f} "
              f"{cps[n]:>10.3f} {fpt * tps[n] / peak:>6.1%} {tps['ours'] / tps[n]:>7.3f}")
    print(f"tokens_s_ours={tps['ours']:.0f} tokens_s_compiled={tps['compiled']:.0f} tokens_s_plain={tps['plain']:.0f} "
          f"tokens_s_hf={tps['hf']:.0f} compiled_vs_eager={tps['compiled'] / tps['ours']:.3f} "
          f"compile_s={compile_s:.1f} vs_plain={tps['ours'] / tps['plain']:.3f} vs_hf={tps['ours'] / tps['hf']:.3f} "
          f"mfu_ours={fpt * tps['ours'] / peak:.4f} mfu_plain={fpt * tps['plain'] / peak:.4f} "
          f"mfu_hf={fpt * tps['hf'] / peak:.4f} cpu_vs_plain={cps['plain'] / cps['ours']:.3f} "
          f"cpu_vs_hf={cps['hf'] / cps['ours']:.3f} peak_gflops={peak / 1e9:.1f} threads={torch.get_num_threads()}")


# ---------------------------------------------------------------- --scaling (real trainer)

def trainer_run(a, nproc: int, run_dir: Path) -> float:
    overrides = [f"model.dim={a.dim}", f"model.n_layers={a.layers}", f"model.n_heads={a.heads}",
                 f"model.n_kv_heads={a.kv_heads}", f"model.ffn_hidden_dim={a.ffn}", f"model.vocab_size={a.vocab}",
                 f"train.seq_len={a.seq}", f"train.local_batch_size={a.batch}", f"train.steps={a.scaling_steps}",
                 "train.num_threads=1", "train.device=cpu", "data.num_workers=0", "logging.tensorboard=false",
                 "logging.every=1", "logging.console=false", f"hydra.run.dir={run_dir}"]
    bin_dir = Path(sys.executable).parent
    cmd = [str(bin_dir / "torchrun"), "--nnodes", "1", "--nproc_per_node", str(nproc), "--master_addr",
           "127.0.0.1", "--master_port", str(_free_port()), "-m", "pretrain", *overrides]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"trainer failed ({nproc} processes):\n{proc.stderr[-4000:]}")
    rows = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    rates = [m["tokens_per_s_per_device"] for m in rows if m["step"] > a.scaling_skip]
    return statistics.median(rates)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_scaling(a) -> None:
    rates = {1: [], 2: []}
    with tempfile.TemporaryDirectory(prefix="scaling-bench-") as tmp:
        for r in range(a.scaling_rounds):
            for n in (1, 2) if r % 2 == 0 else (2, 1):
                rates[n].append(trainer_run(a, n, Path(tmp) / f"n{n}-r{r}"))
    per = {n: statistics.median(v) for n, v in rates.items()}
    eff = per[2] / per[1]
    print(f"our trainer (python -m pretrain under torchrun), Llama dim {a.dim}, {a.layers} layers, vocab {a.vocab}, "
          f"seq {a.seq} x batch {a.batch} per rank, fp32 CPU, 1 thread per process, loader in process; "
          f"{a.scaling_steps} steps, median tokens_per_s_per_device of steps > {a.scaling_skip}, "
          f"median of {a.scaling_rounds} alternating rounds")
    print(f"{'processes':<10} {'layout':<12} {'tokens/s/proc':>13} {'tokens/s total':>14} {'efficiency':>10}")
    print(f"{1:<10} {'single':<12} {per[1]:>13.0f} {per[1]:>14.0f} {1.0:>10.3f}")
    print(f"{2:<10} {'FSDP2 x2':<12} {per[2]:>13.0f} {2 * per[2]:>14.0f} {eff:>10.3f}")
    print(f"tokens_s_proc_1={per[1]:.0f} tokens_s_proc_2={per[2]:.0f} tokens_s_total_2={2 * per[2]:.0f} "
          f"scaling_efficiency={eff:.3f}")


# ---------------------------------------------------------------- --gpu (one CUDA device)

GPU_MODELS = ("llama3_2_1b", "llama3_2_3b")
# --gpu rows: (model, seq, float8 recipe, compile, activation checkpointing, masking), where
# masking is none (one document per row: SDPA's causal kernel) or the attention kernel
# under document masking (sdpa: a dense boolean mask, flex: a block mask from the ids).
GPU_ROWS = {
    # 1B, seq 4096: compile and AC (the MFU goal: >= 45% with compile)
    "1b-4k-eager": ("llama3_2_1b", 4096, "none", False, "none", "none"),
    "1b-4k-eager-sac": ("llama3_2_1b", 4096, "none", False, "selective_op", "none"),
    "1b-4k": ("llama3_2_1b", 4096, "none", True, "none", "none"),
    "1b-4k-sac": ("llama3_2_1b", 4096, "none", True, "selective_op", "none"),
    # Float8 against bf16 (the goal: >= 1.25x tokens/s for 3B at 8192), compiled, selective AC
    "1b-4k-f8": ("llama3_2_1b", 4096, "tensorwise", True, "none", "none"),
    "1b-8k-sac": ("llama3_2_1b", 8192, "none", True, "selective_op", "none"),
    "1b-8k-sac-f8": ("llama3_2_1b", 8192, "tensorwise", True, "selective_op", "none"),
    "3b-4k-sac": ("llama3_2_3b", 4096, "none", True, "selective_op", "none"),
    "3b-4k-sac-f8": ("llama3_2_3b", 4096, "tensorwise", True, "selective_op", "none"),
    "3b-8k-sac": ("llama3_2_3b", 8192, "none", True, "selective_op", "none"),
    "3b-8k-sac-f8": ("llama3_2_3b", 8192, "tensorwise", True, "selective_op", "none"),
    "3b-8k-sac-f8row": ("llama3_2_3b", 8192, "rowwise", True, "selective_op", "none"),
    # Document masking: a dense mask through SDPA against flex's block mask
    "1b-4k-docs-sdpa": ("llama3_2_1b", 4096, "none", True, "none", "sdpa"),
    "1b-4k-docs-flex": ("llama3_2_1b", 4096, "none", True, "none", "flex"),
    "1b-8k-docs-sdpa": ("llama3_2_1b", 8192, "none", True, "selective_op", "sdpa"),
    "1b-8k-docs-flex": ("llama3_2_1b", 8192, "none", True, "selective_op", "flex"),
}
# Documents per row under masking: lengths drawn from a geometric law of this mean, cut at
# the window (the loader packs documents whole the same way).
MEAN_DOC = 1024


def doc_batch(batch: int, seq: int, device, seed: int = 0, mean: int = MEAN_DOC):
    """(positions, doc_ids) of ``batch`` packed rows: documents of random lengths (geometric,
    mean ``mean``), positions restarting at each."""
    g = torch.Generator().manual_seed(seed)
    docs = torch.zeros(batch, seq, dtype=torch.long)
    pos = torch.zeros(batch, seq, dtype=torch.long)
    for b in range(batch):
        i, d = 0, 0
        while i < seq:
            n = min(seq - i, 1 + int(torch.empty(1).exponential_(1 / mean, generator=g).item()))
            docs[b, i:i + n] = d
            pos[b, i:i + n] = torch.arange(n)
            i, d = i + n, d + 1
    return pos.to(device), docs.to(device)


def gpu_one(row: str, a) -> dict:
    """One --gpu row in this process: the largest micro-batch <= --gpu-max-batch that fits
    (halving on out-of-memory), its tokens/s and MFU over --gpu-steps steps, and the
    compile (and first-step) overhead apart: the seconds of the warmup steps beyond as many
    steady steps."""
    from pretrain.config import load_model_file
    from pretrain.observe.flops import peak_flops

    name, seq, float8, compile_, ac, masking = GPU_ROWS[row]
    args = load_model_file(REPO / "configs" / "model" / f"{name}.yaml")
    device = torch.device("cuda", 0)
    torch.cuda.set_device(device)
    kernel = "auto" if masking == "none" else masking
    model, step = build_ours(args, seq, device, compile_=compile_, ac=ac, param_dtype=torch.bfloat16,
                             float8=float8, kernel=kernel)
    fpt, peak = flops_per_token(args, seq), peak_flops(device, None)
    out = {"row": row, "model": name, "seq": seq, "float8": float8, "compile": compile_, "ac": ac,
           "masking": masking, "batch": 0, "tokens_s": 0.0, "mfu": 0.0, "peak_gib": 0.0, "warmup_extra_s": 0.0}
    batch = a.gpu_max_batch
    while batch >= 1:
        try:
            tokens = torch.randint(0, args.vocab_size, (batch, seq + 1), device=device)
            inputs, labels = tokens[:, :-1], tokens[:, 1:]
            extra = doc_batch(batch, seq, device) if masking != "none" else (None, None)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(a.gpu_warmup):
                step(inputs, labels, *extra)
            torch.cuda.synchronize()
            warm = time.perf_counter() - t0
            torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            for _ in range(a.gpu_steps):
                step(inputs, labels, *extra)
            torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            tps = a.gpu_steps * batch * seq / dt
            # FLOPs/token counts the full causal attention (a document mask skips some)
            return {**out, "batch": batch, "tokens_s": tps, "mfu": fpt * tps / peak,
                    "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
                    "warmup_extra_s": warm - a.gpu_warmup * dt / a.gpu_steps}
        except torch.cuda.OutOfMemoryError:
            pass
        # Out of memory: free what the failed step held (its frames went with the exception).
        tokens = inputs = labels = extra = None
        model.zero_grad(set_to_none=True)
        gc.collect()
        torch.cuda.empty_cache()
        batch //= 2
    return out


def run_gpu(a) -> None:
    rows = []
    names = a.gpu_rows.split(",") if a.gpu_rows else list(GPU_ROWS)
    unknown = [n for n in names if n not in GPU_ROWS]
    if unknown:
        raise SystemExit(f"--gpu-rows: unknown {unknown}; known: {', '.join(GPU_ROWS)}")
    for row in names:
        cmd = [sys.executable, __file__, "--gpu-one", row, *sys.argv[1:]]
        t0 = time.perf_counter()
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:  # reported, and the row left empty (batch 0)
            print(f"{row} failed:\n{out.stderr[-3000:]}", file=sys.stderr)
            name, seq, float8, compile_, ac, masking = GPU_ROWS[row]
            rows.append({"row": row, "model": name, "seq": seq, "float8": float8, "compile": compile_, "ac": ac,
                         "masking": masking, "batch": 0, "tokens_s": 0.0, "mfu": 0.0, "peak_gib": 0.0,
                         "warmup_extra_s": 0.0, "process_s": time.perf_counter() - t0})
            continue
        rows.append({**json.loads(out.stdout.strip().splitlines()[-1]), "process_s": time.perf_counter() - t0})
        print(json.dumps(rows[-1]), flush=True)
    import torch.cuda as tc

    print(f"{tc.get_device_name(0)}, bf16 autocast over fp32 masters, largest micro-batch <= {a.gpu_max_batch} "
          f"that fits (halving), {a.gpu_steps} steps after {a.gpu_warmup} warmup; 'warmup+' = seconds of the "
          f"warmup steps beyond as many steady ones (compile, autotuning, allocator), 'proc s' = the row's whole "
          f"process; document masks: mean document {MEAN_DOC} tokens")
    print(f"{'row':<18} {'seq':>5} {'float8':>10} {'compile':>7} {'AC':>12} {'masking':>7} {'batch':>5} "
          f"{'tokens/s':>9} {'MFU':>6} {'peak GiB':>8} {'warmup+':>7} {'proc s':>6}")
    for r in rows:
        print(f"{r['row']:<18} {r['seq']:>5} {r['float8']:>10} {str(r['compile']):>7} {r['ac']:>12} "
              f"{r['masking']:>7} {r['batch']:>5} {r['tokens_s']:>9.0f} {r['mfu']:>6.1%} {r['peak_gib']:>8.1f} "
              f"{r['warmup_extra_s']:>7.1f} {r['process_s']:>6.0f}")
    by = {r["row"]: r for r in rows}
    ratios = {}
    for base, other, key in (("3b-8k-sac", "3b-8k-sac-f8", "float8_3b_8k"),
                             ("1b-8k-sac", "1b-8k-sac-f8", "float8_1b_8k"),
                             ("1b-4k-docs-sdpa", "1b-4k-docs-flex", "flex_1b_4k"),
                             ("1b-8k-docs-sdpa", "1b-8k-docs-flex", "flex_1b_8k")):
        if base in by and other in by and by[base]["tokens_s"] > 0:
            ratios[key] = by[other]["tokens_s"] / by[base]["tokens_s"]
    for k, v in ratios.items():
        print(f"{k}: {v:.3f}x tokens/s")
    print(" ".join([f"{r['row']}_{k}={r[k]:.4g}" for r in rows for k in ("batch", "tokens_s", "mfu", "peak_gib",
                                                                         "warmup_extra_s")]
                   + [f"{k}_speedup={v:.4g}" for k, v in ratios.items()]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scaling", action="store_true", help="1 vs 2 processes of the real trainer (FSDP2)")
    ap.add_argument("--gpu", action="store_true", help="Llama 3.2 1B/3B on one CUDA device")
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--heads", type=int, default=6)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--ffn", type=int, default=1024)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--steps", type=int, default=1, help="timed steps per variant per round")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per variant before the rounds")
    ap.add_argument("--scaling-steps", type=int, default=10)
    ap.add_argument("--scaling-rounds", type=int, default=2)
    ap.add_argument("--scaling-skip", type=int, default=3, help="--scaling: steps left out of the median")
    ap.add_argument("--gpu-rows", default=None,
                    help=f"--gpu: comma-separated rows (default all): {', '.join(GPU_ROWS)}")
    ap.add_argument("--gpu-max-batch", type=int, default=16)
    ap.add_argument("--gpu-steps", type=int, default=10)
    ap.add_argument("--gpu-warmup", type=int, default=3)
    ap.add_argument("--gpu-one", default=None, help=argparse.SUPPRESS)  # internal: one --gpu combination
    a = ap.parse_args()
    if a.gpu_one:
        print(json.dumps(gpu_one(a.gpu_one, a)))
    elif a.gpu:
        run_gpu(a)
    elif a.scaling:
        run_scaling(a)
    else:
        run_default(a)


if __name__ == "__main__":
    main()
