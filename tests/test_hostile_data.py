"""Hostile data: corpora in which no record yields a document, truncated compressed
streams, records too large for memory, files that vanish while a job runs, and long
documents tokenized a piece at a time. Real files in temporary folders; the end-to-end
cases run real ``python -m pretrain`` jobs on the tiny model."""
import gzip
import json
import os
import random
import subprocess
import sys
import sysconfig
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import zstandard

import data_pipeline.sources as sources_mod
import data_pipeline.tokenizer as tokenizer_mod
from data_pipeline.loader import LoaderSpec, RankLoader
from data_pipeline.sources import DataError, SourceSpec, build_source
from data_pipeline.runs import EMPTY_UNITS_LIMIT
from data_pipeline.stream import SlotStream, UnitPlan, fresh_slot_state, key_unit
from data_pipeline.tokenizer import HFTokenizer, Llama3Tokenizer, hf_chunkable, split_for_encoding, train_bpe
from tests.conftest import REPO, TINY, _env, read_metrics, run_job
from tests.datagen import make_docs, write_jsonl, write_parquet

MiB = 1 << 20


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    """A small byte-level BPE (tokenizer.json) for the loaders and the jobs."""
    return train_bpe(make_docs(300, seed=4), 400, tmp_path_factory.mktemp("bpe") / "tok.json")


@pytest.fixture(scope="module")
def llama3():
    return Llama3Tokenizer()


def read_all(src, cut=None):
    """(documents, skips as (where, reason)) of every unit in listing order."""
    skips, docs = [], []
    for u in src.units:
        docs += [t for _, _, t in src.iter_docs(u, 0, lambda w, r: skips.append((w, r)), cut)]
    return docs, skips


def stream(srcs, tokenizer, slot=0, slots=1, shuffle=True, state=None):
    srcs = srcs if isinstance(srcs, list) else [srcs]
    plans = [UnitPlan(len(s.units), 0, i, shuffle) for i, s in enumerate(srcs)]
    return SlotStream(srcs, plans, [1.0] * len(srcs), tokenizer, 17, state or fresh_slot_state(slot, slots, len(srcs)))


def job_args(tok, path, *extra):
    return ["data=jsonl", f"data.path={path}", "data.glob=null", "data.tokenizer.kind=hf",
            f"data.tokenizer.path={tok.path}", *extra]


# -- 1. no hang when no record yields a document ----------------------------------------------

def test_a_job_whose_records_all_miss_the_field_fails_fast_naming_the_key(tmp_path, tok, tok_cache):
    """data.field names no field of any record: the loader worker gives up after 64 units
    and the training process fails with the worker's message, exit 1, status failed."""
    data = write_jsonl(tmp_path / "a.jsonl", make_docs(30))
    t0 = time.monotonic()
    proc = run_job(tmp_path / "run", job_args(tok, data, "data.field=nope", "data.num_workers=1"),
                   tok_cache=tok_cache, check=False, timeout=120)
    elapsed = time.monotonic() - t0
    assert proc.returncode == 1, proc.stderr[-3000:]
    n = 30  # every unit of the corpus (one) read without a document: nothing will come
    message = (f"data.field='nope': every unit (1) of data.path='{data}' held "
               f"no document ({n} records read, {n} skipped: no field 'nope' x{n}; the first: {data}@byte0: "
               "no field 'nope'); check data.field / data.path")
    assert f"DataError: {message}" in proc.stderr
    status = json.loads((tmp_path / "run" / "status.json").read_text())
    assert status["status"] == "failed" and status["exit_code"] == 1
    assert status["error"] == f"DataError: {message}"  # the worker's message, nothing around it
    assert elapsed < 60, elapsed  # start-up included; the loader itself gives up in milliseconds


def test_the_empty_unit_rule_counts_only_units_that_could_hold_a_document(tmp_path, tok):
    # Half of the files hold only bad records: no false alarm (0.5**64 per unit).
    half = tmp_path / "half"
    for i in range(8):
        if i % 2:
            (half / f"{i}.jsonl").write_text('{"body": "x"}\n{not json\n')
        else:
            write_jsonl(half / f"{i}.jsonl", make_docs(3, seed=i))
    s = stream(build_source(SourceSpec("jsonl", str(half))), tok)
    for _ in range(1000):  # ~25 epochs of this corpus
        s.next_window()
    assert s.take_skipped() > 150

    # One document spanning 300 byte ranges: ranges inside a line hold no record and do
    # not count, however many come in a row.
    long_doc = tmp_path / "long"
    write_jsonl(long_doc / "a.jsonl", ["word " * 600] + make_docs(2))
    src = build_source(SourceSpec("jsonl", str(long_doc), chunk_bytes=8))
    assert len(src.units) > 4 * EMPTY_UNITS_LIMIT
    s = stream(src, tok, shuffle=False)
    units = set()
    for _ in range(600):  # more than an epoch of this slot's units
        w = s.next_window()
        units.update(key_unit(w[1]).tolist())
    assert max(units) >= len(src.units)

    # Every record bad, for several reasons: an error naming the key, the counts and reasons.
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.jsonl").write_text('{"text": 7}\n{not json\n{"text": 8}\n')
    with pytest.raises(DataError) as e:
        stream(build_source(SourceSpec("jsonl", str(bad))), tok).next_window()
    assert str(e.value) == (
        f"data.field='text': every unit (1) of data.path='{bad}' held no document (3 records "
        f"read, 3 skipped: field 'text' is int, not a string x2, malformed JSON x1; the first: "
        f"{bad / 'a.jsonl'}@byte0: field 'text' is int, not a string); check data.field / data.path")

    # Only blank lines: no record at all, still no document.
    (bad / "a.jsonl").write_text("\n\n\n")
    with pytest.raises(DataError, match=r"^data.path='.*': every unit \(1\) held no document "
                                        r"\(3 records read, 0 skipped; 3 blank lines\); check data.path$"):
        stream(build_source(SourceSpec("jsonl", str(bad))), tok).next_window()

    # A mixture entry whose records all miss the field: named by its own key.
    good = build_source(SourceSpec("jsonl", str(half / "0.jsonl")))
    wrong = build_source(SourceSpec("jsonl", str(half / "2.jsonl"), field="body", key="data.mixture.1."))
    with pytest.raises(DataError, match=r"^data.mixture.1.field='body': every unit \(1\)"):
        s = stream([good, wrong], tok)
        for _ in range(100):
            s.next_window()

    # More units than the limit, none with a document: 64 in a row end it before an epoch.
    many = tmp_path / "many"
    for i in range(EMPTY_UNITS_LIMIT + 6):
        write_jsonl(many / f"{i:03d}.jsonl", ["x"], field="body")
    with pytest.raises(DataError, match=rf"^data.field='text': {EMPTY_UNITS_LIMIT} consecutive units "
                                        rf"\({EMPTY_UNITS_LIMIT} distinct\) of data.path="):
        stream(build_source(SourceSpec("jsonl", str(many))), tok).next_window()

    # Every file gone after listing: the vanished units end the job the same way.
    src = build_source(SourceSpec("jsonl", str(half)))
    for f in half.iterdir():
        f.unlink()
    with pytest.raises(DataError, match=r"^data.path='.*half': every unit \(8\) held no document "
                                        r"\(8 records read, 8 skipped: vanished or unreadable x8; the first: .*"
                                        r"No such file or directory.*\); check data.path$"):
        stream(src, tok).next_window()


