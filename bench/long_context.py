"""Peak memory per rank of one forward + backward at long sequences, under context
parallelism (``parallel.cp``) 1/2/4 and with the whole or the chunked loss
(``train.loss_chunk``).

    python bench/long_context.py                      # seq 2048 4096, cp 1 2 4, both losses
    python bench/long_context.py --seqs 2048 4096 8192 16384
    python bench/long_context.py --doc-masking        # random documents, positions restart
    python bench/long_context.py --gpu                # Llama 3.2 1B, 32K-128K, on CUDA
    python bench/long_context.py --gpu --dry-run      # that path on the meta device, anywhere

Now (the dense-mask path bounded by 2^22 attention scores, the logits released before the
backward), the default on this 2-core CPU, 90 s:

    seq    cp  whole loss  vs cp1  chunked loss  vs cp1
    2048    1      550.7            232.7
    2048    2      300.2   0.545    171.2   0.736!
    2048    4      179.5   0.326!   148.0   0.636!
    4096    1     1101.4            401.5
    4096    2      579.6   0.526    261.7   0.652!
    4096    4      310.2   0.282    185.2   0.461!
    the loss alone, cp 1: whole 384.0 / 768.0 MB, chunked 66.0 / 68.1 MB (2048 / 4096)

The chunked rows miss the goal by what every rank holds whatever cp (below): the loss's
chunk (about 66 MB) and the gathered K/V and root, a constant share that shrinks as the
sequence grows. The rest of this docstring is the first measurement, before those two
changes:

Measured 2026-12-06 on this 2-core CPU, torch 2.13.0+cpu, at commit c4fb283 (the dense-mask
path bounded by 2^26 attention scores), while another job's test suite kept the load
average at 3-9. The default (2048, 4096) took 134 s (user 138 s); ``--seqs 2048 4096
8192`` 342 s; ``--seqs 16384`` alone 596 s (cp 1's steps 140-150 s each). 32K is not run
here: attention grows with the square of the sequence, so a cp 1 step at 32K would take up
to four times 16K's (some 10 minutes under this load), and its whole loss holds 11 GB;
``--seqs 32768`` runs it. Peak MB per rank (the highest over the ranks), beyond the weights
and gradients:

    seq    cp  whole loss  vs cp1  chunked loss  vs cp1   attention at cp > 1
    2048    1      678.7            232.7
    2048    2      396.2   0.584    204.2   0.877!   SDPA, dense mask
    2048    4      212.5   0.313!   149.0   0.640!   SDPA, dense mask
    4096    1     1357.4            401.5
    4096    2      835.6   0.616!   389.6   0.970!   SDPA, dense mask
    4096    4      434.2   0.320!   243.2   0.606!   SDPA, dense mask
    8192    1     2714.8            739.0
    8192    2     1392.4   0.513    440.5   0.596    blockwise
    8192    4      981.6   0.362!   531.6   0.719!   SDPA, dense mask
    16384   1     5429.7           1421.6
    16384   2     2766.0   0.509    790.2   0.556    blockwise
    16384   4     1424.4   0.262    468.5   0.330!   blockwise
    (! = above the goal, 1.2 / cp; weights and gradients per rank 27.3 / 13.6 / 6.8 MB each
    at cp 1 / 2 / 4, FSDP2 sharding them over the cp ranks)

    the loss alone, cp 1:   seq      2048   4096   8192   16384
                            whole     384    768   1536    3072 MB
                            chunked  66.0   68.1   72.1    80.3 MB

Goal 2 (the loss's peak independent of the sequence with chunking) is met: from 2K to 16K
the whole loss's peak grows 8x (three (seq x vocab) fp32 tensors: log-softmax, its
gradient, the logits' gradient), the chunked loss's by 14.3 MB, which is the hidden
state's gradient (seq x dim x 4 bytes, 14.0 MB): one chunk's logits (256 tokens) and the
tied embedding's gradient are the rest. Within a step the whole loss holds four such
tensors at its peak (2,048 MB of 2,715 at 8K: the step less the chunked step's
activations): the logits themselves stay referenced (``out`` in
``TrainStep._forward_backward``) through the backward, which does not read them.

Goal 1 (per-rank peak at cp n within 1.2 / n of cp 1's) is met in 6 of 16 rows: cp 2
wherever the context-parallel core takes the blockwise path (8K, 16K), and the whole loss
at 2048 / cp 2 and 16K / cp 4, where the logits outweigh the rest. Why the others miss:

- The dense-mask path. ``attend`` takes SDPA with a boolean mask while batch x query heads
  x queries x keys <= 2^26 (here, 4 heads: up to 2^24 mask entries, e.g. 2048 queries of
  8192 keys). SDPA turns the boolean mask into an additive fp32 mask (``aten::where``, 4
  bytes an entry) and each layer keeps it for its backward: 4 x (seq / cp) x seq bytes per
  layer, which grows with the square of the sequence and divides by cp only once. Read
  from the profiler's trace at 4096 / cp 2 / chunked: 128 MB of the 390 MB peak are the 4
  layers' float masks (32 MB each); at 8192 / cp 4 (computed) 64 MB per layer. cp 1 without
  document masking takes SDPA's causal kernel, with no mask at all. Where the scores pass
  2^26 the blockwise path holds no mask, and cp 2 meets the goal (0.596 at 8K, 0.556 at 16K).
- What every rank holds whole, whatever cp: the all-gathered K and V of the whole window in
  window order (seq x kv dim x 4 bytes x 2 per layer: 16 MB at 4K, 64 MB at 16K over 4
  layers), the loss's chunk (about 66 MB: one chunk's logits, log-softmax and gradients,
  and the tied embedding's gradient before it is accumulated) and FSDP2's gathered root
  (the 16 MB embedding kept from the forward to the end of the backward, and its
  unsharded gradient before the reduce-scatter). These make cp 4 miss at 16K (0.330) and
  weigh most on the chunked loss, whose own peak is small.
- With the whole loss the logits (seq / cp x vocab, several copies) dominate and divide by
  cp exactly: cp 2 meets the goal but at 4096 (0.616: the masks), cp 4 misses by a hair
  (0.31-0.36) below 16K.

cp > 1 figures move by up to 4 MB between runs: gloo frees the buffers of its collectives
(the clones of reduce-scatter inputs) on its own schedule, sometimes in a later window;
cp 1 figures are exact to the byte.

Method (CPU, the default). Every cp degree runs as a fresh ``torchrun --nproc_per_node cp``
(gloo, a free port each) of this script in worker mode, which builds the model as the
trainer does (``pretrain.build.build_model``: the family's model on meta,
``parallel.parallelize`` (the context-parallel attention cores, FSDP2 over the cp ranks),
``to_empty``, the shard-aware seeded init; one model whose RoPE tables cover the longest
window) and runs, for every sequence, the trainer's own ``TrainStep.split`` (positions on
the whole window, then each rank's head-tail chunks of tokens, positions, document ids and
labels) and ``TrainStep._forward_backward`` (forward, whole or chunked loss, backward; no
optimizer step), once with ``train.loss_chunk=0`` and once with ``--chunk`` tokens. A short
warm-up window first (FSDP2's lazy init, and every gradient allocated), so the measured
steps accumulate into gradients that exist: the peak is the step's own memory beyond the
parameters (activations, the loss's logits, temporaries, the all-gathered K/V and masks,
FSDP2's gathered weights and unsharded gradients before their reduce-scatter), while the
weights and the gradients a rank holds are reported apart (``weights MB``, ``grads MB``).
The peak is the most bytes held at once by the tensors allocated inside the step, from
torch.profiler's memory events (exact, and the same on a busy machine; see
bench/activation_memory.py): every step is a window of its own (``record_function``) in the
worker's one profile, its peak the window's highest count less the count at its start
(each sequence in its own process gives the same figures). "peak MB" is the highest over
the cp ranks (the per-rank figure a job must fit), "rank0 MB" rank 0's. "vs cp1": the peak
over cp 1's at the same sequence and loss, against the goal 1.2 / cp. "step s": the
window's time under the profiler on a shared CPU, for orientation only. Threads per
process: the cores / cp (at least 1); the figures are the same with 1.

The loss alone: in the cp 1 worker, the loss from a fixed hidden state (a leaf (1, seq,
dim) tensor made before the window) through the model's tied head, whole
(``next_token_loss`` of the full logits) vs chunked (``chunked_next_token_loss``), forward
and backward; its peak includes the hidden state's gradient.

Shapes, and why: dim 256, 4 layers, 4 heads of 64 / 2 kv heads, SwiGLU 704, vocabulary
16,384, tied head, fp32, batch 1. The vocabulary makes the logits visible (64 KB a token
in fp32, about 3x the 20 KB one layer keeps a token, and the whole loss holds four such
tensors) without making the head the whole cost: 32,000 would double the head's time for
the same picture. The default stops at 4096 to stay near 2 minutes on this machine.
``--doc-masking``: random document ids (a start drawn with probability 1 / ``--doc-len``),
positions restarting per document; cp 1 then takes the dense-mask path too. ``--ac full``:
activation checkpointing (``parallel.activation_checkpoint``) on every block.

``--gpu`` (not run here: no GPU): the Llama 3.2 1B config
(``configs/model/llama3_2_1b.yaml``: dim 2048, 16 layers, 32 / 8 heads, ffn 8192, vocab
128,256, tied), bf16 autocast over fp32 weights, full activation checkpointing, the
trainer's auto loss chunk (523 tokens), seq 32K / 64K / 128K, cp 1 (``--cps 1 2`` under
torchrun on 2+ GPUs, FSDP2's bf16 parameters instead of autocast): tokens/s of the window
over ``--steps`` forward + backward steps after one warm-up, and
``torch.cuda.max_memory_allocated`` (all of it, and the step's part above what was
allocated before it); no optimizer state. One process per row; a row that runs out of
memory says "oom". ``--gpu --dry-run``: the same workers on the meta device
(no memory, no time; fp32, as autocast cannot run on meta): the 1B model, its AC wrapping,
the split and a forward + backward through the chunked loss at 32K-128K, on any machine
(41 s here).

The last line is machine-readable key=value pairs."""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

