"""Sharded checkpoints with torch.distributed.checkpoint (DCP).

A checkpoint ``<run dir>/checkpoints/step-<N>/`` holds:
- model and optimizer state (DCP, any layout; DCP reshards on load);
- ``loader/dp-<r>.json``: the data loader state of each data-parallel rank (resharded on
  load when the global batch changed);
- ``rng/rank-<r>.pt``: Python, numpy, torch (and this device's CUDA) RNG states of each
  rank, as tensors and numbers;
- ``tokenizer/tokenizer.json`` (or ``.model``): a copy of the run's tokenizer file, written
  by rank 0, so that an export anywhere has it (``tokenizer_record``; none for the bundled
  Llama 3 vocabulary);
- ``meta.json``: step, tokens seen, world size, the model's shape (``model`` args), the
  tokenizer (``tokenizer``: kind, fingerprint, its file here) and
  ``files``: the size and CRC32 of every other file, each computed by the rank that
  wrote it while writing; written last.
The LR schedule is a pure function of the step and needs no state.

Atomic completion: every rank writes into ``step-N.partial/``; once every rank finished,
rank 0 writes meta.json and renames the folder to ``step-N/``. A crash or kill before that
leaves the previous checkpoint as the newest; partial folders are removed at the next
start. With ``checkpoint.async_save`` the tensors are staged to host memory and written by
a background thread while training continues; at most one save in flight (the next one
waits), and the commit happens at the first step boundary where every rank is done.

Everything read back is data (``ckpt_io``): no pickle from a checkpoint runs code. Before a
load the files are checked against ``meta.json`` (size and CRC32, the files split between
the ranks); an unusable checkpoint of the run dir's own is moved aside to
``step-N.corrupt`` and the previous one is used. Errors that one rank finds are agreed
between all ranks before the next collective, so every rank raises the same
``CheckpointError`` (exit 4) and none waits for a peer that left."""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import shutil
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_model_state_dict, set_state_dict)

from data_pipeline.loader import LoaderStateMismatch
from parallel import distributed as pdist

from .fit import check_fits
from .files import (TOKENIZER_FILES, CheckpointError, CheckpointMismatch, CrcWriter, check_meta_crc, describe_error,
                    file_crc, load_dcp, load_rng, meta_text, read_dcp_metadata, read_json, reraise_interrupt, save_rng,
                    verify_files, write_file)

log = logging.getLogger("pretrain")
_STEP_DIR = re.compile(r"^step-(\d+)$")
__all__ = ["CheckpointError", "Checkpointer", "complete_checkpoints", "read_meta", "check_shapes"]


def loader_states_of(path: Path) -> List[dict]:
    """The data loader states (``loader/dp-*.json``) of a checkpoint."""
    loader_files = sorted((path / "loader").glob("dp-*.json"))
    if not loader_files:
        raise CheckpointError(f"checkpoint {path} has no loader/ state (written by an older version, or imported): "
                              "checkpoint.resume_data=false resumes it with the data started afresh; or start a "
                              "new run dir")
    return [read_json(f, "a data loader state") for f in loader_files]


def tokenizer_record(tok, chat: bool, *, read: bool = True) -> Tuple[dict, Optional[bytes]]:
    """(what meta.json records of the run's tokenizer under ``tokenizer``: its kind, its
    fingerprint, the file it was read from, the checkpoint's copy of that file (``file``) and
    whether the run trained on chats; that file's bytes when ``read``). A vocabulary that is a
    file (a trained BPE or a tokenizer.json: ``hf``; Meta's tokenizer.model: ``tiktoken``) is
    copied into every checkpoint: the trained BPE lives under a hash-named file of
    data.tokenizer.cache_dir, gone on another machine or after a cache cleanup, and an export
    needs it. The bundled Llama 3 vocabulary (``llama3``, in a package) is not copied. Read
    once, when the run starts (the bytes it encodes with, whatever later becomes of the file);
    a tokenizer.json is a few MB (Llama 3's: 9 MB) per checkpoint, beside weights of hundreds
    of MB or more: a whole copy in each, no link between checkpoints that prune separately."""
    rel = TOKENIZER_FILES.get(tok.kind)
    record = {"kind": tok.kind, "fingerprint": tok.fingerprint, "source": str(tok.path), "file": rel,
              "chat": bool(chat)}
    return record, Path(tok.path).read_bytes() if rel is not None and read else None


