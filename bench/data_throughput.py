"""Data pipeline throughput on this machine, in one run, on the same text:

1. raw tokenizer: Llama 3 (quicktok) encoding the documents, one thread, nothing else;
2. streaming pipeline: JSONL -> parse -> tokenize -> pack -> batch, through RankLoader,
   with 0 (all in the calling thread), 1 and 2 tokenizer threads; tokens/s as the trainer
   receives them. Every worker count also runs the graph's reader thread (read, parse) and
   its prefetching thread (pack, batch): "per worker" divides by the tokenizer threads;
3. pretokenized shards (same documents) through the same loader, in process (one core);
4. data_wait share of step time in a short real training run (the demo's model, one
   process, data.num_workers=1);
5. the loader state's JSON bytes after 3,000 batches of a skewed corpus (document lengths
   from 5 characters to 200K, a 95/5 two-source mixture; 8 rows x 8 streams).

Corpus: this interpreter's standard library sources (subpackages included), one JSONL
record per file, up to ``--mb`` megabytes of distinct text. Every measurement runs in its
own fresh process and reads the corpus once: quicktok caches pieces it has seen, so a
second pass over the same text would flatter whichever path ran second. Last line:
machine-readable key=value pairs, with ratio = streaming tokens/s per worker (1 worker) /
raw tokenizer tokens/s and scale2 = tokens/s with 2 workers / with 1."""
from __future__ import annotations

import argparse
import json
import os
import statistics
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
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("**/*.py"))
    out, size = [], 0
    for f in files:
        if "site-packages" in f.parts or f.stat().st_size > 500_000:
            continue
        t = f.read_text(encoding="utf-8", errors="replace")
        if t.strip():
            out.append(t)
            size += len(t)
        if size >= mb * 1e6:
            break
    return out


def loader_rate(source, tok, workers: int, seq_len: int, batch: int, tokens: int) -> float:
    spec = LoaderSpec(seq_len=seq_len, local_batch_size=batch, dp_rank=0, dp_world=1, num_workers=workers,
                      seed=0, shuffle=True, streams_per_row=8)
    ld = RankLoader([source], [1.0], tok, spec)
    for _ in range(4):  # start-up (worker fork, first batches) is not throughput
        next(ld)
    per_batch, n = batch * (seq_len + 1), 0
    t0 = time.perf_counter()
    while n < tokens:
        next(ld)
        n += per_batch
    dt = time.perf_counter() - t0
    ld.close()
    return n / dt


