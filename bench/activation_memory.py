"""Peak memory of one training step (forward + backward) under each activation
checkpointing mode, on a model with a long sequence, and the step time it costs.

Each mode runs in its own fresh process. On CPU the peak is the most bytes held at once by
the tensors the step allocates, from torch.profiler's memory events (exact: the process's
RSS moved with the malloc arenas and with other processes, by up to 0.17 of the baseline
between a quiet and a busy machine); on CUDA it is torch.cuda.max_memory_allocated minus
the memory allocated before the step. Either way it is the step's own memory:
activations, gradients and temporaries, not the weights. The peak is measured on a step
of its own; the time is the fastest of ``--steps`` further steps. The last line is
machine-readable key=value pairs.

``--family mllama``: one Llama 3.2 11B Vision "block pair", a self-attention
TransformerBlock then a gated CrossAttentionBlock (decoder layers 0 and 1, layer 1
cross-attending), built as the trainer builds a model (the family's ``build`` on meta,
``apply_activation_checkpointing`` on the family's layout blocks, ``to_empty``,
``init_weights``) and fed by the family's ``inputs`` with one image whose every tile every
token sees. The layout's blocks are [vision local 0, vision global 0, self-attention,
cross-attention]: ``every_n`` (n=2) checkpoints vision local 0 and the self-attention
block (as at 11B, whose 40 vision blocks put text layer i at an even index when i is even),
``full`` and ``selective_op`` all four. Besides the peak it reports ``held``: what the
forward keeps for the backward (on CPU the profiler's count just before the backward; on
CUDA memory_allocated after the loss less before the step). With two blocks the peak says
little about a deep model: ``full`` still recomputes one whole block of two while the
pair's weight gradients are allocated, and under ``every_n`` the checkpointed block's
recomputation meets the other's saved activations. ``held`` is the per-pair figure that
adds up over a deep model's layers. Shapes, and why:

- Text blocks at 11B proportions, narrower: dim 512 (11B: 4096), 4 heads of 128 (11B: 32 of
  128), 1 kv head (11B: 8; k and v a quarter of dim, as there), SwiGLU 1792 (3.5 x dim, as
  11B's 14336). Not the 11B width on CPU: that pair holds 0.44 B parameters (0.49 B with
  the vision layers and projector), whose fp32 weight gradients (1.9 GB) outweigh the
  activations of any sequence a CPU steps in seconds: measured at seq 256 (4 tiles of 112
  px), none and full both peak at 1,882 MB (ratio 1.00; held 271 vs 35 MB) with steps of
  10 and 12 s (one thread). ``--dim 4096`` gives the 11B pair (heads dim/128, kv heads heads/4, ffn 3.5
  x dim, vision 1280 wide with 16 heads and MLP 5120 follow from --dim), for CUDA.
- Sequence 1024: the pair's activations (held 117 MB) outweigh its 8.3 M parameters'
  gradients (32 MB), so the modes differ, while a step stays under a second: the four
  modes take ~18 s of CPU time with OMP_NUM_THREADS=1 (18-49 s of wall time on a shared
  2-core machine). With 2 threads while another process held a core, 43-64 s: CPU flash
  attention's backward stalls on its threads (a step of 7.5 s instead of 0.33 s); the
  memory figures were the same. Step times on a shared CPU, and so the time ratios, are
  noise; the memory figures are exact.
- Images: one image of 4 tiles at 112 px (11B: 560): 8 x 8 patches + the class token = 65
  states per tile (padded to 72 in the encoder), 260 image states (11B: 6,404), so the
  cross-attention block's keys, values and scores are there but small, as at 11B where
  they are 4 x 1601 against 8192 text tokens.
- Vision encoder: scaled with the text (vision dim = dim x 1280 / 4096: 160, heads of 80,
  MLP 4 x), one local and one gated global layer, the local one kept as intermediate output
  (the model needs at least one: an empty ``intermediate_layers`` fails in its forward);
  it adds a small share of the memory."""
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


def _cpu_peak_bytes(step, mark=None):
    """The most bytes held at once by tensors allocated during ``step``: torch.profiler's
    memory events ("Total Allocated" counts the allocations it saw, from 0 at its start).
    Exact, and unlike the process's RSS it does not depend on the malloc arenas or on
    other processes competing for memory. With ``mark`` (a record_function name that
    ``step`` enters) also the bytes held just before it: (peak, held). Once per process:
    a second profile would start from the bytes the first saw allocated and not freed."""
    import json
    import tempfile

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        prof.export_chrome_trace(f.name)
        events = json.loads(Path(f.name).read_text())["traceEvents"]
    peak = max(e["args"]["Total Allocated"] for e in events if e.get("name") == "[memory]")
    if mark is None:
        return peak
    t = min(e["ts"] for e in events if e.get("name") == mark)
    last = max((e for e in events if e.get("name") == "[memory]" and e["ts"] < t), key=lambda e: e["ts"])
    return peak, last["args"]["Total Allocated"]


