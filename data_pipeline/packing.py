"""Documents -> windows of seq_len+1 tokens (inputs and labels shifted by one).

Every document is wrapped as ``<|begin_of_text|> ... <|end_of_text|>`` and the documents
are concatenated; a window takes the next seq_len+1 tokens and the remainder carries into
the next window, so no token is padded, dropped or repeated. Along with the tokens a
window carries, per token, the key of its document and a position id that restarts at
each document (and at the window start: attention never reaches the previous window), so
that ``data.document_masking`` can make attention block-causal per document.

The packer's state is a list of *fragments* still to be emitted, in order: literal runs of
tokens (the tail of earlier documents, always shorter than a window) and a reference to
the document being split (source, unit, cursor, token offset), rebuilt by re-reading that
one document on restore, so a long document never lands in the state."""
from __future__ import annotations

from typing import Callable, Dict, Iterator, List, Optional, Tuple

import numpy as np

# A document handed to the packer: its key, the wrapped tokens and a resumable reference.
#   ref = {"src": i, "g": unit index, "c": cursor}
Piece = Tuple[int, np.ndarray, dict]


class Packer:
    def __init__(self, window: int, bos_id: int, eos_id: int):
        self.window, self.bos_id, self.eos_id = window, bos_id, eos_id
        # (key, tokens, ref or None, start offset of tokens inside the wrapped document)
        self._segs: List[Tuple[int, np.ndarray, Optional[dict], int]] = []
        self._len = 0

    def wrap(self, tokens: np.ndarray) -> np.ndarray:
        out = np.empty(len(tokens) + 2, dtype=np.int64)
        out[0], out[-1] = self.bos_id, self.eos_id
        out[1:-1] = tokens
        return out

    def add(self, key: int, wrapped: np.ndarray, ref: Optional[dict], offset: int = 0) -> None:
        if len(wrapped) > offset:
            self._segs.append((key, wrapped[offset:], ref, offset))
            self._len += len(wrapped) - offset

    def ready(self) -> bool:
        return self._len >= self.window

    def cut(self) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(tokens, document keys, run lengths) of the next window, the keys run-length
        encoded (``np.repeat(keys, lengths)`` per token); requires ``ready()``. Position
        ids follow from the keys (``positions``)."""
        need, toks, keys, lens = self.window, [], [], []
        while need:
            key, seg, ref, off = self._segs[0]
            take = min(need, len(seg))
            toks.append(seg[:take])
            keys.append(key)
            lens.append(take)
            if take == len(seg):
                self._segs.pop(0)
            else:
                self._segs[0] = (key, seg[take:], ref, off + take)
            need -= take
        self._len -= self.window
        tokens = toks[0] if len(toks) == 1 else np.concatenate(toks)
        return tokens, np.asarray(keys, dtype=np.int64), np.asarray(lens, dtype=np.int64)

    def state_dict(self) -> List[dict]:
        frags = []
        for i, (key, seg, ref, off) in enumerate(self._segs):
            last = i == len(self._segs) - 1
            if last and ref is not None:
                frags.append({"key": key, "ref": ref, "off": off})
            else:
                frags.append({"key": key, "tokens": seg})  # an array; lists only in JSON
        return frags

    def load_fragments(self, frags: List[dict], fetch: Callable[[dict], Optional[np.ndarray]]) -> None:
        """Append saved fragments; ``fetch(ref)`` returns a referenced document wrapped,
        or None when it can no longer be read (the fragment is dropped)."""
        for fr in frags:
            if "tokens" in fr:
                self.add(fr["key"], np.asarray(fr["tokens"], dtype=np.int64), None)
            else:
                wrapped = fetch(fr["ref"])
                if wrapped is not None:
                    self.add(fr["key"], wrapped, fr["ref"], fr["off"])

    def segments(self) -> Iterator[Tuple[int, int]]:
        for key, seg, _, _ in self._segs:
            yield key, len(seg)


def positions(doc_ids: np.ndarray) -> np.ndarray:
    """Position ids for (rows, n) document keys: restarting at each document and at the
    window start (attention never reaches the previous window)."""
    n = doc_ids.shape[1]
    idx = np.broadcast_to(np.arange(n), doc_ids.shape)
    start = np.ones(doc_ids.shape, dtype=bool)
    start[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    return idx - np.maximum.accumulate(np.where(start, idx, 0), axis=1)


def pack_all(docs, window: int, bos_id: int, eos_id: int) -> List[Dict[str, np.ndarray]]:
    """Pack a finite list of token lists (tests and tools); the remainder is dropped."""
    p, out = Packer(window, bos_id, eos_id), []
    for i, d in enumerate(docs):
        p.add(i, p.wrap(np.asarray(d, dtype=np.int64)), None)
        while p.ready():
            t, k, n = p.cut()
            k = np.repeat(k, n)
            out.append({"tokens": t, "keys": k, "positions": positions(k[None])[0]})
    return out