def _is_tokenizer_record(tok) -> bool:
    return (isinstance(tok, dict) and tok.get("kind") in ("llama3", "tiktoken", "hf")
            and tok.get("file") == TOKENIZER_FILES.get(tok["kind"]) and isinstance(tok.get("fingerprint"), str)
            and isinstance(tok.get("chat"), bool) and isinstance(tok.get("source", ""), str))


def complete_checkpoints(root: Path) -> list[Tuple[int, Path]]:
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if (m := _STEP_DIR.match(p.name)) and p.is_dir() and (p / "meta.json").is_file()]
    return sorted(found)


def read_meta(path: Path) -> dict:
    meta = path / "meta.json"
    if not meta.is_file():
        raise CheckpointError(f"checkpoint {path}: no {meta.name} (incomplete, or not a checkpoint of this trainer)")
    data = read_json(meta, "the checkpoint's meta.json")
    check_meta_crc(data, meta)
    for key in ("step", "tokens_seen", "world_size"):
        if key in data and not (type(data[key]) is int and data[key] >= 0):
            raise CheckpointError(f"{meta}: {key}={data[key]!r}, expected an integer >= 0")
    lora = data.get("lora")
    if lora is not None and not (isinstance(lora, dict) and type(lora.get("rank")) is int and lora["rank"] >= 1
                                 and type(lora.get("alpha")) in (int, float) and math.isfinite(lora["alpha"])
                                 and isinstance(lora.get("targets"), list)
                                 and all(isinstance(t, str) for t in lora["targets"])
                                 and (lora.get("base") is None or isinstance(lora["base"], str))):
        raise CheckpointError(f"{meta}: 'lora' is not LoRA settings (rank >= 1, alpha, targets, base)")
    loss = data.get("loss")
    if loss is not None and not (type(loss) in (int, float) and math.isfinite(loss)):
        raise CheckpointError(f"{meta}: loss={loss!r}, expected a finite number")
    freeze = data.get("freeze")
    if freeze is not None and not (isinstance(freeze, list) and all(isinstance(t, str) for t in freeze)):
        raise CheckpointError(f"{meta}: 'freeze' is not a list of tower names")
    files = data.get("files")
    if files is not None and not (isinstance(files, dict) and all(
            isinstance(v, list) and len(v) == 2 and all(isinstance(x, int) for x in v) for v in files.values())):
        raise CheckpointError(f"{meta}: 'files' is not a map of name -> [size, crc32]")
    tok = data.get("tokenizer")
    if tok is not None and not _is_tokenizer_record(tok):
        raise CheckpointError(f"{meta}: 'tokenizer' is not a tokenizer record (kind llama3, tiktoken or hf, its "
                              "file tokenizer/tokenizer.model, tokenizer/tokenizer.json or none, fingerprint, chat)")
    return data


def check_shapes(path: Path, state: dict, model_names=None) -> None:
    """Compare the checkpoint's tensor shapes with ``state`` (nested dicts of tensors:
    ``model``, and ``optim`` when resuming) before loading: the first mismatch is named
    with both shapes. ``model_names``: every rank's model tensors (the union over pipeline
    stages); the checkpoint must hold no model tensor outside them."""
    saved = read_dcp_metadata(path).state_dict_metadata
    if model_names is not None:
        check_no_extra_tensors(path, saved, model_names)
    for prefix, sub in state.items():
        for name, t in sub.items():
            if not isinstance(t, torch.Tensor):
                continue
            key = f"{prefix}.{name}"
            if key not in saved and prefix == "optim":
                raise CheckpointMismatch(
                    f"checkpoint {path} has no optimizer state {key}: that parameter did not train in the "
                    "checkpoint's run (finetune.freeze or finetune.lora changed?)")
            if key not in saved:
                raise CheckpointMismatch(f"checkpoint {path} has no tensor {key} (another model? "
                                         f"it has e.g. {sorted(saved)[:3]})")
            have = tuple(getattr(saved[key], "size", ()))
            if have != tuple(t.shape):
                raise CheckpointMismatch(f"checkpoint {path}: {key} has shape {list(have)} in the checkpoint but "
                                      f"{list(t.shape)} in this model: the model config differs")


