"""Async checkpoint staging: how long each ``checkpoint.async_save`` holds the training
loop, with the trainer's stager (host copies made once and reused by every later save;
pinned, with non-blocking copies, on CUDA) against torch's default (``dcp.async_save``
without a stager: new unpinned buffers each save, freed after it).

One process, a one-rank gloo group, the ~100M-parameter Llama of bench/checkpoint_io.py
with its AdamW state (~1.3 GB staged per save). Each variant saves ``--saves`` times, a
training step between saves; the previous save's write is waited for outside the timed
part, so "held" is the staging (and the save's setup) alone. Variants alternate over
``--repeats``; medians of the saves after the first (the first allocates in both). On
CPU pinning does not apply: what remains is the reuse of the buffers. The last line is
machine-readable key=value pairs."""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from checkpoint_io import ARGS, LOADER, fresh, train_step  # noqa: E402
from pretrain.checkpoint import Checkpointer  # noqa: E402
from pretrain.config import CheckpointConfig  # noqa: E402


def run(reuse: bool, root: Path, saves: int, tokens) -> list:
    model, opt = fresh(tokens.shape[1])
    ck = Checkpointer(root, CheckpointConfig(interval=1, async_save=True, keep_last=2), rank=0, world_size=1,
                      model_args=ARGS)
    ck.reuse_staging = reuse
    held = []
    for step in range(1, saves + 1):
        train_step(model, opt, tokens)
        ck.wait()  # the previous save's write: not part of what is timed
        t0 = time.perf_counter()
        ck.save(step, 0, model, opt, LOADER)
        held.append(time.perf_counter() - t0)
    ck.wait()
    ck.close()
    return held


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--saves", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--seq", type=int, default=64)
    a = ap.parse_args()
    torch.manual_seed(0)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    dist.init_process_group("gloo", init_method=f"file://{tempfile.mktemp()}", rank=0, world_size=1)
    tokens = torch.randint(0, ARGS.vocab_size, (1, a.seq + 1))
    base = Path(tempfile.mkdtemp(prefix="staging-bench-"))
    rows = {"default": [], "reused": []}
    for r in range(a.repeats):
        for name in rows:
            root = base / f"{name}-{r}"
            rows[name].append(run(name == "reused", root, a.saves, tokens))
            shutil.rmtree(root, ignore_errors=True)
    shutil.rmtree(base, ignore_errors=True)
    first = {n: statistics.median(h[0] for h in v) for n, v in rows.items()}
    later = {n: statistics.median(x for h in v for x in h[1:]) for n, v in rows.items()}
    print(f"{'stager':<9} {'first save held s':>18} {'later saves held s (median)':>28}")
    for n in rows:
        print(f"{n:<9} {first[n]:>18.3f} {later[n]:>28.3f}")
    print(f"device=cpu saves={a.saves} repeats={a.repeats} held_first_default_s={first['default']:.3f} "
          f"held_first_reused_s={first['reused']:.3f} held_later_default_s={later['default']:.3f} "
          f"held_later_reused_s={later['reused']:.3f} later_ratio_reused_vs_default="
          f"{later['reused'] / later['default']:.3f}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
