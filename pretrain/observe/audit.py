"""``data.audit``: per step, the tokens each data-parallel rank took from each document
(``<run dir>/data_audit/rank-<r>.jsonl``), kept consistent with the checkpoint a run
resumes from."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict

import torch


class DataAudit:
    """data.audit: per step, how many tokens this DP rank took from each document."""

    def __init__(self, run_dir: Path, dp_rank: int):
        self._f = open(run_dir / "data_audit" / f"rank-{dp_rank}.jsonl", "a")
        self._counts: Dict[int, int] = {}

    def add(self, window_doc_ids: torch.Tensor) -> None:
        keys, counts = torch.unique(window_doc_ids, return_counts=True)
        for k, c in zip(keys.tolist(), counts.tolist()):
            self._counts[k] = self._counts.get(k, 0) + c

    def end_step(self, step: int) -> None:
        self._f.write(json.dumps({"step": step, "docs": {str(k): c for k, c in sorted(self._counts.items())}}) + "\n")
        self._f.flush()
        self._counts = {}

    def close(self) -> None:
        self._f.close()

    @staticmethod
    def truncate(run_dir: Path, last_step: int) -> None:
        """Before a run (or a resumed one) writes: drop steps after the checkpoint it
        starts from, in every rank's file (a resumed job may have fewer ranks)."""
        out = run_dir / "data_audit"
        out.mkdir(parents=True, exist_ok=True)
        for f in out.glob("rank-*.jsonl"):
            keep = [ln for ln in f.read_text().splitlines() if ln and json.loads(ln)["step"] <= last_step]
            f.write_text("".join(ln + "\n" for ln in keep))
