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
resume with another DP degree but the same global batch bit-exact. Loader workers
(``num_workers``) split the rank's rows between them (worker w takes rows w, w+W, ...);
the main process joins one piece from each worker, in worker order, per batch, so the
batches do not depend on the worker count either.

Each piece carries the states of the slots it advanced, *after* that batch, so the rank's state is exact
however far workers prefetched. Resume: with the same number of slots each slot continues
from its own state (bit-for-bit the batches of an uninterrupted run); with another number
(another global batch size) ``stream.reshard`` redistributes the remaining work, so no
document is repeated or lost."""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Dict, List, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .chat import PACKING_MODES, PAD_KEY, ChatRenderer, shifted_labels
from .packing import positions as _positions
from .sources import DataError, Source
from .stream import SlotStream, UnitPlan, fresh_slot_state, key_source, reshard

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

    @property
    def rows(self) -> int:
        """Rows this rank reads per optimizer step."""
        return self.local_batch_size * self.grad_accum_steps


class _Piece:
    """One worker's rows of a batch. A plain object, so the DataLoader leaves its numpy
    arrays alone (no per-batch shared-memory tensors: pickled bytes through the pipe are
    several times cheaper for batches this size)."""

    def __init__(self, **kw):
        self.__dict__.update(kw)


class _RowsDataset(IterableDataset):
    """Yields, per batch, this worker's rows: one window per row from the row's next slot."""

    def __init__(self, sources, plans, weights, tokenizer, spec: LoaderSpec, rows: List[dict], n_workers: int,
                 ship_states: bool):
        self.sources, self.plans, self.weights = sources, plans, weights
        self.tokenizer, self.spec, self.rows, self.n_workers = tokenizer, spec, rows, n_workers
        # Worker processes send their rows' states with every batch; in process, the
        # loader reads them from the live streams when asked (``live``).
        self.ship_states, self.live = ship_states, None

    def live_states(self) -> List[dict]:
        _, lanes, nxt = self.live
        return [{"slots": [s.state_dict() for s in streams], "next": n} for streams, n in zip(lanes, nxt)]

    def __iter__(self):
        info = get_worker_info()
        w = info.id if info is not None else 0
        mine = list(range(w, len(self.rows), self.n_workers))
        window = self.spec.seq_len + 1
        lanes = [[SlotStream(self.sources, self.plans, self.weights, self.tokenizer, window, st,
                             sft_packing=self.spec.sft_packing, max_length=self.spec.max_length)
                  for st in self.rows[q]["slots"]] for q in mine]
        chat = lanes[0][0].chat if lanes else False
        nxt = [self.rows[q]["next"] for q in mine]
        self.live = (mine, lanes, nxt)
        n_src = len(self.sources)
        while True:
            wins, skipped, truncated, cut, moved = [], 0, 0, 0, []
            for i, streams in enumerate(lanes):
                lane = nxt[i]
                wins.append(streams[lane].next_window())
                skipped += streams[lane].take_skipped()
                cut += streams[lane].take_truncated_docs()
                if chat:
                    truncated += streams[lane].take_truncated()
                moved.append(lane)
                nxt[i] = (lane + 1) % len(streams)
            # Document keys stay run-length encoded: a window holds a handful of documents.
            runs = [(x[1], x[2]) for x in wins]
            keys, lens = np.concatenate([k for k, _ in runs]), np.concatenate([n for _, n in runs])
            if chat:  # padding is no source's token
                real = keys != PAD_KEY
                keys, lens = keys[real], lens[real]
            src_tokens = np.bincount(key_source(keys), weights=lens, minlength=n_src).astype(np.int64)
            yield _Piece(
                rows=mine,
                tokens=np.stack([x[0] for x in wins]).astype(np.int32),
                doc_runs=runs,
                source_tokens=src_tokens,
                skipped=skipped,
                truncated=truncated,
                truncated_docs=cut,
                masks=np.stack([x[3] for x in wins]) if chat else None,
                # Only the stream each row just took a window from changed.
                states=[(lane, streams[lane].state_dict(with_queue=False), n)
                        for streams, lane, n in zip(lanes, moved, nxt)] if self.ship_states else None,
            )


class RankLoader:
    """Iterator of batch dicts: ``input_ids``/``labels``/``positions``/``doc_ids``
    (local_batch_size x seq_len), ``window_doc_ids`` (the keys of all seq_len+1 window
    tokens, for the audit), ``source_tokens`` (tokens per source), ``skipped``,
    ``truncated`` and ``truncated_docs`` (records skipped, chat conversations cut to
    max_length, and documents cut to max_doc_bytes; the four counted on a step's first
    micro-batch). A ``DataError`` raised in a worker process (no unit yields a document)
    reaches the caller as a ``DataError`` with the worker's message. Chat sources: ``labels`` are
    ``chat.IGNORE_INDEX`` (-100) except where the next token is an assistant token, and
    padding has document key ``chat.PAD_KEY`` (-1)."""

    def __init__(self, sources: Sequence[Source], weights: Sequence[float], tokenizer, spec: LoaderSpec):
        self.sources, self.weights, self.tokenizer, self.spec = list(sources), list(weights), tokenizer, spec
        self.plans = [UnitPlan(len(s.units), spec.seed, i, spec.shuffle) for i, s in enumerate(sources)]
        if any(s.chat for s in self.sources):  # fail here rather than in a loader worker
            _check_chat(self.sources, tokenizer, spec)
        for s in self.sources:
            if s.tokenized:  # documents are also shuffled inside a block of shards
                s.seed, s.shuffle = spec.seed, spec.shuffle
        b, lanes = spec.rows, spec.streams_per_row
        self.n_workers = min(spec.num_workers, b)
        self.num_slots = spec.dp_world * b * lanes
        self.first = spec.dp_rank * b * lanes  # this rank's first slot
        self.states = [{"slots": [fresh_slot_state(self.first + q * lanes + j, self.num_slots, len(sources))
                                  for j in range(lanes)], "next": 0} for q in range(b)]
        self._it = self._ds = None
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
        self._sync_in_process_states()
        return _json_safe({"num_slots": self.num_slots, "streams_per_row": self.spec.streams_per_row,
                           "rows": self.states, "dp_rank": self.spec.dp_rank, "dp_world": self.spec.dp_world,
                           "n_sources": len(self.sources), "data": self.data_identity()})

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
                    "under another root are fine); restore it, or start another run dir")
        if then.get("tokenizer") != now["tokenizer"]:
            raise LoaderStateMismatch(f"data.tokenizer: fingerprint {now['tokenizer']} now, {then.get('tokenizer')} "
                                      "when the checkpoint was written (its packers hold that tokenizer's token ids)")
        if then.get("format") != now["format"]:
            raise LoaderStateMismatch(f"data.format={now['format']!r} (the checkpoint's loader read "
                                      f"{then.get('format')!r} records)")

    # -- iteration -----------------------------------------------------------------------
    def _start(self):
        ds = self._ds = _RowsDataset(self.sources, self.plans, self.weights, self.tokenizer, self.spec,
                                     self.states, max(1, self.n_workers), ship_states=self.n_workers > 0)
        if self.n_workers == 0:
            return iter(ds)
        # A generator of its own: the DataLoader draws its workers' base seed when iterated,
        # after a checkpoint's RNG states were restored, and a draw from the global one
        # would shift a resumed run's dropout masks. (The workers draw nothing: the data
        # order is a function of the seed.)
        return iter(DataLoader(ds, batch_size=None, num_workers=self.n_workers, prefetch_factor=4,
                               multiprocessing_context="fork", worker_init_fn=_quiet_worker,
                               generator=torch.Generator().manual_seed(self.spec.seed)))

    def __iter__(self):
        return self

    def __next__(self) -> Dict[str, torch.Tensor]:
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
            elif k in ("source_tokens", "skipped", "truncated", "truncated_docs"):  # counted once per step
                out[k] = v * (m == 0)
            else:
                out[k] = v[rows]
        return out

    def _next_step(self) -> Dict[str, torch.Tensor]:
        if self._it is None:
            self._it = self._start()
        # One piece per worker, in worker order (the DataLoader's round robin).
        try:
            pieces = [next(self._it) for _ in range(max(1, self.n_workers))]
            err = None
        except DataError as e:
            err = _worker_data_error(e)
        if err is not None:  # raised here, not in the handler: no reference to the worker iterator's frames
            self._stop_workers()
            raise err
        b, s1 = self.spec.rows, self.spec.seq_len + 1
        # numpy, not torch: torch's indexed copies wake OpenMP threads that then spin on
        # cores the loader workers and the training step need.
        tokens = np.empty((b, s1), dtype=np.int64)
        doc_ids = np.empty((b, s1), dtype=np.int64)
        chat = pieces[0].masks is not None
        masks = np.empty((b, s1), dtype=bool) if chat else None
        for p in pieces:
            tokens[p.rows] = p.tokens
            if chat:
                masks[p.rows] = p.masks
            for q, (k, n) in zip(p.rows, p.doc_runs):
                doc_ids[q] = np.repeat(k, n)
            for q, (lane, st, n) in zip(p.rows, p.states or ()):
                row = self.states[q]
                for r_old, r_new in zip(row["slots"][lane]["readers"], st["readers"]):
                    r_new["queue"] = r_old["queue"]
                row["slots"][lane], row["next"] = st, n
        positions = torch.from_numpy(_positions(doc_ids)) if self.spec.positions else None
        labels = torch.from_numpy(shifted_labels(tokens, masks)) if chat else None
        tokens, doc_ids = torch.from_numpy(tokens), torch.from_numpy(doc_ids)
        return {
            "input_ids": tokens[:, :-1], "labels": tokens[:, 1:] if labels is None else labels,
            "positions": positions[:, :-1] if positions is not None else None,
            "doc_ids": doc_ids[:, :-1], "window_doc_ids": doc_ids,
            "source_tokens": torch.from_numpy(sum(p.source_tokens for p in pieces)),
            "skipped": sum(p.skipped for p in pieces),
            "truncated": sum(p.truncated for p in pieces),
            "truncated_docs": sum(p.truncated_docs for p in pieces),
        }

    def close(self) -> None:
        self._sync_in_process_states()
        self._stop_workers()
        self._ds = None

    def _stop_workers(self) -> None:
        """Shut the worker processes down now rather than when the iterator is collected:
        an exception's traceback can keep it alive until exit, where multiprocessing's
        exit handler may wait forever for its workers."""
        it, self._it = self._it, None
        shutdown = getattr(it, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()

    def _sync_in_process_states(self) -> None:
        """In process (no workers) the streams' states are read when needed, not per batch."""
        if self._ds is not None and not self._ds.ship_states and self._ds.live is not None:
            self.states = self._ds.live_states()


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
        n_sources = s["n_sources"]
        for row in s["rows"]:
            need(isinstance(row, dict) and _nat(row.get("next")) and isinstance(row.get("slots"), list),
                 "a row lacks next or slots")
            for st in row["slots"]:
                need(isinstance(st, dict) and _nat(st.get("slot")), "a stream without its slot number")
                need(isinstance(st.get("readers"), list) and len(st["readers"]) == n_sources
                     and isinstance(st.get("packer"), list)
                     and all(isinstance(st.get(k), list) and len(st[k]) == n_sources and all(map(_nat, st[k]))
                             for k in ("mix_tokens", "mix_docs")), f"stream {st['slot']}: malformed")
                for r in st["readers"]:
                    pair = lambda x: isinstance(x, list) and len(x) == 2 and all(map(_nat, x))  # noqa: E731
                    need(isinstance(r, dict) and _nat(r.get("qi")) and _nat(r.get("next"))
                         and type(r.get("stride")) is int and r["stride"] >= 1 and isinstance(r.get("queue"), list)
                         and all(map(pair, r["queue"])) and (r.get("cur") is None or pair(r["cur"])),
                         f"stream {st['slot']}: malformed reader position")
                for fr in st["packer"]:
                    need(isinstance(fr, dict) and type(fr.get("key")) is int,
                         f"stream {st['slot']}: malformed fragment")
                    if "tokens" in fr:
                        toks = fr["tokens"]
                        need(isinstance(toks, list) and all(type(t) is int for t in toks),
                             f"stream {st['slot']}: a fragment's token ids are not integers")
                    else:
                        ref = fr.get("ref")
                        need(isinstance(ref, dict) and _nat(ref.get("g")) and _nat(ref.get("c"))
                             and _nat(ref.get("src")) and ref["src"] < n_sources and _nat(fr.get("off", 0)),
                             f"stream {st['slot']}: malformed document reference")


def _worker_data_error(e: DataError) -> DataError:
    """torch re-raises a worker's exception as ``type(e)("Caught DataError in DataLoader
    worker process N.\nOriginal Traceback ...: <message>")``: keep the message only."""
    msg = str(e)
    if msg.startswith("Caught DataError in DataLoader worker"):
        marker = "DataError: "
        at = msg.rfind(marker)
        if at >= 0:
            return DataError(msg[at + len(marker):].strip())
    return e


def _quiet_worker(_: int) -> None:
    """Loader workers leave stop signals to the training process: Ctrl-C reaches the
    whole foreground process group, SLURM may signal every process of a step, and a
    worker killed by SIGINT/SIGTERM/SIGUSR1 would fail the next batch before the trainer
    could checkpoint. They end with it (the DataLoader's watchdog, and the kernel's
    parent-death signal set here)."""
    import ctypes
    import signal

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)
    try:
        ctypes.CDLL(None).prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux
        pass


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
