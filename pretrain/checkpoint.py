"""Sharded checkpoints with torch.distributed.checkpoint: model and optimizer state (any
layout), step and tokens seen, and the data loader's state (loader/dp-<r>.json, one per
data-parallel rank; resharded on load when the DP degree or worker count changed). A
checkpoint exists only once complete: every rank writes into step-N.partial/, then rank 0
renames it to step-N/ after all finished."""
from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path
from typing import List, Optional, Tuple

import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from parallel import distributed as pdist

log = logging.getLogger("pretrain")
_STEP_DIR = re.compile(r"^step-(\d+)$")


def complete_checkpoints(root: Path) -> list[Tuple[int, Path]]:
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return sorted(found)


class Checkpointer:
    def __init__(self, root: Path, cfg, *, is_rank0: bool):
        self.root, self.cfg, self.is_rank0 = root, cfg, is_rank0

    def due(self, step: int, total: int) -> bool:
        return self.cfg.interval > 0 and (step % self.cfg.interval == 0 or step == total)

    def save(self, step: int, tokens_seen: int, model, optimizer, loader_state: Optional[dict] = None) -> None:
        """``loader_state``: this rank's loader state when it writes one (one rank per DP group)."""
        final = self.root / f"step-{step}"
        partial = self.root / f"step-{step}.partial"
        if self.is_rank0:
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True)
        pdist.barrier()
        model_sd, optim_sd = get_state_dict(model, optimizer)
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(partial))
        if loader_state is not None:
            ldir = partial / "loader"
            ldir.mkdir(exist_ok=True)
            (ldir / f"dp-{loader_state['dp_rank']}.json").write_text(json.dumps(loader_state))
        pdist.barrier()
        if self.is_rank0:
            meta = {"step": step, "tokens_seen": tokens_seen}
            (partial / "meta.json").write_text(json.dumps(meta))
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

    def maybe_resume(self, model, optimizer) -> Tuple[int, int, Optional[List[dict]]]:
        """(step, tokens_seen, loader states of every DP rank) to continue from;
        (0, 0, None) for a fresh start."""
        if self.is_rank0 and self.root.is_dir():
            for stale in self.root.glob("step-*.partial"):
                log.warning("removing incomplete checkpoint %s", stale)
                shutil.rmtree(stale, ignore_errors=True)
        pdist.barrier()
        done = complete_checkpoints(self.root) if self.cfg.resume else []
        if not done:
            return 0, 0, None
        step, path = done[-1]
        meta = json.loads((path / "meta.json").read_text())
        model_sd, optim_sd = get_state_dict(model, optimizer)
        state = {"model": model_sd, "optim": optim_sd}
        dcp.load(state, checkpoint_id=str(path))
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        loader_files = sorted((path / "loader").glob("dp-*.json"))
        if not loader_files:
            raise FileNotFoundError(f"{path} has no loader/ state: it was written by an older version; "
                                    "start a new run dir or set checkpoint.resume=false")
        loader_states = [json.loads(f.read_text()) for f in loader_files]
        log.info("loaded checkpoint %s", path)
        return int(meta["step"]), int(meta["tokens_seen"]), loader_states

