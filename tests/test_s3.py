"""Object storage: JSONL sources on S3 (s3fs) read from a real S3 endpoint on localhost,
moto's standalone server, through a TCP proxy that counts the bytes it relays and breaks
requests on purpose (tests/s3_server.py). The client is configured the usual way, by
AWS_* environment variables. botocore's own retries are turned off here
(AWS_MAX_ATTEMPTS=1: by default it retries a 5xx up to 5 times, with random waits of up
to 8 s) so that what is tested is s3fs's retries and sources.py's (RemoteFile)."""
from __future__ import annotations

import json
import os
import traceback
from pathlib import Path

import pytest
import torch

import data_pipeline.sources as sources_mod
from data_pipeline.loader import LoaderSpec, RankLoader
from data_pipeline.sources import DataError, SourceSpec, build_source
from data_pipeline.tokenizer import Llama3Tokenizer
from tests.datagen import make_docs, write_jsonl
from tests.s3_server import PASS, FaultProxy, MotoServer

BUCKET = "corpora"
KEY_ID, SECRET = "AKIAS3TESTKEYID4SKIP", "s3cr3t/Test+Value/never-to-be-printed"
CHUNK = 256 << 10  # several units per large file


class S3:
    def __init__(self, moto: MotoServer, proxy: FaultProxy, client, corpus: Path):
        self.moto, self.proxy, self.client, self.corpus = moto, proxy, client, corpus

    def upload(self, folder: Path, prefix: str) -> None:
        for f in sorted(folder.iterdir()):
            self.client.put_object(Bucket=BUCKET, Key=f"{prefix}/{f.name}", Body=f.read_bytes())

    def gets(self, name: str = "") -> list:
        """(target, range, action) of the GET requests the proxy saw for keys ending with ``name``."""
        return [(t, r, a) for m, t, r, a in self.proxy.requests if m == "GET" and t.split("?")[0].endswith(name)]


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    import boto3
    import s3fs

    mp = pytest.MonkeyPatch()
    for var in list(os.environ):
        if var.startswith("AWS_"):
            mp.delenv(var)
    moto = proxy = None
    try:
        moto = MotoServer()
        proxy = FaultProxy(("127.0.0.1", moto.port))
        nowhere = str(tmp_path_factory.mktemp("aws") / "none")
        for var, value in {"AWS_ACCESS_KEY_ID": KEY_ID, "AWS_SECRET_ACCESS_KEY": SECRET,
                           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": proxy.url,
                           "AWS_CONFIG_FILE": nowhere, "AWS_SHARED_CREDENTIALS_FILE": nowhere,
                           "AWS_EC2_METADATA_DISABLED": "true", "AWS_MAX_ATTEMPTS": "1"}.items():
            mp.setenv(var, value)
        s3fs.S3FileSystem.clear_instance_cache()
        client = boto3.client("s3", endpoint_url=moto.url)  # uploads and deletions: straight to moto
        client.create_bucket(Bucket=BUCKET)
        corpus = tmp_path_factory.mktemp("local") / "corpus"
        write_jsonl(corpus / "big.jsonl", make_docs(12000, seed=1, min_words=10, max_words=50))
        write_jsonl(corpus / "a.jsonl", make_docs(600, seed=2))
        write_jsonl(corpus / "b.jsonl", make_docs(600, seed=3))
        env = S3(moto, proxy, client, corpus)
        env.upload(corpus, "corpus")
        yield env
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
        if proxy is not None:
            proxy.close()
        if moto is not None:
            moto.stop()
        mp.undo()


@pytest.fixture(scope="module")
def tok():
    return Llama3Tokenizer()


@pytest.fixture(autouse=True)
def _proxy_passes(request):
    if "s3" not in request.fixturenames:
        yield
        return
    proxy = request.getfixturevalue("s3").proxy
    proxy.reset()
    yield
    proxy.reset()


def spec(path: str, **kw) -> SourceSpec:
    return SourceSpec("jsonl", path, chunk_bytes=CHUNK, **kw)


