"""Data pipeline units: sources and their bad input, tokenizers, packing, slot streams
(exact resume and resharding), worker loaders, pretokenized shards, document masking."""
import json
import re
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
import torch

from data_pipeline.loader import LoaderSpec, RankLoader, listing_skips
from data_pipeline.packing import Packer, pack_all, positions
from data_pipeline.sources import BLANK, SourceSpec, build_source
from data_pipeline.stream import (SlotStream, UnitPlan, doc_key, fresh_slot_state, key_cursor, key_source,
                                  key_unit, reshard)
from data_pipeline.tokenizer import HFTokenizer, Llama3Tokenizer, TiktokenTokenizer, train_bpe, write_tiktoken_model
from data_pipeline.tokenizer import main as tokenizer_main
from tests.conftest import REPO
from tests.datagen import make_docs, write_jsonl, write_parquet


def all_docs(source):
    return [text for u in source.units for _, _, text in source.iter_docs(u, 0, lambda *_: None)]


@pytest.fixture(scope="module")
def llama3():
    return Llama3Tokenizer()


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    return train_bpe(make_docs(200, seed=99), 400, tmp_path_factory.mktemp("bpe") / "tok.json")


# -- sources -------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["a.jsonl", "a.jsonl.gz", "a.jsonl.zst"])
def test_jsonl_sources_read_every_record_and_resume_by_cursor(tmp_path, name):
    docs = make_docs(40)
    write_jsonl(tmp_path / name, docs)
    src = build_source(SourceSpec("jsonl", str(tmp_path), chunk_bytes=2500))
    assert all_docs(src) == docs
    if not name.endswith(("gz", "zst")):
        assert len(src.units) > 3  # plain files split into byte ranges
    # Resume at the cursor of the 3rd document of the first unit: the rest of that unit.
    u = src.units[0]
    seen = list(src.iter_docs(u, 0, lambda *_: None))
    rest = [t for _, _, t in src.iter_docs(u, seen[2][0], lambda *_: None)]
    assert rest == [t for _, _, t in seen[2:]]
    assert src.read_one(u, seen[3][0]) == seen[3][2]


def test_text_folder_parquet_and_hf_dataset_sources(tmp_path):
    import datasets

    docs = make_docs(30)
    for i, d in enumerate(docs[:5]):
        (tmp_path / "txt" / "sub").mkdir(parents=True, exist_ok=True)
        (tmp_path / "txt" / "sub" / f"{i}.txt").write_text(d)
    assert sorted(all_docs(build_source(SourceSpec("text_folder", str(tmp_path / "txt"))))) == sorted(docs[:5])

    write_parquet(tmp_path / "pq" / "a.parquet", docs, row_group_size=7)
    src = build_source(SourceSpec("parquet", str(tmp_path / "pq")))
    assert len(src.units) == 5 and all_docs(src) == docs
    assert [t for _, _, t in src.iter_docs(src.units[1], 3, lambda *_: None)] == docs[10:14]

    datasets.Dataset.from_dict({"body": docs}).save_to_disk(str(tmp_path / "hf"))
    src = build_source(SourceSpec("hf_dataset", str(tmp_path / "hf"), field="body", rows_per_unit=8))
    assert len(src.units) == 4 and all_docs(src) == docs
    with pytest.raises(ValueError, match="data.field='text'.*body"):
        build_source(SourceSpec("hf_dataset", str(tmp_path / "hf")))
    with pytest.raises(ValueError, match="data.field='nope'.*no such column"):
        build_source(SourceSpec("parquet", str(tmp_path / "pq"), field="nope"))


