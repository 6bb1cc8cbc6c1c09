"""The batches of one data-parallel rank, with a state that resumes exactly and
reshards elastically.

Every row of a step's global batch is fed by its own ``L = streams_per_row`` streams
(*slots*), taking one window from each in turn: a job has S = dp_world x local_batch_size
x grad_accum_steps x L slots; DP rank ``r`` owns rows ``r*R .. r*R+R-1`` (``R =
local_batch_size x grad_accum_steps``) and row ``q`` owns slots ``q*L .. q*L+L-1``;
micro-batch ``m`` of a step takes rows ``m*local_batch_size ..``. Consecutive windows of
a row come from L different places in the corpus (long documents do not fill a row's
consecutive steps), and a step's global batch is the same set of sequences for any
split of it into ranks and micro-batches (2 ranks x 4 rows = 1 rank x 8 rows = 1 rank x
4 rows x 2 accumulation steps), which lets layouts be compared exactly and makes a
resume with another DP degree but the same global batch bit-exact. The
batches do not depend on the number of tokenizer workers (``num_workers``) either: the
graph (graph.py) reads and tokenizes ahead in worker threads, but each slot's packer
takes its documents in its reader's order.

The rank's state is the committed one after the last batch handed out (the graph's
``Batches.get_state``, snapshotted by the ``Prefetcher`` with every batch), so it is exact
however far the graph read ahead. Resume: with the same number of slots each slot continues
from its own state (bit-for-bit the batches of an uninterrupted run); with another number
(another global batch size) ``stream.reshard`` redistributes the remaining work, so no
document is repeated or lost."""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch

from .chat import PACKING_MODES, ChatRenderer
from .graph import Batches, build_loader
from .sources import DataError, Source
from .stream import _UNIT_BITS, UnitPlan, doc_key, fresh_slot_state, key_source, reshard

_MAX_UNIT = 1 << _UNIT_BITS  # unit indices g past this would wrap in the document keys
# Batch counts that a step's first micro-batch carries (the others carry 0).
COUNTED_PER_STEP = ("source_tokens", "skipped", "truncated", "truncated_docs", "dropped")

log = logging.getLogger("data_pipeline")


@dataclass
class LoaderSpec:
    seq_len: int
    local_batch_size: int
    dp_rank: int
    dp_world: int
    num_workers: int
    seed: int
    shuffle: bool
    grad_accum_steps: int = 1
    streams_per_row: int = 1
    # Emit position ids restarting at each document (for document masking).
    positions: bool = False
    # Chat sources only (data.format=chat): pack whole conversations into a window, or
    # pad one per row; and cut conversations longer than max_length tokens (-1 = seq_len+1).
    sft_packing: str = "pack"
    max_length: int = -1
    # Documents with items (``stream.Record``, e.g. images): the token that marks each item,
    # and an optional function of the numpy batch returning more keys (per-token arrays
    # built from ``item_positions``, the markers' window positions).
    marker_id: Optional[int] = None
    collate: Optional[Callable[[dict], dict]] = None
    # Image-text data (an ``images.ImageSpec``, from the model family): documents are packed
    # whole with a loss mask, images are decoded in the worker threads, and every batch
    # holds the model's image inputs (``images.collate``: the batch contract).
    image: Optional[object] = None

    @property
    def rows(self) -> int:
        """Rows this rank reads per optimizer step."""
        return self.local_batch_size * self.grad_accum_steps


