"""Document-masked attention through each kernel of ``parallel.attention_kernel``: flex
attention with a block mask from the document ids, SDPA with a dense boolean mask, and our
blockwise attention (what SDPA's path becomes for long windows), against one reference.

Inputs: one packed batch, Llama 3.2 1B's attention shape (32 query heads, 8 kv heads,
head dim 64), documents of random lengths (geometric, mean ``--mean-doc`` tokens), the
causal mask within each. The reference is SDPA's dense-mask path in fp32.

- On CUDA (bf16 inputs): forward and backward. Per kernel: the largest |output -
  reference| and |dq, dk, dv - reference| (each over the reference's largest entry),
  the median fwd+bwd time over ``--iters`` after ``--warmup``, and the peak memory above
  the inputs. Flex's first call (compile of the kernel and of the block mask) is timed
  apart.
- On CPU (fp32): forward only (torch 2.13 has no CPU backward for flex), smaller shapes.

The last line is machine-readable key=value pairs."""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from parallel.attention_core import attend  # noqa: E402
from train_throughput import doc_batch  # noqa: E402  (bench/ is this script's directory)

# sdpa: the dense-mask path at any size (the trainer switches to blockwise above
# DENSE_SCORES_MAX scores); blockwise: forced at any size.
KERNELS = {"flex": dict(kernel="flex"), "sdpa": dict(kernel="sdpa", dense_max=1 << 62),
           "blockwise": dict(kernel="sdpa", dense_max=0)}


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def one(seq: int, a, device, dtype) -> dict:
    g = torch.Generator().manual_seed(1)
    shape_q, shape_kv = (a.batch, seq, a.heads, a.head_dim), (a.batch, seq, a.kv_heads, a.head_dim)
    q0, k0, v0 = (torch.randn(s, generator=g) for s in (shape_q, shape_kv, shape_kv))
    _, docs = doc_batch(a.batch, seq, device, mean=a.mean_doc)
    backward = device.type == "cuda"

    def run(name: str, inputs_dtype, with_grad: bool):
        q, k, v = (t.to(device, inputs_dtype).requires_grad_(with_grad) for t in (q0, k0, v0))
        out = attend(q, k, v, None, docs, docs, **KERNELS[name])
        grads = None
        if with_grad:
            out.backward(torch.ones_like(out) / out.numel() ** 0.5)
            grads = [t.grad for t in (q, k, v)]
        return out, grads

    with torch.no_grad() if not backward else torch.enable_grad():
        ref_out, ref_grads = run("sdpa", torch.float32, backward)
    row = {"seq": seq, "docs_per_row": float(docs.max(dim=1).values.float().mean().item() + 1)}
    for name in KERNELS:
        t0 = time.perf_counter()
        with torch.no_grad() if not backward else torch.enable_grad():
            out, grads = run(name, dtype, backward)
        sync(device)
        row[f"{name}_first_s"] = time.perf_counter() - t0
        row[f"{name}_out_err"] = ((out.float() - ref_out).abs().max() / ref_out.abs().max()).item()
        if grads is not None:
            row[f"{name}_grad_err"] = max(((g.float() - r).abs().max() / r.abs().max()).item()
                                          for g, r in zip(grads, ref_grads))
        for _ in range(a.warmup):
            with torch.no_grad() if not backward else torch.enable_grad():
                run(name, dtype, backward)
        sync(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        times = []
        for _ in range(a.iters):
            t0 = time.perf_counter()
            with torch.no_grad() if not backward else torch.enable_grad():
                run(name, dtype, backward)
            sync(device)
            times.append(time.perf_counter() - t0)
        row[f"{name}_ms"] = 1e3 * statistics.median(times)
        if device.type == "cuda":
            row[f"{name}_peak_mib"] = (torch.cuda.max_memory_allocated() - base) / 2**20
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--seqs", default=None, help="comma-separated window lengths (default: cuda 4096,8192; "
                                                 "cpu 1024,2048)")
    ap.add_argument("--batch", type=int, default=None, help="rows (default: cuda 4, cpu 1)")
    ap.add_argument("--heads", type=int, default=None, help="query heads (default: cuda 32, cpu 8)")
    ap.add_argument("--kv-heads", type=int, default=None, help="kv heads (default: cuda 8, cpu 2)")
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--mean-doc", type=int, default=None, help="mean document length (default: cuda 1024, cpu 256)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--iters", type=int, default=5)
    a = ap.parse_args()
    device = torch.device(a.device)
    cuda = device.type == "cuda"
    a.batch = a.batch or (4 if cuda else 1)
    a.heads = a.heads or (32 if cuda else 8)
    a.kv_heads = a.kv_heads or (8 if cuda else 2)
    a.mean_doc = a.mean_doc or (1024 if cuda else 256)
    seqs = [int(s) for s in (a.seqs or ("4096,8192" if cuda else "1024,2048")).split(",")]
    dtype = torch.bfloat16 if cuda else torch.float32
    name = torch.cuda.get_device_name(device) if cuda else f"CPU, {torch.get_num_threads()} threads"
    print(f"{name}; {dtype}; batch {a.batch}, {a.heads} query / {a.kv_heads} kv heads, head dim {a.head_dim}; "
          f"documents of mean {a.mean_doc} tokens; {'forward + backward' if cuda else 'forward only'}; median of "
          f"{a.iters} after {a.warmup} warmup; errors relative to the largest entry of SDPA's fp32 result")
    rows = [one(s, a, device, dtype) for s in seqs]
    cols = ["out_err"] + (["grad_err"] if cuda else []) + ["ms", "first_s"] + (["peak_mib"] if cuda else [])
    print(f"{'seq':>6} {'docs':>5} {'kernel':<10} " + " ".join(f"{c:>10}" for c in cols) + f" {'vs sdpa':>8}")
    for r in rows:
        for k in KERNELS:
            vals = " ".join(f"{r[f'{k}_{c}']:>10.3g}" for c in cols)
            print(f"{r['seq']:>6} {r['docs_per_row']:>5.1f} {k:<10} {vals} {r['sdpa_ms'] / r[f'{k}_ms']:>7.2f}x")
    print(" ".join(f"s{r['seq']}_{k}_{c}={r[f'{k}_{c}']:.4g}" for r in rows for k in KERNELS for c in cols))


if __name__ == "__main__":
    main()
