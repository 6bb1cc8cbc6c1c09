"""profiling.*: torch.profiler over a window of optimizer steps, driven by the training
loop; every rank writes a Chrome trace (and optionally memory data) to <run dir>/profile/."""
from __future__ import annotations

import logging
import warnings
from pathlib import Path

import torch
from torch.profiler import ProfilerAction, ProfilerActivity, profile, schedule

log = logging.getLogger("pretrain")

_RECORDING = (ProfilerAction.RECORD, ProfilerAction.RECORD_AND_SAVE)


class StepProfiler:
    """``start()`` before the first step, ``step()`` at the end of every optimizer step,
    ``stop()`` in the loop's ``finally``; all three do nothing when profiling is off.

    The window is global steps ``start_step`` .. ``start_step + steps - 1``, cut at the
    run's last step; a run resumed at or past ``start_step`` profiles nothing. The step
    before the window (when this process ran one) is the profiler's warm-up: it runs
    with the profiler on and its events are dropped. torch numbers the steps of this
    process's loop from 0, so global step g is ``ProfilerStep#(g - resumed_step - 1)``
    in the trace (a fresh run: ``#(g - 1)``).

    Files, per rank r, under ``<run dir>/profile/``: ``trace-rank<r>.pt.trace.json`` (Chrome
    trace format: Perfetto, chrome://tracing, TensorBoard's profiler plugin read it);
    with ``memory``: ``memory-rank<r>.txt`` (per-op allocator table) and on CUDA
    ``memory-rank<r>.pickle`` (a ``torch.cuda.memory`` snapshot of the window, for
    https://pytorch.org/memory_viz)."""

    def __init__(self, cfg, run_dir: Path, rank: int, device: torch.device, steps_done: int, last_step: int):
        self.cfg, self.rank, self.device = cfg, rank, device
        self.out = Path(run_dir) / "profile"
        self.prof = None
        self._history = False  # CUDA memory history being recorded
        self._saved = False
        if not cfg.enable:
            return
        if cfg.start_step <= steps_done:
            if rank == 0:
                log.warning("profiling: the run resumed at step %d, at or past profiling.start_step=%d: "
                            "nothing is profiled", steps_done, cfg.start_step)
            return
        if cfg.start_step > last_step:
            if rank == 0:
                log.warning("profiling: profiling.start_step=%d is after the last step %d: nothing is profiled",
                            cfg.start_step, last_step)
            return
        self.first, self.last = cfg.start_step, min(cfg.start_step + cfg.steps - 1, last_step)
        index = cfg.start_step - steps_done - 1  # this loop's 0-based index of the first profiled step
        warmup = 1 if index >= 1 else 0
        self.first_index = index
        activities = [ProfilerActivity.CPU]
        if device.type == "cuda":
            activities.append(ProfilerActivity.CUDA)
        with warnings.catch_warnings():  # "won't be using warmup": only when the window opens the run
            warnings.simplefilter("ignore")
            sched = schedule(wait=index - warmup, warmup=warmup, active=cfg.steps, repeat=1)
        self.prof = profile(activities=activities, schedule=sched, on_trace_ready=self._ready,
                            record_shapes=cfg.record_shapes, profile_memory=cfg.memory, with_stack=cfg.with_stack)
        if rank == 0:
            log.info("profiling: steps %d-%d (ProfilerStep#%d-#%d in the traces) -> %s", self.first, self.last,
                     index, index + self.last - self.first, self.out)

    def start(self) -> None:
        if self.prof is not None:
            self.prof.start()
            self._maybe_record_history()

    def step(self) -> None:
        """End of an optimizer step: the next one begins."""
        if self.prof is None:
            return
        self.prof.step()
        if self._saved:  # window done: close the step marker just opened, leave the profiler
            self.prof.stop()
            self.prof = None
        else:
            self._maybe_record_history()

    def stop(self) -> None:
        """End of the loop (or an exception): a window still open is saved as it is."""
        if self.prof is not None:
            prof, self.prof = self.prof, None
            prof.stop()
        if self._history:
            torch.cuda.memory._record_memory_history(enabled=None)
            self._history = False

    def _maybe_record_history(self) -> None:
        if (self.cfg.memory and self.device.type == "cuda" and not self._history
                and self.prof.current_action in _RECORDING):
            torch.cuda.memory._record_memory_history(max_entries=1_000_000)
            self._history = True

    def _ready(self, prof: profile) -> None:
        self._saved = True
        self.out.mkdir(parents=True, exist_ok=True)
        trace = self.out / f"trace-rank{self.rank}.pt.trace.json"
        prof.export_chrome_trace(str(trace))
        if self.cfg.memory:
            sort = "self_cuda_memory_usage" if self.device.type == "cuda" else "self_cpu_memory_usage"
            table = prof.key_averages().table(sort_by=sort, row_limit=50)
            (self.out / f"memory-rank{self.rank}.txt").write_text(table + "\n")
            if self._history:
                torch.cuda.memory._dump_snapshot(str(self.out / f"memory-rank{self.rank}.pickle"))
                torch.cuda.memory._record_memory_history(enabled=None)
                self._history = False
        if self.rank == 0:
            log.info("profiling: traces of steps %d-%d written to %s (trace-rank<r>.pt.trace.json, one per rank; "
                     "open in https://ui.perfetto.dev)%s", self.first, self.last, self.out,
                     "; per-op memory in memory-rank<r>.txt" if self.cfg.memory else "")
