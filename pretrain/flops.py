"""Model FLOPs per token and the peak FLOP/s that MFU divides by."""
from __future__ import annotations

import logging
import time

import torch

from .model.args import LlamaArgs

log = logging.getLogger("pretrain")

# Dense bf16 tensor-core peak per GPU, TFLOP/s (the datasheets print "with sparsity"
# figures, twice these; halved here). Matched in this order against
# torch.cuda.get_device_name, so the PCIe/NVL variants come before their SXM names.
#   A100 (SXM and PCIe): 312    NVIDIA A100 Tensor Core GPU datasheet
#   H100 SXM: 989 (1,979 sparse); H100 PCIe: 756 (1,513); H100 NVL: 835 (1,671)
#                               NVIDIA H100 Tensor Core GPU datasheet
#   H200 SXM: 989 (1,979 sparse, the H100 SXM's compute); H200 NVL: 835 (1,671)
#                               NVIDIA H200 Tensor Core GPU datasheet
#   B200: 2,250 (4.5 PFLOP/s sparse FP16/BF16 per GPU)   NVIDIA HGX B200 / DGX B200 datasheet
GPU_PEAK_TFLOPS = {
    "A100": 312.0,
    "H100 PCIe": 756.0, "H100 NVL": 835.0, "H100": 989.0,
    "H200 NVL": 835.0, "H200": 989.0,
    "B200": 2250.0,
}


def matmul_params(args: LlamaArgs) -> int:
    """Parameters that take part in a matmul per token: every parameter except the RMSNorm
    weights and the input embedding lookup (a gather, no FLOPs). The output head is a
    matmul and counts, once: with tied embeddings its one weight matrix is that matmul,
    so tied and untied models of one shape give the same number. Per layer: q and o
    (dim x heads x head_dim each), k and v (dim x kv_heads x head_dim each), the SwiGLU
    w1, w3, w2 (dim x ffn_hidden_dim each); plus the head, dim x vocab."""
    hd = args.resolved_head_dim
    attn = args.dim * hd * (2 * args.n_heads + 2 * args.n_kv_heads)
    ffn = 3 * args.dim * args.ffn_hidden_dim
    return args.n_layers * (attn + ffn) + args.dim * args.vocab_size


def flops_per_token(args: LlamaArgs, seq_len: int, lora_params: int = 0) -> float:
    """Model FLOPs per trained token, the numerator of MFU:

        6 x matmul_params  +  12 x n_layers x n_heads x head_dim x seq_len

    6 = 2 (multiply-add) for the forward pass + 4 for the backward (input and weight
    gradients), applied to the matmul params above (not all params: norms and the input
    embedding are left out). The attention term is QK^T and attention x V, each 2 x
    head_dim x seq_len FLOPs per token per head forward, x 3 for forward + backward. It
    counts the full seq_len x seq_len score matrix, as PaLM (appendix B) and Megatron do:
    a causal mask needs only half of it, which would make the term 6 x ... x seq_len;
    that halving is not taken, so MFU here is comparable with those papers' numbers.
    Activation recomputation is not counted (it is hardware FLOPs, not model FLOPs).

    With LoRA (``lora_params`` trainable adapter parameters, all in matmuls) the frozen
    base computes no weight gradients: 4 x matmul_params (forward + input gradients) + 6 x
    lora_params + the same attention term. (The first block's input gradient is not
    needed either; at 16 layers that would take another 2 x 1/16 of its blocks' share,
    left in.)"""
    attn = 12 * args.n_layers * args.n_heads * args.resolved_head_dim * seq_len
    if lora_params:
        return 4.0 * matmul_params(args) + 6.0 * lora_params + attn
    return 6.0 * matmul_params(args) + attn


def peak_flops(device: torch.device, override_tflops: float | None) -> float:
    """Peak FLOP/s of one device: the config's value, the table for known GPUs, or on CPU
    a short fp32 matmul probe with this process's threads."""
    if override_tflops:
        return override_tflops * 1e12
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        tf = gpu_peak_tflops(name)
        if tf is None:  # unknown GPU: A100-class, stated rather than guessed silently
            log.warning("MFU: %r is not in the peak table; assuming 312 TFLOP/s (set logging.peak_tflops)", name)
            tf = 312.0
        return tf * 1e12
    return cpu_matmul_probe()


def gpu_peak_tflops(device_name: str) -> float | None:
    """Dense bf16 TFLOP/s of a GPU by its torch.cuda.get_device_name, None if not in the table."""
    for key, tf in GPU_PEAK_TFLOPS.items():
        if key in device_name:
            return tf
    return None


def cpu_matmul_probe(n: int = 512, seconds: float = 0.25) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)  # warm up
    reps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        torch.mm(a, b)
        reps += 1
    return 2 * n**3 * reps / (time.perf_counter() - start)