def check_no_extra_tensors(path: Path, saved: dict, names) -> None:
    """The checkpoint's entries ``saved`` hold no model tensor outside ``names``. One it has
    and the model lacks would be dropped without a word: a 4-layer checkpoint resumed with
    2 layers, LoRA adapters of targets no longer adapted."""
    names = set(names)
    extra = sorted(k[len("model."):] for k in saved if k.startswith("model.") and k[len("model."):] not in names)
    if extra:
        raise CheckpointMismatch(f"checkpoint {path} holds {len(extra)} model tensor(s) this model lacks (e.g. "
                                 f"{', '.join(extra[:3])}): the model config differs, and loading would drop them")


def all_model_names(model_sd: dict) -> set:
    """The model tensors of every rank (a collective): the union of the pipeline stages'."""
    return set().union(*pdist.all_gather_object(sorted(model_sd)))


def agreed(fn: Callable, *args, **kwargs):
    """Runs ``fn`` on every rank; if it raised on any rank, every rank raises the first
    rank's error as ``CheckpointError`` (``CheckpointMismatch`` when it was one), after one
    object all-gather. Used before collectives,
    so that a rank that found a bad file does not leave the others waiting."""
    out, err = None, None
    try:
        out = fn(*args, **kwargs)
    except (Exception, CheckpointException) as e:  # noqa: BLE001 (CheckpointException is a BaseException)
        reraise_interrupt(e)
        err = e
    mine = None if err is None else (str(err) if isinstance(err, CheckpointError) else describe_error(err),
                                     isinstance(err, CheckpointMismatch))
    for r, found in enumerate(pdist.all_gather_object(mine)):
        if found is not None:
            if r == pdist.rank() and isinstance(err, CheckpointError):
                raise err
            msg, mismatch = found
            # The same class on every rank: a mismatch is not a corruption to fall back from.
            raise (CheckpointMismatch if mismatch else CheckpointError)(
                msg if r == pdist.rank() else f"{msg} (found by rank {r})") from err
    return out


# Flat optimizer state ("state.<param>.exp_avg", "param_groups.<param>.lr"): keyed by
# parameter name, so the states of several model parts (pipeline stages) merge, and any
# layout loads any other's.
_OPTS = StateDictOptions(flatten_optimizer_state_dict=True)
# LoRA checkpoints hold the trainable parameters only: the adapters are small, and the
# frozen base comes from where the run started (model.init_from). A run that freezes whole
# towers (finetune.freeze) saves every weight: its checkpoints resume and export on their
# own, and a full-training checkpoint resumed with a tower frozen keeps that tower.
_OPTS_TRAINABLE = StateDictOptions(flatten_optimizer_state_dict=True, ignore_frozen_params=True, strict=False)


def _opts(part) -> StateDictOptions:
    lora = any(".lora_a." in name for name, _ in part.named_parameters())
    return _OPTS_TRAINABLE if lora else _OPTS


def _pairs(model, optimizer):
    """(part, its optimizer) pairs: a model is one module or a list of pipeline stages."""
    parts = list(model) if isinstance(model, (list, tuple)) else [model]
    if optimizer is None:
        return [(p, None) for p in parts]
    optims = getattr(optimizer, "optimizers", [optimizer])
    return list(zip(parts, optims))


