"""The ``parallel`` config group's schema: degrees of each parallel dimension and how
they are applied. Read by ``parallel/`` (layout, mesh) and validated with the job."""
from __future__ import annotations

from dataclasses import dataclass

from .knobs import knob

REST = {-1: "the rest of the world size"}


@dataclass
class ParallelConfig:
    # Degrees; their product must equal the world size. dp_shard=-1 takes what is left.
    dp_replicate: int = knob(1, ge=1)
    dp_shard: int = knob(-1, ge=1, special=REST)
    tp: int = knob(1, ge=1)
    pp: int = knob(1, ge=1)
    # Context parallel: each sequence is split over cp ranks (rank i holds chunks i and
    # 2cp-1-i of 2cp); attention all-gathers K/V along the sequence. train.seq_len must
    # divide by 2 x cp. FSDP2 shards the parameters over dp_shard x cp.
    cp: int = knob(1, ge=1)
    # allgather (ours: all-gather K/V, any backend) | ring (torch's context_parallel: CUDA
    # kernels only, not built yet: refused)
    cp_impl: str = "allgather"
    # gpipe | 1f1b | interleaved_1f1b | interleaved_zb | zbv
    pp_schedule: str = "1f1b"
    # Micro-batches per local batch through the pipeline; -1 = the number of stages.
    pp_microbatches: int = knob(-1, ge=1, special={-1: "the number of stages"})
    # Stages per pp rank for interleaved_1f1b / interleaved_zb; -1 = 2 (zbv: always 2, others 1).
    pp_stages_per_rank: int = knob(-1, ge=1, special={-1: "2"})
    # FSDP2: free unsharded params after forward (re-gathered in backward).
    reshard_after_forward: bool = True
    # Tensor parallel only: shard the residual stream and the norms along the sequence
    # (sequence parallel); train.seq_len must divide by tp.
    sequence_parallel: bool = True
    # Tensor parallel only: keep the logits sharded over the vocabulary into the loss.
    loss_parallel: bool = False
    # none | full | every_n | selective_op (keep matmul and attention outputs, recompute the rest)
    activation_checkpoint: str = "none"
    # every_n: checkpoint blocks 0, n, 2n, ...
    ac_every_n: int = knob(2, ge=1)
    # torch.compile each transformer block (composes with TP, AC and FSDP2).
    compile: bool = False
    # Seconds a collective may wait before the process group gives up (NCCL's watchdog,
    # gloo's timeout), for every group the trainer makes: raise it when a synchronous save
    # of a large checkpoint on a slow filesystem keeps the fastest rank waiting longer.
    # 60 to 31536000; the start-up rendezvous waits as long for every rank to arrive.
    timeout_s: float = knob(600.0, ge=60, le=31_536_000)
