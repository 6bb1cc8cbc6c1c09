"""Documents -> windows of seq_len+1 tokens (inputs and labels shifted by one).

Every document is wrapped as ``<|begin_of_text|> ... <|end_of_text|>`` and the documents
are concatenated; a window takes the next seq_len+1 tokens and the remainder carries into
the next window, so no token is padded, dropped or repeated. Along with the tokens a
window carries, per token, the key of its document and a position id that restarts at
each document (and at the window start: attention never reaches the previous window), so
that ``data.document_masking`` can make attention block-causal per document.

The packer's state is a list of *fragments* still to be emitted, in order: each a reference
to its document (source, unit, cursor, token offset), rebuilt by re-reading that document
on restore, so no token and no payload lands in the state. (States written before
payloads existed hold the tails of earlier documents as literal runs of tokens; those
still load.)

A document may carry *items* (``stream.Record``: a dict of arrays per marker token, an
image for instance): the packer hands each window the items of the markers it holds, in
order, and never slices an item."""
from __future__ import annotations

from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

# A document handed to the packer: its key, the wrapped tokens and a resumable reference.
#   ref = {"src": i, "g": unit index, "c": cursor}
Piece = Tuple[int, np.ndarray, dict]


def wrap(parts: Sequence[np.ndarray], bos_id: int, eos_id: int) -> np.ndarray:
    """``<|begin_of_text|>`` + the parts' tokens in order + ``<|end_of_text|>``, as int64."""
    out = np.empty(sum(len(p) for p in parts) + 2, dtype=np.int64)
    out[0], out[-1] = bos_id, eos_id
    at = 1
    for p in parts:
        out[at:at + len(p)] = p
        at += len(p)
    return out


class Packer:
    def __init__(self, window: int, bos_id: int, eos_id: int, marker_id: Optional[int] = None):
        self.window, self.bos_id, self.eos_id, self.marker_id = window, bos_id, eos_id, marker_id
        # (key, tokens, ref or None, start offset of tokens inside the wrapped document,
        #  the items of the markers among tokens)
        self._segs: List[Tuple[int, np.ndarray, Optional[dict], int, list]] = []
        self._len = 0
        self.items: list = []  # the last window's items, in the order of their markers

    def wrap(self, tokens: np.ndarray) -> np.ndarray:
        return wrap([tokens], self.bos_id, self.eos_id)

    def _markers(self, tokens: np.ndarray) -> int:
        return 0 if self.marker_id is None else int(np.count_nonzero(tokens == self.marker_id))

    def add(self, key: int, wrapped: np.ndarray, ref: Optional[dict], offset: int = 0,
            items: Sequence = ()) -> None:
        """``items``: one per marker token of the whole document; those of markers before
        ``offset`` are dropped with their tokens."""
        if len(wrapped) > offset:
            items = list(items)[self._markers(wrapped[:offset]):] if items else []
            self._segs.append((key, wrapped[offset:], ref, offset, items))
            self._len += len(wrapped) - offset

    def ready(self) -> bool:
        return self._len >= self.window

    def cut(self) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(tokens, document keys, run lengths) of the next window, the keys run-length
        encoded (``np.repeat(keys, lengths)`` per token); requires ``ready()``. Position
        ids follow from the keys (``positions``); the window's items are ``self.items``."""
        need, toks, keys, lens, self.items = self.window, [], [], [], []
        while need:
            key, seg, ref, off, items = self._segs[0]
            take = min(need, len(seg))
            toks.append(seg[:take])
            keys.append(key)
            lens.append(take)
            if items:
                n = self._markers(seg[:take])
                self.items.extend(items[:n])
                items = items[n:]
            if take == len(seg):
                self._segs.pop(0)
            else:
                self._segs[0] = (key, seg[take:], ref, off + take, items)
            need -= take
        self._len -= self.window
        tokens = toks[0] if len(toks) == 1 else np.concatenate(toks)
        return tokens, np.asarray(keys, dtype=np.int64), np.asarray(lens, dtype=np.int64)

    def state_dict(self) -> List[dict]:
        return [{"key": key, "ref": ref, "off": off} if ref is not None else {"key": key, "tokens": seg}
                for key, seg, ref, off, _ in self._segs]  # tokens: an array; lists only in JSON

    def load_fragments(self, frags: List[dict], fetch: Callable[[dict], Optional[tuple]]) -> None:
        """Append saved fragments; ``fetch(ref)`` returns a referenced document as (wrapped
        tokens, items), or None when it can no longer be read (the fragment is dropped)."""
        for fr in frags:
            if "tokens" in fr:
                self.add(fr["key"], np.asarray(fr["tokens"], dtype=np.int64), None)
            else:
                got = fetch(fr["ref"])
                if got is not None:
                    self.add(fr["key"], got[0], fr["ref"], fr.get("off", 0), got[1])

    def segments(self) -> Iterator[Tuple[int, int]]:
        for key, seg, _, _, _ in self._segs:
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