def test_blank_lines_count_toward_the_no_document_limit(tmp_path, tok, monkeypatch):
    """A few KB of .jsonl.zst that expand to millions of blank lines: one unit (no random
    access), which took minutes to read (3.5 s per 4 MiB) while the first step waited, with
    nothing counted. Now EMPTY_RECORDS_LIMIT records in a row without a document stop the
    stream, the tokenizer's sample and pretokenize, naming the path and the blank lines
    (the limit lowered here from its 1,000,000: a second of blank lines each time)."""
    import data_pipeline.runs as runs_mod
    from data_pipeline.pretokenize import main as pretokenize_main

    EMPTY_RECORDS_LIMIT = 100_000
    monkeypatch.setattr(runs_mod, "EMPTY_RECORDS_LIMIT", EMPTY_RECORDS_LIMIT)

    path = tmp_path / "blank.jsonl.zst"
    path.write_bytes(zstandard.ZstdCompressor().compress(b"\n" * (EMPTY_RECORDS_LIMIT + 10) + b'{"text": "late"}\n'))
    assert path.stat().st_size < 100_000
    src = build_source(SourceSpec("jsonl", str(path)))
    want = (rf"data.path='{path}': {EMPTY_RECORDS_LIMIT} consecutive records held no document "
            rf"\({EMPTY_RECORDS_LIMIT} records read, 0 skipped; {EMPTY_RECORDS_LIMIT} blank lines\)")
    t0 = time.monotonic()
    with pytest.raises(DataError, match=want):
        stream(src, tok).next_window()
    with pytest.raises(DataError, match=want):
        next(iter(src.iter_texts()))
    assert time.monotonic() - t0 < 60
    assert pretokenize_main(["--source", "jsonl", "--path", str(path), "--tokenizer", "hf", "--tokenizer-path",
                             tok.path, str(tmp_path / "out")]) == 2
    # In a row: a document starts the count over, however many blank lines the unit holds in all.
    spaced = tmp_path / "spaced.jsonl.zst"
    gap = b"\n" * (EMPTY_RECORDS_LIMIT * 6 // 10)
    spaced.write_bytes(zstandard.ZstdCompressor().compress(b'{"text": "a"}\n' + gap + b'{"text": "b"}\n' + gap))
    assert list(build_source(SourceSpec("jsonl", str(spaced))).iter_texts()) == ["a", "b"]
    # Byte ranges inside one long line hold no record: they are not units without a document.
    write_jsonl(tmp_path / "long" / "a.jsonl", ["word " * 600, "short"])
    src = build_source(SourceSpec("jsonl", str(tmp_path / "long"), chunk_bytes=8))
    assert len(src.units) > 64 and list(src.iter_texts()) == ["word " * 600, "short"]


def test_a_loader_state_of_other_files_is_a_mismatch_and_a_moved_corpus_is_not(tmp_path, tok):
    """The loader state records each source's listing (unit labels relative to the folder
    they share): the same number of units of other files (another glob, two mixture paths
    swapped) is a LoaderStateMismatch naming the key, where it resumed silently; the same
    files under another root resume; and so does the same corpus named by another path."""
    import shutil

    from data_pipeline.loader import LoaderStateMismatch

    for name, seed in (("a", 1), ("b", 2)):
        for i in range(3):
            write_jsonl(tmp_path / "corpus" / name / f"{i}.jsonl", make_docs(4, seed=seed * 10 + i))
    shutil.copytree(tmp_path / "corpus", tmp_path / "moved")

    def loader(*paths):
        srcs = [build_source(SourceSpec("jsonl", str(p), key=f"data.mixture.{i}.")) for i, p in enumerate(paths)]
        return RankLoader(srcs, [1.0] * len(srcs), tok, LoaderSpec(seq_len=16, local_batch_size=1, dp_rank=0,
                                                                  dp_world=1, num_workers=0, seed=0, shuffle=True))

    first = loader(tmp_path / "corpus" / "a", tmp_path / "corpus" / "b")
    next(first)
    state = first.state_dict()
    loader(tmp_path / "moved" / "a", tmp_path / "moved" / "b").load_rank_states([state])
    with pytest.raises(LoaderStateMismatch, match=r"data.mixture.0.path='.*corpus/b' lists 3 other units than when "
                                                  r"the checkpoint was written"):
        loader(tmp_path / "corpus" / "b", tmp_path / "corpus" / "a").load_rank_states([state])


@pytest.fixture(scope="module")
def shards(tmp_path_factory, tok):
    """A pretokenized folder of 2 shards made by the tool."""
    from data_pipeline.pretokenize import pretokenize

    d = tmp_path_factory.mktemp("shards")
    write_jsonl(d / "a.jsonl", make_docs(40, seed=11))
    m = pretokenize(SourceSpec("jsonl", str(d / "a.jsonl")), tok, d / "out", shard_tokens=500, progress=False)
    assert len(m["shards"]) >= 2
    return d / "out"


MANIFEST_EDITS = [  # (what, edit of the manifest, the field named)
    ("n_docs past any memory", lambda m: m["shards"][0].update(n_docs=10**13), r"shards\[0\]\.n_docs is 10000000000000"),
    ("n_docs past the index", lambda m: m["shards"][1].update(n_docs=m["shards"][1]["n_docs"] + 1),
     r"shards\[1\]\.n_docs is \d+, but index-00001.npy holds int64 of shape"),
    ("an absolute tokens path", lambda m: m["shards"][0].update(tokens="/etc/hostname"), r"shards\[0\]\.tokens is "
     r"'/etc/hostname': expected the name of a file in"),
    ("an index outside the folder", lambda m: m["shards"][0].update(index="../x.npy"), r"shards\[0\]\.index is "
     r"'\.\./x\.npy'"),
    ("a token count the file does not hold", lambda m: m["shards"][0].update(n_tokens=m["shards"][0]["n_tokens"] - 1),
     r"shards\[0\]\.n_tokens is \d+, but tokens-00000.bin holds"),
    ("another dtype", lambda m: m.update(dtype="float64"), r"dtype is 'float64', expected uint16 or uint32"),
    ("a vocabulary past the dtype", lambda m: m["tokenizer"].update(vocab_size=10**6), r"tokenizer must hold"),
    ("negative counts", lambda m: m["shards"][0].update(n_tokens=-5), r"shards\[0\] must hold n_docs and n_tokens"),
    ("not shards", lambda m: m.update(shards={"0": 1}), r"shards is not a list"),
    ("a shard listed twice", lambda m: m["shards"].append(dict(m["shards"][0])),
     r"shards\[\d+\]\.tokens is 'tokens-00000.bin', already shards\[0\]\.tokens"),
    ("totals that are not the shards'", lambda m: m.update(n_docs=10**15), r"n_docs is 1000000000000000, but the "
     r"shards hold \d+"),
    ("no format", lambda m: (m.clear(), m.update({"x": 1})), r"format is None"),
]


@pytest.mark.parametrize("what,edit,field", MANIFEST_EDITS, ids=[w for w, _, _ in MANIFEST_EDITS])
def test_a_pretokenized_manifest_is_checked_against_its_files(shards, tmp_path, what, edit, field):
    """A crafted or damaged manifest.json is refused when the source is built, before any
    step, naming the file and the field (n_docs=10**13 built its unit list until memory ran
    out; n_docs above the index was an IndexError; paths outside the folder were read)."""
    import shutil

    folder = tmp_path / "shards"
    shutil.copytree(shards, folder)
    m = json.loads((folder / "manifest.json").read_text())
    edit(m)
    (folder / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ValueError, match=rf"{folder / 'manifest.json'}: {field}"):
        build_source(SourceSpec("pretokenized", str(folder)))


def test_token_ids_past_the_vocabulary_are_skipped_naming_the_document(shards, tmp_path, tok):
    """A shard whose token ids reach past the vocabulary (they reached the embedding as an
    IndexError naming no file), or whose index points past its tokens: that document is a
    counted skip naming the shard and the document; the others are read. A manifest that
    claims another vocabulary for the same tokenizer is refused before training."""
    import shutil

    from parallel.env import LaunchEnv
    from pretrain.tokenizers import load_tokenizer
    from tests.conftest import compose_job

    folder = tmp_path / "shards"
    shutil.copytree(shards, folder)
    clean = read_all(build_source(SourceSpec("pretokenized", str(folder))))[0]
    toks = np.fromfile(folder / "tokens-00000.bin", dtype=np.uint16)
    toks[3] = 60000
    toks.tofile(folder / "tokens-00000.bin")
    index = np.load(folder / "index-00001.npy")
    index[2] = index[-1] + 7  # document 1 ends, and document 2 starts, past the tokens
    np.save(folder / "index-00001.npy", index)
    src = build_source(SourceSpec("pretokenized", str(folder)))
    docs, skips = read_all(src)
    assert len(docs) == len(clean) - 3 and len(skips) == 3, skips
    assert skips[0] == (f"{folder / 'tokens-00000.bin'}#doc0", "token id 60000 >= the tokenizer's vocabulary 400 "
                                                                "(a damaged shard)")
    assert all("outside the shard's" in why and "tokens-00001.bin#doc" in where for where, why in skips[1:])
    m = json.loads((folder / "manifest.json").read_text())
    m["tokenizer"]["vocab_size"] = 401
    (folder / "manifest.json").write_text(json.dumps(m))
    cfg = compose_job("data=pretokenized", f"data.path={folder}", "data.tokenizer.kind=hf",
                      f"data.tokenizer.path={tok.path}")
    env = LaunchEnv(rank=0, world_size=1, local_rank=0, local_world_size=1, master_addr="", master_port=0,
                    launcher="single")
    with pytest.raises(ValueError, match=r"manifest.json tokenizer.vocab_size=401, but the tokenizer of that "
                                         r"fingerprint has 400 tokens"):
        load_tokenizer(cfg.data, [build_source(SourceSpec("pretokenized", str(folder)))], env)


def test_a_worker_process_data_error_reaches_the_caller_intact(tmp_path, tok):
    data = write_jsonl(tmp_path / "a.jsonl", make_docs(5))
    src = build_source(SourceSpec("jsonl", str(data), field="nope"))
    loader = RankLoader([src], [1.0], tok, LoaderSpec(seq_len=16, local_batch_size=2, dp_rank=0, dp_world=1,
                                                      num_workers=2, seed=0, shuffle=True, streams_per_row=2))
    with pytest.raises(DataError) as e:
        next(loader)
    assert str(e.value).startswith("data.field='nope': every unit (1)")
    assert str(e.value).endswith("check data.field / data.path")
    loader.close()


# -- truncated compressed streams ------------------------------------------------------------------

def _complete_lines(prefix: bytes) -> int:
    return prefix.count(b"\n")


@pytest.mark.parametrize("kind", ["gz", "zst", "zst-2-frames"])
def test_a_truncated_compressed_file_yields_the_documents_before_the_cut_and_counts_a_skip(tmp_path, tok, kind):
    docs = make_docs(3000)  # 750 kB: several zstd blocks
    data = "".join(json.dumps({"text": d}) + "\n" for d in docs).encode()
    path = tmp_path / ("a.jsonl.gz" if kind == "gz" else "a.jsonl.zst")
    if kind == "gz":
        blob = gzip.compress(data)
    elif kind == "zst":
        blob = zstandard.ZstdCompressor().compress(data)
    else:  # two frames (zstd -c a b > c); the cut falls in the second
        mid = data.index(b"\n", len(data) // 2) + 1
        blob = zstandard.ZstdCompressor().compress(data[:mid]) + zstandard.ZstdCompressor().compress(data[mid:])
        path.write_bytes(blob)
        assert read_all(build_source(SourceSpec("jsonl", str(path)))) == (docs, [])  # whole: both frames
    cut = blob[:int(len(blob) * 0.8)]
    path.write_bytes(cut)
    if kind == "gz":
        prefix = zlib.decompressobj(wbits=31).decompress(cut)
    else:
        prefix, rest = b"", cut
        while rest:
            d = zstandard.ZstdDecompressor().decompressobj()
            prefix += d.decompress(rest)
            rest = d.unused_data if d.eof else b""
    src = build_source(SourceSpec("jsonl", str(path)))
    got, skips = read_all(src)
    assert 0 < len(got) < len(docs)
    assert got == docs[:_complete_lines(prefix)]  # every whole line decoded before the cut
    reason = "truncated zstd stream" if kind != "gz" else (
        "unreadable compressed stream (Compressed file ended before the end-of-stream marker was reached)")
    assert skips == [(str(path), reason)]
    # Through a slot: epoch after epoch the same documents, the skip counted each time.
    s = stream(src, tok)
    units = set()
    while len(units) < 3:
        units.update(key_unit(s.next_window()[1]).tolist())
    assert s.take_skipped() >= 2


# -- 2. bounded records: data.max_doc_bytes ----------------------------------------------------------

class _ReadSpy:
    """A binary file that records the largest piece any read returned."""

    def __init__(self, f, sizes):
        self._f, self._sizes = f, sizes

    def _note(self, b):
        self._sizes.append(len(b))
        return b

    def read(self, *a):
        return self._note(self._f.read(*a))

    def readline(self, *a):
        return self._note(self._f.readline(*a))

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


@pytest.mark.parametrize("name", ["a.jsonl", "a.jsonl.gz", "a.jsonl.zst"])
def test_jsonl_lines_over_max_doc_bytes_are_skipped_in_bounded_reads(tmp_path, name, monkeypatch):
    limit = 1000
    docs = make_docs(40, seed=7)
    fit = "f" * (limit - len('{"text": ""}'))  # a line of exactly limit bytes: kept
    over = fit + "g"  # limit + 1: skipped
    huge = "h" * 100_000
    texts = [huge] + docs[:10] + [fit, over] + docs[10:30] + [huge] + docs[30:] + [over]
    path = tmp_path / name
    lines = "".join(json.dumps({"text": t}) + "\n" for t in texts).encode()
    path.write_bytes(gzip.compress(lines) if name.endswith(".gz") else
                     zstandard.ZstdCompressor().compress(lines) if name.endswith(".zst") else lines)
    src = build_source(SourceSpec("jsonl", str(tmp_path), chunk_bytes=700, max_doc_bytes=limit))
    sizes = []
    monkeypatch.setattr(sources_mod, "_SCAN_BYTES", 4096)
    monkeypatch.setattr(sources_mod, "open_binary", lambda fs, p: _ReadSpy(open(p, "rb"), sizes))
    got, skips = read_all(src)
    assert got == docs[:10] + [fit] + docs[10:30] + docs[30:]
    lengths = [len(json.dumps({"text": t})) + 1 for t in (huge, over, huge, over)]
    assert [r for _, r in skips] == [f"longer than data.max_doc_bytes={limit} ({n} bytes)" for n in lengths]
    if name == "a.jsonl":
        assert [w.split("@")[0] for w, _ in skips] == [str(path)] * 4
        assert len(src.units) > 100 and max(sizes) <= 4096  # never the 100 kB line at once
    # Resuming at any document's cursor inside its unit gives the rest of that unit.
    for u in src.units:
        seen = list(src.iter_docs(u, 0, lambda *_: None))
        for k, (c, _, t) in enumerate(seen):
            assert [x for _, _, x in src.iter_docs(u, c, lambda *_: None)] == [x for _, _, x in seen[k:]]
            assert src.read_one(u, c) == t


def test_text_cells_and_files_over_max_doc_bytes_are_cut_at_a_character_boundary(tmp_path, tok):
    import datasets

    limit = 1000
    docs = make_docs(12, seed=3)
    docs[3] = "é" * 600 + "x"  # 1201 bytes -> 500 é (1000 bytes)
    docs[7] = "a" + "🦙" * 400  # 1601 bytes -> a + 249 llamas (997 bytes: no half llama)
    expect = list(docs)
    expect[3], expect[7] = "é" * 500, "a" + "🦙" * 249
    write_parquet(tmp_path / "pq" / "a.parquet", docs, row_group_size=5)
    datasets.Dataset.from_dict({"text": docs}).save_to_disk(str(tmp_path / "hf"))
    for i in (2, 3, 7):
        (tmp_path / "txt").mkdir(exist_ok=True)
        (tmp_path / "txt" / f"{i:02d}.txt").write_text(docs[i])
    for kind, path, want, where in [("parquet", tmp_path / "pq", expect, ["#rowgroup0:row3", "#rowgroup1:row2"]),
                                    ("hf_dataset", tmp_path / "hf", expect, [":row3", ":row7"]),
                                    ("text_folder", tmp_path / "txt", [expect[i] for i in (2, 3, 7)],
                                     ["03.txt", "07.txt"])]:
        src = build_source(SourceSpec(kind, str(path), max_doc_bytes=limit))
        cut = []
        got, skips = read_all(src, cut.append)
        assert (got, skips) == (want, []), kind
        assert len(cut) == 2 and all(c.endswith(w) for c, w in zip(cut, where)), (kind, cut)
        assert all(len(t.encode()) <= limit for t in got)
    # The loader counts them in every batch's truncated_docs, once per document.
    src = build_source(SourceSpec("parquet", str(tmp_path / "pq"), max_doc_bytes=limit))
    loader = RankLoader([src], [1.0], tok, LoaderSpec(seq_len=16, local_batch_size=1, dp_rank=0, dp_world=1,
                                                      num_workers=0, seed=0, shuffle=False, streams_per_row=1))
    counts = []
    while True:
        batch = next(loader)
        assert isinstance(batch["truncated_docs"], int)
        if key_unit(batch["window_doc_ids"]).max() >= len(src.units):  # the second epoch began
            break
        counts.append(batch["truncated_docs"])
    assert sum(counts) == 2 and max(counts) == 1


def test_pretokenize_and_chat_records_obey_max_doc_bytes(tmp_path, tok):
    from data_pipeline.pretokenize import main as pretokenize_main

    docs = make_docs(20, seed=8)
    write_jsonl(tmp_path / "web" / "a.jsonl", docs[:10] + ["z" * 5000] + docs[10:])
    assert pretokenize_main(["--source", "jsonl", "--path", str(tmp_path / "web"), "--tokenizer", "hf",
                             "--tokenizer-path", tok.path, "--max-doc-bytes", "1000", str(tmp_path / "out")]) == 0
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert (manifest["n_docs"], manifest["skipped"], manifest["source"]["max_doc_bytes"]) == (20, 1, 1000)
    def conv(text):
        return {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": text}]}

    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(conv(t)) + "\n" for t in ["short", "y" * 5000, "ok"]))
    src = build_source(SourceSpec("jsonl", str(tmp_path / "chat.jsonl"), format="chat", max_doc_bytes=1000))
    got, skips = read_all(src)
    assert [c[-1][1] for c in got] == ["short", "ok"]
    n = len(json.dumps(conv("y" * 5000))) + 1
    assert [r for _, r in skips] == [f"longer than data.max_doc_bytes=1000 ({n} bytes)"]


def test_pretokenize_never_deletes_what_it_did_not_write(tmp_path, tok, capsys):
    """An output folder that holds the input is refused, --overwrite or not (it deleted the
    input, then reported "no such file"); --overwrite removes only the files an earlier run
    of the tool wrote (shards, indexes, the manifest), not a user's notes beside them."""
    from data_pipeline.pretokenize import main as pretokenize_main

    corpus = tmp_path / "corpus"
    write_jsonl(corpus / "web" / "a.jsonl", make_docs(10, seed=9))
    args = ["--source", "jsonl", "--tokenizer", "hf", "--tokenizer-path", tok.path]
    for out in (corpus, corpus / "web", corpus / "web" / "a.jsonl"):
        assert pretokenize_main([*args, "--path", str(corpus / "web"), "--overwrite", str(out)]) == 2
        assert "contains the input" in capsys.readouterr().err
    assert (corpus / "web" / "a.jsonl").stat().st_size > 0
    out = tmp_path / "out"
    assert pretokenize_main([*args, "--path", str(corpus / "web"), str(out)]) == 0
    (out / "NOTES.md").write_text("mine")
    (out / "tokens-2023-notes.bin").write_text("mine too")  # not a shard's name
    first = sorted(p.name for p in out.iterdir())
    assert pretokenize_main([*args, "--path", str(corpus / "web"), str(out)]) == 2  # not empty
    bad_tok = ["--source", "jsonl", "--tokenizer", "hf", "--tokenizer-path", str(tmp_path / "nope.json")]
    assert pretokenize_main([*bad_tok, "--path", str(corpus / "web"), "--overwrite", str(out)]) == 2
    assert sorted(p.name for p in out.iterdir()) == first  # nothing removed before the tokenizer loaded
    assert pretokenize_main([*args, "--path", str(corpus / "web"), str(out / "NOTES.md")]) == 2  # a file
    assert "exists and is not a folder" in capsys.readouterr().err
    write_jsonl(corpus / "web" / "a.jsonl", make_docs(3, seed=10))
    assert pretokenize_main([*args, "--path", str(corpus / "web"), "--overwrite", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == first and (out / "NOTES.md").read_text() == "mine"
    assert json.loads((out / "manifest.json").read_text())["n_docs"] == 3


@pytest.mark.parametrize("key", ["data.max_doc_bytes", "data.mixture.0.max_doc_bytes", "eval.data.max_doc_bytes"])
def test_max_doc_bytes_is_a_knob_of_every_source_and_must_be_positive(key, tmp_path):
    from pretrain.tokenizers import build_sources
    from pretrain.validate import ConfigError, validate_job
    from tests.conftest import compose_job

    data = write_jsonl(tmp_path / "a.jsonl", make_docs(3))
    extra = {"data.max_doc_bytes": ["data=jsonl", f"data.path={data}", "model.vocab_size=128256"],
             "data.mixture.0.max_doc_bytes": ["data=mixture", f"data.mixture.0.path={data}",
                                              "data.mixture.1.source=jsonl", f"data.mixture.1.path={data}",
                                              "model.vocab_size=128256"],
             "eval.data.max_doc_bytes": ["eval.data.source=jsonl", f"eval.data.path={data}"]}[key]
    cfg = compose_job(*extra, f"{key}=1000")
    validate_job(cfg, 1)  # a valid job: what fails below is the 0
    section = cfg.eval.data if key.startswith("eval") else cfg.data
    srcs, _, _ = build_sources(section, prefix="eval.data." if key.startswith("eval") else "data.")
    assert srcs[0].spec.max_doc_bytes == 1000  # reaches the source
    with pytest.raises(ConfigError, match=rf"{key}=0: expected an integer in \[1, 1073741824\]"):
        validate_job(compose_job(*extra, f"{key}=0"), 1)
    with pytest.raises(ValueError, match="data.max_doc_bytes=0: must be > 0"):
        build_source(SourceSpec("jsonl", "/nowhere", max_doc_bytes=0))


def test_a_200mb_record_is_skipped_by_a_real_job_in_bounded_memory(tmp_path, tok, tok_cache):
    """One 200 MB JSONL line (over the default data.max_doc_bytes, 64 MiB) among normal
    records, the loader in the training process: the line is stepped over in 1 MiB reads.
    Loading it would cost at least its 200 MB (then decoding, tokenizing: GBs)."""
    path = tmp_path / "big.jsonl"
    normal = make_docs(6000, seed=5)
    with open(path, "wb") as f:
        i = 0
        while f.tell() < MiB:  # unit 0 (data.chunk_bytes = 1 MiB): normal records
            f.write(json.dumps({"text": normal[i]}).encode() + b"\n")
            i += 1
        f.write(b'{"text": "')  # starts in unit 1
        block = b"lorem ipsum " * (MiB // 12)
        for _ in range(200 * MiB // len(block)):
            f.write(block)
        f.write(b'"}\n')
        for t in normal[i:i + 200]:
            f.write(json.dumps({"text": t}).encode() + b"\n")
    assert path.stat().st_size > 200 * MiB
    # Two streams on one row, unshuffled: lane 0 reads unit 0 at steps 1, 3, 5; lane 1 reads
    # unit 1 (the line) at step 2. Step 1's memory is the job's own.
    run = tmp_path / "run"
    try:
        run_job(run, job_args(tok, path, "data.num_workers=0", "data.shuffle=false", "data.streams_per_row=2",
                              "train.local_batch_size=1", "train.steps=5"), tok_cache=tok_cache, timeout=120)
    finally:
        path.unlink()  # pytest keeps the last runs' temporary folders
    metrics = read_metrics(run)
    first, peak = metrics[0]["mem_gb"], max(m["mem_gb"] for m in metrics)
    assert metrics[-1]["data/skipped"] == 1
    assert peak - first < 64 / 1024, (first, peak)  # < 64 MiB for a 200 MB line
    assert peak < 2.0, peak
    log = (run / "pretrain.log").read_text() if (run / "pretrain.log").exists() else ""
    assert "longer than data.max_doc_bytes=67108864" in log


# -- tokenizing long documents a piece at a time ------------------------------------------------

def _stdlib_text(max_chars):
    out, n = [], 0
    for f in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        out.append(f.read_text(encoding="utf-8", errors="replace"))
        n += len(out[-1])
        if n >= max_chars:
            break
    return "".join(out)[:max_chars]


def _adversarial_text(n_pieces, seed=0):
    """Newlines in runs and after spaces, CRLF, digits, contractions, punctuation before
    newlines, letters of every kind after newlines, numerals that are not digits."""
    rng = random.Random(seed)
    bits = ["\n", "\n\n\n", " \n", "  \n  ", "\r\n", "\r\n\r\n", "x\n", "\nWord", "\n\nAb", " \n B", "it's",
            "'ll", "'S", "\n'd", " 123", "45678", "\n9x", "!\n", "?!\nq", "...\n\n", ")\n", "\t\n", "\nǅ",
            "\nⅧ", "²\nb", "\x1c\nz", "\u2028\nk", "\u00a0\nm", "中文\n字", "é\nè", "🦙\n🦙", "a" * 3,
            " the", " ", "  ", "_\nn", "\n_", "'\ns", "\n\u200bx"]
    return "".join(rng.choice(bits) for _ in range(n_pieces))


class _CallSpy:
    """A tokenizer backend that records the characters of every call."""

    def __init__(self, inner, method, calls):
        self._inner, self._method, self._calls = inner, method, calls

    def __getattr__(self, name):
        attr = getattr(self._inner, name)
        if name != self._method:
            return attr

        def spy(texts, *a, **kw):
            self._calls.append(sum(len(t) for t in texts))
            return attr(texts, *a, **kw)
        return spy


@pytest.fixture(scope="module")
def code_bpe(tmp_path_factory):
    """A byte-level BPE trained on code and the adversarial text: its merges span runs of
    spaces and newlines, where a wrong cut would change the tokens."""
    texts = [_stdlib_text(400_000), _adversarial_text(20_000, seed=9)]
    return train_bpe(texts, 1500, tmp_path_factory.mktemp("code_bpe") / "tok.json")


@pytest.mark.parametrize("which", ["llama3", "bpe"])
def test_long_documents_tokenize_in_pieces_exactly_as_whole(which, llama3, code_bpe, monkeypatch):
    if which == "llama3":
        t, backend, method = llama3, "_enc", "encode_batch"
        whole = lambda s: llama3._enc.encode_ordinary(s)  # noqa: E731
        texts = [_stdlib_text(4_000_000), _adversarial_text(300_000)]
    else:
        t, backend, method = code_bpe, "_tok", "encode_batch_fast"
        whole = lambda s: code_bpe._tok.encode(s, add_special_tokens=False).ids  # noqa: E731
        texts = [_stdlib_text(1_500_000), _adversarial_text(100_000)]
    assert t.chunkable if which == "bpe" else True
    assert {"ĠĠĊ", "ĊĠĠĠ"} <= set(code_bpe._tok.get_vocab()) or which == "llama3"
    refs = [np.asarray(whole(s), dtype=np.uint32) for s in texts]
    calls = []
    monkeypatch.setattr(t, backend, _CallSpy(getattr(t, backend), method, calls))
    for chunk in (tokenizer_mod.ENCODE_CHUNK_CHARS, 3000):
        monkeypatch.setattr(tokenizer_mod, "ENCODE_CHUNK_CHARS", chunk)
        calls.clear()
        flat, off = t.encode_batch(["head", *texts, "tail"])
        for j, ref in enumerate(refs, start=1):
            assert np.array_equal(flat[off[j]:off[j + 1]], ref), (which, chunk, j)
        if chunk == 3000:  # many cuts (pieces grow over stretches of indented code without a safe point)
            assert len(calls) > 300, len(calls)
        else:  # real text: no tokenizer call over ~1 MB
            assert len(calls) >= 3 and max(calls) <= 1.5 * chunk, (len(calls), max(calls))


def test_pieces_end_only_at_safe_points_and_grow_where_there_is_none():
    # No safe point for ~50k characters: every line starts with a space, a digit or a
    # newline, or follows a space; then one ("end\nStart").
    bad = "    x = 1\n 2\n\n\nfoo \nbar\n9 z \n" * 2000
    text = "ab\ncd\n" * 10 + bad + "end\nStart" + bad
    pieces = list(split_for_encoding(text, 1000))
    assert "".join(pieces) == text
    for p in pieces[1:]:
        assert p[0].isalpha() and p[0] != "_"
    starts = np.cumsum([0] + [len(p) for p in pieces[:-1]])
    assert all(text[s - 1] == "\n" and not text[s - 2].isspace() for s in starts[1:])
    assert [len(p) for p in pieces][:1] == [len("ab\ncd\n" * 10) + len(bad) + 4]  # grew to the next safe point
    assert list(split_for_encoding("short")) == ["short"]


def test_which_tokenizer_json_is_cut_into_pieces(tmp_path):
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers

    def spec(pre, normalizer=None, added=()):
        t = Tokenizer(models.BPE())
        t.pre_tokenizer = pre
        if normalizer is not None:
            t.normalizer = normalizer
        t.add_special_tokens(list(added) or ["<|begin_of_text|>", "<|end_of_text|>"])
        return json.loads(t.to_str())

    from tokenizers import AddedToken

    llama = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(tokenizer_mod.LLAMA3_PATTERN), "isolated"),
                                     pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    assert hf_chunkable(spec(llama))  # Llama 3's tokenizer.json
    assert hf_chunkable(spec(pre_tokenizers.ByteLevel(add_prefix_space=False)))  # GPT-2 style, the trained bpe
    assert not hf_chunkable(spec(pre_tokenizers.ByteLevel(add_prefix_space=True)))
    assert not hf_chunkable(spec(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)))
    assert not hf_chunkable(spec(pre_tokenizers.ByteLevel(add_prefix_space=False), normalizers.NFC()))
    assert not hf_chunkable(spec(pre_tokenizers.Whitespace()))
    assert not hf_chunkable(spec(pre_tokenizers.Sequence([pre_tokenizers.Digits(), pre_tokenizers.ByteLevel(
        add_prefix_space=False)])))
    assert not hf_chunkable(spec(llama, added=[AddedToken("<x>", lstrip=True)]))
    assert not hf_chunkable(spec(llama, added=["\nline"]))
    # A Llama 3 style tokenizer.json trained here: pieces give the whole document's tokens.
    t = Tokenizer(models.BPE())
    t.pre_tokenizer = llama
    t.train_from_iterator(make_docs(300, seed=1) + [_adversarial_text(3000, seed=2)],
                          trainers.BpeTrainer(vocab_size=600, special_tokens=["<|begin_of_text|>", "<|end_of_text|>"],
                                              initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                              show_progress=False))
    t.save(str(tmp_path / "tokenizer.json"))
    hf = HFTokenizer(tmp_path / "tokenizer.json")
    assert hf.chunkable
    text = _adversarial_text(60_000, seed=3) + _stdlib_text(300_000)
    old = tokenizer_mod.ENCODE_CHUNK_CHARS
    try:
        tokenizer_mod.ENCODE_CHUNK_CHARS = 2000
        flat, off = hf.encode_batch([text])
    finally:
        tokenizer_mod.ENCODE_CHUNK_CHARS = old
    assert flat.tolist() == hf.encode(text)


# -- 3. files that vanish --------------------------------------------------------------------------

def test_a_vanished_file_is_a_counted_skip_and_a_vanished_fragment_is_dropped(tmp_path, tok, caplog):
    d = tmp_path / "c"
    write_jsonl(d / "a.jsonl", ["alpha beta gamma " * 40, "delta " * 50])  # long: split across windows
    write_jsonl(d / "b.jsonl", make_docs(30, seed=2))
    src = build_source(SourceSpec("jsonl", str(d)))
    s = stream(src, tok, shuffle=False)
    s.next_window()
    state = json.loads(json.dumps(s.state_dict()))
    assert any("ref" in fr for fr in state["packer"])  # the rest of a.jsonl's first document
    os.remove(d / "a.jsonl")
    _, skips = read_all(src)
    assert skips == [(f"{d / 'a.jsonl'}[0:{src.units[0][2]}]",
                      f"vanished or unreadable ([Errno 2] No such file or directory: '{d / 'a.jsonl'}')")]
    with caplog.at_level("WARNING", logger="data_pipeline"):
        resumed = stream(src, tok, shuffle=False, state=state)  # no crash: the fragment is dropped
        keys = key_unit(resumed.next_window()[1]).tolist()
    assert "dropped the rest of a document" in caplog.text and "vanished or unreadable" in caplog.text
    assert keys == [1] * len(keys)  # b.jsonl, unit 1
    assert resumed.take_skipped() == 1  # the rest of a.jsonl's unit: vanished


def test_a_file_deleted_while_a_real_job_runs_is_skipped_and_the_job_finishes(tmp_path, tok, tok_cache):
    """One stream reads f00, f01, ... in order, 32 documents per read-ahead: step 1 reads
    f00..f07 (4 documents each, ~70 tokens apiece), the next read-ahead (~130 steps of 17
    tokens later) f08 on. f08 and f09 are deleted once step 1 is logged: two units vanish,
    and the run goes on through f10 within its first epoch."""
    corpus = tmp_path / "corpus"
    docs = make_docs(4 * 14, seed=11, min_words=40, max_words=60)
    for i in range(14):
        write_jsonl(corpus / f"f{i:02d}.jsonl", docs[4 * i:4 * i + 4])
    run = tmp_path / "run"
    args = [*TINY, f"data.tokenizer.cache_dir={tok_cache}",
            *job_args(tok, corpus, "data.glob=*.jsonl", "data.num_workers=0", "data.shuffle=false",
                      "data.streams_per_row=1", "train.local_batch_size=1", "train.seq_len=16", "train.steps=150"),
            f"hydra.run.dir={run}"]
    proc = subprocess.Popen([sys.executable, "-m", "pretrain", *args], cwd=REPO, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        metrics, deadline = run / "metrics.jsonl", time.monotonic() + 90
        while not (metrics.exists() and metrics.read_text().strip()):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.005)
        (corpus / "f08.jsonl").unlink()
        (corpus / "f09.jsonl").unlink()
        steps_then = len(metrics.read_text().splitlines())
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-3000:]
    assert steps_then < 100, steps_then  # the deletion came well before f08 was due
    m = read_metrics(run)
    assert m[-1]["step"] == 150 and m[-1]["data/skipped"] == 2
    counted_at = min(row["step"] for row in m if row["data/skipped"] == 2)
    assert steps_then < counted_at, (steps_then, counted_at)
    print(f"deleted after step {steps_then}, counted at step {counted_at}")
    assert f"vanished or unreadable ([Errno 2] No such file or directory: '{corpus / 'f08.jsonl'}')" in err + out
    assert json.loads((run / "status.json").read_text())["status"] == "completed"


def test_hostile_loader_states_and_failures_of_the_graph(tmp_path):
    """Loader states that would misplace streams or documents are refused at load naming
    the field; a state whose document is gone fails the first batch with that reason
    (0 and 2 threads), close() then succeeds, and the loader hands out nothing more (a
    retry would have replayed batches: its position after the last batch is lost)."""
    import copy

    from data_pipeline.stream import doc_key

    write_jsonl(tmp_path / "a.jsonl", make_docs(80, seed=1, max_words=40))
    src = build_source(SourceSpec("jsonl", str(tmp_path / "a.jsonl"), chunk_bytes=1500))
    tok = Llama3Tokenizer()

    def loader(workers, rank=0, world=1):
        return RankLoader([src], [1.0], tok, LoaderSpec(seq_len=24, local_batch_size=2, dp_rank=rank,
                                                        dp_world=world, num_workers=workers, seed=0, shuffle=True,
                                                        streams_per_row=2))

    ranks = [loader(0, r, 2) for r in (0, 1)]
    for ld in ranks:
        for _ in range(3):
            next(ld)
    good = json.loads(json.dumps([ld.state_dict() for ld in ranks]))
    frag = next(i for i, st in enumerate(good[0]["rows"][0]["slots"]) if st["packer"])

    def hostile(edit):
        bad = copy.deepcopy(good)
        edit(bad)
        return bad

    def bump_key(b):
        b[0]["rows"][0]["slots"][frag]["packer"][0]["key"] += 1

    cases = {
        "a fragment's key is not its document's": bump_key,
        "stream 2 saved where stream 0 belongs": lambda b: b[0]["rows"].reverse(),
        "disagree on num_slots": lambda b: b[1].update(streams_per_row=4),
        "do not make num_slots": lambda b: b[0].update(dp_rank=7),
        "one per stream of the row, next among them": lambda b: b[0]["rows"][0].update(next=9),
        "malformed reader position": lambda b: b[0]["rows"][0]["slots"][0]["readers"][0].update(next=1 << 40),
    }
    for want, edit in cases.items():
        with pytest.raises(ValueError, match=want):
            loader(0).load_rank_states(hostile(edit))

    def gone(b):  # a reference to a line that holds no document any more
        fr = b[0]["rows"][0]["slots"][frag]["packer"][0]
        fr["ref"]["c"] += 1
        fr["key"] = doc_key(fr["ref"]["src"], fr["ref"]["g"], fr["ref"]["c"])

    for workers in (0, 2):
        ld = loader(workers, 0, 2)
        ld.load_rank_states(hostile(gone))
        with pytest.raises(RuntimeError, match="no document at cursor .* the data changed since the checkpoint"):
            next(ld)
        ld.close()
        with pytest.raises(RuntimeError, match="failed earlier .* resume from the last checkpoint"):
            next(ld)
        with pytest.raises(RuntimeError, match="failed earlier"):
            ld.state_dict()
