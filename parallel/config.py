"""The ``parallel`` config group's schema: degrees of each parallel dimension and how
they are applied. Read by ``parallel/`` (layout, mesh) and validated with the job."""
from __future__ import annotations

from dataclasses import dataclass

from .dims import CP_IMPLS, PP_SCHEDULES
from .knobs import doc_field, knob

REST = {-1: "the rest of the world size"}
# parallel.activation_checkpoint (parallel/ac.py applies them).
AC_MODES = ("none", "full", "every_n", "selective_op")
# parallel.attention_kernel (parallel/attention_core.py).
ATTENTION_KERNELS = ("auto", "sdpa", "flex")


@dataclass
class ParallelConfig:
    # Degrees; their product must equal the world size. dp_shard=-1 takes what is left.
    dp_replicate: int = knob(1, ge=1, doc="Data-parallel replicas (HSDP when > 1: shard within a group, all-reduce "
                                          "across groups).")
    dp_shard: int = knob(-1, ge=1, special=REST, doc="FSDP2 shard degree; dp_replicate x dp_shard x cp x tp x pp "
                                                     "must equal the world size.")
    tp: int = knob(1, ge=1, doc="Tensor-parallel degree (Megatron-style; the innermost mesh dim, keep it within a "
                                "node); model.n_heads, n_kv_heads, ffn_hidden_dim and vocab_size must divide by it.")
    pp: int = knob(1, ge=1, doc="Pipeline-parallel degree (the outermost mesh dim): the model is cut by layers into "
                                "pp x stages per rank equal stages.")
    # Context parallel: each sequence is split over cp ranks (rank i holds chunks i and
    # 2cp-1-i of 2cp); attention all-gathers K/V along the sequence. FSDP2 shards the
    # parameters over dp_shard x cp.
    cp: int = knob(1, ge=1, doc="Context-parallel degree: each sequence is split over cp ranks (head-tail "
                                "balanced chunks); train.seq_len must divide by 2 x cp.")
    # ring (torch's context_parallel) has CUDA kernels only and is not built yet: refused.
    cp_impl: str = doc_field("allgather", "How attention sees the other cp ranks' keys and values: allgather "
                             "(ours, any backend); ring is refused (not built yet).", choices=CP_IMPLS)
    pp_schedule: str = doc_field("1f1b", "The torch.distributed.pipelining schedule.", choices=PP_SCHEDULES)
    pp_microbatches: int = knob(-1, ge=1, special={-1: "the number of stages"},
                                doc="Micro-batches each local batch is split into through the pipeline; must divide "
                                    "train.local_batch_size.")
    # zbv: always 2, gpipe and 1f1b: 1.
    pp_stages_per_rank: int = knob(-1, ge=1, special={-1: "2"},
                                   doc="Stages per pp rank for interleaved_1f1b and interleaved_zb.")
    reshard_after_forward: bool = doc_field(True, "FSDP2: free the gathered parameters after forward (less memory, "
                                                  "one more all-gather in backward).")
    sequence_parallel: bool = doc_field(True, "With tp > 1: shard the residual stream and the norms along the "
                                              "sequence; train.seq_len / cp must divide by tp.")
    loss_parallel: bool = doc_field(False, "With tp > 1: keep the logits sharded over the vocabulary into a "
                                           "vocabulary-parallel cross-entropy.")
    activation_checkpoint: str = doc_field(
        "none", "Recompute activations in backward: full (every block), every_n (blocks 0, n, 2n, ...), "
        "selective_op (keep matmul and attention outputs).", choices=AC_MODES)
    ac_every_n: int = knob(2, ge=1, doc="The n of activation_checkpoint=every_n.")
    # parallel/attention_core.py: which kernel computes masked (document or context-parallel) attention.
    attention_kernel: str = doc_field(
        "auto", "Masked attention (document masking, CP): auto = flex attention with a block mask on CUDA, SDPA "
        "(dense or blockwise) on CPU; sdpa; flex (CUDA only). Unmasked causal attention is always SDPA.",
        choices=ATTENTION_KERNELS)
    compile: bool = doc_field(False, "torch.compile each transformer block (composes with TP, AC and FSDP2); needs "
                                     "a C/C++ compiler and the Python headers on every node.")
    # NCCL's watchdog, gloo's timeout, for every group the trainer makes: raise it when a
    # synchronous save of a large checkpoint on a slow filesystem keeps the fastest rank
    # waiting longer.
    timeout_s: float = knob(600.0, ge=60, le=31_536_000,
                            doc="Seconds a collective (and the start-up rendezvous) may wait before the process "
                                "group gives up.")