def test_bad_records_are_skipped_counted_and_located(tmp_path):
    good = make_docs(3)
    lines = [json.dumps({"text": good[0]}).encode(), b"{not json", json.dumps({"body": "x"}).encode(),
             json.dumps({"text": 7}).encode(), b'{"text": "caf\xe9 latin-1"}', json.dumps({"text": ""}).encode(),
             json.dumps({"text": good[1]}).encode(), b"", json.dumps({"text": good[2]}).encode()]
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    (tmp_path / "d" / "empty.jsonl").write_bytes(b"")
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "bad.txt").write_bytes(b"\xff\xfe broken")
    (tmp_path / "t" / "ok.txt").write_text("fine")
    (tmp_path / "t" / "empty.txt").write_text("")

    skips = []
    src = build_source(SourceSpec("jsonl", str(tmp_path / "d")))
    texts = [t for u in src.units for _, _, t in src.iter_docs(u, 0, lambda w, r: skips.append((w, r)))]
    assert texts == good
    reasons = [r for _, r in skips]
    # The blank line is reported as such (it counts toward the no-document limit), not as a
    # skipped record (the stream below counts 5).
    assert len(skips) == 6 and skips[5] == (f"{tmp_path / 'd' / 'a.jsonl'}@byte608", BLANK)
    assert reasons[0].startswith("malformed JSON") and "no field 'text'" in reasons[1]
    assert "int, not a string" in reasons[2] and "invalid UTF-8" in reasons[3] and reasons[4] == "empty document"
    assert all("a.jsonl@byte" in w for w, _ in skips)
    assert [p for p, _ in src.listing_skipped] == [str(tmp_path / "d" / "empty.jsonl")]

    skips.clear()
    src = build_source(SourceSpec("text_folder", str(tmp_path / "t")))
    assert [t for u in src.units for _, _, t in src.iter_docs(u, 0, lambda w, r: skips.append((w, r)))] == ["fine"]
    assert skips == [(str(tmp_path / "t" / "bad.txt"), "invalid UTF-8 at byte 0")]
    assert len(src.listing_skipped) == 1

    # The packed stream carries on past them and counts them.
    tok = Llama3Tokenizer()
    src = build_source(SourceSpec("jsonl", str(tmp_path / "d")))
    stream = SlotStream([src], [UnitPlan(len(src.units), 0, 0, False)], [1.0], tok, 9, fresh_slot_state(0, 1, 1))
    while True:  # until the second good record (after all five bad ones) is packed
        keys = _keys(stream.next_window())
        if any(key_cursor(k) for k in keys.tolist()):
            break
    assert stream.take_skipped() == 5 and stream.take_skipped() == 0


def test_missing_paths_and_empty_globs_name_the_key(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"data.path='.*nope'"):
        build_source(SourceSpec("jsonl", str(tmp_path / "nope")))
    with pytest.raises(FileNotFoundError, match=r"data.glob='\*\*/\*.jsonl\*' matched no file"):
        build_source(SourceSpec("jsonl", str(tmp_path)))
    with pytest.raises(FileNotFoundError, match="data.mixture.1.path"):
        build_source(SourceSpec("parquet", str(tmp_path / "x"), key="data.mixture.1."))
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(FileNotFoundError, match="every matched file is empty"):
        build_source(SourceSpec("text_folder", str(tmp_path)))


def test_fsspec_urls_are_accepted(tmp_path):
    docs = make_docs(5)
    write_jsonl(tmp_path / "a.jsonl", docs)
    assert all_docs(build_source(SourceSpec("jsonl", f"file://{tmp_path}/*.jsonl"))) == docs


def test_max_file_bytes_skips_larger_text_files_at_listing(tmp_path, caplog):
    """data.max_file_bytes: a text file over it is skipped whole at listing, counted and logged naming the key."""
    small, big = make_docs(2)
    big = big * 20
    (tmp_path / "big.txt").write_text(big)
    (tmp_path / "small.txt").write_text(small)
    limit = len(small.encode())  # the small file is exactly at the limit: kept
    src = build_source(SourceSpec("text_folder", str(tmp_path), max_file_bytes=limit))
    assert all_docs(src) == [small]
    assert src.listing_skipped == [(str(tmp_path / "big.txt"), f"larger than data.max_file_bytes={limit}")]
    with caplog.at_level("WARNING", logger="data_pipeline"):
        assert listing_skips([src]) == 1  # what the run adds to data/skipped
    assert f"big.txt: larger than data.max_file_bytes={limit}" in caplog.text


