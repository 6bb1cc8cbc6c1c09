"""The training loop: build the job (``build.py``), then per step: the micro-batches into
the ``TrainStep`` (``step.py``), evaluation, a logged row (``metrics.py``), checkpoints
and the stop signal."""
from __future__ import annotations

import logging
import math
import os
import random
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
import torch.distributed as dist

from parallel import distributed as pdist
from parallel.compile import compiled_graphs
from parallel.dims import ParallelDims
from parallel.env import LaunchEnv
from parallel.parallelize import describe_blocks

from .build import Job, build_job
from .checkpoint import CheckpointError, Checkpointer, complete_checkpoints, read_meta
from .config import JobConfig
from .evaluate import Evaluator
from .observe.audit import DataAudit
from .observe.flops import peak_flops_and_source
from .observe.metrics import DataCounts, LogWindow, MetricsSink, log_every, training_row
from .observe.profiling import StepProfiler
from .optim import build_lr_fn
from .runtime.rundir import RunDirError
from .runtime.signals import EXIT_PREEMPTED, Preempted, SignalHandler
from .runtime.status import EXIT_DIVERGED, Diverged, write_status
from .step import TrainStep
from .validate import config_warnings

log = logging.getLogger("pretrain")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:
        pass


def set_determinism(on: bool, device: torch.device) -> None:
    if not on:
        return
    if device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False
    torch.use_deterministic_algorithms(True)