def get_states(model, optimizer) -> Tuple[dict, dict]:
    model_sd, optim_sd = {}, {}
    for part, opt in _pairs(model, optimizer):
        m, o = get_state_dict(part, opt, options=_opts(part))
        model_sd.update(m)
        optim_sd.update(o)
    return model_sd, optim_sd


def set_states(model, optimizer, model_sd: dict, optim_sd: dict) -> None:
    for part, opt in _pairs(model, optimizer):
        # foreach/fused say how this process runs the update (build_optimizer picks them for
        # its devices and tensor kinds), not training state: a load keeps this process's.
        impl = [{k: g[k] for k in ("foreach", "fused") if k in g} for g in opt.param_groups] if opt else []
        set_state_dict(part, opt, model_state_dict=_own(part, model_sd), optim_state_dict=optim_sd,
                       options=_opts(part))
        for group, keep in zip(opt.param_groups if opt else [], impl):  # the load replaced the groups
            group.update(keep)


def get_model_states(model) -> dict:
    out = {}
    for part, _ in _pairs(model, None):
        out.update(get_model_state_dict(part))
    return out


def set_model_states(model, model_sd: dict) -> None:
    for part, _ in _pairs(model, None):
        set_model_state_dict(part, _own(part, model_sd))


def _own(part, model_sd: dict) -> dict:
    """The entries of ``model_sd`` that are ``part``'s parameters (in-place AC, compile
    and FSDP2 keep the names)."""
    names = {n for n, _ in part.named_parameters()}
    return {k: v for k, v in model_sd.items() if k in names}