def test_hf_dataset_split_picks_one_split_of_a_dataset_dict(tmp_path):
    """data.split: a saved DatasetDict is read from the named split only; an unknown split names data.split."""
    import datasets

    train, val = make_docs(9, seed=1), make_docs(4, seed=2)
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": train}),
                          "validation": datasets.Dataset.from_dict({"text": val})}).save_to_disk(str(tmp_path / "ds"))
    assert all_docs(build_source(SourceSpec("hf_dataset", str(tmp_path / "ds"), split="validation"))) == val
    assert all_docs(build_source(SourceSpec("hf_dataset", str(tmp_path / "ds"), split="train"))) == train
    with pytest.raises(ValueError, match=r"data.split='test': .* holds splits \['train', 'validation'\]"):
        build_source(SourceSpec("hf_dataset", str(tmp_path / "ds"), split="test"))


# -- tokenizers ----------------------------------------------------------------------------

TEXTS = ["Hello world", "Grüße aus Köln — naïve café", "東京は晴れです。你好，世界", "Привет, мир! Γειά σου",
         "emoji 🦙🔥👩‍👩‍👧 and a flag 🇫🇷", "def f(x):\n\treturn x ** 2  # 12345678\n\n", "मराठी भाषा", "🙂" * 7]


def test_llama3_tokenizer_is_exact_offline(llama3):
    assert llama3.encode("Hello world") == [9906, 1917]
    assert (llama3.bos_id, llama3.eos_id, llama3.vocab_size) == (128000, 128001, 128256)
    for t in TEXTS:
        assert llama3.decode(llama3.encode(t)) == t
    flat, off = llama3.encode_batch(TEXTS)
    assert [flat[off[i]:off[i + 1]].tolist() for i in range(len(TEXTS))] == [llama3.encode(t) for t in TEXTS]
    # Special-token strings inside a document are text, not control tokens.
    assert 128000 not in llama3.encode("<|begin_of_text|>")


def test_tiktoken_model_file_matches_the_bundled_vocabulary(llama3, tmp_path):
    path = write_tiktoken_model(llama3, tmp_path / "tokenizer.model")
    tt = TiktokenTokenizer(path)
    assert (tt.bos_id, tt.eos_id, tt.vocab_size) == (128000, 128001, 128256)
    for t in TEXTS + make_docs(20):
        assert tt.encode(t) == llama3.encode(t)
    assert tt.fingerprint == llama3.fingerprint
    bad = tmp_path / "bad.model"
    bad.write_text("not-base64-and-no-rank\n")
    with pytest.raises(ValueError, match="bad.model:1"):
        TiktokenTokenizer(bad)


def test_hf_tokenizer_json_roundtrip(bpe):
    tok = HFTokenizer(bpe.path)
    assert tok.fingerprint == bpe.fingerprint and tok.vocab_size == 400
    for t in make_docs(5) + TEXTS:
        assert tok.decode(tok.encode(t)) == t
    flat, off = tok.encode_batch(TEXTS[:3])
    assert flat[off[1]:off[2]].tolist() == tok.encode(TEXTS[1])


def test_hf_tokenizer_from_a_model_folder(bpe, tmp_path):
    """data.tokenizer.path may be a Hugging Face model folder: its tokenizer.json."""
    import shutil

    shutil.copy(bpe.path, tmp_path / "tokenizer.json")
    assert HFTokenizer(tmp_path).encode(TEXTS[0]) == bpe.encode(TEXTS[0])
    with pytest.raises(FileNotFoundError, match="no such tokenizer.json"):
        HFTokenizer(tmp_path / "missing")