def default_threads(local_world_size: int) -> int:
    """A launcher that bound this process to some cores (srun --cpu-bind, taskset) already
    split the node: use them all. Otherwise share the node's cores between local ranks."""
    total = os.cpu_count() or 1
    mine = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else total
    if mine < total:
        return mine
    return max(1, total // local_world_size)


def train(cfg: JobConfig, env: LaunchEnv, dims: ParallelDims, run_dir: Path, *,
          signals: Optional[SignalHandler] = None, run_dir_problem: Optional[str] = None,
          report: Optional[Callable] = None, diverged: Optional[str] = None) -> List[Dict[str, float]]:
    """Runs the job; returns the logged metrics (every rank computes them; losses agree).
    ``run_dir_problem``: rank 0's reason the run dir cannot be used (locked by another
    job, not writable), raised as ``RunDirError`` on every rank once they can hear it;
    ``diverged``: rank 0's finding that this is torchrun's restart of an attempt that
    diverged, raised as ``Diverged`` on every rank.
    ``report(state, exit_code, **fields)``: writes status.json (rank 0's, when it holds
    the run dir)."""
    t, device = cfg.train, pdist.pick_device(cfg.train.device, env)
    threads = t.num_threads or default_threads(env.local_world_size)
    torch.set_num_threads(threads)
    set_determinism(t.deterministic, device)
    pdist.init_distributed(env, device, timeout_s=cfg.parallel.timeout_s)
    own_signals = signals is None
    signals = signals or SignalHandler()
    try:
        run_dir, problem, again = pdist.broadcast_object((str(run_dir), run_dir_problem, diverged))
        if problem is not None:
            raise RunDirError(problem)
        if again is not None:
            raise Diverged(None, [], message=again)
        return _train(cfg, env, dims, Path(run_dir), device, signals, report or _write_status_to(Path(run_dir)))
    finally:
        if own_signals:
            signals.restore()
        pdist.shutdown_distributed()


def _write_status_to(run_dir: Path) -> Callable:
    def report(state: str, exit_code: int, **fields) -> None:
        write_status(run_dir, status=state, exit_code=exit_code, **fields, ended=time.time())

    return report


def _announce(cfg: JobConfig, env: LaunchEnv, dims: ParallelDims, run_dir: Path, job: Job, device,
              fpt: float, peak: float, peak_source: str) -> None:
    m, pc, lora = job.model, cfg.parallel, cfg.finetune.lora
    for line in config_warnings(cfg):
        log.warning("config warning: %s", line)
    log.info("run dir %s | %s params | layout dp_replicate=%d dp_shard=%d cp=%d tp=%d pp=%d%s | world %d (%s)%s | %s %s",
             run_dir, f"{m.n_params:,}", dims.dp_replicate, dims.dp_shard, dims.cp, dims.tp, dims.pp,
             f" ({pc.pp_schedule}, stages {m.stage_ids} here)" if dims.pp > 1 else "", env.world_size,
             env.launcher, f" | collectives time out after {pdist.group_timeout().total_seconds():g} s"
             if env.world_size > 1 else "", device.type, str(m.param_dtype).removeprefix("torch."))
    if lora.rank > 0:
        log.info("LoRA rank %d alpha %g on %s: %s trainable parameters (%.2f%% of %s), base frozen",
                 lora.rank, lora.alpha, ",".join(lora.target_modules), f"{m.n_trainable:,}",
                 100 * m.n_trainable / m.n_params, f"{m.n_params:,}")
    if cfg.finetune.freeze:
        log.info("frozen: %s | %s trainable parameters (%.2f%% of %s)%s", ",".join(cfg.finetune.freeze),
                 f"{m.n_trainable:,}", 100 * m.n_trainable / m.n_params, f"{m.n_params:,}",
                 "" if cfg.model.init_from or cfg.checkpoint.load_path or job.start_step else
                 " | WARNING: no model.init_from: the frozen towers keep their random init")
    log.info("%s | deterministic algorithms %s", describe_blocks(m.parts, m.family.layout),
             "on" if torch.are_deterministic_algorithms_enabled() else "off")
    log.info("MFU = %r FLOPs/token x tokens/s / (%r FLOP/s peak per device, from %s x %d devices)",
             fpt, peak, peak_source, env.world_size)
    if job.start_step:
        log.info("resumed from step %d", job.start_step)


def _micro_batches(job: Job, n: int, counts: DataCounts, window: LogWindow, audit: Optional[DataAudit]):
    """The step's ``n`` loader batches, each counted (data metrics, wait time, audit) as it is taken."""
    for _ in range(n):
        d0 = time.perf_counter()
        batch = next(job.loader)
        window.data_wait += time.perf_counter() - d0
        counts.add(batch)
        if audit is not None:
            audit.add(batch["window_doc_ids"])
        yield batch


def _train(cfg: JobConfig, env: LaunchEnv, dims: ParallelDims, run_dir: Path, device: torch.device,
           preempt: SignalHandler, report: Callable):
    t, is_rank0 = cfg.train, env.rank == 0
    seed_everything(t.seed)
    job = build_job(cfg, env, dims, device, run_dir)
    step_fn, ckpt = job.step, job.ckpt
    if job.start_step >= t.steps and is_rank0:
        log.warning("the checkpoint is at step %d, train.steps=%d: nothing left to train (raise train.steps to "
                    "continue)", job.start_step, t.steps)
    if cfg.data.audit and is_rank0:
        DataAudit.truncate(run_dir, job.start_step)
    pdist.barrier()
    audit = DataAudit(run_dir, job.dp_rank) if cfg.data.audit and job.is_dp_leader else None
    tokens_per_step = job.dp_world * t.local_batch_size * t.grad_accum_steps * t.seq_len
    lora_params = job.model.n_trainable if cfg.finetune.lora.rank > 0 else 0
    frozen = {"frozen": tuple(cfg.finetune.freeze)} if cfg.finetune.freeze else {}  # no weight gradients there
    fpt = job.model.family.flops_per_token(cfg.model, t.seq_len, lora_params=lora_params, **frozen)
    peak, peak_source = peak_flops_and_source(device, cfg.logging.peak_tflops)
    sink = MetricsSink(run_dir, enabled=is_rank0, total_steps=t.steps, tensorboard=cfg.logging.tensorboard,
                       console=cfg.logging.console, wandb_cfg=cfg.logging if cfg.logging.wandb else None,
                       job_config=cfg)
    if is_rank0:
        _announce(cfg, env, dims, run_dir, job, device, fpt, peak, peak_source)
    evaluator = (Evaluator(cfg, job.tokenizer, dp_rank=job.dp_rank, dp_world=job.dp_world)
                 if cfg.eval.interval > 0 else None)
    profiler = StepProfiler(cfg.profiling, run_dir, env.rank, device, steps_done=job.start_step, last_step=t.steps)
    counts, window = DataCounts(len(job.sources)), LogWindow(device, every=log_every(cfg.logging.every, device),
                                                             start_step=job.start_step, total_steps=t.steps)
    lr_at, tokens_seen, history = build_lr_fn(cfg.optim, t.steps), job.tokens_seen, []
    for part in job.model.parts:
        part.train()
    preempt.stop_timeout_s = cfg.checkpoint.stop_timeout_s
    try:
        profiler.start()
        preempt.phase = "loop"  # a signal now asks for a checkpoint at the next step boundary
        for step in range(job.start_step + 1, t.steps + 1):
            lr = lr_at(step)
            out = step_fn(_micro_batches(job, t.grad_accum_steps, counts, window, audit), lr)
            preempt.phase = "busy"  # between steps: no stop deadline (evaluation, logging, saves)
            tokens_seen += tokens_per_step
            if audit is not None:
                audit.end_step(step)
            window.add_step(out.loss_sum / t.grad_accum_steps, tokens_per_step)
            if step == job.start_step + 1 and is_rank0:
                _warn_without_images(cfg, job, counts)
            val_loss = _maybe_evaluate(evaluator, step_fn, step, t.steps, window, is_rank0)
            if window.due(step, val_loss is not None):
                metrics = _log_row(cfg, env, job, window, counts, step, lr, out, tokens_seen, val_loss, fpt, peak)
                sink.log(step, metrics, eta_s=window.eta_s)
                history.append({"step": step, **metrics})
                _stop_if_diverged(ckpt, step, [k for k in ("loss", "grad_norm") if not math.isfinite(metrics[k])],
                                  is_rank0, report)
            ckpt.poll()
            # Every rank acts on a signal any rank received, at the same step boundary.
            stop = pdist.host_all_reduce(torch.tensor([float(preempt.received)]), dist.ReduceOp.MAX).item() > 0
            if stop or ckpt.due(step, t.steps):
                if stop:
                    preempt.phase = "stopping"  # acting on the signal: no deadline any more
                _save(job, out, step, tokens_seen, blocking=stop or step == t.steps, is_rank0=is_rank0, report=report)
            if stop:
                _stop(ckpt, preempt, step, is_rank0, report)
            preempt.phase = "loop"
            profiler.step()
        preempt.phase = "done"
        ckpt.wait()
        _report_effects(step_fn, is_rank0)
    except BaseException:
        ckpt.abandon()  # an async save in flight is never committed by a failing job
        raise
    finally:
        # Each one runs even when another raises (a full disk fails the metrics sink's
        # close): the loader's threads are stopped rather than left reading ahead.
        with ExitStack() as stack:
            for close in (job.loader.close, audit.close if audit is not None else None, sink.close, profiler.stop,
                          ckpt.close):
                if close is not None:
                    stack.callback(close)
    if is_rank0:
        log.info("done: %d steps | metrics %s | tensorboard %s", t.steps, run_dir / "metrics.jsonl", run_dir / "tb")
    return history


def _warn_without_images(cfg: JobConfig, job: Job, counts: DataCounts) -> None:
    """After the first step: towers that learn from images only, with no image in it."""
    idle = [t for t in job.model.family.image_towers if t not in cfg.finetune.freeze]
    if idle and not counts.images_seen:
        log.warning("no image in the first step's batches (data.image_field=%r): if the data has none, the %s "
                    "tower(s) get zero gradients, and AdamW's weight decay (optim.weight_decay=%g) shrinks them by "
                    "(1 - lr x weight_decay) every step; finetune.freeze=[%s] keeps them as they are",
                    cfg.data.image_field, ",".join(idle), cfg.optim.weight_decay, ",".join(idle))


def _maybe_evaluate(evaluator, step_fn: TrainStep, step: int, total: int, window: LogWindow,
                    is_rank0: bool) -> Optional[float]:
    if evaluator is None or not evaluator.due(step, total):
        return None
    e0 = time.perf_counter()
    val_loss = step_fn.evaluate(evaluator.batches(), evaluator.steps, evaluator.chat)
    window.exclude(time.perf_counter() - e0)  # evaluation time is not training time
    if is_rank0:
        log.info("eval step %d | val loss %.4f | val ppl %.3f", step, val_loss, math.exp(val_loss))
    return val_loss


def _log_row(cfg: JobConfig, env: LaunchEnv, job: Job, window: LogWindow, counts: DataCounts, step: int, lr: float,
             out, tokens_seen: int, val_loss: Optional[float], fpt: float, peak: float) -> Dict[str, float]:
    """One logged row; every rank takes part (the values are reduced over ranks)."""
    loss = job.step.mean_over_loss_ranks(window.loss / window.steps)
    timing = window.metrics(step, loss, world_size=env.world_size, flops_per_token=fpt, peak=peak)
    data = counts.global_metrics(loss.device, job.step.dims.batch_replicas, job.source_names,
                                 job.listing_skipped, chat=cfg.data.format == "chat",
                                 images=job.model.family.image_spec is not None)
    return training_row(timing, data, lr=lr, grad_norm=out.grad_norm.item(), tokens_seen=tokens_seen,
                        val_loss=val_loss)


def _save(job: Job, out, step: int, tokens_seen: int, *, blocking: bool, is_rank0: bool, report: Callable) -> None:
    """A checkpoint of this step, never of non-finite values (pruning would then delete
    good ones), with the step's loss in its meta.json."""
    step_fn = job.step
    _stop_if_diverged(job.ckpt, step, step_fn.nonfinite(out), is_rank0, report)
    job.ckpt.save(step, tokens_seen, job.model.state_model, job.optimizer,
                  loader_state=job.loader.state_dict() if job.is_dp_leader else None, blocking=blocking,
                  loss=step_fn.mean_over_loss_ranks(out.loss_sum / step_fn.accum).item())


def _stop_if_diverged(ckpt: Checkpointer, step: int, nonfinite: List[str], is_rank0: bool,
                      report: Callable) -> None:
    """Every rank sees the same values (reduced over ranks): all stop together. An async
    save in flight holds values checked when it was staged: it is committed first. Rank 0
    writes the status before any rank exits (as ``_stop`` does: the first exit makes
    torchrun kill the others, and its restarts and the batch scripts read the status)."""
    if not nonfinite:
        return
    ckpt.wait()
    kept = []
    for _, path in complete_checkpoints(ckpt.root):
        try:
            loss = read_meta(path).get("loss")
        except CheckpointError:
            loss = None
        kept.append(f"{path.name} (loss {loss:.4g})" if isinstance(loss, float) else path.name)
    e = Diverged(step, nonfinite, ckpt.root, kept)
    if is_rank0:
        report("diverged", EXIT_DIVERGED, step=step, error=f"Diverged: {e}")
    pdist.barrier()
    raise e


def _stop(ckpt: Checkpointer, preempt: SignalHandler, step: int, is_rank0: bool, report: Callable) -> None:
    ckpt.wait()
    if is_rank0:
        log.warning("stopping at step %d on %s: checkpoint saved; run the same command to resume",
                    step, preempt.name)
        # Before any rank exits: the first exit makes torchrun (or srun
        # --kill-on-bad-exit) kill the others, and a batch script decides to
        # requeue by this file.
        report("preempted", EXIT_PREEMPTED, step=step, signal=preempt.name)
    pdist.barrier()
    raise Preempted(step, preempt.name)


def _report_effects(step_fn: TrainStep, is_rank0: bool) -> None:
    """After the last step, what the run did, read back from it: the tied embedding's two
    copies (pipelines), the layout of the logits the loss took (vocabulary-sharded under
    loss parallel), the graphs torch.compile built."""
    if step_fn.tied_sync is not None:
        gap = step_fn.tied_sync.max_divergence()
        if gap > 0 or is_rank0:
            log.info("tied embedding copies (first and last stage): max |difference| %r", float(gap))
    # The loss sits on the last pipeline stage, which rank 0 may not hold.
    seen = [s for s in pdist.all_gather_object(step_fn.loss_input) if s is not None]
    if is_rank0:
        log.info("the loss took logits %s | torch.compile graphs built: %d", seen[0] if seen else "(none: no step ran)",
                 compiled_graphs())
