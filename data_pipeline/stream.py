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

A slot's reader of a source raises ``DataError`` after ``runs.EMPTY_UNITS_LIMIT`` consecutive
units, or ``runs.EMPTY_RECORDS_LIMIT`` consecutive records, without a document (every record
bad or blank, every file gone): without it a slot would read on forever, epoch after
epoch, and training would hang."""
from __future__ import annotations

import logging
import os
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from .chat import ChatPacker, ChatRenderer, pad_id
from .packing import Packer, wrap
from .records import ChatRecord, ImageRef, Record
from .runs import DataError, NoDocumentRun
from .sources import Source, _fs, _is_local, open_binary

log = logging.getLogger("data_pipeline")

# Document keys: source (4 bits) | global unit index (36 bits) | cursor in unit (23 bits).
_UNIT_BITS, _CUR_BITS = 36, 23
# In process, a tokenizer call takes up to this many documents or characters of one slot.
_ENCODE_DOCS, _ENCODE_CHARS = 32, 1 << 16
_MAX_SKIP_LOGS = 5
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


def payload_chars(payload) -> int:
    """A document's size before tokenizing: characters (text, records, conversations), or
    tokens for a pretokenized one (the loader's read-ahead budget)."""
    if isinstance(payload, str):
        return len(payload)
    if isinstance(payload, Record):
        return sum(map(len, payload.texts))
    if isinstance(payload, np.ndarray):
        return len(payload)
    if isinstance(payload, ChatRecord):
        payload = payload.messages
    return sum(len(c) for _, c in payload)  # a conversation: (role, content) pairs


class Unusable:
    """What the encoder gives for a document it cannot pack: ``skipped`` (an image that
    cannot be read or decoded: counted in ``data/skipped``) or not (a sample that does not
    fit a window or has more images than a window holds: counted in ``data/dropped``)."""

    __slots__ = ("where", "reason", "skipped")

    def __init__(self, where: str, reason: str, skipped: bool):
        self.where, self.reason, self.skipped = where, reason, skipped


# An image file or URL read for decoding is at most this large (a larger one is skipped).
MAX_IMAGE_BYTES = 256 << 20
# A slot stops with DataError after this many samples in a row that the encoder could not
# use (every picture missing or broken, every sample too long): a wrong image root or
# image field would otherwise read on forever without a batch.
UNUSABLE_LIMIT = 1000


def read_image_bytes(ref: ImageRef) -> bytes:
    """The bytes of an image reference (``OSError`` for a missing or unreadable file, or
    one past ``MAX_IMAGE_BYTES``)."""
    if ref.data is not None:
        return ref.data
    fs, path = _fs(ref.path)
    if _is_local(fs):  # a device, FIFO or directory would block or be read whole
        import stat

        mode = os.stat(path).st_mode
        if not stat.S_ISREG(mode):
            raise OSError(f"{path} is not a regular file")
    with open_binary(fs, path) as f:
        data = f.read(MAX_IMAGE_BYTES + 1)
    if len(data) > MAX_IMAGE_BYTES:
        raise OSError(f"larger than {MAX_IMAGE_BYTES} bytes")
    return data


class Encoder:
    """The stateless batch work of the loader: documents as read -> documents as packed.
    ``encode(payloads)`` returns, per document, (packed form, tokens, items, truncated): text
    and records wrapped in ``<|begin_of_text|> ... <|end_of_text|>`` (an int64 array),
    pretokenized arrays wrapped likewise, conversations rendered (tokens, loss mask) and
    cut to ``max_length``. All texts of a call go to the tokenizer in one batch call.

    With ``image`` (an ``images.ImageSpec``) every document is packed whole with a loss
    mask (``whole``): records' images are read, decoded and tiled here (the loader's
    parallel stage), their marker tokens are never loss targets, and a document that cannot
    be used comes back as an ``Unusable`` (an unreadable image; a sample with images longer
    than ``max_length`` or with more than ``image.max_images`` images). A text-only
    document longer than ``max_length`` is cut to it (truncated)."""

    def __init__(self, tokenizer, window: int, chat: bool = False, max_length: int = -1,
                 marker_id: Optional[int] = None, image=None):
        self.tok, self.window, self.chat, self.image = tokenizer, window, chat, image
        self.marker_id = image.image_token_id if image is not None else marker_id
        self.whole = chat or image is not None
        self.bos, self.eos = tokenizer.bos_id, tokenizer.eos_id
        self.max_length = window if max_length < 0 else max_length
        if self.whole and not 0 < self.max_length <= window:
            raise ValueError(f"data.max_length={max_length}: must be in [1, train.seq_len+1={window}] or -1")
        if chat:
            self.renderer = ChatRenderer(tokenizer)
        self._skip_log, self._drop_log = SkipLog(), SkipLog("dropped a sample")

    def _wrap(self, parts) -> np.ndarray:
        return wrap(parts, self.bos, self.eos)

    def encode(self, payloads: Sequence) -> List[tuple]:
        if self.image is not None:
            return self._encode_whole(payloads)
        if self.chat:
            return [((t, m), len(t), [], tr) for t, m, tr in self.renderer.render_batch(payloads, self.max_length)]
        if self.marker_id is None and any(isinstance(p, Record) for p in payloads):
            raise ValueError("a source yields records with items (payloads), but the loader has no "
                             "marker token for them (LoaderSpec.marker_id)")
        return [(w, len(w), p.items if isinstance(p, Record) else [], False)
                for p, w in zip(payloads, self._wrapped(payloads))]

    def _wrapped(self, payloads: Sequence) -> List[Optional[np.ndarray]]:
        """Per payload its wrapped tokens: texts and records (their texts around marker
        tokens) tokenized in one batch call, pretokenized arrays as they are; None for a
        conversation (rendered instead)."""
        texts = []
        for p in payloads:
            if isinstance(p, str):
                texts.append(p)
            elif isinstance(p, Record):
                texts.extend(p.texts)
        flat, off = self.tok.encode_batch(texts) if texts else (None, None)
        out, j = [], 0
        for p in payloads:
            if isinstance(p, np.ndarray):
                out.append(self._wrap([p]))
            elif isinstance(p, str):
                out.append(self._wrap([flat[off[j]:off[j + 1]]]))
                j += 1
            elif isinstance(p, Record):
                out.append(self._wrap(self._parts(flat, off, j, len(p.texts))))
                j += len(p.texts)
            else:
                out.append(None)
        return out

    def _parts(self, flat, off, j: int, n: int) -> list:
        """The encoded texts j..j+n-1 with a marker token between each two."""
        mark = np.asarray([self.marker_id], dtype=np.int64)
        parts = []
        for k in range(n):
            if k:
                parts.append(mark)
            parts.append(flat[off[j + k]:off[j + k + 1]])
        return parts

    def _encode_whole(self, payloads: Sequence) -> List[tuple]:
        """Image mode: every document as ((tokens, loss mask), n, items, truncated)."""
        # "<|image|>" is a picture's place only in a record that has pictures: a text-only
        # conversation keeps it as text.
        with_images = [p.messages for p in payloads if isinstance(p, ChatRecord)]
        text_only = [p for p in payloads if isinstance(p, tuple)]
        rendered_images = iter(self.renderer.render_batch(with_images, -1, self.marker_id) if with_images else [])
        rendered_text = iter(self.renderer.render_batch(text_only, -1) if text_only else [])
        out = []
        for p, tokens in zip(payloads, self._wrapped(payloads)):
            refs, where = (p.items, p.where) if isinstance(p, (Record, ChatRecord)) else ([], "")
            if tokens is None:  # a conversation
                tokens, mask, _ = next(rendered_images if isinstance(p, ChatRecord) else rendered_text)
            else:
                mask = tokens != self.marker_id
                mask[0] = False  # <|begin_of_text|> starts a sample: never a target
            out.append(self._finish(tokens, mask, refs, where))
        return out

    def _finish(self, tokens, mask, refs, where) -> tuple:
        n, cap = len(tokens), self.max_length
        marks = int(np.count_nonzero(tokens == self.marker_id))
        if marks != len(refs):  # a tokenizer that maps "<|image|>" in plain text to the image token
            return self._unusable(where or "a text document", f"{marks} image tokens for {len(refs)} images (its "
                                  "text holds <|image|> where no image is given)", skipped=True)
        if not refs:
            truncated = n > cap
            if truncated:
                tokens, mask = tokens[:cap], mask[:cap]
            return (tokens, mask), len(tokens), [], truncated
        if len(refs) > self.image.max_images:
            return self._unusable(where, f"{len(refs)} images, more than a window holds (model.max_images="
                                         f"{self.image.max_images})", skipped=False)
        if n > cap:
            return self._unusable(where, f"{n} tokens with its images, more than a window's {cap} (data.max_length "
                                         "or train.seq_len+1): an image sample is never cut", skipped=False)
        from .images import BadImage, load_image, tile_image

        items = []
        for ref in refs:
            if not isinstance(ref, ImageRef):  # items already decoded (tests, tools)
                items.append(ref)
                continue
            try:
                items.append(tile_image(load_image(read_image_bytes(ref), self.image), self.image))
            except Exception as e:  # noqa: BLE001 - a hostile path or URL (unknown protocol, NUL byte,
                # no credentials, a filesystem package not installed) skips its record, never the loader
                why = str(e) if isinstance(e, (BadImage, OSError)) else f"{type(e).__name__}: {e}"
                return self._unusable(ref.where or where, f"image {ref.path or '(bytes)'}: {why}", skipped=True)
        return (tokens, mask), n, items, False

    def _unusable(self, where: str, reason: str, skipped: bool) -> tuple:
        (self._skip_log if skipped else self._drop_log)(where, reason)
        return Unusable(where, reason, skipped), 0, [], False


def pick_source(seed: int, slot: int, tokens, docs, weights: np.ndarray) -> int:
    """The mixture's next source for a slot that has taken ``docs`` documents and ``tokens``
    tokens of each source (see the module docstring)."""
    tokens, docs = np.asarray(tokens, dtype=np.float64), np.asarray(docs, dtype=np.float64)
    seen = docs > 0
    default = (tokens[seen] / docs[seen]).mean() if seen.any() else 1.0
    mean_len = np.where(seen, tokens / np.maximum(docs, 1), default)
    u = np.random.default_rng([seed, slot, int(docs.sum())]).exponential(size=len(tokens))
    return int(np.argmin((tokens + u * mean_len) / weights))


class SkipLog:
    """Logs the first ``_MAX_SKIP_LOGS`` skipped records of a slot (or, with another
    ``what``, dropped samples of an encoder); the rest are counted."""

    def __init__(self, what: str = "skipped a record"):
        self.n, self.what = 0, what

    def __call__(self, where: str, reason: str) -> None:
        if self.n < _MAX_SKIP_LOGS:
            self.n += 1
            log.warning("%s: %s: %s%s", self.what, where, reason,
                        "" if self.n < _MAX_SKIP_LOGS else " (further ones are only counted)")


# A document ready for a slot's packer: its key, packed form, tokens, items, whether it was
# cut to max_length (chat), its resumable reference, the reader state after it, and the
# records skipped and documents cut to max_doc_bytes by the reader up to it.
Ready = Tuple[int, object, int, list, bool, dict, dict, Tuple[int, int]]


def ready_doc(i: int, raw: tuple, encoded: tuple) -> Ready:
    """``raw``: a reader's (g, cursor, payload, state after, skipped, cut)."""
    g, c, _, snap, n_skipped, n_cut = raw
    packed, n, items, truncated = encoded
    return doc_key(i, g, c), packed, n, items, truncated, {"src": i, "g": g, "c": c}, snap, (n_skipped, n_cut)


class SlotStream:
    """Iterator of windows (tokens, run-length document keys: keys, lengths) for one
    slot, with ``state_dict``. Chat windows carry the loss mask as a fourth element; the
    items of a window's markers are ``take_items()``.

    ``feed(i)`` hands the slot its next document of source ``i`` (a ``Ready`` tuple, in the
    reader's order): the loader graph feeds the slots from its tokenizing workers. Without
    one the slot reads and tokenizes in process, a batch of documents per tokenizer call."""

    def __init__(self, sources: Sequence[Source], plans: Sequence[UnitPlan], weights: Sequence[float],
                 tokenizer, window: int, state: dict, sft_packing: str = "pack", max_length: int = -1,
                 marker_id: Optional[int] = None, feed: Optional[Callable[[int], Ready]] = None,
                 encoder: Optional[Encoder] = None, image=None):
        self.sources, self.plans = sources, plans
        self.weights = np.asarray(weights, dtype=np.float64)
        self.slot = state["slot"]
        self.mix_tokens = list(state["mix_tokens"])
        self.mix_docs = list(state["mix_docs"])
        self.chat = any(s.chat for s in sources)
        if self.chat and not all(s.chat for s in sources):
            raise ValueError("data.format=chat: every source must be chat JSONL")
        self.encoder = encoder or Encoder(tokenizer, window, self.chat, max_length, marker_id, image)
        # Whole documents with a loss mask (chat, or anything with images: chat.ChatPacker).
        self.whole = self.encoder.whole
        # Committed reader states: after the last document handed to the packer; and the
        # records skipped before it and the documents cut to max_doc_bytes up to it
        # (read-ahead counts once their turn comes).
        self.reader_states = [dict(r) for r in state["readers"]]
        self._skips_committed = [0] * len(sources)
        self._skips_reported = 0
        self._cuts_committed = [0] * len(sources)
        self._cuts_reported = 0
        self._truncated = 0  # chat: conversations cut to max_length, packed since the last take
        self._unusable = [0, 0]  # documents the encoder could not use since the last take: skipped, dropped
        self._unusable_run = 0  # ... in a row
        self.consumed = 0  # tokens (chat pad: documents) handed to the packer so far
        if feed is None:
            on_skip = SkipLog()
            self.readers = [_Reader(s, p, r, on_skip) for s, p, r in zip(sources, plans, state["readers"])]
            self._iters = [self._encoded(i) for i in range(len(sources))]
            feed = self._next_encoded
        self._feed = feed
        if self.whole:
            max_items = self.encoder.image.max_images if self.encoder.image is not None else None
            self.packer = ChatPacker(window, sft_packing, pad_id(tokenizer), max_items)
        else:
            self.packer = Packer(window, tokenizer.bos_id, tokenizer.eos_id, self.encoder.marker_id)
        self.packer.load_fragments(state["packer"], self._fetch)

    def _next_encoded(self, i: int) -> Ready:
        return next(self._iters[i])

    def _encoded(self, i: int) -> Iterator[Ready]:
        """In process: source i's documents, tokenized in batches of up to ``_ENCODE_DOCS``
        documents or ``_ENCODE_CHARS`` characters."""
        reader = iter(self.readers[i])
        while True:
            batch, chars = [next(reader)], 0
            while len(batch) < _ENCODE_DOCS:
                chars += payload_chars(batch[-1][2])
                if chars >= _ENCODE_CHARS:
                    break
                batch.append(next(reader))
            for raw, enc in zip(batch, self.encoder.encode([b[2] for b in batch])):
                yield ready_doc(i, raw, enc)

    def _fetch(self, ref: dict):
        """The packed form of a saved fragment's document (text: with its items), or None
        (with a warning) when its file vanished or cannot be read: the fragment is dropped."""
        src = self.sources[ref["src"]]
        unit = src.units[self.plans[ref["src"]].unit(ref["g"])]
        try:
            payload = src.read_one(unit, ref["c"])
        except OSError as e:
            log.warning("dropped the rest of a document being packed when the checkpoint was written: "
                        "%s, cursor %d: vanished or unreadable (%s)", src.unit_label(unit), ref["c"], e)
            return None
        packed, _, items, _ = self.encoder.encode([payload])[0]
        if isinstance(packed, Unusable):
            log.warning("dropped a document being packed when the checkpoint was written: %s: %s", packed.where,
                        packed.reason)
            return None
        return packed, items

    def _pick_source(self) -> int:
        if len(self.sources) == 1:
            return 0
        return pick_source(self.plans[0].seed, self.slot, self.mix_tokens, self.mix_docs, self.weights)

    def next_window(self):
        """(tokens, keys, lengths), and for chat a fourth element: the loss mask."""
        while not self.packer.ready():
            i = self._pick_source()
            key, packed, n_tokens, items, truncated, ref, snap, counts = self._feed(i)
            self._truncated += truncated
            if isinstance(packed, Unusable):
                self._unusable[0 if packed.skipped else 1] += 1
                self._unusable_run += 1
                if self._unusable_run >= UNUSABLE_LIMIT:  # the data is wrong, not a few records
                    raise DataError(
                        f"{self._unusable_run} samples in a row could not be used (the last: {packed.where}: "
                        f"{packed.reason}): check data.path, data.image_field and the pictures' paths (relative to "
                        "the records' file), train.seq_len and model.max_images")
            elif self.whole:
                self.packer.add(key, packed, ref, items)
            else:
                self.packer.add(key, packed, ref, 0, items)
            if not isinstance(packed, Unusable):
                self._unusable_run = 0
            self.reader_states[i] = snap
            self._skips_committed[i], self._cuts_committed[i] = counts
            self.mix_tokens[i] += n_tokens
            self.mix_docs[i] += 1
            self.consumed += 1 if self.whole and self.packer.mode == "pad" else n_tokens
        return self.packer.cut()

    @property
    def held(self) -> int:
        """What the packer holds for the next windows, in the unit of ``consumed``."""
        return len(self.packer._docs) if self.whole and self.packer.mode == "pad" else self.packer._len

    def take_items(self) -> list:
        """The items of the last window's markers, in order."""
        return self.packer.items

    def take_dropped(self) -> int:
        """Samples dropped (too long, too many images) since the last call."""
        n, self._unusable[1] = self._unusable[1], 0
        return n

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
        n, self._unusable[0] = n + self._unusable[0], 0
        return n

    def state_dict(self) -> dict:
        return {"slot": self.slot, "readers": list(self.reader_states), "packer": self.packer.state_dict(),
                "mix_tokens": list(self.mix_tokens), "mix_docs": list(self.mix_docs)}


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
