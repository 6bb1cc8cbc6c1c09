"""Exact and elastic data resume through real training jobs (torchrun, gloo, worker
processes), checked by tracking document ids (data.audit), not the state dict."""
import json
import math
from collections import Counter
from pathlib import Path

import pytest

from data_pipeline.sources import SourceSpec, build_source
from data_pipeline.stream import UnitPlan, doc_key, key_cursor, key_unit
from data_pipeline.tokenizer import HFTokenizer, train_bpe
from tests.conftest import losses, read_metrics, run_job
from tests.datagen import make_docs, write_jsonl, write_parquet

CHUNK = 800
SEQ = 32


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    write_jsonl(d / "web" / "a.jsonl", make_docs(40, seed=3))
    tok = train_bpe(make_docs(300, seed=4), 400, d / "tok.json")
    return d, tok


def job_args(corpus, *extra):
    d, tok = corpus
    return ["data=jsonl", f"data.path={d / 'web'}", "data.glob=null", f"data.chunk_bytes={CHUNK}", "data.tokenizer.kind=hf",
            f"data.tokenizer.path={tok.path}", "data.audit=true", f"train.seq_len={SEQ}",
            "train.local_batch_size=4", "optim.schedule=constant", "optim.warmup_steps=0", *extra]


def audit(run_dir: Path):
    """{step: Counter(doc key -> tokens)} summed over the DP ranks' files."""
    out = {}
    for f in sorted((run_dir / "data_audit").glob("rank-*.jsonl")):
        for line in f.read_text().splitlines():
            rec = json.loads(line)
            out.setdefault(rec["step"], Counter()).update({int(k): v for k, v in rec["docs"].items()})
    return out


def expected_lengths(corpus, epochs):
    d, tok = corpus
    src = build_source(SourceSpec("jsonl", str(d / "web"), chunk_bytes=CHUNK))
    plan, tok = UnitPlan(len(src.units), 0, 0, True), HFTokenizer(tok.path)
    out = {}
    for g in range(len(src.units) * epochs):
        for c, _, text in src.iter_docs(src.units[plan.unit(g)], 0, lambda *_: None):
            out[doc_key(0, g, c)] = len(tok.encode(text)) + 2
    return out, len(src.units)


def test_resume_is_exact_across_worker_counts(corpus, tmp_path, tok_cache):
    """2 ranks x 2 workers for 8 steps, vs 4 steps then resumed in-process (0 workers):
    the same documents at every step and the same losses, bit for bit."""
    full, split = tmp_path / "full", tmp_path / "split"
    common = job_args(corpus, "checkpoint.interval=4")
    run_job(full, [*common, "train.steps=8", "data.num_workers=2"], tok_cache=tok_cache, nproc=2,
            launcher="torchrun")
    run_job(split, [*common, "train.steps=4", "data.num_workers=2"], tok_cache=tok_cache, nproc=2,
            launcher="torchrun")
    proc = run_job(split, [*common, "train.steps=8", "data.num_workers=0"], tok_cache=tok_cache, nproc=2,
                   launcher="torchrun")
    assert "resumed from step 4" in proc.stderr + proc.stdout
    a, b = audit(full), audit(split)
    assert sorted(a) == sorted(b) == list(range(1, 9))
    assert all(a[s] == b[s] for s in a)
    assert len(set().union(*(a[s] for s in a))) > 20  # many documents went by
    assert losses(full) == losses(split)


def test_elastic_resume_reads_every_document_exactly_once(corpus, tmp_path, tok_cache):
    """Saved with 2 DP ranks x 4 rows x 2 streams (16), resumed as 1 rank x 3 rows x 2
    streams (6): documents neither repeat nor go missing across the change."""
    run = tmp_path / "run"
    common = job_args(corpus, "checkpoint.interval=5", "data.streams_per_row=2")
    run_job(run, [*common, "train.steps=5"], tok_cache=tok_cache, nproc=2, launcher="torchrun")
    expected, n_units = expected_lengths(corpus, epochs=6)
    epoch0 = {k: v for k, v in expected.items() if key_unit(k) < n_units}
    steps = int(2.5 * sum(epoch0.values()) / ((SEQ + 1) * 3))
    proc = run_job(run, [*common, "train.local_batch_size=3", f"train.steps={5 + steps}"], tok_cache=tok_cache)
    assert "resharded from 16 to 6 streams" in proc.stderr + proc.stdout
    seen = Counter()
    for c in audit(run).values():
        seen.update(c)
    assert sum(seen.values()) == 5 * 8 * (SEQ + 1) + steps * 3 * (SEQ + 1)
    assert {k: seen[k] for k in epoch0} == epoch0  # the whole first epoch, each document once
    over = {k: (seen[k], expected.get(k)) for k in seen if seen[k] > expected.get(k, 0)}
    assert not over, f"documents read more than once: {over}"