def skewed_state_bytes(batches: int = 3000) -> int:
    """JSON bytes of a rank's loader state after ``batches`` batches of a skewed corpus."""
    import random

    rng = random.Random(0)
    words = "the of and to in is was for on that with as by at from".split()
    with tempfile.TemporaryDirectory() as d:
        for name, n in (("big", 3000), ("small", 3000)):
            with open(Path(d) / f"{name}.jsonl", "w") as f:
                for _ in range(n):
                    chars = min(200_000, int(5 * rng.paretovariate(0.6)))
                    text = " ".join(rng.choice(words) for _ in range(max(1, chars // 4)))
                    f.write(json.dumps({"text": text}) + "\n")
        srcs = [build_source(SourceSpec("jsonl", str(Path(d) / f"{x}.jsonl"), chunk_bytes=1 << 16))
                for x in ("big", "small")]
        spec = LoaderSpec(seq_len=256, local_batch_size=8, dp_rank=0, dp_world=1, num_workers=1, seed=0,
                          shuffle=True, streams_per_row=8)
        ld = RankLoader(srcs, [0.95, 0.05], Llama3Tokenizer(), spec)
        for _ in range(batches):
            next(ld)
        n = len(json.dumps(ld.state_dict()))
        ld.close()
    return n


def data_wait_share(steps: int) -> float:
    with tempfile.TemporaryDirectory() as d:
        cmd = [sys.executable, "-m", "pretrain", "experiment=demo", f"train.steps={steps}", "logging.every=10",
               "logging.tensorboard=false", "data.num_workers=1", f"hydra.run.dir={d}"]
        subprocess.run(cmd, cwd=REPO, check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "2"})
        rows = [json.loads(x) for x in (Path(d) / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r["step"] > 1]  # step 1 includes the loader's start-up
    return sum(r["data_wait_share"] for r in rows) / len(rows)


def measure(what: str, d: Path, seq_len: int, batch: int) -> float:
    tok = Llama3Tokenizer()
    n_tokens = json.loads((d / "shards" / "manifest.json").read_text())["n_tokens"]
    budget = int(n_tokens * 0.8)  # stay inside one epoch: each document read once
    if what == "raw":
        docs = [json.loads(line)["text"] for line in (d / "c.jsonl").read_text().splitlines()]
        t0, n = time.perf_counter(), 0
        for i in range(0, len(docs), 32):
            flat, _ = tok.encode_batch(docs[i:i + 32])
            n += len(flat)
        return n / (time.perf_counter() - t0)
    if what == "state":
        return skewed_state_bytes()
    if what == "pretok":
        src = build_source(SourceSpec("pretokenized", str(d / "shards"), rows_per_unit=64))
        return loader_rate(src, tok, 0, seq_len, batch, budget)
    src = build_source(SourceSpec("jsonl", str(d / "c.jsonl")))
    return loader_rate(src, tok, int(what[1:]), seq_len, batch, budget)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mb", type=float, default=12.0, help="corpus size (distinct text)")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--train-steps", type=int, default=60, help="0 skips the training run")
    p.add_argument("--repeats", type=int, default=3, help="alternating repeats per path (median)")
    p.add_argument("--measure", help=argparse.SUPPRESS)
    p.add_argument("--dir", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.measure:
        print(measure(a.measure, Path(a.dir), a.seq_len, a.batch))
        return

    docs = corpus(a.mb)
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        (d / "c.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
        m = pretokenize(SourceSpec("jsonl", str(d / "c.jsonl")), Llama3Tokenizer(), d / "shards", progress=False)

        def run(what):
            out = subprocess.run([sys.executable, __file__, "--measure", what, "--dir", str(d), "--seq-len",
                                  str(a.seq_len), "--batch", str(a.batch)], check=True, capture_output=True,
                                 text=True).stdout
            return float(out.split()[-1])

        # Alternating repeats, median of each: this machine's speed drifts by tens of percent.
        paths = ["raw", "w0", "w1", "w2", "pretok"]
        runs = {k: [] for k in paths}
        for _ in range(a.repeats):
            for k in paths:
                runs[k].append(run(k))
        med = {k: statistics.median(v) for k, v in runs.items()}
        raw, pretok = med["raw"], med["pretok"]
        rates = {w: med[f"w{w}"] for w in (0, 1, 2)}
        state_bytes = int(run("state"))

    wait = data_wait_share(a.train_steps) if a.train_steps else float("nan")
    ratio, scale2 = rates[1] / raw, rates[2] / rates[1]
    print(f"corpus: {len(docs)} documents, {m['n_tokens'] / 1e6:.2f} M Llama 3 tokens; seq_len {a.seq_len}, "
          f"batch {a.batch}, 8 streams per row; {os.cpu_count()} cores; each path in a fresh process, "
          f"median of {a.repeats} alternating repeats")
    print(f"{'path':<44}{'tokens/s':>14}{'per worker':>14}")
    print(f"{'raw tokenizer (quicktok llama3, 1 thread)':<44}{raw:>14,.0f}{raw:>14,.0f}")
    for w in (0, 1, 2):
        label = f"streaming JSONL, {w} tokenizer thread(s)" if w else "streaming JSONL, in the calling thread"
        print(f"{label:<44}{rates[w]:>14,.0f}{rates[w] / max(w, 1):>14,.0f}")
    print(f"{'pretokenized shards, in process':<44}{pretok:>14,.0f}{pretok:>14,.0f}")
    print(f"streaming per worker / raw tokenizer: {ratio:.2f} (target >= 0.80); 2 workers / 1: {scale2:.2f}")
    print(f"pretokenized: {pretok / 1e6:.1f} M tokens/s (target >= 20 M on one core)")
    print(f"training run data_wait share: {wait:.2%} (target < 2%)")
    print(f"loader state after 3,000 batches of a skewed corpus: {state_bytes:,} bytes of JSON")
    print(f"raw_tok_per_s={raw:.0f} stream_w0_tok_per_s={rates[0]:.0f} stream_w1_tok_per_s={rates[1]:.0f} "
          f"stream_w2_tok_per_s={rates[2]:.0f} pretok_tok_per_s={pretok:.0f} data_wait_share={wait:.4f} "
          f"state_bytes={state_bytes} ratio={ratio:.3f} scale2={scale2:.3f}")


if __name__ == "__main__":
    main()