class RankLoader:
    """Iterator of batch dicts: ``input_ids``/``labels``/``positions``/``doc_ids``
    (local_batch_size x seq_len), ``window_doc_ids`` (the keys of all seq_len+1 window
    tokens, for the audit), ``source_tokens`` (tokens per source), ``skipped``,
    ``truncated`` and ``truncated_docs`` (records skipped, chat conversations cut to
    max_length, and documents cut to max_doc_bytes; the four counted on a step's first
    micro-batch). With ``spec.marker_id``: ``item_positions`` and ``item_<name>`` per item
    array (graph.stack_items), and what ``spec.collate`` adds. A ``DataError`` raised in a
    loader thread (no unit yields a document) reaches the caller as a ``DataError`` with its
    message. Chat sources: ``labels`` are ``chat.IGNORE_INDEX`` (-100) except where the
    next token is an assistant token, and padding has document key ``chat.PAD_KEY`` (-1).

    ``num_workers`` is the number of tokenizing threads; 0 runs the whole graph in the
    caller's thread (no threads, no read-ahead beyond one item)."""

    def __init__(self, sources: Sequence[Source], weights: Sequence[float], tokenizer, spec: LoaderSpec):
        self.sources, self.weights, self.tokenizer, self.spec = list(sources), list(weights), tokenizer, spec
        self.plans = [UnitPlan(len(s.units), spec.seed, i, spec.shuffle) for i, s in enumerate(sources)]
        if any(s.chat for s in self.sources):  # fail here rather than in a loader worker
            _check_chat(self.sources, tokenizer, spec)
        for s in self.sources:
            if s.tokenized:  # documents are also shuffled inside a block of shards
                s.seed, s.shuffle = spec.seed, spec.shuffle
        b, lanes = spec.rows, spec.streams_per_row
        self.n_workers = spec.num_workers
        self.num_slots = spec.dp_world * b * lanes
        self.first = spec.dp_rank * b * lanes  # this rank's first slot
        if spec.dp_rank == 0:
            for s in self.sources:
                if len(s.units) < self.num_slots:
                    log.warning(
                        "%spath=%r has %d unit(s) for %d loader streams: streams read the units of later epochs "
                        "in the same order, so rows repeat each other's documents; more units (a smaller %s, or "
                        "more files) or fewer streams (data.streams_per_row, rows) avoid it", s.spec.key,
                        s.spec.path, len(s.units), self.num_slots,
                        f"{s.spec.key}chunk_bytes" if s.spec.kind == "jsonl" else f"{s.spec.key}rows_per_unit")
        self.states = [{"slots": [fresh_slot_state(self.first + q * lanes + j, self.num_slots, len(sources))
                                  for j in range(lanes)], "next": 0} for q in range(b)]
        self._it = self._loader = self._root = self._node = None
        self._delivered = False  # a batch of the current graph was handed out
        self._failed: Optional[str] = None  # the error that stopped the graph
        self._step_rows = None  # the current step's rows, handed out one micro-batch at a time
        self._micro = 0

    # -- state ---------------------------------------------------------------------------
    def data_identity(self) -> dict:
        """What the saved positions index: each source's kind and number of units (its
        listing), the tokenizer (packer states hold its token ids) and the records' format."""
        return {"sources": [{"kind": s.spec.kind, "units": len(s.units), "listing": s.listing} for s in self.sources],
                "tokenizer": self.tokenizer.fingerprint, "format": self.sources[0].spec.format}

    def state_dict(self) -> dict:
        """Valid at optimizer-step boundaries (after the step's last micro-batch)."""
        if self._micro:
            raise RuntimeError("loader state requested in the middle of a step's micro-batches")
        self._check_alive()
        self._sync_states()
        return _json_safe({"num_slots": self.num_slots, "streams_per_row": self.spec.streams_per_row,
                           "rows": self.states, "dp_rank": self.spec.dp_rank, "dp_world": self.spec.dp_world,
                           "n_sources": len(self.sources), "data": self.data_identity()})

    def _sync_states(self) -> None:
        """The committed rows' state of the graph after the last batch handed out (none
        handed out: the state it started from)."""
        if self._loader is not None and self._delivered:
            st = self._loader.state_dict()["root"]
            if self._root is not self._node:  # the Prefetcher's snapshot, taken with that batch
                if st["steps_since_snapshot"]:
                    raise RuntimeError("the loader's prefetcher has no state for its last batch")
                st = st["snapshot"]
            self.states = st["rows"]

    def load_rank_states(self, saved: List[dict]) -> None:
        """``saved``: the state_dict of every DP rank of the checkpointed job. A state that
        is not well formed raises ``ValueError``; one of data this job does not read (other
        sources, listing, tokenizer or format) ``LoaderStateMismatch``, naming the key."""
        if self._it is not None:
            raise RuntimeError("load the loader state before iterating")
        saved = copy.deepcopy(saved)  # the rows are updated in place while iterating
        _check_saved(saved)
        self._check_fits(saved)
        _check_tokens(saved, self.tokenizer.vocab_size)
        old_slots, old_lanes = saved[0]["num_slots"], saved[0]["streams_per_row"]
        by_slot = {}
        for s in saved:
            for row in s["rows"]:
                for st in row["slots"]:
                    by_slot[st["slot"]] = st
        if sorted(by_slot) != list(range(old_slots)):
            raise ValueError(f"loader state is incomplete: {len(by_slot)} of {old_slots} streams saved")
        lanes, b = self.spec.streams_per_row, self.spec.rows
        if (old_slots, old_lanes) == (self.num_slots, lanes):
            rows = {q: row for s in saved for q, row in enumerate(s["rows"], start=s["dp_rank"] * len(s["rows"]))}
            first_row = self.first // lanes
            self.states = [rows[first_row + q] for q in range(b)]
            return
        slots = reshard([by_slot[i] for i in range(old_slots)], self.num_slots)
        self.states = [{"slots": slots[self.first + q * lanes:self.first + (q + 1) * lanes], "next": 0}
                       for q in range(b)]
        if self.spec.dp_rank == 0:
            log.info("data loader resharded from %d to %d streams", old_slots, self.num_slots)

    def _check_fits(self, saved: List[dict]) -> None:
        n_src = {s["n_sources"] for s in saved}
        if n_src != {len(self.sources)}:
            raise LoaderStateMismatch(
                f"the checkpoint's data loader read {sorted(n_src)[0] if len(n_src) == 1 else sorted(n_src)} "
                f"source(s), this job reads {len(self.sources)}: data.source or data.mixture changed")
        then = saved[0].get("data")
        if then is None:  # a state of an earlier version: nothing more to compare
            return
        now = self.data_identity()
        if not (isinstance(then, dict) and isinstance(then.get("sources"), list)
                and len(then["sources"]) == len(self.sources)
                and all(isinstance(x, dict) for x in then["sources"])):
            raise ValueError("its 'data' record is malformed")
        for src, a, b in zip(self.sources, then["sources"], now["sources"]):
            if a.get("kind") != b["kind"]:
                raise LoaderStateMismatch(f"{src.spec.key}source={b['kind']!r} (the checkpoint's loader read "
                                          f"{a.get('kind')!r})")
            if a.get("units") != b["units"] or a.get("listing", b["listing"]) != b["listing"]:
                count = (f"{b['units']} units now, {a.get('units')} when the checkpoint was written"
                         if a.get("units") != b["units"] else f"{b['units']} other units than when the checkpoint was "
                         "written (other file names, sizes or row groups, or the same ones in another order)")
                raise LoaderStateMismatch(
                    f"{src.spec.key}path={src.spec.path!r} lists {count}: the saved positions index that listing "
                    f"({src.spec.key}path, glob, chunk_bytes, rows_per_unit or the files changed; the same files "
                    "under another root are fine); restore it, or set checkpoint.resume_data=false to start the data "
                    "afresh")
        if then.get("tokenizer") != now["tokenizer"]:
            raise LoaderStateMismatch(f"data.tokenizer: fingerprint {now['tokenizer']} now, {then.get('tokenizer')} "
                                      "when the checkpoint was written (its packers hold that tokenizer's token ids)")
        if then.get("format") != now["format"]:
            raise LoaderStateMismatch(f"data.format={now['format']!r} (the checkpoint's loader read "
                                      f"{then.get('format')!r} records)")

    # -- iteration -----------------------------------------------------------------------
    def _start(self):
        self._node = Batches(self.sources, self.plans, self.weights, self.tokenizer, self.spec, self.states,
                             self.n_workers, self.spec.collate)
        self._root, self._loader = build_loader(self._node, prefetch=self.n_workers > 0)
        return iter(self._loader)

    def __iter__(self):
        return self

    def _check_alive(self) -> None:
        if self._failed is not None:
            raise RuntimeError(f"the data loader failed earlier ({self._failed[:300]}); its position after the "
                               "last batch it handed out is lost: resume from the last checkpoint")

    def __next__(self) -> Dict[str, torch.Tensor]:
        self._check_alive()
        if self._micro == 0:
            self._step_rows = self._next_step()
        lbs, m = self.spec.local_batch_size, self._micro
        self._micro = (m + 1) % self.spec.grad_accum_steps
        if self.spec.grad_accum_steps == 1:
            return self._step_rows
        rows = slice(m * lbs, (m + 1) * lbs)
        out = {}
        for k, v in self._step_rows.items():
            if v is None:
                out[k] = None
            elif k in COUNTED_PER_STEP:  # counted once per step
                out[k] = v * (m == 0)
            else:
                out[k] = v[rows]
        return out

    def _next_step(self) -> Dict[str, torch.Tensor]:
        try:
            if self._it is None:
                self._delivered = False
                self._it = self._start()
            b = next(self._it)
            err = None
        except DataError as e:
            err = _thread_data_error(e)
        except Exception as e:  # noqa: BLE001 - a failure in a loader thread, named as such
            err = _thread_error(e)
        if err is not None:  # raised here, not in the handler: no reference to the threads' frames
            # Where each slot stood after the last batch handed out is gone with the graph
            # (packers may have cut part of the next): no batch and no state from here on.
            self._failed = f"{type(err).__name__}: {err}"
            self._stop_threads()
            raise err
        self._delivered = True
        tokens, doc_ids = torch.from_numpy(b["tokens"]), torch.from_numpy(b["doc_ids"])
        out = {
            "input_ids": tokens[:, :-1], "labels": tokens[:, 1:] if b["labels"] is None else
            torch.from_numpy(b["labels"]),
            "positions": torch.from_numpy(b["positions"][:, :-1]) if b["positions"] is not None else None,
            "doc_ids": doc_ids[:, :-1], "window_doc_ids": doc_ids,
            "source_tokens": torch.from_numpy(b["source_tokens"]),
            "skipped": b["skipped"], "truncated": b["truncated"], "truncated_docs": b["truncated_docs"],
        }
        for k, v in b.items():
            if k not in out and k not in ("tokens", "masks"):
                out[k] = torch.from_numpy(v) if isinstance(v, np.ndarray) else v
        return out

    def close(self) -> None:
        try:
            if self._failed is None:
                self._sync_states()
        finally:
            self._stop_threads()

    def _stop_threads(self) -> None:
        """Stop the graph's threads now rather than when it is collected."""
        root, self._root, self._loader, self._it = self._root, None, None, None
        if root is None:
            return
        it = getattr(root, "_it", None)
        if it is not None and hasattr(it, "_shutdown"):  # the Prefetcher's thread
            it._shutdown()
        self._node._shutdown()


