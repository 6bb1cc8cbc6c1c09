"""``TrainStep``: one optimizer step of any family under any layout, plain or pipelined.

It owns what happens between "here are this step's micro-batches" and "the weights moved":
autocast, the loss context (loss parallel), the context-parallel split of each batch along
the sequence, the whole or chunked loss, micro-batching through the pipeline schedule,
gradient accumulation, the chat loss (summed over trained tokens, divided by their global
count), gradient settling (TP), the tied-embedding sync (PP), clipping and the optimizer
step. ``evaluate`` runs its forward-only path. ``bench/train_throughput.py`` times this
object."""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Iterable, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn

from parallel import distributed as pdist
from parallel.config import ParallelConfig
from parallel.dims import ParallelDims
from parallel.float8 import after_optimizer_step as float8_after_optimizer_step
from parallel.init import clip_grad_norm_, settle_grads
from parallel.tensors import describe_layout, full_value, local_values, loss_context

from .loss import chunked_next_token_loss, next_token_loss
from .model.family import ModelFamily


def resolve_dtypes(mode: str, device: torch.device):
    """(param dtype for compute, gradient-reduce dtype). Master weights stay fp32."""
    if mode == "auto":
        mode = "bf16" if device.type == "cuda" else "fp32"
    if mode == "bf16":
        return torch.bfloat16, torch.float32
    return torch.float32, torch.float32


@dataclass
class StepResult:
    """``loss_sum``: the step's loss x grad_accum_steps (sum of micro-step means; chat: the
    global token mean x accum), on ranks that hold a loss (under PP the last stage's; 0
    elsewhere). ``grad_norm``: before clipping. Both device tensors: reading them syncs."""

    loss_sum: torch.Tensor
    grad_norm: torch.Tensor


