"""The training loop: build the model on meta, shard it, materialize it, then step:
micro-batches with gradient accumulation, global-norm clipping, AdamW, schedule, metrics."""
from __future__ import annotations

import json
import logging
import math
import os
import random
import time
from contextlib import ExitStack, nullcontext
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

from data_pipeline.loader import LoaderSpec, RankLoader, listing_skips
from parallel import distributed as pdist
from parallel.dims import ParallelDims
from parallel.env import LaunchEnv
from parallel.init import clip_grad_norm_, settle_grads, shard_aware_init
from parallel.parallelize import parallelize_llama

from .checkpoint import Checkpointer
from .config import JobConfig
from .flops import flops_per_token, peak_flops
from .metrics import MetricsSink, memory_stats_gb
from .model.llama import build_llama, count_parameters, seeded_trunc_normal_
from .optim import OptimizerParts, build_lr_fn, build_optimizer
from .profiling import StepProfiler
from .rundir import RunDirError
from .signals import EXIT_PREEMPTED, Preempted, SignalHandler
from .evaluate import Evaluator
from .status import write_status
from .tokenizers import build_sources, load_tokenizer

log = logging.getLogger("pretrain")


def next_token_loss(logits: torch.Tensor, labels: torch.Tensor, *, summed: bool) -> torch.Tensor:
    """Cross-entropy in fp32 over (batch x seq) positions, labels -100 ignored: summed
    (chat, weighed by trained tokens later) or the mean."""
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), reduction="sum" if summed else "mean")


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


def document_mask(doc_ids: torch.Tensor) -> torch.Tensor:
    """(B, 1, S, S) boolean mask, True where a query may attend: causal and same document."""
    same = doc_ids.unsqueeze(2) == doc_ids.unsqueeze(1)
    causal = torch.ones(doc_ids.shape[1], doc_ids.shape[1], dtype=torch.bool, device=doc_ids.device).tril()
    return (same & causal).unsqueeze(1)


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


def resolve_dtypes(mode: str, device: torch.device):
    """(param dtype for compute, gradient-reduce dtype). Master weights stay fp32."""
    if mode == "auto":
        mode = "bf16" if device.type == "cuda" else "fp32"
    if mode == "bf16":
        return torch.bfloat16, torch.float32
    return torch.float32, torch.float32


def train(cfg: JobConfig, env: LaunchEnv, dims: ParallelDims, run_dir: Path, *,
          signals: Optional[SignalHandler] = None, run_dir_problem: Optional[str] = None,
          report: Optional[Callable] = None) -> List[Dict[str, float]]:
    """Runs the job; returns the logged metrics (every rank computes them; losses agree).
    ``run_dir_problem``: rank 0's reason the run dir cannot be used (locked by another
    job, not writable), raised as ``RunDirError`` on every rank once they can hear it.
    ``report(state, exit_code, **fields)``: writes status.json (rank 0's, when it holds
    the run dir)."""
    t, device = cfg.train, pdist.pick_device(cfg.train.device, env)
    threads = t.num_threads or default_threads(env.local_world_size)
    torch.set_num_threads(threads)
    set_determinism(t.deterministic, device)
    pdist.init_distributed(env, device)
    own_signals = signals is None
    signals = signals or SignalHandler()
    try:
        run_dir, problem = pdist.broadcast_object((str(run_dir), run_dir_problem))
        if problem is not None:
            raise RunDirError(problem)
        return _train(cfg, env, dims, Path(run_dir), device, signals, report or _write_status_to(Path(run_dir)))
    finally:
        if own_signals:
            signals.restore()
        pdist.shutdown_distributed()


def _write_status_to(run_dir: Path) -> Callable:
    def report(state: str, exit_code: int, **fields) -> None:
        write_status(run_dir, status=state, exit_code=exit_code, **fields, ended=time.time())

    return report