def _nat(x) -> bool:
    return type(x) is int and x >= 0


class LoaderStateMismatch(ValueError):
    """A well-formed loader state of data this job does not read (another mixture, listing,
    tokenizer or format): the config changed, the checkpoint is sound."""


def _need(ok, what):
    if not ok:
        raise ValueError(what)


def _fragments(saved):
    for s in saved:
        for row in s["rows"]:
            for st in row["slots"]:
                for fr in st["packer"]:
                    yield st["slot"], fr


def _check_tokens(saved, vocab: int) -> None:
    """Token ids of the packers' fragments fit the vocabulary (an id past the embedding
    would fail in the first step, or assert on a GPU)."""
    for slot, fr in _fragments(saved):
        if "tokens" in fr:
            _need(all(0 <= t < vocab for t in fr["tokens"]),
                  f"stream {slot}: a fragment's token ids are not in [0, {vocab}) (the tokenizer's vocabulary)")


def _check_saved(saved) -> None:
    """Loader states come from checkpoint files (data from anywhere): every field the
    streams act on has its type and range, consistent within the state. ``ValueError``
    names the first bad field. (Whether the state fits this job's data is
    ``RankLoader._check_fits``; token ids against the vocabulary ``_check_tokens``.)"""
    need = _need
    need(isinstance(saved, list) and saved, "no loader states")
    for s in saved:
        need(isinstance(s, dict) and all(_nat(s.get(k)) for k in ("num_slots", "streams_per_row", "dp_rank",
                                                                  "n_sources"))
             and isinstance(s.get("rows"), list), "a state lacks num_slots, streams_per_row, dp_rank, "
             "n_sources or rows")
        n_sources, lanes, first = s["n_sources"], s["streams_per_row"], saved[0]
        need(all(s[k] == first[k] for k in ("num_slots", "streams_per_row", "n_sources")),
             "the ranks' states disagree on num_slots, streams_per_row or n_sources")
        world = s.get("dp_world")
        if world is not None:  # states of every version since data-parallel resharding
            need(_nat(world) and world == first.get("dp_world") and s["dp_rank"] < world
                 and len(s["rows"]) * world * lanes == s["num_slots"],
                 f"dp_rank {s['dp_rank']}: dp_world, rows and streams_per_row do not make num_slots")
        base = s["dp_rank"] * len(s["rows"])
        for q, row in enumerate(s["rows"]):
            need(isinstance(row, dict) and _nat(row.get("next")) and isinstance(row.get("slots"), list)
                 and len(row["slots"]) == lanes and row["next"] < lanes,
                 "a row lacks next or slots (one per stream of the row, next among them)")
            for j, st in enumerate(row["slots"]):
                need(isinstance(st, dict) and _nat(st.get("slot")), "a stream without its slot number")
                need(st["slot"] == (base + q) * lanes + j,
                     f"stream {st['slot']} saved where stream {(base + q) * lanes + j} belongs (dp_rank "
                     f"{s['dp_rank']}, row {q})")
                need(isinstance(st.get("readers"), list) and len(st["readers"]) == n_sources
                     and isinstance(st.get("packer"), list)
                     and all(isinstance(st.get(k), list) and len(st[k]) == n_sources and all(map(_nat, st[k]))
                             for k in ("mix_tokens", "mix_docs")), f"stream {st['slot']}: malformed")
                for r in st["readers"]:
                    # unit indices (g) within the document keys' range
                    pair = lambda x: (isinstance(x, list) and len(x) == 2 and all(map(_nat, x))  # noqa: E731
                                      and x[0] < _MAX_UNIT)
                    need(isinstance(r, dict) and _nat(r.get("qi")) and _nat(r.get("next")) and r["next"] < _MAX_UNIT
                         and type(r.get("stride")) is int and 1 <= r["stride"] < _MAX_UNIT
                         and isinstance(r.get("queue"), list)
                         and all(map(pair, r["queue"])) and (r.get("cur") is None or pair(r["cur"])),
                         f"stream {st['slot']}: malformed reader position")
                for fr in st["packer"]:
                    need(isinstance(fr, dict) and _nat(fr.get("key")) and fr["key"] < 1 << 63
                         and key_source(fr["key"]) < n_sources, f"stream {st['slot']}: malformed fragment")
                    if "tokens" in fr:
                        toks = fr["tokens"]
                        need(isinstance(toks, list) and all(type(t) is int for t in toks),
                             f"stream {st['slot']}: a fragment's token ids are not integers")
                    else:
                        ref = fr.get("ref")
                        need(isinstance(ref, dict) and _nat(ref.get("g")) and ref["g"] < _MAX_UNIT
                             and _nat(ref.get("c")) and _nat(ref.get("src")) and ref["src"] < n_sources
                             and _nat(fr.get("off", 0)), f"stream {st['slot']}: malformed document reference")
                        need(fr["key"] == doc_key(ref["src"], ref["g"], ref["c"]),
                             f"stream {st['slot']}: a fragment's key is not its document's")


