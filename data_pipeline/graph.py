"""The loader's graph on ``torchdata.nodes``, per data-parallel rank:

    DocSource (reads documents for the rank's slots, in the order their packers will need them)
      -> ParallelMapper(Encoder.encode) (tokenizing threads, in order; inline with 0 workers)
      -> Batches (per slot a packer; cuts each row's window and assembles the batch)
      -> Prefetcher (the batches are built off the training thread) -> Loader

Only ``Batches`` decides what a batch holds: every slot's packer takes the documents of
each source in its reader's order, whatever the source read ahead and whichever worker
tokenized them, so the batches do not depend on the number of workers or on timing. Its
state (``get_state``) is the committed one: per slot the reader positions after the last
document packed, the packer's fragments (references, re-read on restore) and the mixture
counts; what was read ahead is read again after a resume.

``DocSource`` is demand driven: it walks the order in which the rows take windows from
their slots and reads for a slot while the tokens on their way to it (estimated from
characters until tokenized) fall short of what its next windows need, picking each
document's source by the packer's own mixture rule, so read-ahead stays a few items per
slot. Should a packer still wait for a source of a slot with nothing on its way (the
estimate was off), it asks (``Ledger.needs``) and the source serves that first. Tokenizer
threads, not processes: quicktok, tiktoken and ``tokenizers`` release the GIL while they
encode (README: `data.num_workers`, Benchmarks)."""
from __future__ import annotations

import collections
import threading
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
from torchdata.nodes import BaseNode, Loader, ParallelMapper, Prefetcher

from .chat import PAD_KEY, shifted_labels
from .packing import positions as _positions
from .stream import (Encoder, SkipLog, SlotStream, UnitPlan, _Reader, key_source, payload_chars, pick_source,
                     ready_doc)

# A work item for the tokenizer threads holds up to this many characters or documents, and
# documents for windows at most LOOKAHEAD batches past the one being packed. Large items
# keep the tokenizing thread busy: each time it returns to Python it may wait for the GIL
# (up to the 5 ms switch interval) while the reading and packing threads run, and 256K
# items kept 0.68 of the raw tokenizer's speed with 1 worker where 1M items kept 0.87
# (bench/data_throughput.py --mb 30). In process (no workers) an item holds what the
# batch being packed needs, in tokenizer calls of up to INLINE_CHARS.
ITEM_CHARS, ITEM_DOCS, LOOKAHEAD = 1 << 20, 512, 32
IMAGE_ITEM_DOCS, IMAGE_LOOKAHEAD = 4, 2
INLINE_CHARS = 1 << 16
_CHARS_PER_TOKEN = 4.0  # the estimate before the first documents are tokenized


class Ledger:
    """What ``DocSource`` (reader thread) and ``Batches`` (packing thread) tell each other.
    Every counter has one writer; the other thread reads it, possibly a little stale, which
    only changes how far ahead the source reads, never what a batch holds."""

    def __init__(self, n_slots: int, n_sources: int):
        z = lambda: [[0] * n_sources for _ in range(n_slots)]  # noqa: E731
        # Written by the source: documents and estimated tokens sent to (slot, source).
        self.sent_docs, self.sent_est = z(), z()
        # Written by the packing side: documents arrived, their estimates and true tokens.
        self.got_docs, self.got_est, self.got_tokens = z(), z(), z()
        self.chars, self.tokens = 0, 0  # arrived: characters (as estimated) and tokens
        # Per slot, in the packer's unit (tokens; chat pad: documents): windows cut, units
        # handed to the packer, and units it holds after its last window.
        self.windows, self.consumed, self.held = [0] * n_slots, [0] * n_slots, [0] * n_slots
        self.needs: collections.deque = collections.deque()  # (slot, source) a packer waits for
        self.batches = 0  # batches the packing side has finished
        self.closed = False
        self.cond = threading.Condition()

    def wake(self) -> None:
        """The packing side finished a batch or waits for a document: the source reads on."""
        with self.cond:
            self.cond.notify_all()

    def tokens_of(self, j: int, i: int, sent_est: float) -> float:
        """Tokens sent to (slot j, source i): true where tokenized, estimated on the way."""
        return sent_est - self.got_est[j][i] + self.got_tokens[j][i]

    def chars_per_token(self) -> float:
        return self.chars / self.tokens if self.tokens > 1000 else _CHARS_PER_TOKEN


