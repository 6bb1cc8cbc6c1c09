"""Checkpoint I/O on this machine, in one run: save and load seconds and MB/s for a ~100M
parameter Llama with its AdamW state, synchronous vs asynchronous saves, and how long
the training loop is held up by each.

Every mode trains the same model for ``--steps`` steps (batch x seq of random tokens) in
a one-process gloo group, through the trainer's own ``Checkpointer``:
- ``none``: no checkpoint (the baseline loop time);
- ``sync``: a blocking ``dcp.save`` after step 2 (the loop waits for the whole write);
- ``async``: ``checkpoint.async_save`` after step 2 (the loop waits while the state is
  staged to host memory; the write runs in a background thread; the commit happens at
  the first step boundary after it finished; the run waits for it at the end).
Modes alternate over ``--repeats`` and the medians are printed. "loop overhead" is the
loop's wall time through the commit minus the baseline's for the same steps: what the
checkpoint cost training, including the background thread's contention for the cores.
Then a fresh model and optimizer load the checkpoint (``maybe_resume``) and the time is
reported, with the part of it spent checking every file's size and CRC32 against the
manifest in meta.json before the load ("verify"). The CRC32s of a save are computed
while the bytes are written (zlib.crc32, in the writing thread): "crc in memory" is the
CPU time that costs, measured over the checkpoint's bytes already in memory. The last
line is machine-readable key=value pairs."""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
import zlib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from pretrain.checkpoint import Checkpointer  # noqa: E402
from pretrain.config import CheckpointConfig, OptimConfig  # noqa: E402
from pretrain.model.llama.args import LlamaArgs  # noqa: E402
from pretrain.model.llama import build_llama, count_parameters  # noqa: E402
from pretrain.optim import build_optimizer  # noqa: E402

ARGS = LlamaArgs(name="bench100m", dim=768, n_layers=12, n_heads=12, n_kv_heads=4, ffn_hidden_dim=2048,
                 vocab_size=32000, tie_embeddings=True)
LOADER = {"dp_rank": 0, "note": "bench: no data loader"}


def fresh(seq: int):
    model = build_llama(ARGS, rope_cache_len=seq, device="meta")
    model.to_empty(device="cpu")
    model.init_weights()
    return model, build_optimizer(model, OptimConfig(lr=1e-4, warmup_steps=0))