def test_resume_data_false_keeps_model_optimizer_and_step_and_starts_the_data_afresh(corpus, tmp_path, tok_cache):
    """checkpoint.resume_data=false on a checkpoint of another corpus: the step and tokens
    seen continue, the first batch is a fresh loader's first batch of the new corpus, and
    the model and optimizer are the checkpoint's (the same first loss as a weights-only
    start, then another path: the optimizer moments are restored). Without it the loader
    state is refused naming the knob."""
    d, tok = corpus
    other = tmp_path / "other"
    write_jsonl(other / "b.jsonl", make_docs(30, seed=9))
    first = tmp_path / "first"
    run_job(first, [*job_args(corpus, "checkpoint.interval=4"), "train.steps=4"], tok_cache=tok_cache)
    ckpt = first / "checkpoints" / "step-4"
    moved = [*job_args(corpus, f"data.path={other}", f"checkpoint.load_path={ckpt}"), "train.steps=6"]
    refused = run_job(tmp_path / "refused", moved, tok_cache=tok_cache, check=False)
    assert refused.returncode == 4 and "checkpoint.resume_data=false" in refused.stderr, refused.stderr[-2000:]
    run_job(tmp_path / "afresh", [*moved, "checkpoint.resume_data=false"], tok_cache=tok_cache)
    run_job(tmp_path / "weights", [*moved, "checkpoint.load_weights_only=true", "train.steps=2"], tok_cache=tok_cache)
    a, w, before = read_metrics(tmp_path / "afresh"), read_metrics(tmp_path / "weights"), read_metrics(first)
    assert [m["step"] for m in a] == [5, 6]
    assert a[0]["tokens_seen"] == before[-1]["tokens_seen"] + 4 * SEQ
    assert audit(tmp_path / "afresh")[5] == audit(tmp_path / "weights")[1]  # the new corpus from its start
    assert a[0]["loss"] == w[0]["loss"]  # the checkpoint's weights
    assert a[1]["loss"] != w[1]["loss"]  # its optimizer moments and schedule, not fresh ones


def test_mixture_metrics_and_skipped_records(corpus, tmp_path, tok_cache):
    d, tok = corpus
    write_parquet(tmp_path / "code" / "c.parquet", make_docs(30, seed=8), row_group_size=5)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.jsonl").write_text('{"text": "fine one"}\n{oops\n{"other": 1}\n{"text": "fine two"}\n')
    run = tmp_path / "mix"
    proc = run_job(run, [
        "data=mixture", "data.tokenizer.kind=hf", f"data.tokenizer.path={tok.path}",
        f"data.mixture=[{{name: web, source: jsonl, path: '{d / 'web'}', weight: 3}}, "
        f"{{name: code, source: parquet, path: '{tmp_path / 'code'}', weight: 1}}, "
        f"{{name: bad, source: jsonl, path: '{bad}', weight: 0.1}}]",
        "data.document_masking=true", "data.streams_per_row=2", f"train.seq_len={SEQ}", "train.steps=40",
        "logging.every=20",
    ], tok_cache=tok_cache)
    last = read_metrics(run)[-1]
    total = last["data/tokens/web"] + last["data/tokens/code"] + last["data/tokens/bad"]
    assert total == 40 * 8 * (SEQ + 1)
    assert abs(last["data/share/web"] - 3 / 4.1) < 0.03 and abs(last["data/share/code"] - 1 / 4.1) < 0.03
    assert last["data/skipped"] >= 2  # at least one pass over the bad file's two bad lines
    assert "x.jsonl@byte" in proc.stderr + proc.stdout


def test_training_on_pretokenized_shards_and_refusing_another_tokenizer(corpus, tmp_path, tok_cache):
    from data_pipeline.pretokenize import pretokenize

    d, tok = corpus
    m = pretokenize(SourceSpec("jsonl", str(d / "web")), HFTokenizer(tok.path), tmp_path / "shards", progress=False)
    assert m["dtype"] == "uint16"
    common = ["data=pretokenized", f"data.path={tmp_path / 'shards'}", "data.rows_per_unit=8",
              f"train.seq_len={SEQ}", "train.steps=6", "data.audit=true"]
    run_job(tmp_path / "ok", [*common, "data.tokenizer.kind=hf", f"data.tokenizer.path={tok.path}"],
            tok_cache=tok_cache)
    last = read_metrics(tmp_path / "ok")[-1]
    assert last["data/tokens/pretokenized"] == 6 * 8 * (SEQ + 1)
    # It learned from the shards: from ~ln 512 (6.24, a uniform guess) to 5.82 measured in 6
    # steps; a model that learns nothing stays at ~6.2.
    got = [m["loss"] for m in read_metrics(tmp_path / "ok")]
    assert abs(got[0] - math.log(512)) < 0.05 and got[-1] < got[0] - 0.3, got
    # Keys name the shards' documents: block (unit) and row inside it.
    keys = set().union(*audit(tmp_path / "ok").values())
    assert len(keys) > 10 and all(key_cursor(k) < 8 for k in keys)
    bad = run_job(tmp_path / "bad", [*common, "data.tokenizer.kind=bpe", "data.tokenizer.path=null",
                                      f"data.tokenizer.cache_dir={tmp_path / 'tc'}"], tok_cache=tok_cache, check=False)
    assert bad.returncode == 1  # a data error while building: training failed
    assert "needs a text source" in bad.stderr + bad.stdout
    other = train_bpe(make_docs(50, seed=11), 300, tmp_path / "other.json")
    bad = run_job(tmp_path / "bad2", [*common, "data.tokenizer.kind=hf", f"data.tokenizer.path={other.path}"],
                  tok_cache=tok_cache, check=False)
    assert bad.returncode == 1
    assert f"fingerprint {tok.fingerprint}" in bad.stderr + bad.stdout
    assert f"fingerprint {other.fingerprint}" in bad.stderr + bad.stdout
