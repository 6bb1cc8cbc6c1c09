"""Sharded checkpoints with torch.distributed.checkpoint (DCP).

A checkpoint ``<run dir>/checkpoints/step-<N>/`` holds:
- model and optimizer state (DCP, any layout; DCP reshards on load);
- ``loader/dp-<r>.json``: the data loader state of each data-parallel rank (resharded on
  load when the global batch changed);
- ``rng/rank-<r>.pt``: Python, numpy, torch (and CUDA) RNG states of each rank;
- ``meta.json``: step, tokens seen, world size and the model's shape (``model`` args),
  written last.
The LR schedule is a pure function of the step and needs no state.

Atomic completion: every rank writes into ``step-N.partial/``; once every rank finished,
rank 0 writes meta.json and renames the folder to ``step-N/``. A crash or kill before that
leaves the previous checkpoint as the newest; partial folders are removed at the next
start. With ``checkpoint.async_save`` the tensors are staged to host memory and written by
a background thread while training continues; at most one save is in flight (the next one
waits), and the commit happens at the first step boundary where every rank is done."""
from __future__ import annotations

import dataclasses
import json
import logging
import random
import re
import shutil
import time
from pathlib import Path
from typing import List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_model_state_dict, set_state_dict)

from parallel import distributed as pdist

log = logging.getLogger("pretrain")
_STEP_DIR = re.compile(r"^step-(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: missing, incomplete, corrupt or of another shape."""


def complete_checkpoints(root: Path) -> list[Tuple[int, Path]]:
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if (m := _STEP_DIR.match(p.name)) and p.is_dir() and (p / "meta.json").is_file()]
    return sorted(found)


def rng_state() -> dict:
    import numpy as np

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    import numpy as np

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def read_meta(path: Path) -> dict:
    meta = path / "meta.json"
    if not meta.is_file():
        raise CheckpointError(f"checkpoint {path}: no {meta.name} (incomplete, or not a checkpoint of this trainer)")
    try:
        return json.loads(meta.read_text())
    except ValueError as e:
        raise CheckpointError(f"checkpoint {path}: {meta} is corrupt ({e})") from e


def check_shapes(path: Path, state: dict) -> None:
    """Compare the checkpoint's tensor shapes with ``state`` (nested dicts of tensors)
    before loading: the first mismatch is named with both shapes."""
    try:
        md = dcp.FileSystemReader(str(path)).read_metadata()
    except FileNotFoundError as e:
        raise CheckpointError(f"checkpoint {path}: missing {path / '.metadata'} (incomplete or not DCP)") from e
    except Exception as e:  # noqa: BLE001 (pickle and format errors)
        raise CheckpointError(f"checkpoint {path}: cannot read {path / '.metadata'} ({e})") from e
    saved = md.state_dict_metadata
    for prefix, sub in state.items():
        for name, t in sub.items():
            if not isinstance(t, torch.Tensor):
                continue
            key = f"{prefix}.{name}"
            if key not in saved:
                raise CheckpointError(f"checkpoint {path} has no tensor {key} (another model? "
                                      f"it has e.g. {sorted(saved)[:3]})")
            have = tuple(getattr(saved[key], "size", ()))
            if have != tuple(t.shape):
                raise CheckpointError(f"checkpoint {path}: {key} has shape {list(have)} in the checkpoint but "
                                      f"{list(t.shape)} in this model: the model config differs")


# Flat optimizer state ("state.<param>.exp_avg", "param_groups.<param>.lr"): keyed by
# parameter name, so the states of several model parts (pipeline stages) merge, and any
# layout loads any other's.
_OPTS = StateDictOptions(flatten_optimizer_state_dict=True)
# With frozen parameters (LoRA), checkpoints hold the trainable ones only: the adapters
# are small, and the frozen base comes from where the run started (model.init_from).
_OPTS_TRAINABLE = StateDictOptions(flatten_optimizer_state_dict=True, ignore_frozen_params=True, strict=False)


