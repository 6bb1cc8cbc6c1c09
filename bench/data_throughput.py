"""Data pipeline throughput on this machine, in one run, on the same text:

1. raw tokenizer: Llama 3 (quicktok) encoding the documents, one thread, nothing else;
2. streaming pipeline: JSONL -> parse -> tokenize -> pack -> batch, through RankLoader,
   with 0 (in process), 1 and 2 worker processes; tokens/s as the trainer receives them;
3. pretokenized shards (same documents) through the same loader, in process (one core);
4. data_wait share of step time in a short real training run (the demo's model, one
   process, data.num_workers=1).

Corpus: this interpreter's standard library sources, one JSONL record per file,
repeated to ``--mb`` megabytes. Last line: machine-readable key=value pairs, with
ratio = streaming tokens/s per worker (1 worker) / raw tokenizer tokens/s."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from data_pipeline.loader import LoaderSpec, RankLoader  # noqa: E402
from data_pipeline.pretokenize import pretokenize  # noqa: E402
from data_pipeline.sources import SourceSpec, build_source  # noqa: E402
from data_pipeline.tokenizer import Llama3Tokenizer  # noqa: E402


def corpus(mb: float) -> list[str]:
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    texts = [f.read_text(encoding="utf-8", errors="replace") for f in files]
    out, size = [], 0
    while size < mb * 1e6:
        for t in texts:
            out.append(t)
            size += len(t)
    return out


def loader_rate(source, tok, workers: int, seq_len: int, batch: int, tokens: int) -> float:
    spec = LoaderSpec(seq_len=seq_len, local_batch_size=batch, dp_rank=0, dp_world=1, num_workers=workers,
                      seed=0, shuffle=True)
    ld = RankLoader([source], [1.0], tok, spec)
    next(ld)  # start-up (worker fork, first batch) is not throughput
    per_batch, n = batch * (seq_len + 1), 0
    t0 = time.perf_counter()
    while n < tokens:
        next(ld)
        n += per_batch
    dt = time.perf_counter() - t0
    ld.close()
    return n / dt


def data_wait_share(steps: int) -> float:
    with tempfile.TemporaryDirectory() as d:
        cmd = [sys.executable, "-m", "pretrain", "experiment=demo", f"train.steps={steps}", "logging.every=10",
               "logging.tensorboard=false", "data.num_workers=1", f"hydra.run.dir={d}"]
        subprocess.run(cmd, cwd=REPO, check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "2"})
        rows = [json.loads(x) for x in (Path(d) / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r["step"] > 1]  # step 1 includes the loader's start-up
    return sum(r["data_wait_share"] for r in rows) / len(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--mb", type=float, default=8.0, help="corpus size")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--train-steps", type=int, default=60, help="0 skips the training run")
    a = p.parse_args()

    tok = Llama3Tokenizer()
    docs = corpus(a.mb)
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        (d / "c.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))

        tok.encode_batch(docs[:8])
        t0 = time.perf_counter()
        n_raw = 0
        for i in range(0, len(docs), 32):
            flat, _ = tok.encode_batch(docs[i:i + 32])
            n_raw += len(flat)
        raw = n_raw / (time.perf_counter() - t0)

        src = build_source(SourceSpec("jsonl", str(d / "c.jsonl")))
        budget = int(n_raw * 0.8)  # stay inside one epoch
        rates = {w: loader_rate(src, tok, w, a.seq_len, a.batch, budget) for w in (0, 1, 2)}

        pretokenize(SourceSpec("jsonl", str(d / "c.jsonl")), tok, d / "shards", progress=False)
        shards = build_source(SourceSpec("pretokenized", str(d / "shards"), rows_per_unit=64))
        pretok = loader_rate(shards, tok, 0, a.seq_len, a.batch, budget)

    wait = data_wait_share(a.train_steps) if a.train_steps else float("nan")
    ratio = rates[1] / raw
    print(f"corpus: {len(docs)} documents, {n_raw / 1e6:.2f} M Llama 3 tokens; seq_len {a.seq_len}, "
          f"batch {a.batch}; {os.cpu_count()} cores")
    print(f"{'path':<44}{'tokens/s':>14}{'per worker':>14}")
    print(f"{'raw tokenizer (quicktok llama3, 1 thread)':<44}{raw:>14,.0f}{raw:>14,.0f}")
    for w in (0, 1, 2):
        label = f"streaming JSONL, {w} worker(s)" + (" (in process)" if w == 0 else "")
        print(f"{label:<44}{rates[w]:>14,.0f}{rates[w] / max(w, 1):>14,.0f}")
    print(f"{'pretokenized shards, in process':<44}{pretok:>14,.0f}{pretok:>14,.0f}")
    print(f"streaming per worker / raw tokenizer: {ratio:.2f} (target >= 0.80)")
    print(f"pretokenized: {pretok / 1e6:.1f} M tokens/s (target >= 20 M on one core)")
    print(f"training run data_wait share: {wait:.2%} (target < 2%)")
    print(f"raw_tok_per_s={raw:.0f} stream_w0_tok_per_s={rates[0]:.0f} stream_w1_tok_per_s={rates[1]:.0f} "
          f"stream_w2_tok_per_s={rates[2]:.0f} pretok_tok_per_s={pretok:.0f} data_wait_share={wait:.4f} "
          f"ratio={ratio:.3f}")


if __name__ == "__main__":
    main()
