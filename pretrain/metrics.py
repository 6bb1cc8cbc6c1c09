"""Where metrics go on rank 0: metrics.jsonl, TensorBoard events under tb/, and one
console progress line per logged step."""
from __future__ import annotations

import json
import logging
import resource
from pathlib import Path
from typing import Dict, Optional

import torch

log = logging.getLogger("pretrain")


def peak_memory_gb(device: torch.device) -> float:
    """CUDA max allocated, else this process's peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def _fmt_eta(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


class MetricsSink:
    def __init__(self, run_dir: Path, *, enabled: bool, total_steps: int, tensorboard: bool, console: bool):
        self.enabled, self.total_steps, self.console = enabled, total_steps, console
        self._jsonl = None
        self._tb = None
        if not enabled:
            return
        self._jsonl = open(run_dir / "metrics.jsonl", "a", buffering=1)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(run_dir / "tb"))

    def log(self, step: int, metrics: Dict[str, float], eta_s: Optional[float] = None) -> None:
        if not self.enabled:
            return
        record = {"step": step, **metrics}
        self._jsonl.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for k, v in metrics.items():
                self._tb.add_scalar(k, v, step)
        if self.console:
            eta = f" | eta {_fmt_eta(eta_s)}" if eta_s is not None else ""
            log.info(
                "step %d/%d | loss %.4f | lr %.2e | gnorm %.3f | %.0f tok/s | mfu %.1f%% | mem %.2fGB%s",
                step, self.total_steps, metrics["loss"], metrics["lr"], metrics["grad_norm"],
                metrics["tokens_per_s"], 100 * metrics["mfu"], metrics["mem_gb"], eta,
            )

    def close(self) -> None:
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()
        if self._jsonl is not None:
            self._jsonl.close()
