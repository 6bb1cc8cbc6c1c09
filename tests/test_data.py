"""Minimal data path: packing, document order, per-rank striding."""
import sysconfig

import pytest
import torch

from data_pipeline.loader import TextFolderBatches
from data_pipeline.packing import pack_windows, shuffle_windows
from data_pipeline.text_folder import list_text_files
from data_pipeline.tokenizer import HFTokenizer, corpus_sample, train_bpe


def test_pack_windows_wraps_and_carries():
    docs = [[10, 11, 12], [20, 21], [30]]
    out = list(pack_windows(docs, seq_len=3, bos_id=1, eos_id=2))
    # stream: 1 10 11 12 2 | 1 20 21 2 1 30 2
    assert out == [[1, 10, 11, 12], [2, 1, 20, 21], [2, 1, 30, 2]]


def test_shuffle_windows_is_a_seeded_permutation():
    w = [[i] for i in range(100)]
    a = list(shuffle_windows(iter(w), 16, seed=1))
    assert sorted(a) == w and a != w
    assert a == list(shuffle_windows(iter(w), 16, seed=1))
    assert a != list(shuffle_windows(iter(w), 16, seed=2))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = sysconfig.get_paths()["stdlib"]
    files = list_text_files(root, "json/*.py", 10**6)
    tok = train_bpe(corpus_sample(files, 10**6), 300, tmp_path_factory.mktemp("t") / "tok.json")
    return files, tok


def test_tokenizer_roundtrip_and_specials(corpus):
    files, tok = corpus
    text = files[0].read_text()
    assert tok.decode(tok.encode(text)) == text
    assert tok.bos_id != tok.eos_id and tok.vocab_size == 300
    assert HFTokenizer(tok.path).fingerprint == tok.fingerprint


def test_ranks_partition_the_global_batch(corpus):
    files, tok = corpus
    kw = dict(seq_len=16, seed=0, shuffle=True, shuffle_buffer=8)
    single = TextFolderBatches(files, tok, local_batch_size=4, dp_rank=0, dp_world_size=1, **kw)
    ranks = [TextFolderBatches(files, tok, local_batch_size=2, dp_rank=r, dp_world_size=2, **kw) for r in range(2)]
    for _ in range(3):
        full = next(single)["input_ids"]
        parts = torch.cat([next(r)["input_ids"] for r in ranks])
        assert sorted(map(tuple, full.tolist())) == sorted(map(tuple, parts.tolist()))
    b = next(single)
    assert torch.equal(b["input_ids"][:, 1:], b["labels"][:, :-1])  # labels are inputs shifted


def test_skip_resumes_the_stream(corpus):
    files, tok = corpus
    kw = dict(seq_len=16, local_batch_size=2, dp_rank=1, dp_world_size=2, seed=0)
    a = TextFolderBatches(files, tok, **kw)
    for _ in range(5):
        next(a)
    b = TextFolderBatches(files, tok, **kw)
    b.skip(5)
    assert torch.equal(next(a)["input_ids"], next(b)["input_ids"])


def test_missing_data_names_the_key(tmp_path):
    with pytest.raises(FileNotFoundError, match="data.root"):
        list_text_files(str(tmp_path / "nope"), "*.txt", 10)
    with pytest.raises(FileNotFoundError, match="data.glob"):
        list_text_files(str(tmp_path), "*.txt", 10)