def test_tokenizer_cli_exports_llama3_and_trains_a_bpe(tmp_path, llama3):
    """python -m data_pipeline.tokenizer: export-llama3 writes Meta's tokenizer.model, train a usable BPE."""
    assert tokenizer_main(["export-llama3", str(tmp_path / "tokenizer.model")]) == 0
    tt = TiktokenTokenizer(tmp_path / "tokenizer.model")
    assert tt.vocab_size == 128256 and tt.fingerprint == llama3.fingerprint
    docs = make_docs(200, seed=5)
    write_jsonl(tmp_path / "corpus" / "a.jsonl", docs)
    out = tmp_path / "bpe.json"
    assert tokenizer_main(["train", "--source", "jsonl", "--path", str(tmp_path / "corpus"), "--vocab-size", "300",
                           str(out)]) == 0
    tok = HFTokenizer(out)
    assert tok.vocab_size == 300
    for d in docs[:5]:
        assert tok.decode(tok.encode(d)) == d
        assert len(tok.encode(d)) < len(d.encode())  # it learned merges from the corpus


# -- packing -------------------------------------------------------------------------------

def test_packing_wraps_carries_and_restarts_positions():
    out = pack_all([[10, 11, 12], [20, 21], [30]], window=4, bos_id=1, eos_id=2)
    # stream: 1 10 11 12 2 | 1 20 21 2 1 30 2
    assert [w["tokens"].tolist() for w in out] == [[1, 10, 11, 12], [2, 1, 20, 21], [2, 1, 30, 2]]
    assert [w["keys"].tolist() for w in out] == [[0, 0, 0, 0], [0, 1, 1, 1], [1, 2, 2, 2]]
    assert [w["positions"].tolist() for w in out] == [[0, 1, 2, 3], [0, 0, 1, 2], [0, 0, 1, 2]]


# -- slot streams: order, exact resume, resharding, mixing -----------------------------------

def _jsonl_source(tmp_path, n=60, chunk=600, seed=0, name="c.jsonl"):
    docs = make_docs(n, seed=seed)
    write_jsonl(tmp_path / name, docs)
    return build_source(SourceSpec("jsonl", str(tmp_path / name), chunk_bytes=chunk)), docs


def _streams(sources, states, tok, window=17, weights=None, seed=0):
    plans = [UnitPlan(len(s.units), seed, i, True) for i, s in enumerate(sources)]
    return [SlotStream(sources, plans, weights or [1.0] * len(sources), tok, window, st) for st in states]


def _expected_lengths(source, tok, seed=0, epochs=1, src=0):
    """doc key -> wrapped token count, for every document of the first ``epochs`` epochs."""
    plan, out = UnitPlan(len(source.units), seed, src, True), {}
    for g in range(len(source.units) * epochs):
        for c, _, text in source.iter_docs(source.units[plan.unit(g)], 0, lambda *_: None):
            out[doc_key(src, g, c)] = len(tok.encode(text)) + 2
    return out


def _keys(window):
    return np.repeat(window[1], window[2])


def _consume(streams, n, counts):
    for _ in range(n):
        for s in streams:
            counts.update(_keys(s.next_window()).tolist())


def test_exact_resume_of_a_slot_is_bit_identical(tmp_path, llama3):
    src, _ = _jsonl_source(tmp_path)
    a = _streams([src], [fresh_slot_state(1, 3, 1)], llama3)[0]
    for _ in range(25):
        a.next_window()
    state = json.loads(json.dumps(a.state_dict()))  # through JSON, as in a checkpoint
    b = _streams([src], [state], llama3)[0]
    for _ in range(40):
        wa, wb = a.next_window(), b.next_window()
        assert all(np.array_equal(x, y) for x, y in zip(wa, wb))


@pytest.mark.parametrize("old,new", [(4, 3), (2, 5), (3, 1)])
def test_resharding_consumes_every_document_exactly_once(tmp_path, llama3, old, new):
    src, docs = _jsonl_source(tmp_path)
    expected = _expected_lengths(src, llama3, epochs=8)
    epoch0 = {k: v for k, v in expected.items() if key_unit(k) < len(src.units)}
    counts = Counter()
    streams = _streams([src], [fresh_slot_state(s, old, 1) for s in range(old)], llama3)
    _consume(streams, 13, counts)
    states = json.loads(json.dumps([s.state_dict() for s in streams]))
    streams = _streams([src], reshard(states, new), llama3)
    per_slot = int(2.5 * sum(epoch0.values()) / 17 / new)  # 2.5 epochs of windows in all
    _consume(streams, per_slot, counts)
    # Every document of the first epoch entirely, once; nothing anywhere more than once.
    assert {k: counts[k] for k in epoch0} == epoch0
    assert all(counts[k] <= expected[k] for k in counts)
    # Twice resharded, still exact.
    states = json.loads(json.dumps([s.state_dict() for s in streams]))
    streams = _streams([src], reshard(reshard(states, 2), 3), llama3)
    _consume(streams, 40, counts)
    assert all(counts[k] <= expected[k] for k in counts)