def _opts(part) -> StateDictOptions:
    return _OPTS_TRAINABLE if any(not p.requires_grad for p in part.parameters()) else _OPTS


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
    def __init__(self, root: Path, cfg, *, rank: int, world_size: int, model_args=None, lora=None):
        self.root, self.cfg, self.rank, self.world_size = root, cfg, rank, world_size
        self.is_rank0 = rank == 0
        self.model_args = dataclasses.asdict(model_args) if model_args is not None else None
        # LoRA: the adapters' settings and the base they adapt (export needs both).
        self.lora = lora
        self._pending = None  # (future, step, partial, meta, loader_state)
        self._pg = None
        if cfg.async_save and dist.is_initialized():
            # Background writes must not share a communicator with training collectives.
            self._pg = dist.new_group(backend="gloo")
        self.blocked_s = 0.0  # time the training loop spent inside save calls

    def due(self, step: int, total: int) -> bool:
        return self.cfg.interval > 0 and (step % self.cfg.interval == 0 or step == total)

    # -- save -----------------------------------------------------------------------------
    def save(self, step: int, tokens_seen: int, model, optimizer, loader_state: Optional[dict] = None,
             *, blocking: bool = False) -> None:
        """``loader_state``: this rank's loader state when it writes one (one rank per DP
        group). ``blocking`` forces a synchronous save (end of run, signals)."""
        t0 = time.perf_counter()
        self.wait()  # at most one save in flight
        partial = self.root / f"step-{step}.partial"
        if self.is_rank0:
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True)
        pdist.barrier()
        model_sd, optim_sd = get_states(model, optimizer)
        state = {"model": model_sd, "optim": optim_sd}
        for sub in ("rng", "loader"):
            (partial / sub).mkdir(exist_ok=True)
        torch.save(rng_state(), partial / "rng" / f"rank-{self.rank}.pt")
        if loader_state is not None:
            (partial / "loader" / f"dp-{loader_state['dp_rank']}.json").write_text(json.dumps(loader_state))
        meta = {"step": step, "tokens_seen": tokens_seen, "world_size": self.world_size, "model": self.model_args}
        if self.lora:
            meta["lora"] = self.lora
        if self.cfg.async_save and not blocking:
            fut = dcp.async_save(state, checkpoint_id=str(partial), process_group=self._pg)
            self._pending = (fut, step, partial, meta)
        else:
            dcp.save(state, checkpoint_id=str(partial))
            self._commit(step, partial, meta)
        self.blocked_s += time.perf_counter() - t0

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
        fut, step, partial, meta = self._pending
        self._pending = None
        fut.result()
        self._commit(step, partial, meta)

    def _commit(self, step: int, partial: Path, meta: dict) -> None:
        pdist.barrier()
        if self.is_rank0:
            (partial / "meta.json").write_text(json.dumps(meta))
            final = self.root / f"step-{step}"
            shutil.rmtree(final, ignore_errors=True)
            partial.rename(final)  # the commit point
            log.info("checkpoint saved: %s", final)
            self._prune()
        pdist.barrier()

    def _prune(self) -> None:
        keep = self.cfg.keep_last
        done = complete_checkpoints(self.root)
        if keep > 0:
            for _, path in done[:-keep]:
                shutil.rmtree(path, ignore_errors=True)

    # -- load -----------------------------------------------------------------------------
    def maybe_resume(self, model, optimizer) -> Tuple[int, int, Optional[List[dict]]]:
        """(step, tokens_seen, loader states of every DP rank) to continue from: the newest
        complete checkpoint of this run dir, else ``checkpoint.load_path``; (0, 0, None)
        for a fresh start (also after ``load_weights_only``)."""
        if self.is_rank0 and self.root.is_dir():
            for stale in self.root.glob("step-*.partial"):
                log.warning("removing incomplete checkpoint %s", stale)
                shutil.rmtree(stale, ignore_errors=True)
        pdist.barrier()
        done = complete_checkpoints(self.root) if self.cfg.resume else []
        if done:
            return self._load_full(done[-1][1], model, optimizer)
        if self.cfg.load_path:
            path = Path(self.cfg.load_path)
            if not path.is_dir():
                raise CheckpointError(f"checkpoint.load_path={str(path)!r}: no such checkpoint directory")
            if self.cfg.load_weights_only:
                self.load_weights(path, model)
                return 0, 0, None
            return self._load_full(path, model, optimizer)
        return 0, 0, None

    def load_weights(self, path: Path, model) -> None:
        read_meta(path)
        model_sd = get_model_states(model)
        check_shapes(path, {"model": model_sd})
        state = {"model": model_sd}
        self._dcp_load(state, path)
        set_model_states(model, state["model"])
        log.info("initialized weights from %s (new optimizer, step 0)", path)

    def _load_full(self, path: Path, model, optimizer) -> Tuple[int, int, Optional[List[dict]]]:
        meta = read_meta(path)
        if meta.get("weights_only"):
            raise CheckpointError(f"checkpoint {path} holds weights only (imported from {meta.get('source', '?')}): "
                                  "start from it with checkpoint.load_weights_only=true")
        model_sd, optim_sd = get_states(model, optimizer)
        state = {"model": model_sd, "optim": optim_sd}
        check_shapes(path, {"model": model_sd})
        self._dcp_load(state, path)
        set_states(model, optimizer, state["model"], state["optim"])
        loader_files = sorted((path / "loader").glob("dp-*.json"))
        if not loader_files:
            raise CheckpointError(f"checkpoint {path} has no loader/ state: it was written by an older version; "
                                  "start a new run dir or set checkpoint.resume=false")
        loader_states = [json.loads(f.read_text()) for f in loader_files]
        rng = path / "rng" / f"rank-{self.rank}.pt"
        if meta.get("world_size") == self.world_size and rng.is_file():
            set_rng_state(torch.load(rng, weights_only=False))
        else:
            log.info("RNG states not restored (saved with world size %s, now %d): reseeded",
                     meta.get("world_size"), self.world_size)
        log.info("loaded checkpoint %s", path)
        return int(meta["step"]), int(meta["tokens_seen"]), loader_states

    @staticmethod
    def _dcp_load(state: dict, path: Path) -> None:
        try:
            dcp.load(state, checkpoint_id=str(path))
        except CheckpointError:
            raise
        except Exception as e:  # noqa: BLE001 (DCP wraps reader errors per rank)
            raise CheckpointError(f"checkpoint {path} could not be read: {e}") from e