def run(src, tok, steps, workers=0, state=None, batch=2, seq_len=64):
    """(input_ids of ``steps`` batches, records skipped, the loader's state after them)."""
    loader = RankLoader([src], [1.0], tok, LoaderSpec(seq_len=seq_len, local_batch_size=batch, dp_rank=0, dp_world=1,
                                                      num_workers=workers, seed=0, shuffle=True))
    try:
        if state is not None:
            loader.load_rank_states([state])
        ids, skipped = [], 0
        for _ in range(steps):
            b = next(loader)
            ids.append(b["input_ids"].clone())
            skipped += int(b["skipped"])
        return torch.stack(ids), skipped, loader.state_dict()
    finally:
        loader.close()


def no_secret(*texts: str) -> None:
    for text in texts:
        assert KEY_ID not in text and SECRET not in text and SECRET.split("/")[0] not in text, text


def test_an_s3_prefix_reads_as_the_same_files_on_disk(s3, tok):
    local, remote = build_source(spec(str(s3.corpus))), build_source(spec(f"s3://{BUCKET}/corpus/"))
    assert len(remote.units) == len(local.units) > 3
    assert remote.unit_label(remote.units[0]) == f"{BUCKET}/corpus/a.jsonl[0:{local.units[0][2]}]"
    # The same listing: a loader state saved on one resumes on the other.
    assert remote.listing == local.listing
    docs = list(remote.iter_all_docs())
    assert docs == list(local.iter_all_docs()) and len(docs) == 13200
    size = sum(f.stat().st_size for f in s3.corpus.iterdir())
    print(f"\nread the corpus, {size} bytes in {len(remote.units)} units, with {s3.proxy.sent} bytes in "
          f"{len(s3.gets())} GETs")
    assert size <= s3.proxy.sent < 1.1 * size  # read once (ranges of the units, a little past their ends)
    ref, skipped, _ = run(local, tok, 6)
    got, skipped_s3, _ = run(remote, tok, 6, workers=1)
    assert skipped == skipped_s3 == 0 and torch.equal(got, ref)


def test_a_resume_reads_a_small_range_of_a_large_file(s3, tok):
    src = build_source(SourceSpec("jsonl", f"s3://{BUCKET}/corpus/big.jsonl", chunk_bytes=1 << 20))
    size = (s3.corpus / "big.jsonl").stat().st_size
    ref, _, _ = run(src, tok, 8, batch=1, seq_len=128)
    _, _, state = run(src, tok, 5, batch=1, seq_len=128)
    s3.proxy.reset()
    got, skipped, _ = run(src, tok, 1, state=state, batch=1, seq_len=128)
    read, gets = s3.proxy.sent, s3.gets()
    print(f"\nresume: file {size} bytes, read after the resume for the next batch {read} bytes "
          f"({100 * read / size:.1f}%) in {len(gets)} GETs ({', '.join(r for _, r, _ in gets)})")
    assert torch.equal(got[0], ref[5]) and skipped == 0
    no_secret(json.dumps(state))
    assert gets and read < 0.15 * size


def _first_read(s3, src, tok) -> tuple:
    """(target, range) of the first GET of a loader on ``src``."""
    s3.proxy.reset()
    run(src, tok, 1)
    return s3.gets()[0][:2]


def test_connections_cut_mid_response_are_retried_and_the_batches_are_exact(s3, tok):
    src = build_source(spec(f"s3://{BUCKET}/corpus/"))
    ref, _, _ = run(src, tok, 12, batch=4)
    first = _first_read(s3, src, tok)
    seen: dict = {}

    def rule(method, target, rng):  # cut the first try of every GET 2000 bytes into the response; of
        if method != "GET":  # the first key's first range, the first 6 (s3fs tries 5 times: RemoteFile's retry)
            return PASS
        n = seen[target, rng] = seen.get((target, rng), 0) + 1
        return ("cut", 2000) if n <= (6 if (target, rng) == first else 1) else PASS

    for workers in (0, 1):
        seen.clear()
        s3.proxy.reset(rule)
        got, skipped, _ = run(src, tok, 12, workers=workers, batch=4)
        gets = s3.gets()  # every range read was cut, then read again
        assert len(seen) >= 4 and all(n >= 2 for n in seen.values()) and seen[first] == 7, gets
        assert s3.proxy.cuts == len(seen) + 5, gets
        assert skipped == 0 and torch.equal(got, ref), workers


