"""One loader *slot*: a stream of windows; each row of the global batch cycles through
``streams_per_row`` of them (see loader.py).

Which units a slot reads is arithmetic. Units are numbered globally across epochs: unit
``g`` is ``units[perm_e[g % N]]`` of epoch ``e = g // N``, where ``perm_e`` is a seeded
permutation (the identity without shuffling). A slot first drains an explicit queue of
(unit, cursor) pairs (empty on a fresh start), then takes the progression ``next,
next + stride, ...``; fresh slot ``s`` starts with ``next = s, stride = S``. So within an
epoch every document is read by exactly one slot, and the whole position of a slot is a
few integers plus the packer's fragments: ``reshard`` turns the states of S slots into
those of S' slots so that the remaining work is covered exactly once.

With several sources (a mixture) each source has its own progression, and the next
document comes from the source with the lowest ``(tokens_i + u_i * mean_doc_len_i) /
weight_i``, where ``u_i`` is a seeded Exp(1) draw per pick: the token counts track the
weights to within about one document per stream (a deficit round robin), and the jitter
makes streams start on different sources with probability proportional to the weights
(the minimum of Exp(w_i) variables), so the realized mixture is right from the first
steps. Deterministic for (seed, slot, documents so far), hence exactly resumable.

Chat sources (``data.format=chat``) are rendered (chat.py) instead of wrapped, and packed
whole by a ``ChatPacker``; their windows carry a loss mask as a fourth element.

A slot's reader of a source raises ``DataError`` after ``EMPTY_UNITS_LIMIT`` consecutive
units, or ``EMPTY_RECORDS_LIMIT`` consecutive records, without a document (every record
bad or blank, every file gone): without it a slot would read on forever, epoch after
epoch, and training would hang."""
from __future__ import annotations

import logging
import re
from collections import Counter
from typing import Dict, Iterator, List, Optional, Sequence

import numpy as np

from .chat import ChatPacker, ChatRenderer, pad_id
from .packing import Packer
from .sources import BLANK, DataError, Source

log = logging.getLogger("data_pipeline")

# Document keys: source (4 bits) | global unit index (36 bits) | cursor in unit (23 bits).
_UNIT_BITS, _CUR_BITS = 36, 23
# A tokenizer call takes up to this many documents or characters (read-ahead stays small).
_ENCODE_DOCS, _ENCODE_CHARS = 32, 1 << 16
_MAX_SKIP_LOGS = 5
# Consecutive units without a document (per slot and source) that stop the job, or every
# unit of the source in a row, whichever comes first. On a corpus where half the units hold
# no document, a slot sees 64 in a row with probability 0.5**64 = 5e-20 per unit read; on
# one where none does, it takes 64 units (seconds on a small file), or all of them, to say so.
EMPTY_UNITS_LIMIT = 64
# Consecutive records without a document (skipped ones and blank lines), however few units
# hold them: a compressed file is one unit, and 300 MiB of blank lines (10 KB as .zst)
# took minutes to read while the first step waited. A million blank lines read in about a
# second; a real corpus does not hold a million bad records in a row.
EMPTY_RECORDS_LIMIT = 1_000_000


def doc_key(src: int, g: int, cursor: int) -> int:
    return (src << (_UNIT_BITS + _CUR_BITS)) | ((g & ((1 << _UNIT_BITS) - 1)) << _CUR_BITS) | (cursor & ((1 << _CUR_BITS) - 1))


def key_source(keys):
    return keys >> (_UNIT_BITS + _CUR_BITS)


def key_unit(keys):
    """The global unit index g (epoch * units + position) of document keys."""
    return (keys >> _CUR_BITS) & ((1 << _UNIT_BITS) - 1)


def key_cursor(keys):
    return keys & ((1 << _CUR_BITS) - 1)