def _train(cfg: JobConfig, env: LaunchEnv, dims: ParallelDims, run_dir: Path, device: torch.device,
           preempt: SignalHandler, report: Callable):
    t = cfg.train
    is_rank0 = env.rank == 0
    seed_everything(t.seed)

    sources, weights, source_names = build_sources(cfg.data)
    tokenizer = load_tokenizer(cfg.data, sources, env)
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise ValueError(
            f"tokenizer {getattr(tokenizer, 'path', '')} has {tokenizer.vocab_size} tokens but "
            f"model.vocab_size={cfg.model.vocab_size}"
        )

    model = build_llama(cfg.model, rope_cache_len=t.seq_len, device="meta")
    n_params = count_parameters(model)
    param_dtype, reduce_dtype = resolve_dtypes(t.mixed_precision, device)
    mesh = pdist.build_device_mesh(dims, device)
    if dims.uses_tp and device.type == "cuda":
        # DTensor's RNG tracker (dropout on DTensor activations: LoRA), made now without
        # the world broadcast its lazy creation runs, which would deadlock pipeline stages
        # that reach their first random op at different times. Every rank has the same seed.
        from torch.distributed.tensor._random import manual_seed as dtensor_manual_seed

        dtensor_manual_seed(t.seed, mesh["tp"])
    pc = cfg.parallel
    # The model parts this rank holds: the whole model, or its pipeline stages.
    runner, tied_sync, stage_list = None, None, [0]
    if dims.pp > 1:
        from parallel import pp as ppar

        per_rank = ppar.stages_per_rank(pc.pp_schedule, pc.pp_stages_per_rank)
        num_stages = dims.pp * per_rank
        stage_list = ppar.stage_ids(mesh["pp"].get_local_rank(), dims.pp, per_rank, pc.pp_schedule)
        parts = [ppar.build_stage(build_llama(cfg.model, rope_cache_len=t.seq_len, device="meta"), s, num_stages)
                 for s in stage_list]
    else:
        parts = [model]
    lora = cfg.finetune.lora
    n_trainable = n_params
    if lora.rank > 0:  # base frozen, adapters added before the layout is applied (FSDP2 shards both)
        from .lora import apply_lora, init_lora

        adapters = dict(rank=lora.rank, alpha=lora.alpha, dropout=lora.dropout, targets=lora.target_modules)
        n_trainable = apply_lora(model, **adapters)  # the whole model: the count
        for part in parts:
            if part is not model:  # pipeline stages
                apply_lora(part, **adapters)
    base_init = lambda tensor, std, fqn: seeded_trunc_normal_(tensor, std, fqn, t.seed)  # noqa: E731
    for part in parts:
        parallelize_llama(part, mesh, dims, pc, param_dtype=param_dtype, reduce_dtype=reduce_dtype)
        part.to_empty(device=device)
        part.init_weights(init_fn=shard_aware_init(base_init))
        if lora.rank > 0:
            init_lora(part, shard_aware_init(base_init))
    # Without FSDP, bf16 compute comes from autocast (weights stay fp32 masters).
    autocast = (torch.autocast(device.type, dtype=param_dtype)
                if not dims.uses_fsdp and param_dtype != torch.float32 else nullcontext())

    # Loss parallel: cross-entropy over vocabulary-sharded logits, forward and backward.
    if pc.loss_parallel:
        from torch.distributed.tensor.parallel import loss_parallel as loss_ctx
    else:
        loss_ctx = nullcontext
    optimizer = OptimizerParts([build_optimizer(part, cfg.optim) for part in parts])
    if dims.pp > 1:
        n_mb = num_stages if pc.pp_microbatches == -1 else pc.pp_microbatches

        def pp_loss(logits, target):
            if pp_summed[0]:  # chat: summed over trained tokens, divided by their global count later
                return next_token_loss(logits, target, summed=True)
            # text: a micro-batch's share of the step's mean loss
            return next_token_loss(logits, target, summed=False) / (n_mb * t.grad_accum_steps)

        runner = ppar.PipelineRunner(parts, stage_list, num_stages, mesh, pc.pp_schedule, n_mb, pp_loss, device)
        if cfg.model.tie_embeddings:
            tied_sync = ppar.TiedEmbeddingSync(parts, stage_list, num_stages, mesh, dims.pp, per_rank,
                                               pc.pp_schedule)
    model = parts if dims.pp > 1 else model
    # Chat batches train on some tokens only (labels -100 elsewhere): the step's loss is the
    # sum over trained tokens / their count over all data-parallel ranks, so every layout and
    # micro-batching weighs each trained token the same. Under PP the loss function returns
    # the sum while this is true (training on chat, or evaluating chat held-out data).
    sft = cfg.data.format == "chat"
    pp_summed = [sft]
    params = [p for part in parts for p in part.parameters() if p.requires_grad]
    # Parameters whose gradient the norm skips (the last stage's copy of a tied embedding).
    norm_skip = {id(tied_sync.duplicate)} if tied_sync is not None and tied_sync.duplicate is not None else set()
    pp_group = mesh["pp"].get_group() if dims.pp > 1 else None
    lr_at = build_lr_fn(cfg.optim, t.steps)

    # Data-parallel coordinates from the mesh (pp, dp_replicate, dp_shard, tp). TP and PP
    # ranks of one DP group run identical loaders; one of them writes the loader state and
    # the audit.
    dp_rank, dp_world = (env.rank // dims.tp) % dims.dp, dims.dp
    is_dp_leader = env.rank % dims.tp == 0 and env.rank < dims.dp * dims.tp
    loader = RankLoader(sources, weights, tokenizer, LoaderSpec(
        seq_len=t.seq_len, local_batch_size=t.local_batch_size, dp_rank=dp_rank, dp_world=dp_world,
        num_workers=cfg.data.num_workers, seed=t.seed, shuffle=cfg.data.shuffle, grad_accum_steps=t.grad_accum_steps,
        streams_per_row=cfg.data.streams_per_row, positions=cfg.data.document_masking,
        sft_packing=cfg.data.sft_packing, max_length=cfg.data.max_length))
    listing_skipped = listing_skips(sources) if is_rank0 else 0

    lora_meta = None
    if lora.rank > 0:
        from .lora import resolve_targets

        lora_meta = {"rank": lora.rank, "alpha": lora.alpha, "dropout": lora.dropout,
                     "targets": resolve_targets(list(lora.target_modules)), "base": cfg.model.init_from}
    ckpt = Checkpointer(run_dir / "checkpoints", cfg.checkpoint, rank=env.rank, world_size=env.world_size,
                        model_args=cfg.model, lora=lora_meta)
    start_step, tokens_seen, loader_states = ckpt.maybe_resume(model, optimizer, loader.load_rank_states)
    if start_step >= t.steps and is_rank0:
        log.warning("the checkpoint is at step %d, train.steps=%d: nothing left to train (raise train.steps to "
                    "continue)", start_step, t.steps)
    # LoRA checkpoints hold the adapters only: the base comes from init_from every start.
    if (loader_states is None or lora.rank > 0) and not cfg.checkpoint.load_path and cfg.model.init_from:
        from .hf import load_hf_weights

        for part in parts:
            load_hf_weights(part, cfg.model.init_from, cfg.model, progress=is_rank0)
    if cfg.data.audit and is_rank0:
        DataAudit.truncate(run_dir, start_step)
    pdist.barrier()
    audit = DataAudit(run_dir, dp_rank) if cfg.data.audit and is_dp_leader else None
    # Cumulative over the run (this process): tokens per source, skipped records, documents
    # cut to data.max_doc_bytes, and chat conversations cut to data.max_length.
    src_tokens = torch.zeros(len(sources), dtype=torch.float64)
    skipped = torch.zeros(1, dtype=torch.float64)
    truncated_docs = torch.zeros(1, dtype=torch.float64)
    truncated = torch.zeros(1, dtype=torch.float64)

    tokens_per_step = dp_world * t.local_batch_size * t.grad_accum_steps * t.seq_len
    fpt = flops_per_token(cfg.model, t.seq_len, lora_params=n_trainable if lora.rank > 0 else 0)
    peak = peak_flops(device, cfg.logging.peak_tflops)
    sink = MetricsSink(run_dir, enabled=is_rank0, total_steps=t.steps,
                       tensorboard=cfg.logging.tensorboard, console=cfg.logging.console,
                       wandb_cfg=cfg.logging if cfg.logging.wandb else None, job_config=cfg)
    if is_rank0:
        log.info("run dir %s | %s params | layout dp_replicate=%d dp_shard=%d tp=%d pp=%d%s | world %d (%s) | %s %s",
                 run_dir, f"{n_params:,}", dims.dp_replicate, dims.dp_shard, dims.tp, dims.pp,
                 f" ({pc.pp_schedule}, stages {stage_list} here)" if dims.pp > 1 else "", env.world_size,
                 env.launcher, device.type, str(param_dtype).removeprefix("torch."))
        if lora.rank > 0:
            log.info("LoRA rank %d alpha %g on %s: %s trainable parameters (%.2f%% of %s), base frozen",
                     lora.rank, lora.alpha, ",".join(lora.target_modules), f"{n_trainable:,}",
                     100 * n_trainable / n_params, f"{n_params:,}")
        if start_step:
            log.info("resumed from step %d", start_step)

    def device_batch(batch):
        """(inputs, labels, positions, attention mask) on the device."""
        inputs = batch["input_ids"].to(device, non_blocking=True)
        labels = batch["labels"].to(device, non_blocking=True)
        positions, mask = None, None
        if cfg.data.document_masking:
            positions = batch["positions"].to(device, non_blocking=True)
            mask = document_mask(batch["doc_ids"].to(device, non_blocking=True))
        return inputs, labels, positions, mask

    def mean_over_loss_ranks(value: torch.Tensor) -> torch.Tensor:
        """``value`` averaged over the ranks that hold a loss (under PP: the last stage's)."""
        holds = 1.0 if runner is None or runner.has_last else 0.0
        agg = pdist.all_reduce_sum(torch.stack([value * holds, torch.tensor(holds, device=device)]))
        return agg[0] / agg[1]

    def token_mean(loss_sum: torch.Tensor, count: torch.Tensor) -> Tuple[torch.Tensor, float]:
        """Global summed loss / global trained-token count. Every TP rank of a DP group holds
        the same sum (under PP only the last stage's), every TP and PP rank the same count.
        Returns (mean, global count, at least 1)."""
        sums = pdist.all_reduce_sum(torch.stack([loss_sum, count.to(loss_sum.dtype)]))
        n = max(sums[1].item() / (dims.tp * dims.pp), 1.0)
        return sums[0] / dims.tp / n, n

    evaluator = Evaluator(cfg, tokenizer, dp_rank=dp_rank, dp_world=dp_world) if cfg.eval.interval > 0 else None

    def evaluate() -> float:
        """Mean held-out loss over all ranks' eval batches: text, each batch's mean,
        averaged (packed windows have equal token counts); chat, the mean over every
        batch's assistant tokens."""
        for part in parts:
            part.eval()
        chat = evaluator.chat
        total = torch.zeros((), device=device)
        count = torch.zeros((), dtype=torch.long, device=device)
        pp_summed[0] = chat
        try:
            for batch in evaluator.batches():
                inputs, labels, positions, mask = device_batch(batch)
                if chat:
                    count += (labels != -100).sum()
                if runner is not None:
                    with autocast:
                        loss = runner.eval_step(inputs, labels)
                    if loss is not None:  # text: pp_loss divides each micro-batch's mean by n_mb x accum
                        total += loss if chat else loss * t.grad_accum_steps
                    continue
                with torch.no_grad():
                    with autocast:
                        logits = model(inputs, position_ids=positions, attn_mask=mask)
                    with loss_ctx():
                        loss = next_token_loss(logits, labels, summed=chat)
                total += loss.full_tensor() if isinstance(loss, DTensor) else loss
        finally:
            pp_summed[0] = sft
        for part in parts:
            part.train()
        if chat:
            return token_mean(total, count)[0].item()
        return mean_over_loss_ranks(total / evaluator.steps).item()

    profiler = StepProfiler(cfg.profiling, run_dir, env.rank, device, steps_done=start_step, last_step=t.steps)
    history: List[Dict[str, float]] = []
    loop_start = window_start = time.perf_counter()
    window_tokens, window_steps, data_wait = 0, 0, 0.0
    # Sum of per-step mean losses since the last log: the logged loss is their average.
    window_loss = torch.zeros((), device=device)
    for part in parts:
        part.train()
    try:
        profiler.start()
        preempt.phase = "loop"  # a signal now asks for a checkpoint at the next step boundary
        for step in range(start_step + 1, t.steps + 1):
            lr = lr_at(step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss_sum = torch.zeros((), device=device)
            trained = torch.zeros((), dtype=torch.long, device=device)
            for _ in range(t.grad_accum_steps):
                d0 = time.perf_counter()
                batch = next(loader)
                data_wait += time.perf_counter() - d0
                src_tokens += batch["source_tokens"]
                skipped += batch["skipped"]
                truncated_docs += batch.get("truncated_docs", 0)
                truncated += batch.get("truncated", 0)
                if audit is not None:
                    audit.add(batch["window_doc_ids"])
                inputs, labels, positions, mask = device_batch(batch)
                if sft:
                    trained += (labels != -100).sum()
                if runner is not None:  # forward and backward of every micro-batch, by the schedule
                    with autocast:
                        loss = runner.step(inputs, labels)
                    if loss is not None:  # the last stage's rank: chat, the sum; text, this micro-step's mean / accum
                        loss_sum += loss.detach() if sft else loss.detach() * t.grad_accum_steps
                    continue
                with autocast:
                    logits = model(inputs, position_ids=positions, attn_mask=mask)
                with loss_ctx():  # chat: summed here, divided by the global trained-token count below
                    loss = next_token_loss(logits, labels, summed=sft)
                    (loss if sft else loss / t.grad_accum_steps).backward()
                loss_sum += loss.detach().full_tensor() if isinstance(loss, DTensor) else loss.detach()
            if sft:
                # Gradients are of the local sums; FSDP averaged them over dp ranks, hence the dp factor.
                mean, n_trained = token_mean(loss_sum, trained)
                for p in params:
                    if p.grad is not None:
                        p.grad.mul_(dims.dp / n_trained)
                loss_sum = mean * t.grad_accum_steps
            window_loss += loss_sum / t.grad_accum_steps
            if dims.uses_tp:
                settle_grads(params)
            if tied_sync is not None:
                tied_sync()
            grad_norm = clip_grad_norm_(params, t.max_norm, skip=norm_skip, group=pp_group)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            tokens_seen += tokens_per_step
            if audit is not None:
                audit.end_step(step)
            window_tokens += tokens_per_step
            window_steps += 1

            val_loss = None
            if evaluator is not None and evaluator.due(step, t.steps):
                e0 = time.perf_counter()
                val_loss = evaluate()
                window_start += time.perf_counter() - e0  # evaluation time is not training time
                if is_rank0:
                    log.info("eval step %d | val loss %.4f | val ppl %.3f", step, val_loss, math.exp(val_loss))

            # The first and last steps are always logged: the curve has both ends. So is
            # every evaluated step.
            if step % cfg.logging.every == 0 or step in (start_step + 1, t.steps) or val_loss is not None:
                loss_avg = mean_over_loss_ranks(window_loss / window_steps)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                now = time.perf_counter()
                elapsed = now - window_start
                tps = window_tokens / elapsed
                mem_stats = memory_stats_gb(device)  # mem_gb and mem_reserved_gb (CUDA) / mem_rss_gb (CPU)
                mem = pdist.all_reduce_max(torch.tensor(list(mem_stats.values()), device=device))
                data_counts = pdist.all_reduce_sum(torch.cat([src_tokens, truncated_docs, truncated, skipped]).to(device)).cpu()
                data_counts /= dims.tp * dims.pp  # every rank of a DP group counted the same batches
                metrics = {
                    "loss": loss_avg.item(),
                    "lr": lr,
                    "grad_norm": grad_norm.item(),
                    "tokens_per_s": tps,
                    "tokens_per_s_per_device": tps / env.world_size,
                    "tokens_seen": float(tokens_seen),
                    "mfu": fpt * tps / (peak * env.world_size),
                    **dict(zip(mem_stats, mem.tolist())),
                    "step_time_s": elapsed / window_steps,
                    "data_wait_share": data_wait / elapsed,
                    "data/skipped": data_counts[-1].item() + listing_skipped,
                    "data/truncated_docs": data_counts[-3].item(),  # documents cut to data.max_doc_bytes
                }
                if sft:
                    metrics["data/truncated"] = data_counts[-2].item()  # conversations cut to data.max_length
                if val_loss is not None:
                    metrics["val/loss"], metrics["val/ppl"] = val_loss, math.exp(val_loss)
                src_counts = data_counts[:-3]
                total_src = max(src_counts.sum().item(), 1.0)
                for name, n in zip(source_names, src_counts.tolist()):
                    metrics[f"data/tokens/{name}"] = n
                    if len(source_names) > 1:
                        metrics[f"data/share/{name}"] = n / total_src
                steps_done = step - start_step
                eta = (now - loop_start) / steps_done * (t.steps - step)
                sink.log(step, metrics, eta_s=eta)
                history.append({"step": step, **metrics})
                window_start, window_tokens, window_steps, data_wait = time.perf_counter(), 0, 0, 0.0
                window_loss.zero_()

            ckpt.poll()
            # Every rank acts on a signal any rank received, at the same step boundary.
            stop = pdist.host_all_reduce(torch.tensor([float(preempt.received)]), dist.ReduceOp.MAX).item() > 0
            if stop or ckpt.due(step, t.steps):
                ckpt.save(step, tokens_seen, model, optimizer,
                          loader_state=loader.state_dict() if is_dp_leader else None,
                          blocking=stop or step == t.steps)
            if stop:
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
            profiler.step()
        preempt.phase = "done"
        ckpt.wait()
        if tied_sync is not None:
            gap = tied_sync.max_divergence()
            if gap > 0 or is_rank0:
                log.info("tied embedding copies (first and last stage): max |difference| %.3g", gap)
    finally:
        # Each one runs even when another raises (a full disk fails the metrics sink's
        # close): loader workers left alive would keep the process from exiting.
        with ExitStack() as stack:
            for close in (loader.close, audit.close if audit is not None else None, sink.close, profiler.stop):
                if close is not None:
                    stack.callback(close)
    if is_rank0:
        log.info("done: %d steps | metrics %s | tensorboard %s", t.steps, run_dir / "metrics.jsonl", run_dir / "tb")
    return history