MB = 2**20


# ---------------------------------------------------------------- worker (one rank)

def _windows(run, marks):
    """Runs ``run()`` under torch.profiler (memory events) and returns, per record_function
    name in ``marks`` that ``run`` entered once: (most bytes held at once by tensors
    allocated inside the window, less the count at the window's start; the window's
    seconds). The count is of tensors allocated while profiling (frees of older tensors are
    not seen), so gradients that existed before do not count, only what the step adds."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        prof.export_chrome_trace(f.name)
        events = json.loads(Path(f.name).read_text())["traceEvents"]
    mem = sorted((e["ts"], e["args"]["Total Allocated"]) for e in events if e.get("name") == "[memory]")
    out = {}
    for mark in marks:
        w = [e for e in events if e.get("name") == mark and e.get("ph") == "X"]
        if not w:
            continue
        t0, t1 = w[0]["ts"], w[0]["ts"] + w[0]["dur"]
        before = [v for t, v in mem if t < t0]
        start = before[-1] if before else 0
        inside = [v for t, v in mem if t0 <= t <= t1]
        out[mark] = {"peak_mb": (max(inside, default=start) - start) / MB, "start_mb": start / MB,
                     "s": w[0]["dur"] / 1e6}
    return out


def _local_mb(tensors) -> float:
    from parallel.tensors import local_values

    return sum(t.numel() * t.element_size() for t in local_values([t for t in tensors if t is not None])) / MB


def _batch(seq: int, vocab: int, doc_len: int, seed: int = 0) -> dict:
    """A window of random tokens (the same on every rank), labels the next tokens; with
    ``doc_len``: random document ids and positions restarting per document."""
    import torch

    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (1, seq + 1), generator=g)
    batch = {"input_ids": tokens[:, :-1], "labels": tokens[:, 1:]}
    if doc_len:
        starts = torch.rand(1, seq, generator=g) < 1.0 / doc_len
        starts[:, 0] = True
        doc_ids = torch.cumsum(starts.long(), 1) - 1
        idx = torch.arange(seq).expand(1, -1)
        first = torch.cummax(torch.where(starts, idx, torch.zeros_like(idx)), 1).values
        batch.update(doc_ids=doc_ids, positions=idx - first)
    return batch


def _model_args(spec: dict):
    if spec["gpu"]:
        from pretrain.config import load_model_file

        return load_model_file(REPO / "configs" / "model" / "llama3_2_1b.yaml")
    from pretrain.model.llama import LlamaArgs

    return LlamaArgs(name="bench", dim=spec["dim"], n_layers=spec["layers"], n_heads=spec["heads"],
                     n_kv_heads=spec["kv_heads"], ffn_hidden_dim=spec["ffn"], vocab_size=spec["vocab"],
                     tie_embeddings=True)


def worker(spec: dict) -> None:
    import torch

    from parallel import distributed as pdist
    from parallel.config import ParallelConfig
    from parallel.dims import ParallelDims
    from parallel.env import detect_launch_env
    from pretrain.loss import chunked_next_token_loss, next_token_loss, resolve_loss_chunk
    from pretrain.model.llama import FAMILY
    from pretrain.step import TrainStep

    env = detect_launch_env()
    cp, seqs, dry = env.world_size, spec["seqs"], spec["dry_run"]
    longest = max(seqs)  # one model for every window (the RoPE tables cover the longest)
    if dry:
        device = torch.device("meta")
    elif spec["gpu"]:
        device = pdist.pick_device("cuda", env)
    else:
        device = torch.device("cpu")
        torch.set_num_threads(spec["threads"])
    pdist.init_distributed(env, device)
    args = _model_args(spec)
    dims = ParallelDims(pp=1, dp_replicate=1, dp_shard=1, cp=cp, tp=1, world_size=cp)
    pc = ParallelConfig(dp_shard=1, cp=cp, activation_checkpoint=spec["ac"])
    mixed = "bf16" if spec["gpu"] and not dry else "fp32"
    if dry:  # build_model's steps up to materialization (the seeded init needs a real device)
        from parallel.parallelize import parallelize

        with torch.device("meta"):
            model = FAMILY.build(args, longest)
        parallelize(model, FAMILY.layout, None, dims, pc, param_dtype=torch.float32, reduce_dtype=torch.float32)
        mesh, param_dtype, tied = None, torch.float32, FAMILY.layout.is_tied(model)
    else:
        from pretrain.build import build_model
        from pretrain.config import FinetuneConfig, JobConfig, OptimConfig, TrainConfig

        cfg = JobConfig(model=args, parallel=pc, optim=OptimConfig(), finetune=FinetuneConfig(),
                        train=TrainConfig(seq_len=longest, local_batch_size=1, seed=0, mixed_precision=mixed))
        built = build_model(cfg, dims, device)
        model, mesh, param_dtype, tied = built.parts[0], built.mesh, built.param_dtype, built.tied
    chunk = spec["chunk"] if spec["chunk"] > 0 else resolve_loss_chunk(
        -1, local_batch_size=1, seq_len=longest, cp=cp, vocab_size=args.vocab_size)
    steps = {loss: TrainStep(FAMILY, [model], None, dims=dims, pc=pc, grad_accum_steps=1, max_norm=0.0, chat=False,
                             device=device, param_dtype=param_dtype, mesh=mesh, tied=tied, model_args=args,
                             loss_chunk=chunk if loss == "chunked" else 0)
             for loss in spec["losses"]}

    def fwd_bwd(loss: str, batch: dict) -> None:
        FAMILY.hidden_output(model, loss == "chunked")  # what TrainStep(loss_chunk=...) sets
        step = steps[loss]
        inputs, labels = step.split(batch)
        step._forward_backward(inputs, labels.to(device), labels.numel())  # text: the mean over every label

    # Warm-up on a short window: FSDP2's lazy init, every gradient allocated.
    short = _batch(2 * cp * 16, args.vocab_size, spec["doc_len"] and 8)
    for loss in spec["losses"]:
        fwd_bwd(loss, short)
    batches = {seq: _batch(seq, args.vocab_size, spec["doc_len"]) for seq in seqs}
    row = {"rank": env.rank, "cp": cp, "chunk": chunk, "weights_mb": _local_mb(list(model.parameters())),
           "params": sum(p.numel() for p in model.parameters()), "seqs": {}}
    if dry:
        for seq in seqs:
            t0 = time.perf_counter()
            for loss in spec["losses"]:
                fwd_bwd(loss, batches[seq])
            row["seqs"][seq] = {"s": time.perf_counter() - t0}
        row.update(dry_run=True, device="meta")
    elif spec["gpu"]:
        for seq in seqs:
            row["seqs"][seq] = {}
            for loss in spec["losses"]:
                fwd_bwd(loss, batches[seq])  # warm-up at full size
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                before = torch.cuda.memory_allocated()
                t0 = time.perf_counter()
                for _ in range(spec["steps"]):
                    fwd_bwd(loss, batches[seq])
                torch.cuda.synchronize()
                dt = (time.perf_counter() - t0) / spec["steps"]
                most = torch.cuda.max_memory_allocated()
                row["seqs"][seq][loss] = {"s": dt, "max_allocated_gib": most / 2**30,
                                          "step_gib": (most - before) / 2**30}
        row["device"] = torch.cuda.get_device_name(device)
    else:
        loss_only = spec["loss_only"] and cp == 1
        if loss_only:  # the loss alone, from a fixed hidden state, through the model's head
            hidden = {seq: torch.randn(1, seq, args.dim, requires_grad=True) for seq in seqs}

            def logits_of(x):
                return FAMILY.layout.logits(model, x)

        def run():
            for seq in seqs:
                for loss in spec["losses"]:
                    with torch.profiler.record_function(f"bench.{seq}.{loss}"):
                        fwd_bwd(loss, batches[seq])
                if not loss_only:
                    continue
                h, labels = hidden[seq], batches[seq]["labels"]
                for loss in spec["losses"]:
                    with torch.profiler.record_function(f"bench.{seq}.loss_{loss}"):
                        if loss == "chunked":
                            out = chunked_next_token_loss(h, labels, logits_of, chunk, summed=False)
                        else:
                            out = next_token_loss(logits_of(h), labels, summed=False)
                        out.backward()
                        del out
                    h.grad = None

        marks = [f"bench.{seq}.{m}{loss}" for seq in seqs for m in ("", "loss_") for loss in spec["losses"]]
        for mark, w in _windows(run, marks).items():
            _, seq, what = mark.split(".")
            row["seqs"].setdefault(int(seq), {})[what] = w
        row["device"] = "cpu"
    row["grads_mb"] = _local_mb([p.grad for p in model.parameters()])
    rows = pdist.all_gather_object(row)
    if env.rank == 0:
        print(json.dumps({"ranks": rows}), flush=True)
    pdist.barrier()  # no rank tears gloo down while another still talks
    pdist.shutdown_distributed()


# ---------------------------------------------------------------- parent

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(spec: dict, cp: int, timeout: float) -> dict:
    """One torchrun of ``cp`` worker processes; rank 0's JSON (every rank's row), or
    {"error": ...}."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("TORCHELASTIC_", "SLURM_")) and k not in
           ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1", OMP_NUM_THREADS=str(spec["threads"]))
    cmd = [str(Path(sys.executable).parent / "torchrun"), "--nnodes", "1", "--nproc_per_node", str(cp),
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), str(Path(__file__).resolve()),
           "--worker", json.dumps(spec)]
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timeout after {timeout:.0f} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith('{"ranks"')]
    if proc.returncode != 0 or not lines:
        err = proc.stderr + proc.stdout
        return {"error": "oom" if "OutOfMemoryError" in err else f"rc={proc.returncode}", "stderr": err[-3000:]}
    return json.loads(lines[-1])


