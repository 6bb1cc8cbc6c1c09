"""The minimal training data path: folder of text -> tokenizer -> packed windows -> the
batches of one data-parallel rank.

Windows are numbered globally; DP rank r of R takes windows r, r+R, r+2R, ... so that a
step's global batch is the same set of sequences whatever R is (layouts compare exactly)."""
from __future__ import annotations

from itertools import islice
from typing import Dict, Iterator, List

import torch

from .packing import pack_windows, shuffle_windows
from .text_folder import iter_documents
from .tokenizer import Tokenizer

_ENCODE_CHUNK = 16  # documents per encode_batch call


def _tokenized_docs(tokenizer: Tokenizer, texts: Iterator) -> Iterator[List[int]]:
    while True:
        chunk = [text for _, text in islice(texts, _ENCODE_CHUNK)]
        if not chunk:
            return
        yield from tokenizer.encode_batch(chunk)


class TextFolderBatches:
    """Iterator of {"input_ids", "labels"} LongTensors of shape (local_batch_size, seq_len)."""

    def __init__(
        self,
        files,
        tokenizer: Tokenizer,
        *,
        seq_len: int,
        local_batch_size: int,
        dp_rank: int,
        dp_world_size: int,
        seed: int,
        shuffle: bool = True,
        shuffle_buffer: int = 0,
    ):
        self.files, self.tokenizer = files, tokenizer
        self.seq_len, self.local_batch_size = seq_len, local_batch_size
        self.dp_rank, self.dp_world_size = dp_rank, dp_world_size
        self.seed, self.shuffle, self.shuffle_buffer = seed, shuffle, shuffle_buffer
        self.windows_seen = 0  # global index of the next window of the shared stream
        self._it = self._windows()

    def _windows(self) -> Iterator[List[int]]:
        docs = _tokenized_docs(self.tokenizer, iter_documents(self.files, self.seed, self.shuffle))
        windows = pack_windows(docs, self.seq_len, self.tokenizer.bos_id, self.tokenizer.eos_id)
        return shuffle_windows(windows, self.shuffle_buffer if self.shuffle else 0, self.seed)

    def __iter__(self):
        return self

    def __next__(self) -> Dict[str, torch.Tensor]:
        rows = []
        while len(rows) < self.local_batch_size:
            window = next(self._it)
            if self.windows_seen % self.dp_world_size == self.dp_rank:
                rows.append(window)
            self.windows_seen += 1
        t = torch.tensor(rows, dtype=torch.long)
        return {"input_ids": t[:, :-1], "labels": t[:, 1:]}

    def skip(self, n_batches: int) -> None:
        """Advance past ``n_batches`` of this rank's batches (resume by replay: this
        minimal path has no seek)."""
        for _ in range(n_batches):
            next(self)