def train_step(model, opt, tokens) -> None:
    logits = model(tokens[:, :-1])
    F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def run_mode(mode: str, root: Path, steps: int, tokens) -> dict:
    """Loop wall time per step boundary, the save's blocked and write times, and a load."""
    model, opt = fresh(tokens.shape[1])
    ck = Checkpointer(root / "checkpoints", CheckpointConfig(interval=2, async_save=(mode == "async"), keep_last=0),
                      rank=0, world_size=1, model_args=ARGS)
    out = {"blocked": 0.0, "write": 0.0}
    t0 = time.perf_counter()
    marks = []
    save_t0 = None
    for step in range(1, steps + 1):
        train_step(model, opt, tokens)
        if ck._pending is not None:
            ck.poll()
            if ck._pending is None:  # committed at this boundary
                out["write"] = time.perf_counter() - save_t0
        if step == 2 and mode != "none":
            save_t0 = time.perf_counter()
            ck.save(step, 0, model, opt, LOADER)
            out["blocked"] = ck.blocked_s
            if mode == "sync":
                out["write"] = out["blocked"]
        marks.append(time.perf_counter() - t0)
    if ck._pending is not None:  # not committed within the loop: wait for it
        ck.wait()
        out["write"] = time.perf_counter() - save_t0
        marks[-1] = time.perf_counter() - t0
    out["marks"] = marks
    if mode != "none":
        path = root / "checkpoints" / "step-2"
        out["bytes"] = dir_bytes(path)
        del model, opt
        model, opt = fresh(tokens.shape[1])
        reader = Checkpointer(root / "checkpoints", CheckpointConfig(), rank=0, world_size=1, model_args=ARGS)
        l0 = time.perf_counter()
        step, _, _ = reader.maybe_resume(model, opt)
        out["load"] = time.perf_counter() - l0
        out["verify"] = reader.verify_s
        blobs = [f.read_bytes() for f in path.rglob("*") if f.is_file()]
        c0 = time.perf_counter()
        for b in blobs:
            zlib.crc32(b)
        out["crc"] = time.perf_counter() - c0
        assert step == 2 and len(opt.state) > 0, "the checkpoint did not load"
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--dir", default=None, help="where to write checkpoints (default: a temp dir)")
    a = ap.parse_args()
    torch.manual_seed(0)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    dist.init_process_group("gloo", init_method=f"file://{tempfile.mktemp()}", rank=0, world_size=1)
    n_params = count_parameters(build_llama(ARGS, rope_cache_len=a.seq, device="meta"))
    tokens = torch.randint(0, ARGS.vocab_size, (a.batch, a.seq + 1))
    base = Path(a.dir or tempfile.mkdtemp(prefix="ckpt-bench-"))
    results = {m: [] for m in ("none", "sync", "async")}
    for r in range(a.repeats):
        for mode in results:
            root = base / f"{mode}-{r}"
            shutil.rmtree(root, ignore_errors=True)
            results[mode].append(run_mode(mode, root, a.steps, tokens))
            shutil.rmtree(root, ignore_errors=True)
    med = lambda xs: statistics.median(xs)  # noqa: E731
    base_marks = [med(m) for m in zip(*(x["marks"] for x in results["none"]))]
    step_s = base_marks[-1] / a.steps
    rows = {}
    for mode in ("sync", "async"):
        rs = results[mode]
        mb = med([x["bytes"] for x in rs]) / 1e6
        # Overhead through the last step (by then the async save committed or was waited for).
        overhead = med([x["marks"][-1] for x in rs]) - base_marks[-1]
        rows[mode] = dict(mb=mb, blocked=med([x["blocked"] for x in rs]), write=med([x["write"] for x in rs]),
                          load=med([x["load"] for x in rs]), overhead=overhead,
                          verify=med([x["verify"] for x in rs]), crc=med([x["crc"] for x in rs]))
    print(f"model {n_params / 1e6:.1f}M params (fp32) + AdamW state; checkpoint {rows['sync']['mb']:.0f} MB; "
          f"{a.steps} steps of batch {a.batch} x seq {a.seq}, baseline {step_s:.2f} s/step; "
          f"medians of {a.repeats} alternating repeats; {torch.get_num_threads()} threads")
    print(f"{'mode':<6} {'loop blocked s':>14} {'write s':>8} {'write MB/s':>10} {'loop overhead s':>15} "
          f"{'load s':>7} {'load MB/s':>9} {'verify s':>9} {'crc in memory s':>15}")
    for mode, r in rows.items():
        print(f"{mode:<6} {r['blocked']:>14.2f} {r['write']:>8.2f} {r['mb'] / r['write']:>10.0f} "
              f"{r['overhead']:>15.2f} {r['load']:>7.2f} {r['mb'] / r['load']:>9.0f} {r['verify']:>9.2f} "
              f"{r['crc']:>15.3f}")
    s, y = rows["sync"], rows["async"]
    print(f"params_m={n_params / 1e6:.1f} ckpt_mb={s['mb']:.0f} sync_save_s={s['write']:.2f} "
          f"sync_mb_s={s['mb'] / s['write']:.0f} async_blocked_s={y['blocked']:.2f} async_write_s={y['write']:.2f} "
          f"async_overhead_s={y['overhead']:.2f} sync_overhead_s={s['overhead']:.2f} load_s={s['load']:.2f} "
          f"load_mb_s={s['mb'] / s['load']:.0f} blocked_ratio={y['blocked'] / s['write']:.3f} "
          f"verify_s={s['verify']:.2f} verify_share_of_load={s['verify'] / s['load']:.3f} "
          f"crc_share_of_write={s['crc'] / s['write']:.3f}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
