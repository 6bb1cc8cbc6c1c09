"""The peak FLOP/s that MFU divides by (model FLOPs per token come from each family:
``ModelFamily.flops_per_token``)."""
from __future__ import annotations

import logging
import time
from typing import Tuple

import torch

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


def peak_flops(device: torch.device, override_tflops: float | None) -> float:
    """Peak FLOP/s of one device (``peak_flops_and_source``'s value)."""
    return peak_flops_and_source(device, override_tflops)[0]


def peak_flops_and_source(device: torch.device, override_tflops: float | None) -> Tuple[float, str]:
    """Peak FLOP/s of one device and where it came from: the config's value, the table for
    known GPUs (an A100's for an unknown one, with a warning), or on CPU a short fp32
    matmul probe with this process's threads."""
    if override_tflops:
        return override_tflops * 1e12, "logging.peak_tflops"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        tf = gpu_peak_tflops(name)
        if tf is None:  # unknown GPU: A100-class, stated rather than guessed silently
            log.warning("MFU: %r is not in the peak table; assuming 312 TFLOP/s (set logging.peak_tflops)", name)
            return 312.0e12, "an assumed A100's"
        return tf * 1e12, "the GPU table"
    return cpu_matmul_probe(), "a CPU fp32 matmul probe"


def gpu_peak_tflops(device_name: str) -> float | None:
    """Dense bf16 TFLOP/s of a GPU by its torch.cuda.get_device_name, None if not in the table."""
    for key, tf in GPU_PEAK_TFLOPS.items():
        if key in device_name:
            return tf
    return None


def cpu_matmul_probe(n: int = 512, seconds: float = 0.25) -> float:
    # Its own generator: the probe runs after a checkpoint's RNG states were restored, and a
    # draw from the global one would shift every later dropout mask of a resumed run.
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(n, n, generator=g), torch.randn(n, n, generator=g)
    torch.mm(a, b)  # warm up
    reps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        torch.mm(a, b)
        reps += 1
    return 2 * n**3 * reps / (time.perf_counter() - start)