class DocSource(BaseNode):
    """Documents of this rank's slots as work items (lists of raw documents), read ahead of
    the packers in the order they need them. Its state is the reader positions of every slot
    and source (read-ahead included)."""

    def __init__(self, sources, plans: Sequence[UnitPlan], weights, window: int, slot_states: List[dict],
                 lane_next: List[int], lanes: int, unit_is_doc: bool, ledger: Ledger, seed: int,
                 inline: bool, images: bool = False):
        super().__init__()
        self.sources, self.plans, self.window = sources, plans, window
        self.weights = np.asarray(weights, dtype=np.float64)
        self.slot_ids = [st["slot"] for st in slot_states]
        self._start = [st["readers"] for st in slot_states]
        self.mix0 = [(list(st["mix_tokens"]), list(st["mix_docs"])) for st in slot_states]
        self.lane_next, self.lanes, self.unit_is_doc = list(lane_next), lanes, unit_is_doc
        self.ledger, self.seed = ledger, seed
        self.limit, self.ahead = (INLINE_CHARS, 0) if inline else (ITEM_CHARS, LOOKAHEAD)
        # Decoded images are large (a 4-tile 560-pixel image is 3.8 MB as uint8): small work
        # items spread the decoding over the workers, and little is read ahead.
        self.item_docs = IMAGE_ITEM_DOCS if images else ITEM_DOCS
        if images and not inline:
            self.ahead = IMAGE_LOOKAHEAD

    def reset(self, initial_state: Optional[dict] = None):
        super().reset(initial_state)
        start = initial_state["readers"] if initial_state is not None else self._start
        self.readers = []
        for st in start:
            log = SkipLog()
            self.readers.append([_Reader(s, p, r, log) for s, p, r in zip(self.sources, self.plans, st)])
        self._iters = [[iter(r) for r in rs] for rs in self.readers]
        self.batch, self.row = 0, 0  # the next window in the rows' order
        self.demand = [0] * len(self.readers)  # windows of each slot walked past

    def get_state(self) -> dict:
        return {"readers": [[r.snapshot() for r in rs] for rs in self.readers]}

    def _read(self, j: int, i: int, item: list) -> int:
        raw = next(self._iters[j][i])
        chars = payload_chars(raw[2])
        est = (float(chars) if isinstance(raw[2], np.ndarray) else chars / self.ledger.chars_per_token()) + 2
        item.append((j, i, raw, est, chars))
        self.ledger.sent_docs[j][i] += 1
        self.ledger.sent_est[j][i] += est
        return chars

    def _pick(self, j: int) -> int:
        if len(self.sources) == 1:
            return 0
        led, (tok0, docs0) = self.ledger, self.mix0[j]
        tokens = [t + led.tokens_of(j, i, led.sent_est[j][i]) for i, t in enumerate(tok0)]
        docs = [d + led.sent_docs[j][i] for i, d in enumerate(docs0)]
        return pick_source(self.seed, self.slot_ids[j], tokens, docs, self.weights)

    def next(self) -> list:
        """The next work item; waits (threads only) while every window up to LOOKAHEAD
        batches ahead has its documents on the way."""
        while True:
            item = self._fill()
            if item:
                return item
            with self.ledger.cond:
                self.ledger.cond.wait(0.05)
            if self.ledger.closed:
                raise StopIteration

    def _fill(self) -> list:
        item, chars, led = [], 0, self.ledger
        while led.needs:  # a packer waits: serve it first, then read ahead
            j, i = led.needs.popleft()
            chars += self._read(j, i, item)
        rows, unit = len(self.lane_next), 1.0 if self.unit_is_doc else float(self.window)
        while chars < self.limit and len(item) < self.item_docs and self.batch <= led.batches + self.ahead:
            j = self.row * self.lanes + (self.lane_next[self.row] + self.batch) % self.lanes
            k, done = self.demand[j], led.windows[j]
            if done <= k:  # the packer has not cut this window yet
                # What slot j's windows up to this one need beyond what its packer holds,
                # against what is on its way (sent, not yet handed to the packer).
                need = (k - done + 1) * unit - led.held[j]
                if self.unit_is_doc:
                    sent = float(sum(led.sent_docs[j]))
                else:
                    sent = sum(led.tokens_of(j, i, led.sent_est[j][i]) for i in range(len(self.sources)))
                if sent - led.consumed[j] < need:
                    chars += self._read(j, self._pick(j), item)
                    continue
            self.demand[j] = max(k, done) + 1
            self.row += 1
            if self.row == rows:
                self.row, self.batch = 0, self.batch + 1
        return item


