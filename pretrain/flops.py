"""Model FLOPs per token and the peak FLOP/s that MFU divides by."""
from __future__ import annotations

import time

import torch

from .model.args import LlamaArgs

# Dense bf16 peak per GPU, TFLOP/s, from the vendors' datasheets (no sparsity).
GPU_PEAK_TFLOPS = {"A100": 312.0, "H100": 989.0, "H200": 989.0, "B200": 2250.0}


def matmul_params(args: LlamaArgs) -> int:
    """Parameters that take part in a matmul per token: all but the norms and the input
    embedding lookup; a tied head counts once, as the matmul it is."""
    hd = args.resolved_head_dim
    attn = args.dim * hd * (2 * args.n_heads + 2 * args.n_kv_heads)
    ffn = 3 * args.dim * args.ffn_hidden_dim
    return args.n_layers * (attn + ffn) + args.dim * args.vocab_size


def flops_per_token(args: LlamaArgs, seq_len: int) -> float:
    """Training FLOPs per token: 6 x matmul params (forward 2, backward 4) plus attention
    scores and values, 12 x layers x heads x head_dim x seq (the PaLM convention: the
    causal mask's halving is not taken)."""
    attn = 12 * args.n_layers * args.n_heads * args.resolved_head_dim * seq_len
    return 6.0 * matmul_params(args) + attn


def peak_flops(device: torch.device, override_tflops: float | None) -> float:
    """Peak FLOP/s of one device: the config's value, the table for known GPUs, or on CPU
    a short fp32 matmul probe with this process's threads."""
    if override_tflops:
        return override_tflops * 1e12
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, tf in GPU_PEAK_TFLOPS.items():
            if key in name:
                return tf * 1e12
        return 312e12  # unknown GPU: A100-class, stated rather than guessed silently
    return cpu_matmul_probe()


def cpu_matmul_probe(n: int = 512, seconds: float = 0.25) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)  # warm up
    reps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        torch.mm(a, b)
        reps += 1
    return 2 * n**3 * reps / (time.perf_counter() - start)