class TrainStep:
    """``parts``: the model, or this rank's pipeline stages (``stage_ids``, of ``num_stages``).
    ``chat``: the training data trains on some tokens only (labels -100 elsewhere).
    ``loss_chunk``: tokens per chunk of the chunked loss (0: the loss takes the full logits)."""

    def __init__(self, family: ModelFamily, parts: List[nn.Module], optimizer, *, dims: ParallelDims,
                 pc: ParallelConfig, grad_accum_steps: int, max_norm: float, chat: bool, device: torch.device,
                 param_dtype: torch.dtype, mesh=None, stage_ids=(0,), num_stages: int = 1, tied: bool = False,
                 model_args=None, loss_chunk: int = 0):
        self.family, self.parts, self.optimizer = family, parts, optimizer
        self.model_args = model_args  # the model config: the family's inputs are shaped by it
        self.dims, self.accum, self.max_norm, self.chat, self.device = dims, grad_accum_steps, max_norm, chat, device
        self.loss_parallel = pc.loss_parallel
        # Without FSDP, bf16 compute comes from autocast (weights stay fp32 masters).
        self.autocast = (torch.autocast(device.type, dtype=param_dtype)
                         if not dims.uses_fsdp and param_dtype != torch.float32 else nullcontext())
        self.params = [p for part in parts for p in part.parameters() if p.requires_grad]
        self.runner, self.tied_sync, self.pp_group = None, None, None
        self._summed = chat  # what the pipeline's loss function returns: chat sums, text means
        self.loss_input: Optional[str] = None  # the layout of the first logits the loss took
        self.cp_rank, self.cp = (mesh["cp"].get_local_rank(), dims.cp) if dims.uses_cp else (0, 1)
        # Under sequence parallel the hidden states a head takes are 1/tp of the sequence.
        self.seq_shards = dims.tp if dims.uses_tp and pc.sequence_parallel else 1
        self.loss_chunk = loss_chunk
        self.last_part: Optional[nn.Module] = None  # the part whose head the chunked loss applies
        if loss_chunk:
            if family.hidden_output is None:
                raise ValueError(f"model family {family.name!r} cannot return hidden states: train.loss_chunk=0")
            last = num_stages - 1
            for part, sid in zip(parts, stage_ids):
                if sid == last:
                    family.hidden_output(part, True)
                    self.last_part = part
        if dims.pp > 1:
            from parallel import pp as ppar

            self.n_mb = num_stages if pc.pp_microbatches == -1 else pc.pp_microbatches
            self.runner = ppar.PipelineRunner(parts, list(stage_ids), num_stages, mesh, pc.pp_schedule, self.n_mb,
                                              self._pp_loss, device)
            if tied:
                per_rank = len(stage_ids)
                self.tied_sync = ppar.TiedEmbeddingSync(parts, family.layout, list(stage_ids), num_stages, mesh,
                                                        dims.pp, per_rank, pc.pp_schedule)
            self.pp_group = mesh["pp"].get_group()
        # Parameters whose gradient the norm skips (the last stage's copy of a tied embedding).
        dup = self.tied_sync.duplicate if self.tied_sync is not None else None
        self.norm_skip = {id(dup)} if dup is not None else set()

    @property
    def holds_loss(self) -> bool:
        """This rank computes the loss (always, except on a pipeline's non-last stages)."""
        return self.runner is None or self.runner.has_last

    def _note_loss_input(self, logits, note: str = "") -> None:
        if self.loss_input is None:  # what the loss received on the first call (logged at the end)
            self.loss_input = describe_layout(logits) + note

    def _logits_of(self, h):
        logits = self.family.layout.logits(self.last_part, h)
        self._note_loss_input(logits, " per chunk")
        return logits

    def _loss(self, out, labels, summed: bool, count: Optional[int] = None):
        """The loss of the last part's output: logits, or hidden states (chunked loss)."""
        if not self.loss_chunk:
            self._note_loss_input(out)
            return next_token_loss(out, labels, summed=summed)
        return chunked_next_token_loss(out, labels, self._logits_of, self.loss_chunk, summed=summed,
                                       seq_shards=self.seq_shards, count=count)

    def split(self, batch: dict):
        """(the model's inputs, labels) of a loader batch on this rank: under context
        parallelism its chunks of every sequence input (positions computed on the whole
        window first) and of the labels; labels stay on the host."""
        inputs = self.family.inputs(batch, self.device, self.model_args)
        labels = batch["labels"]
        if self.cp > 1:
            from parallel.cp import split_sequence

            inputs = list(inputs)
            for i, dim in self.family.layout.sequence_inputs:
                if i < len(inputs):
                    inputs[i] = split_sequence(inputs[i], dim, self.cp_rank, self.cp)
            inputs = tuple(inputs)
            labels = split_sequence(labels, 1, self.cp_rank, self.cp)
        return inputs, labels

    def _pp_loss(self, out, target):
        if self._summed:  # chat: summed over trained tokens, divided by their global count later
            return self._loss(out, target, True)
        # text: a micro-batch's share of the step's mean loss
        return self._loss(out, target, False) / (self.n_mb * self.accum)

    def _forward_backward(self, inputs: Tuple[torch.Tensor, ...], labels: torch.Tensor,
                          count: Optional[int] = None) -> Optional[torch.Tensor]:
        """One micro-step: the loss (chat: summed; text: this micro-batch's mean) detached,
        None on a pipeline rank without the last stage."""
        if self.runner is not None:  # forward and backward of every micro-batch, by the schedule
            with self.autocast:
                loss = self.runner.step(inputs, labels)
            if loss is None:
                return None
            return loss.detach() if self.chat else loss.detach() * self.accum  # text: mean / accum came back
        with self.autocast:
            out = self.parts[0](*inputs)
        with loss_context(self.loss_parallel):  # chat: summed here, divided by the global trained-token count
            loss = self._loss(out, labels, self.chat, count)
            del out  # the backward never reads the logits: one (tokens x vocab) tensor less at the peak
            (loss if self.chat else loss / self.accum).backward()
        return full_value(loss.detach())

    def __call__(self, batches: Iterable[dict], lr: float) -> StepResult:
        """Forward and backward of ``grad_accum_steps`` micro-batches (loader batches), then
        the update at learning rate ``lr``."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        loss_sum = torch.zeros((), device=self.device)
        trained = torch.zeros((), dtype=torch.long, device=self.device)
        for batch in batches:
            inputs, labels = self.split(batch)
            # The text mean's divisor without reading the labels: only chat labels hold -100.
            count = None if self.chat else labels.numel()
            labels = labels.to(self.device, non_blocking=True)
            if self.chat:
                trained += (labels != -100).sum()
            loss = self._forward_backward(inputs, labels, count)
            if loss is not None:
                loss_sum += loss
        if self.chat:
            # Gradients are of the local sums; FSDP averaged them over the dp x cp ranks, hence
            # that factor.
            mean, n_trained = self.token_mean(loss_sum, trained)
            grads = local_values([p.grad for p in self.params if p.grad is not None])
            if grads:  # a device tensor as the factor: no host sync in the step
                torch._foreach_mul_(grads, (self.dims.grad_ranks / n_trained).to(grads[0].dtype))
            loss_sum = mean.to(loss_sum.dtype) * self.accum
        if self.dims.uses_tp:
            settle_grads(self.params)
        if self.tied_sync is not None:
            self.tied_sync()
        grad_norm = clip_grad_norm_(self.params, self.max_norm, skip=self.norm_skip, group=self.pp_group)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        float8_after_optimizer_step(self.parts)  # float8 all-gather: next step's weight scales
        return StepResult(loss_sum, grad_norm)

    def nonfinite(self, out: StepResult) -> List[str]:
        """What is not finite after the step ``out``, agreed over all ranks: the loss (on
        the ranks that hold it), the gradient norm, or any weight (this rank's shards). Reads
        back from the device (a sync): called before a checkpoint is written, where the save
        waits for the device anyway. Empty when all is finite."""
        weights = local_values([p for part in self.parts for p in part.parameters()])
        norms = torch._foreach_norm(weights) if weights else [torch.zeros((), device=self.device)]
        loss = out.loss_sum if self.holds_loss else torch.zeros((), device=self.device)
        bad = torch.stack([~torch.isfinite(loss), ~torch.isfinite(out.grad_norm),
                           ~torch.isfinite(torch.stack([n.float() for n in norms])).all()]).float().cpu()
        bad = pdist.host_all_reduce(bad, dist.ReduceOp.MAX)
        return [what for what, flag in zip(("loss", "grad_norm", "weights"), bad.tolist()) if flag]

    def token_mean(self, loss_sum: torch.Tensor, count: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Global summed loss / global trained-token count. Every TP rank of a (DP, CP)
        coordinate holds the same sum (under PP only the last stage's), every TP and PP rank
        the same count (CP ranks count their own chunks). Returns (mean, global count, at
        least 1), both fp64 device tensors (counts past 2^24 stay exact; no host sync)."""
        sums = pdist.all_reduce_sum(torch.stack([loss_sum.double(), count.double()]))
        n = torch.clamp(sums[1] / self.dims.loss_replicas, min=1.0)
        return sums[0] / self.dims.tp / n, n

    def mean_over_loss_ranks(self, value: torch.Tensor) -> torch.Tensor:
        """``value`` averaged over the ranks that hold a loss (under PP: the last stage's)."""
        holds = 1.0 if self.holds_loss else 0.0
        agg = pdist.all_reduce_sum(torch.stack([value * holds, torch.tensor(holds, device=self.device)]))
        return agg[0] / agg[1]

    def evaluate(self, batches: Iterable[dict], n_batches: int, chat: bool) -> float:
        """Mean held-out loss over all ranks' eval batches: text, each batch's mean,
        averaged (packed windows have equal token counts); chat, the mean over every
        batch's assistant tokens."""
        for part in self.parts:
            part.eval()
        total = torch.zeros((), device=self.device)
        count = torch.zeros((), dtype=torch.long, device=self.device)
        self._summed = chat
        try:
            for batch in batches:
                inputs, labels = self.split(batch)
                labels = labels.to(self.device, non_blocking=True)
                if chat:
                    count += (labels != -100).sum()
                total += self._eval_loss(inputs, labels, chat)
        finally:
            self._summed = self.chat
        for part in self.parts:
            part.train()
        if chat:
            return self.token_mean(total, count)[0].item()
        return self.mean_over_loss_ranks(total / n_batches).item()

    def _eval_loss(self, inputs, labels, chat: bool) -> torch.Tensor:
        if self.runner is not None:
            with self.autocast:
                loss = self.runner.eval_step(inputs, labels)
            if loss is None:
                return torch.zeros((), device=self.device)
            return loss if chat else loss * self.accum  # text: _pp_loss divided each mean by n_mb x accum
        with torch.no_grad():
            with self.autocast:
                out = self.parts[0](*inputs)
            with loss_context(self.loss_parallel):
                loss = self._loss(out, labels, chat)
        return full_value(loss)