def encode_item(encoder: Encoder) -> Callable[[list], list]:
    """The map function of the tokenizing workers: a work item's documents encoded in one
    tokenizer call (stateless: any worker may take any item)."""

    def run(item: list) -> list:
        enc = encoder.encode([raw[2] for _, _, raw, _, _ in item])
        return [(j, i, ready_doc(i, raw, e), est, chars) for (j, i, raw, est, chars), e in zip(item, enc)]

    return run


class Batches(BaseNode):
    """This rank's batches (numpy, the whole optimizer step's rows) from per-slot packers
    fed by the tokenizing workers. ``get_state`` is the rows' committed state (loader.py's
    format) after the last batch."""

    def __init__(self, sources, plans, weights, tokenizer, spec, rows: List[dict], n_workers: int,
                 collate: Optional[Callable[[dict], dict]] = None):
        super().__init__()
        self.sources, self.plans, self.weights, self.tokenizer = sources, plans, weights, tokenizer
        self.spec, self._rows0, self.n_workers, self.collate = spec, rows, n_workers, collate
        self.chat = any(s.chat for s in sources)
        self.window = spec.seq_len + 1
        self.image = spec.image
        self.encoder = Encoder(tokenizer, self.window, self.chat, spec.max_length, spec.marker_id, spec.image)
        self.whole, self.marker_id = self.encoder.whole, self.encoder.marker_id
        self._mapper = None

    def reset(self, initial_state: Optional[dict] = None):
        super().reset(initial_state)
        self._shutdown()
        rows = initial_state["rows"] if initial_state is not None else self._rows0
        lanes, n_src = len(rows[0]["slots"]), len(self.sources)
        slot_states = [st for row in rows for st in row["slots"]]
        self.ledger = led = Ledger(len(slot_states), n_src)
        self.queues: List[List[collections.deque]] = [[collections.deque() for _ in range(n_src)]
                                                      for _ in slot_states]
        self.streams = [SlotStream(self.sources, self.plans, self.weights, self.tokenizer, self.window, st,
                                   self.spec.sft_packing, self.spec.max_length, feed=self._feeder(j),
                                   encoder=self.encoder) for j, st in enumerate(slot_states)]
        pad = self.whole and self.spec.sft_packing == "pad"
        for j, s in enumerate(self.streams):
            led.held[j] = s.held
        self.lanes, self.next_lane = lanes, [row["next"] for row in rows]
        source = DocSource(self.sources, self.plans, self.weights, self.window, slot_states, self.next_lane,
                           lanes, pad, led, self.spec.seed, inline=self.n_workers == 0, images=self.image is not None)
        # In order: a slot's documents of a source must reach its queue in its reader's order
        # (two items may hold documents of the same slot and source). torchdata's default bound
        # on items in flight; the mapper's own snapshots are never used (the packers'
        # committed state is the state).
        self._mapper = ParallelMapper(source, encode_item(self.encoder), num_workers=self.n_workers,
                                      in_order=True, method="thread", max_concurrent=None,
                                      snapshot_frequency=1 << 30)
        self._mapper.reset()

    def _feeder(self, j: int):
        def feed(i: int):
            q, led = self.queues[j][i], self.ledger
            while not q:
                if led.sent_docs[j][i] == led.got_docs[j][i] and (j, i) not in led.needs:
                    led.needs.append((j, i))
                    led.wake()
                self._pull()
            return q.popleft()

        return feed

    def _pull(self) -> None:
        led = self.ledger
        for j, i, ready, est, chars in next(self._mapper):
            self.queues[j][i].append(ready)
            led.got_docs[j][i] += 1
            led.got_est[j][i] += est
            led.got_tokens[j][i] += ready[2]
            led.chars += chars
            led.tokens += ready[2]

    def get_state(self) -> dict:
        return {"rows": [{"slots": [self.streams[q * self.lanes + k].state_dict() for k in range(self.lanes)],
                          "next": n} for q, n in enumerate(self.next_lane)]}

    def next(self) -> Dict[str, object]:
        b, s1, led = len(self.next_lane), self.window, self.ledger
        tokens = np.empty((b, s1), dtype=np.int64)
        doc_ids = np.empty((b, s1), dtype=np.int64)
        masks = np.empty((b, s1), dtype=bool) if self.whole else None
        skipped = truncated = cut = dropped = 0
        items: List[list] = []
        src_tokens = np.zeros(len(self.sources), dtype=np.int64)
        for q in range(b):
            lane = self.next_lane[q]
            j = q * self.lanes + lane
            s = self.streams[j]
            win = s.next_window()
            led.windows[j] += 1
            led.consumed[j] = s.consumed
            led.held[j] = s.held
            tokens[q] = win[0]
            keys, lens = win[1], win[2]
            doc_ids[q] = np.repeat(keys, lens)
            if self.whole:
                masks[q] = win[3]
                real = keys != PAD_KEY  # padding is no source's token
                keys, lens = keys[real], lens[real]
            src_tokens += np.bincount(key_source(keys), weights=lens, minlength=len(self.sources)).astype(np.int64)
            skipped += s.take_skipped()
            cut += s.take_truncated_docs()
            truncated += s.take_truncated()
            dropped += s.take_dropped()
            items.append(s.take_items())
            self.next_lane[q] = (lane + 1) % self.lanes
        led.batches += 1
        led.wake()
        out = {"tokens": tokens, "doc_ids": doc_ids, "masks": masks, "source_tokens": src_tokens,
               "skipped": skipped, "truncated": truncated, "truncated_docs": cut, "dropped": dropped}
        out["positions"] = _positions(doc_ids) if self.spec.positions else None
        out["labels"] = shifted_labels(tokens, masks) if self.whole else None
        if self.image is not None:  # the model's image inputs; the per-item arrays are not passed on
            from .images import collate

            stacked = stack_items(items, tokens, self.marker_id)
            out.update(collate({**out, **stacked}, self.image))
        elif self.marker_id is not None:
            out.update(stack_items(items, tokens, self.marker_id))
            if self.collate is not None:
                out.update(self.collate(out))
        return out

    def _shutdown(self) -> None:
        if self._mapper is not None:
            self.ledger.closed = True
            self.ledger.wake()
        it = getattr(getattr(self._mapper, "_it", None), "_it", None)
        shutdown = getattr(it, "_shutdown", None)
        if shutdown is not None:
            shutdown()
        self._mapper = None


