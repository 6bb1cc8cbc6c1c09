"""Peak memory of one training step (forward + backward) under each activation
checkpointing mode, on a model with a long sequence, and the step time it costs.

Each mode runs in its own fresh process. On CPU the peak is the most bytes held at once by
the tensors the step allocates, from torch.profiler's memory events (exact: the process's
RSS moved with the malloc arenas and with other processes, by up to 0.17 of the baseline
between a quiet and a busy machine); on CUDA it is torch.cuda.max_memory_allocated minus
the memory allocated before the step. Either way it is the step's own memory:
activations, gradients and temporaries, not the weights. The peak is measured on a step
of its own; the time is the fastest of ``--steps`` further steps. The last line is
machine-readable key=value pairs."""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

MODES = ("none", "every_n", "selective_op", "full")


def _cpu_peak_bytes(step) -> int:
    """The most bytes held at once by tensors allocated during ``step``: torch.profiler's
    memory events ("Total Allocated" counts the allocations it saw, from 0 at its start).
    Exact, and unlike the process's RSS it does not depend on the malloc arenas or on
    other processes competing for memory."""
    import json
    import tempfile

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        prof.export_chrome_trace(f.name)
        events = json.loads(Path(f.name).read_text())["traceEvents"]
    return max(e["args"]["Total Allocated"] for e in events if e.get("name") == "[memory]")


def measure(mode: str, a) -> dict:
    import torch
    import torch.nn.functional as F

    from parallel.ac import apply_activation_checkpointing
    from pretrain.model.llama.args import LlamaArgs
    from pretrain.model.llama import LAYOUT, build_llama

    torch.manual_seed(0)
    device = torch.device(a.device)
    args = LlamaArgs(name="bench", dim=a.dim, n_layers=a.layers, n_heads=a.heads, n_kv_heads=a.heads // 2,
                     ffn_hidden_dim=a.dim * 3, vocab_size=a.vocab, tie_embeddings=True)
    model = build_llama(args, rope_cache_len=a.seq, device="meta")
    apply_activation_checkpointing(LAYOUT.block_list(model), mode, every_n=2)  # the trainer's blocks
    model.to_empty(device=device)
    model.init_weights()
    tokens = torch.randint(0, a.vocab, (a.batch, a.seq + 1), device=device)

    def step():
        logits = model(tokens[:, :-1])
        F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten()).backward()

    model.zero_grad(set_to_none=True)
    if device.type == "cuda":  # the peak of a first step, from a clean start
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
    else:
        peak = _cpu_peak_bytes(step)
    times = []
    for _ in range(a.steps):  # timed apart from the measured step (the profiler slows it)
        model.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return {"mode": mode, "peak_mb": peak / 2**20, "step_s": min(times)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=1, help="steps per mode (time: the fastest)")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: measure one mode
    a = ap.parse_args()
    if a.one:
        print(json.dumps(measure(a.one, a)))
        return
    rows = {}
    for mode in MODES:
        cmd = [sys.executable, __file__, "--one", mode] + [x for x in sys.argv[1:]]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        rows[mode] = json.loads(out)
    base = rows["none"]
    print(f"Llama dim {a.dim}, {a.layers} layers, seq {a.seq}, batch {a.batch}, vocab {a.vocab}, {a.device}; "
          f"peak = step memory above the weights ({'max allocated' if a.device == 'cuda' else 'profiler allocation count'})")
    print(f"{'mode':<13} {'peak MB':>9} {'vs none':>8} {'step s':>8} {'vs none':>8}")
    for mode, r in rows.items():
        print(f"{mode:<13} {r['peak_mb']:>9.0f} {r['peak_mb'] / base['peak_mb']:>8.2f} {r['step_s']:>8.2f} "
              f"{r['step_s'] / base['step_s']:>8.2f}")
    print(" ".join([f"device={a.device}", f"seq={a.seq}"]
                   + [f"peak_mb_{m}={r['peak_mb']:.0f}" for m, r in rows.items()]
                   + [f"mem_ratio_{m}={r['peak_mb'] / base['peak_mb']:.3f}" for m, r in rows.items() if m != "none"]
                   + [f"time_ratio_{m}={r['step_s'] / base['step_s']:.3f}" for m, r in rows.items() if m != "none"]))


if __name__ == "__main__":
    main()