def test_without_resharding_a_document_lost_would_be_seen(tmp_path, llama3):
    """The check above can fail: resuming 4 slots as 3 fresh ones (no reshard) repeats and
    loses documents."""
    src, _ = _jsonl_source(tmp_path)
    expected = _expected_lengths(src, llama3, epochs=8)
    epoch0 = {k: v for k, v in expected.items() if key_unit(k) < len(src.units)}
    counts = Counter()
    _consume(_streams([src], [fresh_slot_state(s, 4, 1) for s in range(4)], llama3), 13, counts)
    _consume(_streams([src], [fresh_slot_state(s, 3, 1) for s in range(3)], llama3), 50, counts)
    assert {k: counts[k] for k in epoch0} != epoch0


def test_mixture_realizes_token_weights(tmp_path, llama3):
    a, _ = _jsonl_source(tmp_path, name="a.jsonl", seed=1)
    b, _ = _jsonl_source(tmp_path, name="b.jsonl", seed=2)
    s = _streams([a, b], [fresh_slot_state(0, 1, 2)], llama3, weights=[3.0, 1.0])[0]
    per_src = Counter()
    for _ in range(300):
        keys = _keys(s.next_window())
        per_src.update(key_source(keys).tolist())
    share = per_src[0] / (per_src[0] + per_src[1])
    assert abs(share - 0.75) < 0.02, share
    again = _streams([a, b], [fresh_slot_state(0, 1, 2)], llama3, weights=[3.0, 1.0])[0]
    s2 = _streams([a, b], [fresh_slot_state(0, 1, 2)], llama3, weights=[3.0, 1.0])[0]
    assert all(np.array_equal(again.next_window()[0], s2.next_window()[0]) for _ in range(20))


def test_rank_loader_resumes_exactly_whatever_the_worker_count(tmp_path, llama3):
    src, _ = _jsonl_source(tmp_path)

    def loader(workers, dp_rank=1, dp_world=2, lbs=3):
        return RankLoader([src], [1.0], llama3, LoaderSpec(seq_len=16, local_batch_size=lbs, dp_rank=dp_rank,
                                                           dp_world=dp_world, num_workers=workers, seed=0,
                                                           shuffle=True, streams_per_row=3))

    ref = loader(0)
    ref_batches = [next(ref)["input_ids"] for _ in range(12)]
    a = loader(2)  # two tokenizer threads
    for i in range(5):
        assert torch.equal(next(a)["input_ids"], ref_batches[i])
    saved = json.loads(json.dumps([a.state_dict(), loader(0, dp_rank=0).state_dict()]))
    a.close()
    for workers in (0, 1, 3):
        b = loader(workers)
        b.load_rank_states(saved)
        for i in range(5, 12):
            assert torch.equal(next(b)["input_ids"], ref_batches[i])
        b.close()
    # The same global batch split as 1 rank x 6 rows: the same rows, bit for bit.
    one = loader(0, dp_rank=0, dp_world=1, lbs=6)
    one.load_rank_states(saved)
    assert torch.equal(next(one)["input_ids"][3:], ref_batches[5])