def stack_items(items: List[list], tokens: np.ndarray, marker_id: int) -> dict:
    """Per-row item lists -> ``item_<name>`` arrays (rows, I, ...) zero padded, I the most
    items of a row (at least 1), and ``item_positions`` (rows, I): the window position of
    each item's marker token, -1 where a row has fewer items."""
    b = len(items)
    n = max(1, max(len(x) for x in items))
    pos = np.full((b, n), -1, dtype=np.int64)
    for q, row in enumerate(items):
        at = np.flatnonzero(tokens[q] == marker_id)
        if len(at) != len(row):  # the packer hands each window the items of its markers
            raise RuntimeError(f"row {q}: {len(at)} marker tokens but {len(row)} items")
        pos[q, :len(at)] = at
    out = {"item_positions": pos}
    first = next((it for row in items for it in row), None)
    for name in (first or {}):
        ref = np.asarray(first[name])
        arr = np.zeros((b, n, *ref.shape), dtype=ref.dtype)
        for q, row in enumerate(items):
            for k, it in enumerate(row):
                v = np.asarray(it.get(name)) if name in it else None
                if v is None or v.shape != ref.shape:
                    raise ValueError(f"item {name!r}: every item needs it with shape {ref.shape}, got "
                                     f"{None if v is None else v.shape}")
                arr[q, k] = v
        out[f"item_{name}"] = arr
    return out


def build_loader(node: Batches, prefetch: bool):
    """The graph's root and its ``Loader``: batches built in a prefetching thread, or in
    the caller's (no workers: everything in process)."""
    root = Prefetcher(node, prefetch_factor=2) if prefetch else node
    return root, Loader(root, restart_on_stop_iteration=False)