def test_a_5xx_is_retried_and_a_403_or_404_is_a_counted_skip(s3, tok, tmp_path, caplog):
    src = build_source(spec(f"s3://{BUCKET}/corpus/"))
    ref, _, _ = run(src, tok, 4)
    first = _first_read(s3, src, tok)
    count = {"n": 0}

    def unavailable(method, target, rng):  # s3fs does not retry ServiceUnavailable: RemoteFile does
        if method == "GET" and (target, rng) == first and count["n"] < 2:
            count["n"] += 1
            return ("status", 503)
        return PASS

    s3.proxy.reset(unavailable)
    got, skipped, _ = run(src, tok, 4, workers=1)
    assert [a for t, r, a in s3.gets() if (t, r) == first] == [("status", 503), ("status", 503), PASS]
    assert skipped == 0 and torch.equal(got, ref)

    # gone.jsonl is deleted after listing (404); denied.jsonl may be listed but not read (403).
    folder = tmp_path / "bad"
    for name, seed in (("gone", 4), ("denied", 5), ("fine", 6)):
        write_jsonl(folder / f"{name}.jsonl", make_docs(40, seed=seed))
    s3.upload(folder, "bad")
    bad = build_source(spec(f"s3://{BUCKET}/bad/"))
    s3.client.delete_object(Bucket=BUCKET, Key="bad/gone.jsonl")
    s3.proxy.reset(lambda method, target, rng: ("status", 403) if "denied.jsonl" in target else PASS)
    loader = RankLoader([bad], [1.0], tok, LoaderSpec(seq_len=32, local_batch_size=1, dp_rank=0, dp_world=1,
                                                      num_workers=1, seed=0, shuffle=True))
    skipped = steps = 0
    with caplog.at_level("WARNING", logger="data_pipeline"):
        while skipped < 2 and steps < 200:  # the job goes on past both
            skipped += int(next(loader)["skipped"])
            steps += 1
        for _ in range(3):
            skipped += int(next(loader)["skipped"])
    loader.close()
    assert skipped == 2, caplog.text
    for name in ("gone.jsonl", "denied.jsonl"):  # one request each: not retried
        assert len([r for r in s3.proxy.requests if r[1].split("?")[0].endswith(name)]) == 1, s3.proxy.requests
    assert caplog.text.count("vanished or unreadable") == 2
    skips = []
    list(bad.iter_all_docs(on_skip=lambda where, why: skips.append((where, why))))
    assert sorted(w for w, _ in skips) == [f"{BUCKET}/bad/denied.jsonl[0:{bad.units[0][2]}]",
                                           f"{BUCKET}/bad/gone.jsonl[0:{bad.units[2][2]}]"]
    assert all(why.startswith("vanished or unreadable (") for _, why in skips), skips
    no_secret(caplog.text, *(w + why for w, why in skips))


def test_parquet_on_s3_reads_through_cuts_and_skips_a_vanished_file(s3, tmp_path):
    """Parquet row groups read through the same remote file as JSONL (blocks, retries): with
    the first try of every range cut mid-response, the documents equal the local files'; a
    file deleted after listing is one counted skip per row group, not a crash."""
    from tests.datagen import write_parquet

    folder = tmp_path / "pq"
    write_parquet(folder / "a.parquet", make_docs(900, seed=7), row_group_size=300)
    write_parquet(folder / "b.parquet", make_docs(300, seed=8), row_group_size=300)
    s3.upload(folder, "pq")
    local = build_source(SourceSpec("parquet", str(folder)))
    remote = build_source(SourceSpec("parquet", f"s3://{BUCKET}/pq/"))
    assert len(remote.units) == len(local.units) == 4 and remote.listing == local.listing
    seen: dict = {}

    def cut_first(method, target, rng):  # the first try of every range of a Parquet file (listings pass)
        if method != "GET" or not target.split("?")[0].endswith(".parquet"):
            return PASS
        n = seen[target, rng] = seen.get((target, rng), 0) + 1
        return ("cut", 200) if n == 1 else PASS

    s3.proxy.reset(cut_first)
    remote = build_source(SourceSpec("parquet", f"s3://{BUCKET}/pq/"))
    assert list(remote.iter_all_docs()) == list(local.iter_all_docs())
    assert s3.proxy.cuts == len(seen) >= 4
    s3.proxy.reset()
    listed = build_source(SourceSpec("parquet", f"s3://{BUCKET}/pq/"))
    s3.client.delete_object(Bucket=BUCKET, Key="pq/b.parquet")
    skips = []
    docs = list(listed.iter_all_docs(on_skip=lambda where, why: skips.append((where, why))))
    assert len(docs) == 900 and [w for w, _ in skips] == [f"{BUCKET}/pq/b.parquet#rowgroup0"], skips
    assert skips[0][1].startswith("vanished or unreadable ("), skips