def _mllama_args(a):
    from pretrain.model.mllama.args import MllamaArgs

    vd = a.dim * 1280 // 4096  # the vision encoder scaled with the text width (11B: 1280 to 4096)
    return MllamaArgs(name="bench", dim=a.dim, n_layers=2, n_heads=a.heads, n_kv_heads=a.kv_heads,
                      head_dim=a.dim // a.heads, ffn_hidden_dim=a.ffn, vocab_size=a.vocab,
                      cross_attention_layers=[1], vision_dim=vd, vision_layers=1, vision_global_layers=1,
                      vision_heads=max(1, vd // 80), vision_ffn_hidden_dim=4 * vd, image_size=a.image_size,
                      patch_size=14, max_num_tiles=a.tiles, supported_aspect_ratios=[[1, a.tiles]],
                      intermediate_layers=[0], max_images=1)


def _build_mllama(mode: str, a, device):
    """The block pair as the trainer builds a model; (model, inputs of a batch, targets,
    the names of the blocks checkpointed)."""
    import torch

    from parallel import knobs
    from parallel.ac import apply_activation_checkpointing, checkpointed_mode
    from pretrain.model.mllama import FAMILY

    args = _mllama_args(a)
    problems = list(knobs.problems(args)) or list(FAMILY.check(args))  # ranges first: check() assumes them
    if problems:
        raise SystemExit(f"bench shapes refused: {problems}")
    with torch.device("meta"):
        model = FAMILY.build(args, a.seq)
    apply_activation_checkpointing(FAMILY.layout.block_list(model), mode, every_n=2)  # the trainer's blocks
    wrapped = [name for name, m in model.named_modules() if checkpointed_mode(m) != "none"]
    model.to_empty(device=device)
    model.init_weights()
    tokens = torch.randint(0, a.vocab, (a.batch, a.seq + 1), device=device)
    b, t, px = a.batch, a.tiles, a.image_size
    batch = {"input_ids": tokens[:, :-1],
             "pixel_values": torch.randn(b, 1, t, 3, px, px),
             "aspect_ratio_ids": torch.ones(b, 1, dtype=torch.long),  # [1, tiles]: the one supported ratio
             "aspect_ratio_mask": torch.ones(b, 1, t, dtype=torch.long),
             "cross_attention_mask": torch.ones(b, a.seq, 1, t)}  # every token sees every tile
    return model, FAMILY.inputs(batch, device, args), tokens[:, 1:], wrapped


def measure(mode: str, a) -> dict:
    import torch
    import torch.nn.functional as F

    from parallel.ac import apply_activation_checkpointing
    from pretrain.model.llama.args import LlamaArgs
    from pretrain.model.llama import LAYOUT, build_llama

    torch.manual_seed(0)
    device = torch.device(a.device)
    if a.family == "mllama":
        model, inputs, targets, wrapped = _build_mllama(mode, a, device)
    else:
        args = LlamaArgs(name="bench", dim=a.dim, n_layers=a.layers, n_heads=a.heads, n_kv_heads=a.heads // 2,
                         ffn_hidden_dim=a.dim * 3, vocab_size=a.vocab, tie_embeddings=True)
        model = build_llama(args, rope_cache_len=a.seq, device="meta")
        apply_activation_checkpointing(LAYOUT.block_list(model), mode, every_n=2)  # the trainer's blocks
        model.to_empty(device=device)
        model.init_weights()
        tokens = torch.randint(0, a.vocab, (a.batch, a.seq + 1), device=device)
        inputs, targets = (tokens[:, :-1],), tokens[:, 1:]

    held = []  # mllama: bytes the forward kept for the backward, per step

    def step():
        if a.family != "mllama":
            logits = model(*inputs)
            F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten()).backward()
            return
        before = torch.cuda.memory_allocated() if device.type == "cuda" else 0
        logits = model(*inputs)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
        held.append(torch.cuda.memory_allocated() - before if device.type == "cuda" else 0)
        with torch.profiler.record_function("bench.backward"):
            loss.backward()

    model.zero_grad(set_to_none=True)
    if device.type == "cuda":  # the peak of a first step, from a clean start
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
    elif a.family == "mllama":
        peak, held[0] = _cpu_peak_bytes(step, mark="bench.backward")
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
    row = {"mode": mode, "peak_mb": peak / 2**20, "step_s": min(times)}
    if held:  # mllama: what the measured step's forward kept for its backward
        row["held_mb"], row["wrapped"] = held[0] / 2**20, wrapped
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--family", default="llama", choices=["llama", "mllama"],
                    help="llama: --layers blocks; mllama: one self- + one cross-attention block (see above)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--seq", type=int, default=None, help="default 4096 (llama), 1024 (mllama)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--dim", type=int, default=None, help="default 512 (mllama: 4096 is the 11B pair)")
    ap.add_argument("--layers", type=int, default=16, help="llama only")
    ap.add_argument("--heads", type=int, default=None, help="default 8 (llama), dim / 128 (mllama)")
    ap.add_argument("--vocab", type=int, default=None, help="default 2048 (llama), 512 (mllama)")
    ap.add_argument("--kv-heads", type=int, default=None, help="mllama only: default heads / 4 (llama: heads / 2)")
    ap.add_argument("--ffn", type=int, default=None, help="mllama only: default 3.5 x dim (llama: 3 x dim)")
    ap.add_argument("--image-size", type=int, default=112, help="mllama only: a tile's side in pixels")
    ap.add_argument("--tiles", type=int, default=4, help="mllama only: tiles of the one image")
    ap.add_argument("--steps", type=int, default=1, help="steps per mode (time: the fastest)")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: measure one mode
    a = ap.parse_args()
    mllama = a.family == "mllama"
    a.seq = a.seq or (1024 if mllama else 4096)
    a.dim = a.dim or 512
    a.heads = a.heads or (max(4, a.dim // 128) if mllama else 8)
    a.vocab = a.vocab or (512 if mllama else 2048)
    a.kv_heads = a.kv_heads or max(1, a.heads // 4)
    a.ffn = a.ffn or a.dim * 7 // 2
    if a.one:
        print(json.dumps(measure(a.one, a)))
        return
    rows = {}
    for mode in MODES:
        cmd = [sys.executable, __file__, "--one", mode] + [x for x in sys.argv[1:]]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        rows[mode] = json.loads(out)
    base = rows["none"]
    how = f"peak = step memory above the weights ({'max allocated' if a.device == 'cuda' else 'profiler allocation count'})"
    if mllama:
        states = a.tiles * ((a.image_size // 14) ** 2 + 1)
        print(f"Mllama block pair (self-attention + cross-attention) dim {a.dim}, {a.heads} heads / {a.kv_heads} kv, "
              f"ffn {a.ffn}, seq {a.seq}, batch {a.batch}, vocab {a.vocab}, 1 image x {a.tiles} tiles of "
              f"{a.image_size} px = {states} image states, vision 1 local + 1 global layer x "
              f"{a.dim * 1280 // 4096}; every_n wraps {', '.join(rows['every_n']['wrapped'])}; {a.device}; {how}")
    else:
        print(f"Llama dim {a.dim}, {a.layers} layers, seq {a.seq}, batch {a.batch}, vocab {a.vocab}, {a.device}; {how}")

    def held(r):  # mllama's extra columns
        return f" {r['held_mb']:>9.0f} {r['held_mb'] / base['held_mb']:>8.2f}" if mllama else ""

    print(f"{'mode':<13} {'peak MB':>9} {'vs none':>8} {'step s':>8} {'vs none':>8}"
          + (f" {'held MB':>9} {'vs none':>8}" if mllama else ""))
    for mode, r in rows.items():
        print(f"{mode:<13} {r['peak_mb']:>9.0f} {r['peak_mb'] / base['peak_mb']:>8.2f} {r['step_s']:>8.2f} "
              f"{r['step_s'] / base['step_s']:>8.2f}" + held(r))
    if mllama:
        print("held = what the forward keeps for the backward (the part that grows with the number of blocks)")
    print(" ".join(([f"family={a.family}"] if mllama else []) + [f"device={a.device}", f"seq={a.seq}"]
                   + [f"peak_mb_{m}={r['peak_mb']:.0f}" for m, r in rows.items()]
                   + [f"mem_ratio_{m}={r['peak_mb'] / base['peak_mb']:.3f}" for m, r in rows.items() if m != "none"]
                   + [f"time_ratio_{m}={r['step_s'] / base['step_s']:.3f}" for m, r in rows.items() if m != "none"]
                   + ([f"held_mb_{m}={r['held_mb']:.0f}" for m, r in rows.items()]
                      + [f"held_ratio_{m}={r['held_mb'] / base['held_mb']:.3f}" for m, r in rows.items() if m != "none"]
                      if mllama else [])))


if __name__ == "__main__":
    main()
