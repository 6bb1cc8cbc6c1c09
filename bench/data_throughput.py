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
raw tokenizer tokens/s and scale2 = tokens/s with 2 workers / with 1.

``--images`` measures the image-text path instead (Mllama's, ``LoaderSpec.image``), on
caption records (JSONL) pointing at photo-sized JPEGs (640x480, 1024x768 and their portrait
forms; a gradient, smooth colour blobs and noise, quality 90: decode and resize of
real-size JPEGs is what costs):

6. loader only: images/s through RankLoader (read, decode, resize and tile in the worker
   threads; normalize and build the masks when the batch is collated) with 0, 1 and 2
   workers, at the published geometry (560-pixel tiles, up to 4, the 11B preprocessing)
   and at the demo_vision recipe's (one 28-pixel tile, 4 images per row); per worker
   divides by the workers (0: the calling thread);
7. data_wait share of the trainer's own steps (``python -m pretrain experiment=demo_vision``,
   a tiny Mllama, data.num_workers=2) from its metrics.jsonl, on the same JPEGs and on the
   demo's own 28x28 pictures (PNG, nothing to resize).

Last line: images_per_s_w{0,1,2} (560-pixel tiles), small_images_per_s_w{0,1,2} and
data_wait_share_w2 (photo JPEGs; demo_data_wait_share_w2 on the demo's pictures)."""
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


# Image geometries (loader only): (tile size, max tiles, max images per row, seq_len, rows).
# "560": Llama 3.2 Vision 11B's preprocessing, one image per row; "28": the demo_vision
# recipe's model (one tile per image, up to 4 captions per row of 48 tokens, 16 rows).
IMAGE_GEOMETRY = {"560": (560, 4, 1, 64, 8), "28": (28, 1, 4, 48, 16)}
PHOTO_SIZES = ((640, 480), (1024, 768), (480, 640), (768, 1024))
WORDS = "a the red green blue small large dog cat car tree house street sky boat man woman on in near".split()


def write_photos(root: Path, n: int, seed: int = 0) -> Path:
    """``root/records.jsonl``: ``n`` caption records ``{"image": "img/<i>.jpg", "text": ...}``
    over photo-like JPEGs of the sizes in PHOTO_SIZES, in turn."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    (root / "img").mkdir(parents=True, exist_ok=True)
    with open(root / "records.jsonl", "w") as f:
        for i in range(n):
            w, h = PHOTO_SIZES[i % len(PHOTO_SIZES)]
            y, x = np.mgrid[0:h, 0:w].astype(np.float32)
            grad = np.stack([x / w, y / h, (x + y) / (w + h)], -1) * 255
            blobs = Image.fromarray(rng.integers(0, 256, (h // 32 + 1, w // 32 + 1, 3), dtype=np.uint8))
            blobs = np.asarray(blobs.resize((w, h), Image.BICUBIC), dtype=np.float32)
            px = np.clip(0.5 * grad + 0.5 * blobs + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(px).save(root / "img" / f"{i:04d}.jpg", quality=90)
            caption = " ".join(rng.choice(WORDS, size=int(rng.integers(2, 5))))
            f.write(json.dumps({"image": f"img/{i:04d}.jpg", "text": caption}) + "\n")
    return root / "records.jsonl"


def image_rate(records: Path, geometry: str, workers: int, seconds: float) -> float:
    """Images/s that RankLoader hands out (absent image slots not counted), after 3 batches
    of start-up, over at least ``seconds``."""
    from data_pipeline.images import ImageSpec, aspect_ratios_for

    tile, tiles, per_row, seq_len, rows = IMAGE_GEOMETRY[geometry]
    tok = Llama3Tokenizer()
    image = ImageSpec(image_token_id=tok.vocab_size, tile_size=tile, max_tiles=tiles,
                      aspect_ratios=aspect_ratios_for(tiles), max_images=per_row)
    spec = LoaderSpec(seq_len=seq_len, local_batch_size=rows, dp_rank=0, dp_world=1, num_workers=workers, seed=0,
                      shuffle=True, positions=True, image=image)
    src = build_source(SourceSpec("jsonl", str(records), image_field="image"))
    ld = RankLoader([src], [1.0], tok, spec)
    for _ in range(3):
        next(ld)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        n += int((next(ld)["aspect_ratio_ids"] > 0).sum())
    dt = time.perf_counter() - t0
    ld.close()
    return n / dt


def vision_data_wait(records: Path, steps: int, workers: int = 2) -> tuple:
    """(data_wait_share, step_time_s): the trainer's own metrics.jsonl, steps after the first
    (its start-up), of a demo_vision run on ``records``."""
    with tempfile.TemporaryDirectory() as d:
        cmd = [sys.executable, "-m", "pretrain", "experiment=demo_vision", f"data.path={records}",
               f"eval.data.path={records}", "eval.interval=0", "checkpoint.interval=0", f"train.steps={steps}",
               "logging.every=5", "logging.tensorboard=false", f"data.num_workers={workers}",
               f"data.tokenizer.cache_dir={d}/tok", f"hydra.run.dir={d}/run"]
        subprocess.run(cmd, cwd=REPO, check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "2"})
        rows = [json.loads(x) for x in (Path(d) / "run" / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r["step"] > 1 and "data_wait_share" in r]
    # Windows weighted by their steps: the share of the whole time after step 1.
    spans = [(r["step"] - p["step"], r) for p, r in zip([{"step": 1}] + rows, rows)]
    total = sum(k * r["step_time_s"] for k, r in spans)
    return sum(k * r["step_time_s"] * r["data_wait_share"] for k, r in spans) / total, total / (steps - 1)


def measure(what: str, d: Path, seq_len: int, batch: int, seconds: float) -> float:
    if what.startswith("img"):  # img<geometry>_w<workers>
        geometry, workers = what[3:].split("_w")
        return image_rate(d / "photos" / "records.jsonl", geometry, int(workers), seconds)
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
    p.add_argument("--train-steps", type=int, help="0 skips the training run (default 60; --images: 30)")
    p.add_argument("--repeats", type=int, help="alternating repeats per path, median (default 3; --images: 1)")
    p.add_argument("--images", action="store_true", help="the image-text path instead (see above)")
    p.add_argument("--photos", type=int, default=96, help="--images: distinct JPEGs written")
    p.add_argument("--measure", help=argparse.SUPPRESS)
    p.add_argument("--dir", help=argparse.SUPPRESS)
    p.add_argument("--seconds", type=float, default=6.0, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.measure:
        print(measure(a.measure, Path(a.dir), a.seq_len, a.batch, a.seconds))
        return
    if a.images:
        main_images(a.photos, 30 if a.train_steps is None else a.train_steps, a.repeats or 1, a.seconds)
        return
    a.train_steps = 60 if a.train_steps is None else a.train_steps
    a.repeats = a.repeats or 3

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


def main_images(n_photos: int, train_steps: int, repeats: int, seconds: float) -> None:
    from pretrain.demo_vision import write_split

    load = os.getloadavg()[0]  # other jobs on the machine skew every figure: say how busy it was
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        photos = write_photos(d / "photos", n_photos)
        kb = sum(f.stat().st_size for f in (d / "photos" / "img").iterdir()) / n_photos / 1e3
        demo = write_split(d, "demo", 640, seed=1)

        def run(what):
            out = subprocess.run([sys.executable, __file__, "--measure", what, "--dir", str(d), "--seconds",
                                  str(seconds)], check=True, capture_output=True, text=True).stdout
            return float(out.split()[-1])

        paths = [f"img{g}_w{w}" for g in IMAGE_GEOMETRY for w in (0, 1, 2)]
        runs = {k: [] for k in paths}
        for _ in range(repeats):
            for k in paths:
                runs[k].append(run(k))
        rate = {k: statistics.median(v) for k, v in runs.items()}
        nan = (float("nan"), float("nan"))
        wait, step = vision_data_wait(photos, train_steps) if train_steps else nan
        demo_wait, demo_step = vision_data_wait(demo, train_steps) if train_steps else nan

    print(f"photos: {n_photos} JPEGs of {', '.join(f'{w}x{h}' for w, h in PHOTO_SIZES)} in turn ({kb:.0f} KB "
          f"average); {os.cpu_count()} cores, load average {load:.1f} before the run; each loader path in a fresh "
          f"process, {seconds:g} s after 3 batches, median of {repeats}")
    print(f"{'loader path (RankLoader, LoaderSpec.image)':<52}{'images/s':>10}{'per worker':>12}")
    for g, (tile, tiles, per_row, seq_len, rows) in IMAGE_GEOMETRY.items():
        print(f"{tile}-pixel tiles, up to {tiles}; {per_row} image(s) per row, {rows} rows of {seq_len} tokens")
        for w in (0, 1, 2):
            r = rate[f"img{g}_w{w}"]
            label = f"  {w} worker thread(s)" if w else "  in the calling thread"
            print(f"{label:<52}{r:>10,.1f}{r / max(w, 1):>12,.1f}")
    print(f"training run (experiment=demo_vision: tiny Mllama, one 28-pixel tile, 4 images x 16 rows; "
          f"data.num_workers=2, {train_steps} steps, step 1 left out)")
    print(f"{'  data':<52}{'step s':>10}{'data wait':>12}")
    print(f"{'  photo JPEGs (above)':<52}{step:>10.3f}{wait:>12.2%}")
    print(f"{'  the demo pictures (28x28 PNG)':<52}{demo_step:>10.3f}{demo_wait:>12.2%}")
    print(f"data wait with 2 workers, photo JPEGs: {wait:.2%} of step time (aim < 5%)")
    print(" ".join([f"images_per_s_w{w}={rate[f'img560_w{w}']:.1f}" for w in (0, 1, 2)]
                   + [f"small_images_per_s_w{w}={rate[f'img28_w{w}']:.1f}" for w in (0, 1, 2)]
                   + [f"data_wait_share_w2={wait:.4f}", f"step_s_w2={step:.3f}",
                      f"demo_data_wait_share_w2={demo_wait:.4f}", f"demo_step_s_w2={demo_step:.3f}"]))


if __name__ == "__main__":
    main()
