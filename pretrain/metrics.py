"""Where metrics go on rank 0: metrics.jsonl, TensorBoard events under tb/, Weights &
Biases (when logging.wandb is on), and one console progress line per logged step."""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import resource
import sys
import uuid
from pathlib import Path
from typing import Any, Dict, Optional

import torch

from parallel import distributed as pdist

log = logging.getLogger("pretrain")

WANDB_MODES = ("online", "offline", "disabled")


def peak_memory_gb(device: torch.device) -> float:
    """CUDA max allocated, else this process's peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def current_rss_gb() -> float:
    """This process's resident set size now (Linux /proc/self/statm); peak RSS elsewhere."""
    try:
        with open("/proc/self/statm") as f:
            resident_pages = int(f.read().split()[1])
        return resident_pages * os.sysconf("SC_PAGE_SIZE") / 2**30
    except (OSError, ValueError, IndexError):
        return peak_memory_gb(torch.device("cpu"))


def memory_stats_gb(device: torch.device) -> Dict[str, float]:
    """The memory metrics of this process, GiB: `mem_gb` (CUDA max allocated, or peak RSS
    on CPU) plus `mem_reserved_gb` (CUDA max reserved by the caching allocator) on CUDA or
    `mem_rss_gb` (RSS now) on CPU. The training loop takes the max of each over ranks."""
    if device.type == "cuda":
        return {"mem_gb": peak_memory_gb(device),
                "mem_reserved_gb": torch.cuda.max_memory_reserved(device) / 2**30}
    return {"mem_gb": peak_memory_gb(device), "mem_rss_gb": current_rss_gb()}


def _fmt_eta(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def _hydra_sweep_name() -> Optional[str]:
    """The sweep dir's name when this process is a Hydra multirun job, else None."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        if not HydraConfig.initialized():
            return None
        hc = HydraConfig.get()
        if hc.mode != RunMode.MULTIRUN:
            return None
        return Path(hc.sweep.dir).name or None
    except Exception:  # no Hydra context (e.g. train() called directly)
        return None


def _config_dict(job_config: Any) -> Dict[str, Any]:
    if job_config is None:
        return {}
    if dataclasses.is_dataclass(job_config):
        return dataclasses.asdict(job_config)
    from omegaconf import OmegaConf

    return OmegaConf.to_container(job_config, resolve=True)


class WandbSink:
    """One W&B run per run dir. Its id is kept in <run dir>/wandb_id, so a job resumed in
    the same run dir continues the same W&B run (resume="allow"); offline runs land in
    <run dir>/wandb/offline-run-*/. wandb.log hands each record to wandb's own service
    process, so logging does not wait on the network."""

    def __init__(self, run_dir: Path, lc: Any, job_config: Any):
        import wandb  # imported only when logging.wandb is on

        id_file = run_dir / "wandb_id"
        if id_file.is_file() and id_file.read_text().strip():
            run_id = id_file.read_text().strip()
        else:
            run_id = uuid.uuid4().hex[:16]
            id_file.write_text(run_id + "\n")
        mode = lc.wandb_mode  # None: wandb reads WANDB_MODE itself
        self.run = wandb.init(
            project=lc.wandb_project, entity=lc.wandb_entity, name=lc.wandb_run_name or run_dir.name,
            group=lc.wandb_group or _hydra_sweep_name(), tags=list(lc.wandb_tags) or None,
            config=_config_dict(job_config), dir=str(run_dir), id=run_id, resume="allow", mode=mode,
        )
        self.run_id = run_id
        where = self.run.url or str(Path(self.run.dir).parent)
        log.info("wandb run %s (%s) | %s", run_id, self.run.settings.mode, where)

    def log(self, step: int, metrics: Dict[str, float]) -> None:
        self.run.log(dict(metrics), step=step)

    def close(self, exit_code: int = 0) -> None:
        self.run.finish(exit_code=exit_code)


class MetricsSink:
    """Every logged step goes to each enabled sink. Constructed on every rank (collectively
    when W&B is on: a failed wandb.init on rank 0 stops every rank with the same error);
    only rank 0 (`enabled`) writes anything."""

    def __init__(self, run_dir: Path, *, enabled: bool, total_steps: int, tensorboard: bool, console: bool,
                 wandb_cfg: Any = None, job_config: Any = None):
        self.enabled, self.total_steps, self.console = enabled, total_steps, console
        self._jsonl = None
        self._tb = None
        self._wandb: Optional[WandbSink] = None
        if wandb_cfg is not None:  # the LoggingConfig when logging.wandb is on (the same on every rank)
            error = None
            if enabled:
                try:
                    self._wandb = WandbSink(run_dir, wandb_cfg, job_config)
                except Exception as e:
                    error = (f"logging.wandb=true but wandb.init failed ({type(e).__name__}: {e}). "
                             "Set WANDB_MODE=offline (or logging.wandb_mode=offline) to log to "
                             "<run dir>/wandb/ without a network, run `wandb login` (or set "
                             "WANDB_API_KEY), or set logging.wandb=false")
            error = pdist.broadcast_object(error)
            if error is not None:
                raise RuntimeError(error)
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
        if self._wandb is not None:
            self._wandb.log(step, metrics)
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
            self._tb = None
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._wandb is not None:
            # Called from the trainer's `finally`: an exception on its way out (a crash, a
            # preemption) marks the W&B run failed; a resumed job continues it.
            exit_code = 0 if sys.exc_info()[0] is None else 1
            wb, self._wandb = self._wandb, None
            wb.close(exit_code)