def test_a_failure_that_outlasts_the_retries_is_a_skip_that_names_no_secret(s3, tok, monkeypatch):
    monkeypatch.setattr(sources_mod, "REMOTE_RETRY_DELAY", 0.01)
    src = build_source(spec(f"s3://{BUCKET}/corpus/a.jsonl"))
    s3.proxy.reset(lambda method, target, rng: ("status", 503) if method == "GET" else PASS)
    skips, errors = [], []
    with pytest.raises(DataError, match="every unit") as e:  # the source's only unit: skipped
        list(src.iter_all_docs(on_skip=lambda where, why: skips.append(where + ": " + why)))
    errors.append(str(e.value))
    assert len(s3.gets()) == sources_mod.REMOTE_READ_ATTEMPTS  # and no more
    path = f"{BUCKET}/corpus/a.jsonl"
    assert skips == [f"{path}[0:{src.units[0][2]}]: vanished or unreadable ({path}: reading bytes 0-65535 failed "
                     f"{sources_mod.REMOTE_READ_ATTEMPTS} times, the last with OSError: [Errno 16] injected by the "
                     "test proxy)"]
    # The whole chain of the error (botocore's ClientError and request included) names no credential.
    with pytest.raises(OSError) as e:
        with sources_mod.open_binary(src.fs, src.units[0][0]) as f:
            f.read(10)
    errors.append("".join(traceback.format_exception(e.value)))
    no_secret(*skips, *errors, repr(src.spec), repr(src.fs), str(src.fs.storage_options))
    with pytest.raises(AssertionError):
        no_secret(f"... {SECRET} ...")


def test_remote_reads_by_seek_read_and_readline_return_the_files_bytes_through_failures(monkeypatch):
    """RemoteFile's blocks, read-ahead and retries under seeks, reads and bounded readlines,
    on fsspec's memory filesystem (not local: read as a remote one) whose file fails every
    third read with a reset connection, or raises a 404."""
    import io
    import random

    import fsspec

    monkeypatch.setattr(sources_mod, "REMOTE_RETRY_DELAY", 0)
    rng = random.Random(0)
    data = b"".join(b"x" * rng.choice((0, 5, 300, 5000, 70_000)) + b"\n" for _ in range(400))
    fs = fsspec.filesystem("memory")
    fs.pipe("/remote/data.jsonl", data)
    calls = {"read": 0, "fail": 0, "mode": "reset"}
    real_open = fs.open

    class Flaky:
        def __init__(self, f):
            self.f, self.size = f, f.size

        def seek(self, pos):
            self.f.seek(pos)

        def read(self, n):
            calls["read"] += 1
            if calls["mode"] == "gone":
                raise FileNotFoundError("remote/data.jsonl")
            if calls["read"] % 3 == 0:
                calls["fail"] += 1
                self.f.read(n // 2)
                raise ConnectionResetError("connection reset by peer")
            return self.f.read(n)

        def close(self):
            self.f.close()

    monkeypatch.setattr(fs, "open", lambda path, mode, **kw: Flaky(real_open(path, mode, **kw)))
    ref = io.BytesIO(data)
    for end in (None, 200_000):
        with sources_mod.open_binary(fs, "/remote/data.jsonl") as f:
            sources_mod._reading_until(f, end)
            for _ in range(400):
                op = rng.random()
                if op < 0.2:
                    pos = rng.randrange(len(data) + 10)
                    assert f.seek(pos) == ref.seek(pos)
                elif op < 0.6:
                    n = rng.choice((1, 100, 4096, 70_000, 300_000))
                    assert f.readline(n) == ref.readline(n)
                else:
                    n = rng.choice((1, 100, 4096, 70_000, 300_000))
                    assert f.read(n) == ref.read(n)
                assert f.tell() == ref.tell()
    assert calls["fail"] > 20
    calls["mode"], calls["read"] = "gone", 0
    with pytest.raises(FileNotFoundError):
        sources_mod.open_binary(fs, "/remote/data.jsonl").read(10)
    assert calls["read"] == 1  # not retried