def test_a_state_written_by_the_dataloader_loader_resumes_bit_identically(tmp_path, llama3):
    """tests/data/loader_state_v1.json: a state written by the loader before the torchdata
    graph (torch DataLoader's code, in process; after an elastic 4 -> 2 stream reshard, so
    its packers hold literal token tails and document references, over a two-source
    mixture), with digests of the three batches that loader produced next. This loader,
    with 0, 1 or 3 workers, resumes it to the same batches, bit for bit."""
    import hashlib

    from tests.conftest import REPO as repo

    fx = json.loads((repo / "tests" / "data" / "loader_state_v1.json").read_text())
    assert any("tokens" in fr for row in fx["state"]["rows"] for st in row["slots"] for fr in st["packer"])
    write_jsonl(tmp_path / "corpus" / "a" / "a.jsonl", make_docs(60, seed=11, max_words=120))
    write_jsonl(tmp_path / "corpus" / "b" / "b.jsonl", make_docs(40, seed=12, max_words=30))
    for workers in (0, 1, 3):
        srcs = [build_source(SourceSpec("jsonl", str(tmp_path / "corpus" / x), chunk_bytes=700)) for x in "ab"]
        ld = RankLoader(srcs, [0.7, 0.3], llama3, LoaderSpec(seq_len=24, local_batch_size=1, dp_rank=0, dp_world=1,
                                                             num_workers=workers, seed=5, shuffle=True,
                                                             streams_per_row=2, positions=True))
        ld.load_rank_states([fx["state"]])
        got = []
        for _ in range(3):
            b, h = next(ld), hashlib.sha256()
            for k in ("input_ids", "labels", "positions", "doc_ids", "source_tokens"):
                h.update(b[k].numpy().tobytes())
            got.append(h.hexdigest())
        ld.close()
        assert got == fx["next_batches_sha256"], workers


def test_micro_batches_split_the_same_step_rows(tmp_path, llama3):
    src, _ = _jsonl_source(tmp_path)

    def loader(lbs, accum):
        return RankLoader([src], [1.0], llama3, LoaderSpec(seq_len=16, local_batch_size=lbs, dp_rank=0, dp_world=1,
                                                           num_workers=0, seed=0, shuffle=True,
                                                           grad_accum_steps=accum))

    big, small = loader(6, 1), loader(3, 2)
    for _ in range(4):
        whole = next(big)
        parts = [next(small) for _ in range(2)]
        assert torch.equal(torch.cat([p["input_ids"] for p in parts]), whole["input_ids"])
        assert torch.equal(parts[0]["source_tokens"] + parts[1]["source_tokens"], whole["source_tokens"])
    next(small)
    with pytest.raises(RuntimeError, match="middle of a step"):
        small.state_dict()


def _reading_order(folder, tok, shuffle: bool, n: int):
    """The numbers of the first n documents (``doc NNNNN:``) one loader row reads, in order."""
    src = build_source(SourceSpec("text_folder", str(folder)))
    loader = RankLoader([src], [1.0], tok, LoaderSpec(seq_len=31, local_batch_size=1, dp_rank=0, dp_world=1,
                                                      num_workers=0, seed=0, shuffle=shuffle))
    tokens, found = [], []
    while len(found) < n:
        batch = next(loader)  # one row: its window is input_ids plus the last label
        tokens += batch["input_ids"][0].tolist() + batch["labels"][0, -1:].tolist()
        found = [int(m) for m in re.findall(r"doc (\d{5}):", tok.decode(tokens))]
    loader.close()
    return found[:n]


def test_shuffle_false_reads_units_in_listing_order(tmp_path, llama3):
    """data.shuffle=false: files are read in listing (sorted) order; true: another order of the same files."""
    docs = make_docs(12, max_words=8)
    for i in reversed(range(len(docs))):  # written last to first: the listing, not creation, orders them
        (tmp_path / f"{i:02d}.txt").write_text(docs[i])
    in_order = _reading_order(tmp_path, llama3, False, len(docs))
    shuffled = _reading_order(tmp_path, llama3, True, len(docs))
    assert in_order == list(range(len(docs)))
    assert sorted(shuffled) == in_order and shuffled != in_order


# -- pretokenized shards -------------------------------------------------------------------

