"""Where metrics go on rank 0: metrics.jsonl, TensorBoard events under tb/, Weights &
Biases (when logging.wandb is on), and one console progress line per logged step."""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import resource
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Dict, Optional

import torch

from parallel import distributed as pdist

log = logging.getLogger("pretrain")


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


class DataCounts:
    """Cumulative over the run (this process): tokens per source, skipped records,
    documents cut to data.max_doc_bytes and chat conversations cut to data.max_length,
    and for image-text data the samples dropped (too long, too many images) and the images
    trained on, as each loader batch reports them."""

    def __init__(self, n_sources: int):
        self.src_tokens = torch.zeros(n_sources, dtype=torch.float64)
        # images, dropped, truncated_docs, truncated, skipped
        self.counts = torch.zeros(5, dtype=torch.float64)
        self.images_seen = False  # this process's batches held an image

    def add(self, batch: dict) -> None:
        self.src_tokens += batch["source_tokens"]
        ids = batch.get("aspect_ratio_ids")
        images = int((ids != 0).sum()) if ids is not None else 0  # a loader batch: on the host
        self.images_seen |= images > 0
        self.counts += torch.tensor([images, batch.get("dropped", 0), batch.get("truncated_docs", 0),
                                     batch.get("truncated", 0), batch["skipped"]], dtype=torch.float64)

    def global_metrics(self, device: torch.device, replicas: int, source_names, listing_skipped: float,
                       chat: bool, images: bool = False) -> Dict[str, float]:
        """Summed over ranks, each DP group counted once (its ``replicas`` TP/PP ranks
        counted the same batches)."""
        counts = pdist.all_reduce_sum(torch.cat([self.src_tokens, self.counts]).to(device)).cpu()
        counts /= replicas
        out = {"data/skipped": counts[-1].item() + listing_skipped,
               "data/truncated_docs": counts[-3].item()}  # documents cut to data.max_doc_bytes
        if chat or images:
            out["data/truncated"] = counts[-2].item()  # conversations (text samples) cut to data.max_length
        if images:
            out["data/dropped"] = counts[-4].item()  # image samples too long or with too many images
            out["data/images"] = counts[-5].item()
        src = counts[:-5]
        total = max(src.sum().item(), 1.0)
        for name, n in zip(source_names, src.tolist()):
            out[f"data/tokens/{name}"] = n
            if len(source_names) > 1:
                out[f"data/share/{name}"] = n / total
        return out


# logging.every=null on CUDA. A logged step reads about 5 values back from the device
# (loss, grad norm, memory, data counts, the timing sync) and runs 3 small all-reduces;
# each read makes the host wait for the device, so the next step's kernels queue late by
# up to the host's launch lead. That is on the order of a millisecond: every 10 steps keeps
# it under 1% of the step time for steps of 100 ms or more (a 1B model's step on one GPU
# is several hundred ms). The steps between logs read nothing back (tests/test_train_step.py).
LOG_EVERY_CUDA = 10


def log_every(every: Optional[int], device: torch.device) -> int:
    """``logging.every``, its null resolved for this device."""
    return every if every is not None else (LOG_EVERY_CUDA if device.type == "cuda" else 1)


class LogWindow:
    """The steps since the last logged one: their summed mean losses, tokens, time and
    time waiting for data; ``metrics`` turns it into one logged row (every rank takes
    part: the values are reduced over ranks) and starts the next window. The first and
    last steps are always logged (the curve has both ends), so is every evaluated step.
    ``exclude(seconds)`` takes evaluation time out of training time."""

    def __init__(self, device: torch.device, *, every: int, start_step: int, total_steps: int):
        self.device, self.every, self.start_step, self.total_steps = device, every, start_step, total_steps
        self.loop_start = self.start = time.perf_counter()
        self.tokens, self.steps, self.data_wait = 0, 0, 0.0
        # Sum of per-step mean losses since the last log: the logged loss is their average.
        self.loss = torch.zeros((), device=device)

    def add_step(self, step_mean_loss: torch.Tensor, tokens: int) -> None:
        self.loss += step_mean_loss
        self.tokens += tokens
        self.steps += 1

    def exclude(self, seconds: float) -> None:
        self.start += seconds

    def due(self, step: int, evaluated: bool) -> bool:
        return step % self.every == 0 or step in (self.start_step + 1, self.total_steps) or evaluated

    def metrics(self, step: int, mean_loss: torch.Tensor, *, world_size: int, flops_per_token: float,
                peak: float) -> Dict[str, float]:
        """``mean_loss``: the window's mean loss, already averaged over the loss ranks."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        elapsed = now - self.start
        tps = self.tokens / elapsed
        mem_stats = memory_stats_gb(self.device)  # mem_gb and mem_reserved_gb (CUDA) / mem_rss_gb (CPU)
        mem = pdist.all_reduce_max(torch.tensor(list(mem_stats.values()), device=self.device))
        out = {
            "loss": mean_loss.item(),
            "tokens_per_s": tps,
            "tokens_per_s_per_device": tps / world_size,
            "mfu": flops_per_token * tps / (peak * world_size),
            **dict(zip(mem_stats, mem.tolist())),
            "step_time_s": elapsed / self.steps,
            "data_wait_share": self.data_wait / elapsed,
        }
        self.eta_s = (now - self.loop_start) / (step - self.start_step) * (self.total_steps - step)
        self.start, self.tokens, self.steps, self.data_wait = time.perf_counter(), 0, 0, 0.0
        self.loss.zero_()
        return out


def training_row(timing: Dict[str, float], data: Dict[str, float], *, lr: float, grad_norm: float,
                 tokens_seen: int, val_loss: Optional[float]) -> Dict[str, float]:
    """One logged row, keys in the order the sinks show them: loss, lr, grad_norm,
    throughput, tokens seen, mfu, memory, step time, data wait, data counts, validation,
    tokens (and shares) per source. ``timing``: ``LogWindow.metrics``; ``data``:
    ``DataCounts.global_metrics``."""
    timing, data = dict(timing), dict(data)
    row = {"loss": timing.pop("loss"), "lr": lr, "grad_norm": grad_norm,
           "tokens_per_s": timing.pop("tokens_per_s"), "tokens_per_s_per_device": timing.pop("tokens_per_s_per_device"),
           "tokens_seen": float(tokens_seen), **timing,
           **{k: data.pop(k) for k in ("data/skipped", "data/truncated_docs", "data/truncated", "data/dropped",
                                       "data/images") if k in data}}
    if val_loss is not None:
        row["val/loss"], row["val/ppl"] = val_loss, math.exp(val_loss)
    row.update(data)
    return row