class Checkpointer:
    def __init__(self, root: Path, cfg, *, rank: int, world_size: int, model_args=None, lora=None, freeze=(),
                 tokenizer=None, chat: bool = False):
        """``model_args``, ``lora`` and ``freeze`` (the towers of finetune.freeze): what the
        checkpoints record of the run, and what a resume compares with (``fit.py``).
        ``tokenizer`` (the run's) and ``chat`` (data.format=chat): recorded in meta.json,
        the tokenizer's file copied into each checkpoint (``tokenizer_record``)."""
        self.root, self.cfg, self.rank, self.world_size = root, cfg, rank, world_size
        self.is_rank0 = rank == 0
        self.tokenizer, self._tokenizer_bytes = (None, None) if tokenizer is None else \
            tokenizer_record(tokenizer, chat, read=self.is_rank0)
        self.args = model_args
        self.model_args = dataclasses.asdict(model_args) if model_args is not None else None
        # LoRA: the adapters' settings and the base they adapt (export needs both).
        self.lora = lora
        self.freeze = list(freeze)
        # checkpoint.resume=false starts over, but a restart of the same job (torchrun
        # --max-restarts, a SLURM requeue) continues what its first attempt began.
        self.restart = max(int(os.environ.get(k, "0") or 0) for k in ("TORCHELASTIC_RESTART_COUNT",
                                                                      "SLURM_RESTART_COUNT"))
        self.resume = cfg.resume or self.restart > 0
        # checkpoint.resume_data=false starts the data afresh on the job's first attempt; a
        # restart continues the data its first attempt began.
        self.resume_data = cfg.resume_data or self.restart > 0
        self._pending = None  # (future, step, partial, meta, writer, side files)
        self._pg = None
        if cfg.async_save and dist.is_initialized():
            # Background writes must not share a communicator with training collectives.
            self._pg = dist.new_group(backend="gloo", timeout=pdist.group_timeout())
        self._stager = None  # async saves' host staging buffers, kept across saves
        self.reuse_staging = True  # False: torch's default, new unpinned buffers each save (bench)
        self.blocked_s = 0.0  # time the training loop spent inside save calls
        self.verify_s = 0.0  # time spent checking files before a load

    def due(self, step: int, total: int) -> bool:
        return self.cfg.interval > 0 and (step % self.cfg.interval == 0 or step == total)

    # -- save -----------------------------------------------------------------------------
    def save(self, step: int, tokens_seen: int, model, optimizer, loader_state: Optional[dict] = None,
             *, blocking: bool = False, loss: Optional[float] = None) -> None:
        """``loader_state``: this rank's loader state when it writes one (one rank per DP
        group). ``blocking`` forces a synchronous save (end of run, signals). ``loss``: the
        step's loss, recorded in meta.json (which checkpoint to go back to after a loss
        spike). A save that
        fails (disk full, unwritable) removes its ``.partial`` and raises
        ``CheckpointError`` naming the path and errno on every rank; the previous
        checkpoint stays."""
        t0 = time.perf_counter()
        self.wait()  # at most one save in flight
        partial = self.root / f"step-{step}.partial"
        try:
            agreed(self._make_partial, partial)
            model_sd, optim_sd = get_states(model, optimizer)
            state = {"model": model_sd, "optim": optim_sd}
            side = agreed(self._write_side_files, partial, loader_state)
            meta = {"step": step, "tokens_seen": tokens_seen, "world_size": self.world_size,
                    "model": self.model_args, "freeze": self.freeze}
            if loss is not None and math.isfinite(loss):
                meta["loss"] = loss
            if self.lora:
                meta["lora"] = self.lora
            if self.tokenizer is not None:
                meta["tokenizer"] = self.tokenizer
            writer = CrcWriter(partial)
            if self.cfg.async_save and not blocking:
                fut = dcp.async_save(state, storage_writer=writer, process_group=self._pg,
                                     async_stager=self._staging())
                self._pending = (fut, step, partial, meta, writer, side)
            else:
                dcp.save(state, storage_writer=writer)
                self._commit(step, partial, meta, {**writer.files, **side})
        except (Exception, CheckpointException) as e:  # noqa: BLE001 (CheckpointException is a BaseException)
            self._save_failed(partial, e)
        self.blocked_s += time.perf_counter() - t0

    def _staging(self):
        """The stager of async saves, made once: its host copies of the state's tensors are
        cached by storage and reused by every later save (no new allocation per save), pinned
        on CUDA with non-blocking copies synchronized before the save returns. Reuse is safe:
        a save first waits for the previous one's writes. None: torch's default stager."""
        if not self.reuse_staging:
            return None
        if self._stager is None:
            from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

            cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
            self._stager = DefaultStager(StagingOptions(use_pinned_memory=cuda, use_shared_memory=False,
                                                        use_async_staging=False, use_non_blocking_copy=cuda))
        return self._stager

    def close(self) -> None:
        """Drops the stager's cache of host buffers (a write still in flight keeps the
        buffers it holds until it ends)."""
        if self._stager is not None:
            self._stager.close()
            self._stager = None

    def _make_partial(self, partial: Path) -> None:
        if self.is_rank0:
            shutil.rmtree(partial, ignore_errors=True)
            for sub in ("rng", "loader"):
                (partial / sub).mkdir(parents=True)

    def _write_side_files(self, partial: Path, loader_state: Optional[dict]) -> Dict[str, Tuple[int, int]]:
        files = {f"rng/rank-{self.rank}.pt": save_rng(partial / "rng" / f"rank-{self.rank}.pt")}
        if loader_state is not None:
            rel = f"loader/dp-{loader_state['dp_rank']}.json"
            files[rel] = write_file(partial / rel, json.dumps(loader_state).encode())
        if self._tokenizer_bytes is not None:  # rank 0 only: the run's tokenizer file, in the manifest
            rel = self.tokenizer["file"]
            (partial / rel).parent.mkdir(exist_ok=True)
            files[rel] = write_file(partial / rel, self._tokenizer_bytes)
        return files

    def _save_failed(self, partial: Path, e: BaseException) -> None:
        reraise_interrupt(e)
        why = str(e) if isinstance(e, CheckpointError) else describe_error(e)
        if self.is_rank0:
            shutil.rmtree(partial, ignore_errors=True)
        done = complete_checkpoints(self.root)
        kept = f"the newest complete checkpoint, {done[-1][1]}, is kept" if done else "no complete checkpoint yet"
        raise CheckpointError(f"saving checkpoint {partial} failed: {why}; removed {partial.name}; {kept}") from None

    def poll(self) -> None:
        """At a step boundary: commit an async save once every rank finished writing."""
        if self._pending is None:
            return
        # Not on the checkpoint group: it is busy with the background write's collectives.
        done = pdist.host_all_reduce(torch.tensor([1.0 if self._pending[0].done() else 0.0]), dist.ReduceOp.MIN)
        if done.item() == 1.0:
            self.wait()

    def wait(self) -> None:
        """Finish and commit the save in flight, if any."""
        if self._pending is None:
            return
        fut, step, partial, meta, writer, side = self._pending
        self._pending = None
        try:
            fut.result()
            self._commit(step, partial, meta, {**writer.files, **side})
        except (Exception, CheckpointException) as e:  # noqa: BLE001
            self._save_failed(partial, e)

    def abandon(self) -> Optional[Path]:
        """Training failed with an async save in flight: leave it uncommitted. Its commit
        takes collectives every rank must join, and a failed job's ranks may not; the
        ``.partial`` dir is removed at the next start, which resumes from the newest
        complete checkpoint. The writer thread itself ends before the process exits, when
        its writes finish or its group times out (``parallel.timeout_s``). Returns the
        abandoned ``.partial`` (None when no save was in flight)."""
        if self._pending is None:
            return None
        _, step, partial, *_ = self._pending
        self._pending = None
        # Said by every rank that fails: the one that failed first need not be rank 0.
        log.warning("training failed with the async save of step %d in flight: not committed (%s is removed at "
                    "the next start, which resumes from the newest complete checkpoint)", step, partial)
        return partial

    def _commit(self, step: int, partial: Path, meta: dict, files: Dict[str, Tuple[int, int]]) -> None:
        manifest: Dict[str, List[int]] = {}
        for part in pdist.all_gather_object(files):  # every rank's files, with the sums taken as written
            manifest.update({k: list(v) for k, v in part.items()})

        def finish() -> None:
            if not self.is_rank0:
                return
            manifest[".metadata"] = list(file_crc(partial / ".metadata"))
            (partial / "meta.json").write_text(meta_text({**meta, "files": dict(sorted(manifest.items()))}))
            final = self.root / f"step-{step}"
            shutil.rmtree(final, ignore_errors=True)
            partial.rename(final)  # the commit point
            log.info("checkpoint saved: %s", final)
            self._prune()

        agreed(finish)

    def _prune(self) -> None:
        keep = self.cfg.keep_last
        done = complete_checkpoints(self.root)
        if keep > 0:
            for _, path in done[:-keep]:
                shutil.rmtree(path, ignore_errors=True)

    # -- load -----------------------------------------------------------------------------
    def maybe_resume(self, model, optimizer, restore_loader: Optional[Callable[[List[dict]], None]] = None
                     ) -> Tuple[int, int, Optional[List[dict]]]:
        """(step, tokens_seen, loader states of every DP rank) to continue from: the newest
        usable checkpoint of this run dir (an unusable one is moved aside to
        ``step-N.corrupt``, with a warning, and the one before it is tried; one that does
        not fit this job's model is an error, not a corruption), else
        ``checkpoint.load_path``; (0, 0, None) for a fresh start (also after
        ``load_weights_only``); the loader states are ``[]`` after a full load with
        ``checkpoint.resume_data=false`` (the data starts afresh). ``restore_loader(states)``
        applies the loader states (its errors name the loader files, like any other bad file)."""
        moved = pdist.broadcast_object(agreed(self._tidy_root))  # rank 0's: {old path: where it was set aside}
        if not self.cfg.resume and self.resume and self.is_rank0:
            log.info("checkpoint.resume=false, but this is restart %d of the job: it resumes its own checkpoints",
                     self.restart)
        if not self.cfg.resume_data and self.resume_data and self.is_rank0:
            log.info("checkpoint.resume_data=false, but this is restart %d of the job: it resumes its own "
                     "checkpoints' data position", self.restart)
        done = complete_checkpoints(self.root) if self.resume else []
        while done:
            _, path = done.pop()
            try:
                return self._load_full(path, model, optimizer, restore_loader)
            except CheckpointMismatch:
                raise  # the config changed, not the files: nothing to move aside
            except CheckpointError as e:
                if not done:
                    raise CheckpointError(
                        f"{e}. No earlier complete checkpoint in {self.root} to fall back to: move {path.name} aside "
                        "(or delete it) to start the run over, or fix the file; checkpoint.keep_last >= 2 keeps one "
                        "to fall back to") from None
                aside = self._move_aside(path)
                if self.is_rank0:
                    log.warning("checkpoint %s is unusable: %s; moved it to %s, resuming from %s", path, e,
                                aside.name, done[-1][1])
        if self.cfg.load_path:
            path = Path(self.cfg.load_path)
            path = Path(moved.get(os.path.realpath(path), path))  # a checkpoint of this run dir, set aside
            if not path.is_dir():
                raise CheckpointError(f"checkpoint.load_path={str(path)!r}: no such checkpoint directory")
            if self.cfg.load_weights_only:
                self.load_weights(path, model)
                return 0, 0, None
            return self._load_full(path, model, optimizer, restore_loader)
        return 0, 0, None

    def _tidy_root(self) -> Dict[str, str]:
        """Rank 0, before a resume: removes the ``.partial`` saves a crash left, and with
        ``checkpoint.resume=false`` sets an earlier run's checkpoints aside (returns where
        each went, by its old real path). Run through ``agreed``: an error here (a read-only
        folder) ends every rank alike, exit 4."""
        if not (self.is_rank0 and self.root.is_dir()):
            return {}
        for stale in self.root.glob("step-*.partial"):
            log.warning("removing incomplete checkpoint %s", stale)
            shutil.rmtree(stale, ignore_errors=True)
        if not self.resume:
            try:
                return self._set_aside_earlier()
            except OSError as e:
                raise CheckpointError(f"checkpoint.resume=false: cannot set the earlier checkpoints in {self.root} "
                                      f"aside ({describe_error(e)}); move them yourself, or use another "
                                      "hydra.run.dir") from None
        return {}

    def _set_aside_earlier(self) -> Dict[str, str]:
        """``checkpoint.resume=false`` in a run dir that holds checkpoints of an earlier run:
        they move into ``checkpoints/earlier-<time>/``, where neither pruning (which would
        delete them as soon as this run saved ``keep_last`` of its own) nor a later resume
        (which would continue the earlier run) reaches them. Nothing is deleted. Returns
        {old real path: new path} (a ``checkpoint.load_path`` among them follows)."""
        done = complete_checkpoints(self.root)
        if not done:
            return {}
        dest = self.root / time.strftime("earlier-%Y%m%d-%H%M%S", time.gmtime())
        n = 1
        while dest.exists():
            dest, n = dest.with_name(f"{dest.name.split('.')[0]}.{n}"), n + 1
        dest.mkdir()
        moved = {}
        for _, path in done:
            moved[os.path.realpath(path)] = str(dest / path.name)
            path.rename(dest / path.name)
        log.warning("checkpoint.resume=false: the checkpoints of an earlier run in this run dir (%s) are set aside "
                    "in %s, not deleted; this run starts at step 1 (a later start with checkpoint.resume=true "
                    "resumes this run's own; with resume=false again, it sets them aside too)",
                    ", ".join(p.name for _, p in done), dest)
        return moved

    def _move_aside(self, path: Path) -> Path:
        aside = path.with_name(path.name + ".corrupt")
        n = 1
        while aside.exists():
            aside, n = path.with_name(f"{path.name}.corrupt{n}"), n + 1
        if self.is_rank0:
            path.rename(aside)
        pdist.barrier()
        return aside

    def _verify(self, path: Path, meta: dict) -> None:
        """Every listed file exists with its size and CRC32, the files split between the
        ranks (rank r checks every world-size-th; the error is agreed by the caller).
        Checkpoints without a manifest (older versions) are not checked."""
        files = meta.get("files")
        if files is None:
            return
        t0 = time.perf_counter()
        names = sorted(files)
        verify_files(path, files, names[self.rank::self.world_size])
        self.verify_s += time.perf_counter() - t0

    def load_weights(self, path: Path, model) -> None:
        meta = agreed(read_meta, path)
        model_sd = get_model_states(model)
        names = all_model_names(model_sd)
        agreed(lambda: (self._verify(path, meta), check_shapes(path, {"model": model_sd}, names)))
        state = {"model": model_sd}
        self._dcp_load(state, path)
        set_model_states(model, state["model"])
        log.info("initialized weights from %s (new optimizer, step 0)", path)

    def _load_full(self, path: Path, model, optimizer, restore_loader=None) -> Tuple[int, int, Optional[List[dict]]]:
        def prepare():
            meta = read_meta(path)
            if meta.get("weights_only"):
                raise CheckpointMismatch(f"checkpoint {path} holds weights only (imported from "
                                      f"{meta.get('source', '?')}): start from it with "
                                      "checkpoint.load_weights_only=true")
            for key in ("step", "tokens_seen"):
                if key not in meta:
                    raise CheckpointError(f"{path / 'meta.json'}: no {key!r}")
            self._verify(path, meta)
            if self.args is not None:
                check_fits(path, meta, self.args, self.lora, self.freeze)
            return meta

        meta = agreed(prepare)
        model_sd, optim_sd = get_states(model, optimizer)
        state = {"model": model_sd, "optim": optim_sd}
        agreed(check_shapes, path, state, all_model_names(model_sd))
        self._dcp_load(state, path)
        agreed(self._apply, path, model, optimizer, state)

        def side_files():
            if not self.resume_data:
                states = []
                if self.is_rank0:
                    log.info("checkpoint.resume_data=false: the data starts afresh at step %d", meta["step"])
            else:
                states = loader_states_of(path)
            if restore_loader is not None and states:
                try:
                    restore_loader(states)
                except LoaderStateMismatch as e:
                    raise CheckpointMismatch(f"checkpoint {path}: its data position does not fit this job's data: "
                                             f"{e}. The checkpoint is sound and stays where it is; "
                                             "checkpoint.resume_data=false resumes it with the data started "
                                             "afresh") from None
                except (ValueError, KeyError, TypeError, IndexError, AttributeError) as e:
                    raise CheckpointError(f"{path / 'loader'}/dp-*.json: not a loader state this job can use "
                                          f"({type(e).__name__}: {e})") from None
            rng = path / "rng" / f"rank-{self.rank}.pt"
            if meta.get("world_size") == self.world_size and rng.is_file():
                load_rng(rng)
            else:
                log.info("RNG states not restored (saved with world size %s, now %d): reseeded",
                         meta.get("world_size"), self.world_size)
            return states

        loader_states = agreed(side_files)
        log.info("loaded checkpoint %s", path)
        return int(meta["step"]), int(meta["tokens_seen"]), loader_states

    @staticmethod
    def _apply(path: Path, model, optimizer, state: dict) -> None:
        """Loaded values into the model and optimizer. The files were checked (sizes and
        CRC32s) and read: a failure here is one of fit, not of the files."""
        try:
            set_states(model, optimizer, state["model"], state["optim"])
        except (torch.OutOfMemoryError, dist.DistBackendError):
            raise  # the device or a peer, not the fit
        except (KeyError, ValueError, RuntimeError, TypeError) as e:
            raise CheckpointMismatch(f"checkpoint {path} does not fit this job's model or optimizer "
                                     f"({type(e).__name__}: {str(e).strip().splitlines()[0][:300]})") from None

    @staticmethod
    def _dcp_load(state: dict, path: Path) -> None:
        load_dcp(state, path)