def _spec(a, seqs, cp: int) -> dict:
    return {"seqs": list(seqs), "dim": a.dim, "layers": a.layers, "heads": a.heads, "kv_heads": a.kv_heads,
            "ffn": a.ffn, "vocab": a.vocab, "chunk": a.chunk, "losses": a.losses, "ac": a.ac,
            "threads": a.threads or max(1, (os.cpu_count() or 1) // cp),
            "doc_len": a.doc_len if a.doc_masking else 0, "loss_only": cp == 1, "gpu": a.gpu,
            "dry_run": a.dry_run, "steps": a.steps}


def run_cpu(a) -> None:
    t_start = time.perf_counter()
    res = {}  # (seq, cp) -> every rank's windows at that seq, with the rank's weights / grads
    for cp in a.cps:
        bad = [seq for seq in a.seqs if seq % (2 * cp)]
        if bad:
            raise SystemExit(f"seq {bad} does not divide into 2 x cp = {2 * cp} chunks")
        out = launch(_spec(a, a.seqs, cp), cp, a.timeout)
        if "error" in out:
            raise SystemExit(f"cp {cp} failed ({out['error']}):\n{out.get('stderr', '')}")
        for seq in a.seqs:
            res[seq, cp] = [dict(r["seqs"][str(seq)], weights_mb=r["weights_mb"], grads_mb=r["grads_mb"])
                            for r in out["ranks"]]
        print(f"# cp {cp}: {time.perf_counter() - t_start:.0f} s", file=sys.stderr, flush=True)
    wall = time.perf_counter() - t_start

    def peak(seq, cp, what):  # the highest over the ranks
        return max(r[what]["peak_mb"] for r in res[seq, cp])

    masking = f"document masking (mean doc {a.doc_len})" if a.doc_masking else "causal"
    print(f"Llama dim {a.dim}, {a.layers} layers, {a.heads} heads / {a.kv_heads} kv, ffn {a.ffn}, vocab {a.vocab} "
          f"(tied), fp32 CPU, batch 1, {masking}, AC {a.ac}, threads per process "
          f"{a.threads or f'{os.cpu_count()} cores / cp'}, loss chunk "
          f"{a.chunk} tokens; one forward + backward per row; peak MB = the step's own memory beyond the weights "
          f"and gradients (profiler), the highest over the cp ranks")
    print(f"{'seq':>6} {'cp':>3} {'loss':<8} {'peak MB':>9} {'rank0 MB':>9} {'vs cp1':>7} {'goal':>6} "
          f"{'weights MB':>10} {'grads MB':>9} {'step s':>7}")
    kv, met, total = [], 0, 0
    for seq in a.seqs:
        for cp in a.cps:
            for loss in a.losses:
                p = peak(seq, cp, loss)
                ratio = p / peak(seq, 1, loss) if 1 in a.cps else None
                r0, goal = res[seq, cp][0], ""
                if ratio is not None and cp > 1:
                    ok = ratio <= 1.2 / cp
                    met, total = met + ok, total + 1
                    goal = f"{1.2 / cp:.2f}{'' if ok else '!'}"
                    kv.append(f"ratio_{'' if loss == 'chunked' else 'whole_'}cp{cp}_seq{seq}={ratio:.3f}")
                print(f"{seq:>6} {cp:>3} {loss:<8} {p:>9.1f} {r0[loss]['peak_mb']:>9.1f} "
                      f"{'' if ratio is None else f'{ratio:.3f}':>7} {goal:>6} {r0['weights_mb']:>10.1f} "
                      f"{r0['grads_mb']:>9.1f} {max(r[loss]['s'] for r in res[seq, cp]):>7.1f}")
                kv.append(f"peak_mb_{loss}_cp{cp}_seq{seq}={p:.1f}")
    print("vs cp1: the peak over cp 1's (same seq and loss); goal 1.2 / cp, ! where missed; step s: under the "
          "profiler, on a shared CPU")
    if 1 in a.cps and len(a.losses) == 2:
        print(f"\nthe loss alone (cp 1: a fixed (1, seq, {a.dim}) hidden state through the head, forward + backward)")
        print(f"{'seq':>6} {'whole MB':>9} {'chunked MB':>10} {'whole/chunked':>13}")
        for seq in a.seqs:
            r0 = res[seq, 1][0]
            w, c = r0["loss_whole"]["peak_mb"], r0["loss_chunked"]["peak_mb"]
            print(f"{seq:>6} {w:>9.1f} {c:>10.1f} {w / c:>13.2f}")
            kv += [f"loss_mb_whole_seq{seq}={w:.1f}", f"loss_mb_chunked_seq{seq}={c:.1f}"]
        lo, hi = min(a.seqs), max(a.seqs)
        g = {loss: res[hi, 1][0][f"loss_{loss}"]["peak_mb"] / res[lo, 1][0][f"loss_{loss}"]["peak_mb"]
             for loss in a.losses}
        grew = res[hi, 1][0]["loss_chunked"]["peak_mb"] - res[lo, 1][0]["loss_chunked"]["peak_mb"]
        if hi > lo:
            print(f"seq {lo} -> {hi} ({hi / lo:.0f}x): the whole loss's peak x{g['whole']:.2f}, the chunked loss's "
                  f"x{g['chunked']:.2f} (+{grew:.1f} MB; the hidden state's gradient grew "
                  f"{(hi - lo) * a.dim * 4 / MB:.1f} MB)")
        kv += [f"loss_growth_whole={g['whole']:.3f}", f"loss_growth_chunked={g['chunked']:.3f}"]
    print(f"wall {wall:.0f} s")
    print(" ".join(["device=cpu", f"doc_masking={int(a.doc_masking)}", f"ac={a.ac}", f"chunk={a.chunk}",
                    f"cp_goal_met={met}/{total}"] + kv + [f"wall_s={wall:.0f}"]))


def run_gpu(a) -> None:
    rows = []
    for seq in a.seqs:
        for cp in a.cps:
            for loss in a.losses:  # one process per row: an out-of-memory row fails alone
                out = launch(dict(_spec(a, [seq], cp), losses=[loss]), cp, a.timeout)
                rows.append((seq, cp, loss, out))
                if "error" in out and out["error"] != "oom":
                    print(f"seq {seq} cp {cp} {loss}: {out['error']}\n{out.get('stderr', '')}", file=sys.stderr)
    first = next((o["ranks"][0] for *_, o in rows if "ranks" in o), {})
    print(f"Llama 3.2 1B ({first.get('params', 0) / 1e9:.3f} B parameters), "
          f"{'meta device (dry run: fp32, no memory, no time)' if a.dry_run else first.get('device', 'cuda')}, "
          f"{'' if a.dry_run else 'bf16 compute over fp32 weights, '}AC {a.ac}, batch 1, loss chunk "
          f"{first.get('chunk', '?')} tokens, "
          + ("one forward + backward per row" if a.dry_run else
             f"{a.steps} timed forward + backward steps after 1 warm-up"))
    print(f"{'seq':>7} {'cp':>3} {'loss':<8} {'tokens/s':>9} {'step s':>8} {'max alloc GiB':>13} {'step GiB':>9}")
    kv = []
    for seq, cp, loss, out in rows:
        tag = f"cp{cp}_seq{seq}" + ("" if loss == "chunked" else "_whole")
        if "error" in out:
            print(f"{seq:>7} {cp:>3} {loss:<8} {out['error']:>9}")
            kv.append(f"gpu_{tag}={out['error'].replace(' ', '_')}")
            continue
        r = [x["seqs"][str(seq)] for x in out["ranks"]]
        if a.dry_run:
            print(f"{seq:>7} {cp:>3} {loss:<8} {'-':>9} {r[0]['s']:>8.1f} {'-':>13} {'-':>9}")
            kv.append(f"dry_run_ok_{tag}=1")
            continue
        m = {k: max(x[loss][k] for x in r) for k in ("s", "max_allocated_gib", "step_gib")}
        print(f"{seq:>7} {cp:>3} {loss:<8} {seq / m['s']:>9.0f} {m['s']:>8.2f} {m['max_allocated_gib']:>13.1f} "
              f"{m['step_gib']:>9.1f}")
        kv += [f"tokens_s_{tag}={seq / m['s']:.0f}", f"max_alloc_gib_{tag}={m['max_allocated_gib']:.2f}"]
    print(" ".join([f"device={'meta' if a.dry_run else 'cuda'}", "model=llama3_2_1b", f"ac={a.ac}"] + kv))


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--worker":
        worker(json.loads(sys.argv[2]))
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seqs", type=int, nargs="+", default=None,
                    help="window lengths (default 2048 4096; --gpu: 32768 65536 131072)")
    ap.add_argument("--cps", type=int, nargs="+", default=None, help="cp degrees, processes (default 1 2 4; --gpu: 1)")
    ap.add_argument("--losses", nargs="+", default=None, choices=["whole", "chunked"],
                    help="default both (--gpu: chunked; the whole 1B loss at 128K is 67 GB of logits)")
    ap.add_argument("--chunk", type=int, default=None,
                    help="tokens per loss chunk (default 256; --gpu: 0, the trainer's auto rule)")
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--ffn", type=int, default=704)
    ap.add_argument("--vocab", type=int, default=16384)
    ap.add_argument("--ac", default=None, choices=["none", "full", "every_n", "selective_op"],
                    help="activation checkpointing (default none; --gpu: full)")
    ap.add_argument("--doc-masking", action="store_true", help="random document ids, positions restart per document")
    ap.add_argument("--doc-len", type=int, default=1024, help="mean document length under --doc-masking")
    ap.add_argument("--threads", type=int, default=0,
                    help="intra-op threads per process (CPU; default: the cores / cp, at least 1)")
    ap.add_argument("--gpu", action="store_true", help="Llama 3.2 1B, bf16, on CUDA (one process per row)")
    ap.add_argument("--dry-run", action="store_true", help="with --gpu: on the meta device, anywhere")
    ap.add_argument("--steps", type=int, default=3, help="--gpu: timed steps per row")
    ap.add_argument("--timeout", type=float, default=7200, help="seconds per torchrun")
    a = ap.parse_args()
    if a.dry_run and not a.gpu:
        ap.error("--dry-run goes with --gpu")
    a.seqs = a.seqs or ([32768, 65536, 131072] if a.gpu else [2048, 4096])
    a.cps = a.cps or ([1] if a.gpu else [1, 2, 4])
    a.losses = a.losses or (["chunked"] if a.gpu else ["whole", "chunked"])
    a.chunk = a.chunk if a.chunk is not None else (0 if a.gpu else 256)
    a.ac = a.ac or ("full" if a.gpu else "none")
    if a.dry_run and a.cps != [1]:
        ap.error("--dry-run runs cp 1 only (collectives do not run on meta)")
    (run_gpu if a.gpu else run_cpu)(a)


if __name__ == "__main__":
    main()