class UnitPlan:
    """The global unit order of one source: unit g -> base unit index."""

    def __init__(self, n_units: int, seed: int, src: int, shuffle: bool):
        self.n, self.seed, self.src, self.shuffle = n_units, seed, src, shuffle
        self._perms: Dict[int, np.ndarray] = {}

    def epoch(self, g: int) -> int:
        return g // self.n

    def unit(self, g: int) -> int:
        e, i = divmod(g, self.n)
        if not self.shuffle:
            return i
        if e not in self._perms:
            # Streams can be a few epochs apart on small corpora: keep several, within ~32 MB.
            if len(self._perms) >= max(2, (1 << 22) // self.n):
                self._perms.pop(next(iter(self._perms)))
            self._perms[e] = np.random.default_rng([self.seed, self.src, e]).permutation(self.n)
        return int(self._perms[e][i])


def fresh_reader_state(slot: int, stride: int) -> dict:
    return {"queue": [], "qi": 0, "next": slot, "stride": stride, "cur": None}


def fresh_slot_state(slot: int, num_slots: int, n_sources: int) -> dict:
    return {"slot": slot, "readers": [fresh_reader_state(slot, num_slots) for _ in range(n_sources)],
            "packer": [], "mix_tokens": [0] * n_sources, "mix_docs": [0] * n_sources}


def _returning(gen, box: list):
    """``gen``'s items; its return value is appended to ``box`` when it ends."""
    box.append((yield from gen))


def _reason_kind(reason: str) -> str:
    """A skip reason without its per-record detail (parenthesized error, byte offset)."""
    return re.sub(r" \(.*\)$| at byte \d+", "", reason)


class NoDocumentRun:
    """Units and records read in a row without a document (a new run starts at each
    document), the skips seen in them, and the limits: ``unit_without_document`` raises
    ``DataError`` at ``EMPTY_UNITS_LIMIT`` units, ``on_skip`` at ``EMPTY_RECORDS_LIMIT``
    records (skipped ones and blank lines) inside however few units. ``report(where,
    reason)`` hears every skipped record (not blank lines)."""

    def __init__(self, source: Source, report=None):
        self.source, self.report = source, report
        self._start()

    def _start(self) -> None:
        self.units, self.distinct, self.skipped, self.blank = 0, set(), 0, 0
        self.kinds: Counter = Counter()
        self.first: Optional[tuple] = None

    def document(self) -> None:
        """A document was read: the run starts over (called for every document: cheap)."""
        if self.units or self.skipped or self.blank:
            self._start()

    def read(self, u: int, docs, from_start: bool = True):
        """``docs`` (the source's ``iter_docs`` of unit ``u``, reporting its skips to
        ``on_skip``), each document starting the run over. A unit read from its start that
        held none extends the run; a byte range inside one long line (``iter_docs`` returns
        False: it holds no record) and the rest of a unit resumed in its middle do not."""
        found, box = False, []
        for item in _returning(docs, box):
            found = True
            self.document()
            yield item
        if not found and from_start and box != [False]:
            self.unit_without_document(u)

    def on_skip(self, where: str, reason: str) -> None:
        if reason is BLANK:
            self.blank += 1
        else:
            self.skipped += 1
            self.kinds[_reason_kind(reason)] += 1
            if self.first is None:
                self.first = (where, reason)
            if self.report is not None:
                self.report(where, reason)
        if self.skipped + self.blank >= EMPTY_RECORDS_LIMIT:
            raise self.error()

    def unit_without_document(self, u: int) -> None:
        """Also every unit of the source, read in a row without a document: nothing will come
        (a one-file corpus of one huge bad line is decompressed once, not 64 times)."""
        self.units += 1
        self.distinct.add(u)
        if self.units >= EMPTY_UNITS_LIMIT or len(self.distinct) >= len(self.source.units):
            raise self.error()

    def error(self) -> DataError:
        source = self.source
        spec = source.spec
        k = spec.key
        top = self.kinds.most_common(1)[0][0] if self.kinds else ""
        if "max_doc_bytes" in top:
            head, keys = f"{k}max_doc_bytes={spec.max_doc_bytes}", [f"{k}max_doc_bytes"]
        elif "field" in top and source.chat:
            head, keys = f"{k}format='chat'", [f"{k}format"]
        elif "field" in top:
            head, keys = f"{k}field={spec.field!r}", [f"{k}field"]
        else:
            head, keys = "", []
        where = f"{k}path={spec.path!r}"
        kinds = ", ".join(f"{kind} x{n}" for kind, n in self.kinds.most_common(3))
        if len(self.kinds) > 3:
            kinds += f", {len(self.kinds) - 3} other reasons"
        records = self.skipped + self.blank
        held = f"{records} records read, {self.skipped} skipped" + (f": {kinds}" if kinds else "")
        if self.blank:
            held += f"; {self.blank} blank lines"
        if self.first is not None:
            held += f"; the first: {self.first[0]}: {self.first[1]}"
        if records >= EMPTY_RECORDS_LIMIT:
            run = f"{records} consecutive records"
        elif len(self.distinct) >= len(self.source.units) and self.units < EMPTY_UNITS_LIMIT:
            run = f"every unit ({len(self.distinct)})"
        else:
            run = f"{self.units} consecutive units ({len(self.distinct)} distinct)"
        what = f"{head}: {run} of {where} held no document" if head else f"{where}: {run} held no document"
        return DataError(f"{what} ({held}); check {' / '.join(keys + [f'{k}path'])}")


class _Reader:
    """Documents of one source for one slot, with the reader state after each one.
    Raises ``DataError`` after ``EMPTY_UNITS_LIMIT`` consecutive units read from their
    start without a document (a byte range inside one long line does not count: it holds
    no record; neither does the rest of a unit resumed in its middle), or after
    ``EMPTY_RECORDS_LIMIT`` consecutive records (blank lines included) without one."""

    def __init__(self, source: Source, plan: UnitPlan, state: dict, on_skip):
        self.source, self.plan, self._log_skip = source, plan, on_skip
        self.n_skipped = 0  # records skipped so far (read ahead included)
        self.n_truncated = 0  # documents cut to max_doc_bytes so far (read ahead included)
        self.queue = [tuple(x) for x in state["queue"]]
        self.qi, self.next, self.stride = state["qi"], state["next"], state["stride"]
        self.cur = tuple(state["cur"]) if state["cur"] is not None else None
        self._empty = NoDocumentRun(source, self._count_skip)

    def __iter__(self):
        while True:
            if self.cur is not None:
                g, c = self.cur
            elif self.qi < len(self.queue):
                g, c = self.queue[self.qi]
                self.qi += 1
            else:
                g, c = self.next, 0
                self.next += self.stride
            self.cur = (g, c)
            u = self.plan.unit(g)
            docs = self.source.iter_docs(self.source.units[u], c, self.on_skip, self.on_truncate)
            for cursor, after, payload in self._empty.read(u, docs, from_start=c == 0):
                self.cur = (g, after)
                yield g, cursor, payload, self.snapshot(), self.n_skipped, self.n_truncated
            self.cur = None

    def on_skip(self, where: str, reason: str) -> None:
        self._empty.on_skip(where, reason)

    def _count_skip(self, where: str, reason: str) -> None:
        self.n_skipped += 1
        self._log_skip(where, reason)

    def on_truncate(self, where: str) -> None:
        self.n_truncated += 1

    def snapshot(self) -> dict:
        return {"queue": self.queue, "qi": self.qi, "next": self.next, "stride": self.stride,
                "cur": list(self.cur) if self.cur is not None else None}


class SlotStream:
    """Iterator of windows (tokens, run-length document keys: keys, lengths) for one
    slot, with ``state_dict``."""

    def __init__(self, sources: Sequence[Source], plans: Sequence[UnitPlan], weights: Sequence[float],
                 tokenizer, window: int, state: dict, sft_packing: str = "pack", max_length: int = -1):
        self.sources, self.plans, self.tok = sources, plans, tokenizer
        self.weights = np.asarray(weights, dtype=np.float64)
        self.slot = state["slot"]
        self._skip_logged = 0
        self.mix_tokens = list(state["mix_tokens"])
        self.mix_docs = list(state["mix_docs"])
        self.readers = [_Reader(s, p, r, self._on_skip) for s, p, r in zip(sources, plans, state["readers"])]
        # Committed reader states: after the last document handed to the packer; and the
        # records skipped before it and the documents cut to max_doc_bytes up to it
        # (read-ahead counts once their turn comes).
        self.reader_states = [r.snapshot() for r in self.readers]
        self._skips_committed = [0] * len(sources)
        self._skips_reported = 0
        self._cuts_committed = [0] * len(sources)
        self._cuts_reported = 0
        self.chat = any(s.chat for s in sources)
        self._truncated = 0  # chat: conversations cut to max_length, packed since the last take
        if self.chat:
            if not all(s.chat for s in sources):
                raise ValueError("data.format=chat: every source must be chat JSONL")
            self.max_length = window if max_length < 0 else max_length
            if not 0 < self.max_length <= window:
                raise ValueError(f"data.max_length={max_length}: must be in [1, train.seq_len+1={window}] or -1")
            self.renderer = ChatRenderer(tokenizer)
            self._iters = [self._rendered(i) for i in range(len(sources))]
            self.packer = ChatPacker(window, sft_packing, pad_id(tokenizer))
        else:
            self._iters = [self._tokenized(i) for i in range(len(sources))]
            self.packer = Packer(window, tokenizer.bos_id, tokenizer.eos_id)
        self.packer.load_fragments(state["packer"], self._fetch)

    def _on_skip(self, where: str, reason: str) -> None:
        if self._skip_logged < _MAX_SKIP_LOGS:
            self._skip_logged += 1
            log.warning("skipped a record: %s: %s%s", where, reason,
                        "" if self._skip_logged < _MAX_SKIP_LOGS else " (further skips are only counted)")

    def _fetch(self, ref: dict):
        """The packed form of a saved fragment's document, or None (with a warning) when
        its file vanished or cannot be read: the fragment is dropped."""
        src = self.sources[ref["src"]]
        unit = src.units[self.plans[ref["src"]].unit(ref["g"])]
        try:
            payload = src.read_one(unit, ref["c"])
        except OSError as e:
            log.warning("dropped the rest of a document being packed when the checkpoint was written: "
                        "%s, cursor %d: vanished or unreadable (%s)", src.unit_label(unit), ref["c"], e)
            return None
        if self.chat:
            tokens, mask, _ = self.renderer.render_batch([payload], self.max_length)[0]
            return tokens, mask
        toks = payload if src.tokenized else self.tok.encode_batch([payload])[0]
        return self.packer.wrap(toks)

    def _tokenized(self, i: int) -> Iterator[tuple]:
        """(key, wrapped tokens, ref, reader state after) for source i, tokenized in batches."""
        src, reader = self.sources[i], iter(self.readers[i])
        while True:
            batch, chars = [next(reader)], 0
            while not src.tokenized and len(batch) < _ENCODE_DOCS:
                chars += len(batch[-1][2])
                if chars >= _ENCODE_CHARS:
                    break
                batch.append(next(reader))
            if src.tokenized:
                toks = [batch[0][2]]
            else:
                flat, off = self.tok.encode_batch([b[2] for b in batch])
                toks = [flat[off[j]:off[j + 1]] for j in range(len(batch))]
            for (g, c, _, snap, n_skipped, n_cut), t in zip(batch, toks):
                yield doc_key(i, g, c), self.packer.wrap(t), {"src": i, "g": g, "c": c}, snap, (n_skipped, n_cut)

    def _rendered(self, i: int) -> Iterator[tuple]:
        """Chat: (key, (tokens, loss mask), ref, reader state after, skipped, truncated)."""
        reader = iter(self.readers[i])
        while True:
            batch, chars = [next(reader)], 0
            while len(batch) < _ENCODE_DOCS:
                chars += sum(len(c) for _, c in batch[-1][2])
                if chars >= _ENCODE_CHARS:
                    break
                batch.append(next(reader))
            rendered = self.renderer.render_batch([b[2] for b in batch], self.max_length)
            for (g, c, _, snap, n_skipped, n_cut), (t, m, truncated) in zip(batch, rendered):
                yield doc_key(i, g, c), (t, m), {"src": i, "g": g, "c": c}, snap, (n_skipped, n_cut), truncated

    def _pick_source(self) -> int:
        if len(self.sources) == 1:
            return 0
        tokens, docs = np.asarray(self.mix_tokens, dtype=np.float64), np.asarray(self.mix_docs, dtype=np.float64)
        seen = docs > 0
        default = (tokens[seen] / docs[seen]).mean() if seen.any() else 1.0
        mean_len = np.where(seen, tokens / np.maximum(docs, 1), default)
        u = np.random.default_rng([self.plans[0].seed, self.slot, int(docs.sum())]).exponential(size=len(tokens))
        return int(np.argmin((tokens + u * mean_len) / self.weights))

    def next_window(self):
        """(tokens, keys, lengths), and for chat a fourth element: the loss mask."""
        while not self.packer.ready():
            i = self._pick_source()
            if self.chat:
                key, wrapped, ref, snap, counts, truncated = next(self._iters[i])
                self._truncated += truncated
                n_tokens = len(wrapped[0])
            else:
                key, wrapped, ref, snap, counts = next(self._iters[i])
                n_tokens = len(wrapped)
            self.packer.add(key, wrapped, ref)
            self.reader_states[i] = snap
            self._skips_committed[i], self._cuts_committed[i] = counts
            self.mix_tokens[i] += n_tokens
            self.mix_docs[i] += 1
        return self.packer.cut()

    def take_truncated(self) -> int:
        """Chat: conversations cut to max_length among those packed since the last call."""
        n, self._truncated = self._truncated, 0
        return n

    def take_truncated_docs(self) -> int:
        """Documents cut to max_doc_bytes (text cells, text files) among those packed
        since the last call."""
        total = sum(self._cuts_committed)
        n, self._cuts_reported = total - self._cuts_reported, total
        return n

    def take_skipped(self) -> int:
        """Records skipped before the documents packed since the last call."""
        total = sum(self._skips_committed)
        n, self._skips_reported = total - self._skips_reported, total
        return n

    def state_dict(self, with_queue: bool = True) -> dict:
        """``with_queue=False`` leaves out the readers' queues (fixed between loads; the
        loader's main process keeps them) to keep per-batch states small."""
        readers = self.reader_states if with_queue else [
            {k: v for k, v in r.items() if k != "queue"} for r in self.reader_states]
        return {"slot": self.slot, "readers": readers,
                "packer": self.packer.state_dict(), "mix_tokens": list(self.mix_tokens),
                "mix_docs": list(self.mix_docs)}


def reshard(states: List[dict], new_slots: int) -> List[dict]:
    """Slot states for ``new_slots`` slots that cover exactly the work the given states
    had left: units started or owed below each source's frontier go to explicit queues
    (round robin), the progression restarts at the frontier with the new stride, and the
    packers' fragments and mixture counts move to slot ``old % new_slots``."""
    states = sorted(states, key=lambda s: s["slot"])
    n_src = len(states[0]["readers"])
    out = [{"slot": s, "readers": [], "packer": [], "mix_tokens": [0] * n_src, "mix_docs": [0] * n_src}
           for s in range(new_slots)]
    for i in range(n_src):
        olds = [st["readers"][i] for st in states]
        frontier = max(r["next"] for r in olds)
        items = []
        for r in olds:
            if r["cur"] is not None:
                items.append(tuple(r["cur"]))
            items.extend(tuple(x) for x in r["queue"][r["qi"]:])
            items.extend((g, 0) for g in range(r["next"], frontier, r["stride"]))
        items.sort()
        for s in range(new_slots):
            out[s]["readers"].append({"queue": [list(x) for x in items[s::new_slots]], "qi": 0,
                                      "next": frontier + s, "stride": new_slots, "cur": None})
    for st in states:
        tgt = out[st["slot"] % new_slots]
        tgt["packer"].extend(st["packer"])
        for k in ("mix_tokens", "mix_docs"):
            tgt[k] = [a + b for a, b in zip(tgt[k], st[k])]
    return out
