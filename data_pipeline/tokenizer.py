"""Tokenizers behind one small interface, and a byte-level BPE the project trains on a
corpus and caches (the demo's: a 128k vocabulary would dominate a CPU run)."""
from __future__ import annotations

import hashlib
import os
import sys
import tempfile
from pathlib import Path
from typing import Iterable, List, Protocol, Sequence

BOS = "<|begin_of_text|>"
EOS = "<|end_of_text|>"


class Tokenizer(Protocol):
    bos_id: int
    eos_id: int
    vocab_size: int
    fingerprint: str

    def encode(self, text: str) -> List[int]: ...

    def encode_batch(self, texts: Sequence[str]) -> List[List[int]]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


class HFTokenizer:
    """A Hugging Face ``tokenizer.json`` (tokenizers library). Text is encoded without
    special tokens; documents are wrapped with bos/eos by the packer."""

    def __init__(self, path: str | os.PathLike):
        from tokenizers import Tokenizer as _Tok

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file {path} does not exist")
        raw = path.read_bytes()
        self._tok = _Tok.from_str(raw.decode())
        self.path = str(path)
        self.fingerprint = hashlib.sha256(raw).hexdigest()[:16]
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.bos_id = self._required_id(BOS)
        self.eos_id = self._required_id(EOS)

    def _required_id(self, token: str) -> int:
        idx = self._tok.token_to_id(token)
        if idx is None:
            raise ValueError(f"tokenizer {self.path} has no {token} token")
        return idx

    def encode(self, text: str) -> List[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> List[List[int]]:
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)


def corpus_sample(files: Iterable[Path], max_bytes: int) -> List[str]:
    """The first ``max_bytes`` of the corpus, files in the given order, whole files."""
    out, total = [], 0
    for f in files:
        if total >= max_bytes:
            break
        text = f.read_text(encoding="utf-8", errors="replace")
        out.append(text)
        total += len(text.encode())
    return out


def train_bpe(texts: Sequence[str], vocab_size: int, out_path: str | os.PathLike) -> HFTokenizer:
    """Train a byte-level BPE with bos/eos specials; written atomically to ``out_path``."""
    from tokenizers import Tokenizer as _Tok, decoders, models, pre_tokenizers, trainers

    if vocab_size < 256 + 2:
        raise ValueError(f"vocab_size={vocab_size}: a byte-level BPE needs at least 258 entries")
    tok = _Tok(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out_path.parent, prefix=out_path.name, suffix=".tmp")
    os.close(fd)
    tok.save(tmp)
    os.replace(tmp, out_path)  # never a half-written tokenizer under the final name
    return HFTokenizer(out_path)


def bpe_cache_path(cache_dir: str, texts: Sequence[str], vocab_size: int) -> Path:
    h = hashlib.sha256(f"bpe-bytelevel-v1|{vocab_size}|".encode())
    for t in texts:
        h.update(hashlib.sha256(t.encode()).digest())
    return Path(cache_dir) / f"bpe{vocab_size}-{h.hexdigest()[:16]}.json"


def main(argv: Sequence[str] | None = None) -> int:
    """python -m data_pipeline.tokenizer ROOT GLOB VOCAB OUT: train a BPE on a folder."""
    import argparse

    from .text_folder import list_text_files

    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("root")
    p.add_argument("glob")
    p.add_argument("vocab_size", type=int)
    p.add_argument("out")
    p.add_argument("--train-bytes", type=int, default=8_000_000)
    a = p.parse_args(argv)
    files = list_text_files(a.root, a.glob, max_file_bytes=10**9)
    tok = train_bpe(corpus_sample(files, a.train_bytes), a.vocab_size, a.out)
    print(f"wrote {a.out}: vocab {tok.vocab_size}, fingerprint {tok.fingerprint}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