def _thread_data_error(e: DataError) -> DataError:
    """torchdata re-raises a thread's exception as ``type(e)("Caught DataError in ...\n
    Original Traceback ...: <message>")`` (nested once per thread it crossed): keep the
    message only."""
    msg = str(e)
    if msg.startswith("Caught DataError"):
        marker = "DataError: "
        at = msg.rfind(marker)
        if at >= 0:
            return DataError(msg[at + len(marker):].strip())
    return e


def _thread_error(e: Exception) -> Exception:
    """Another exception of a loader thread: its type, with a message that names the loader
    and keeps the thread's traceback (torchdata's "Caught X in ..." text)."""
    msg = e.args[0] if isinstance(e, KeyError) and len(e.args) == 1 else str(e)
    if not isinstance(msg, str) or not msg.startswith("Caught "):
        return e
    where = "in the data loader's graph (data_pipeline/graph.py)"
    try:
        if isinstance(e, KeyError):  # its str() would quote the traceback onto one line
            raise TypeError
        out = type(e)(f"{where}: {msg}")
    except Exception:  # noqa: BLE001 - a type that takes other arguments
        out = RuntimeError(f"{where}: {type(e).__name__}: {msg}")
    return out


def _check_chat(sources, tokenizer, spec: LoaderSpec) -> None:
    if not all(s.chat for s in sources):
        raise ValueError("data.format=chat: every source must be chat JSONL")
    if spec.sft_packing not in PACKING_MODES:
        raise ValueError(f"data.sft_packing={spec.sft_packing!r}: expected one of {', '.join(PACKING_MODES)}")
    if not (spec.max_length == -1 or 0 < spec.max_length <= spec.seq_len + 1):
        raise ValueError(f"data.max_length={spec.max_length}: must be in [1, train.seq_len+1={spec.seq_len + 1}] "
                         "or -1")
    ChatRenderer(tokenizer)  # the tokenizer has the chat special tokens


def _json_safe(x):
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, np.integer):
        return int(x)
    return x


def listing_skips(sources: Sequence[Source]) -> int:
    n = 0
    for s in sources:
        for path, why in s.listing_skipped[:5]:
            log.warning("skipped %s: %s", path, why)
        n += len(s.listing_skipped)
    return n