def test_pretokenize_cli_and_memmap_source(tmp_path, bpe, llama3):
    docs = make_docs(50)
    write_jsonl(tmp_path / "in" / "a.jsonl", docs[:30])
    write_jsonl(tmp_path / "in" / "b.jsonl.gz", docs[30:])
    out = tmp_path / "shards"
    proc = subprocess.run([sys.executable, "-m", "data_pipeline.pretokenize", "--source", "jsonl", "--path",
                           str(tmp_path / "in"), "--tokenizer", "hf", "--tokenizer-path", bpe.path,
                           "--shard-tokens", "500", str(out)], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "pretokenize" in proc.stderr  # the progress bar
    m = json.loads((out / "manifest.json").read_text())
    assert m["dtype"] == "uint16" and m["n_docs"] == 50 and len(m["shards"]) > 2
    assert m["tokenizer"]["fingerprint"] == bpe.fingerprint
    src = build_source(SourceSpec("pretokenized", str(out), rows_per_unit=8))
    src.shuffle = False
    got = [list(map(int, t)) for u in src.units for _, _, t in src.iter_docs(u, 0, None)]
    assert got == [bpe.encode(d) for d in docs]
    # Shuffled: a permutation inside each block, and resumable by row.
    src.seed, src.shuffle = 5, True
    u = src.units[0]
    rows = [list(map(int, t)) for _, _, t in src.iter_docs(u, 0, None)]
    assert sorted(map(tuple, rows)) == sorted(map(tuple, got[:8])) and rows != got[:8]
    assert [list(map(int, t)) for _, _, t in src.iter_docs(u, 3, None)] == rows[3:]
    # A refusal to overwrite, and a refusal to train with another tokenizer.
    again = subprocess.run([sys.executable, "-m", "data_pipeline.pretokenize", "--source", "jsonl", "--path",
                            str(tmp_path / "in"), str(out)], cwd=REPO, capture_output=True, text=True)
    assert again.returncode == 2 and "--overwrite" in again.stderr
    from parallel.env import LaunchEnv
    from pretrain.tokenizers import load_tokenizer
    from tests.conftest import compose_job

    cfg = compose_job("data=pretokenized", f"data.path={out}", "data.tokenizer.kind=llama3")
    env = LaunchEnv(rank=0, world_size=1, local_rank=0, local_world_size=1, master_addr="", master_port=0,
                    launcher="single")
    with pytest.raises(ValueError, match="shards were made with tokenizer hf.*fingerprint"):
        load_tokenizer(cfg.data, [src], env)


def test_llama3_shards_are_uint32(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", make_docs(3))
    from data_pipeline.pretokenize import pretokenize

    m = pretokenize(SourceSpec("jsonl", str(tmp_path / "a.jsonl")), Llama3Tokenizer(), tmp_path / "o", progress=False)
    assert m["dtype"] == "uint32" and m["tokenizer"]["vocab_size"] == 128256


# -- document masking ----------------------------------------------------------------------

def test_document_mask_isolates_documents(llama3):
    from pretrain.model.llama.args import LlamaArgs
    from pretrain.model.llama import build_llama

    torch.manual_seed(0)
    args = LlamaArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden_dim=128, vocab_size=512)
    model = build_llama(args, rope_cache_len=64, device="cpu")
    model.init_weights(seed=0)

    def logits_of_last_doc(prev_doc, masked=True):
        p = Packer(64, 1, 2)
        p.add(0, p.wrap(np.asarray(prev_doc)), None)
        p.add(1, p.wrap(np.arange(100, 120)), None)
        p.add(2, p.wrap(np.arange(3, 50)), None)  # fills the window
        toks, keys, lens = p.cut()
        keys = np.repeat(keys, lens)
        pos = positions(keys[None])[0]
        toks, keys, pos = (torch.from_numpy(x)[None, :-1] for x in (toks, keys, pos))
        out = model(toks, pos.long(), keys.long()) if masked else model(toks)
        return out[0, keys[0] == 1]

    a = logits_of_last_doc(list(range(200, 210)))
    b = logits_of_last_doc(list(range(300, 315)))  # other text, other length
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # Without the mask the previous document leaks in: the check can fail.
    leaky_a, leaky_b = logits_of_last_doc(list(range(200, 210)), False), logits_of_last_doc(list(range(300, 315)), False)
    assert (leaky_a - leaky_b).abs().max() > 1e-2


class _ItemSource:
    """A synthetic source of ``stream.Record`` documents (the slot images will use):
    document n holds n % 4 markers, item j of it {"vec": [n, j], "img": a 2x3 array of n},
    and the text after marker j names it (``d<n>k<j>``)."""

    def __new__(cls, n_units: int, per_unit: int):
        from data_pipeline.sources import Source
        from data_pipeline.stream import Record

        class ItemSource(Source):
            def _iter_docs(self, unit, cursor, on_skip, on_truncate):
                for c in range(cursor, per_unit):
                    n = unit[0] * per_unit + c
                    texts = [f"doc {n} opens here"] + [f" d{n}k{j} and some words after it" for j in range(n % 4)]
                    items = [{"vec": np.array([n, j], np.float32), "img": np.full((2, 3), n, np.int16)}
                             for j in range(n % 4)]
                    yield c, c + 1, Record(texts, items)

        src = ItemSource(SourceSpec("jsonl", "synthetic"))
        src.units = [(u,) for u in range(n_units)]
        return src


def test_items_travel_with_their_markers_and_are_read_again_on_resume(llama3):
    """Documents with items (a payload per marker token): every item reaches the batch of
    the window that holds its marker, at its marker's position, with the arrays of its own
    document; per-token arrays built at batching time (``collate``) arrive split by
    micro-batch; a loader state holds no item and a resumed loader (other worker count)
    gives the same batches, items included."""
    marker = llama3.special_id("<|reserved_special_token_2|>")

    def latest_item(batch):  # per input position: the index of the last item seen, -1 before any
        pos, s = batch["item_positions"], batch["tokens"].shape[1] - 1
        idx = np.full((len(pos), s), -1, dtype=np.int64)
        for q, row in enumerate(pos):
            for k, p in enumerate(row):
                if 0 <= p < s:
                    idx[q, p:] = k
        return {"item_index": idx}

    def loader(workers):
        return RankLoader([_ItemSource(12, 5)], [1.0], llama3, LoaderSpec(
            seq_len=20, local_batch_size=2, dp_rank=0, dp_world=1, num_workers=workers, seed=1, shuffle=True,
            grad_accum_steps=2, streams_per_row=2, marker_id=marker, collate=latest_item))

    ref = loader(0)
    straight = [next(ref) for _ in range(16)]
    seen = 0
    for b in straight:
        window = torch.cat([b["input_ids"], b["labels"][:, -1:]], 1)
        assert b["item_index"].shape == b["input_ids"].shape
        for q in range(len(window)):
            for k, p in enumerate(b["item_positions"][q].tolist()):
                if p < 0:
                    assert b["item_vec"][q, k].eq(0).all()
                    continue
                assert window[q, p] == marker
                if p + 6 <= window.shape[1]:
                    n, j = map(int, re.search(r"d(\d+)k(\d+)", llama3.decode(window[q, p + 1:p + 6].tolist())).groups())
                    assert b["item_vec"][q, k].tolist() == [n, j] and b["item_img"][q, k].eq(n).all()
                    seen += 1
                assert p == b["input_ids"].shape[1] or b["item_index"][q, p] == k
            assert (window[q] == marker).sum() == (b["item_positions"][q] >= 0).sum()
    assert seen > 20
    a = loader(2)
    for i in range(6):
        next(a)
    text = json.dumps(a.state_dict())
    a.close()
    assert '"vec"' not in text and '"img"' not in text and len(text) < 4000
    for workers in (0, 3):
        b = loader(workers)
        b.load_rank_states([json.loads(text)])
        for want in straight[6:]:
            got = next(b)
            assert want.keys() == got.keys()
            for k, v in want.items():
                assert torch.equal(v, got[k]) if isinstance(v, torch.Tensor) else v == got[k], k
        b.close()
