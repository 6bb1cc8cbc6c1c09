"""MFU's numerator and denominator: Llama 3.2 1B's FLOPs per token worked out by hand
from its published shape, and the GPU peak table's lookup by device name."""
from conftest import REPO
from pretrain.config import load_model_file
from pretrain.observe.flops import gpu_peak_tflops, peak_flops
from pretrain.model.llama import flops_per_token
from pretrain.model.llama.args import LlamaArgs


def _load_1b() -> LlamaArgs:
    return load_model_file(REPO / "configs" / "model" / "llama3_2_1b.yaml")


def test_llama3_2_1b_flops_per_token_by_hand():
    args = _load_1b()
    assert (args.dim, args.n_layers, args.n_heads, args.n_kv_heads, args.resolved_head_dim,
            args.ffn_hidden_dim, args.vocab_size, args.tie_embeddings) == (
            2048, 16, 32, 8, 64, 8192, 128256, True)

    # Matmul params per layer: wq 2048x(32*64), wk 2048x(8*64), wv 2048x(8*64), wo (32*64)x2048,
    # w1 and w3 2048x8192, w2 8192x2048.
    attn = 2048 * 2048 + 2048 * 512 + 2048 * 512 + 2048 * 2048  # 10,485,760
    ffn = 3 * 2048 * 8192                                         # 50,331,648
    head = 2048 * 128256  # tied: the one embedding matrix, counted once as the output matmul
    matmul = 16 * (attn + ffn) + head
    assert matmul == 1_235_746_816
    # = the published 1,235,814,400 parameters less the RMSNorm weights (2 per layer + final).
    assert matmul == 1_235_814_400 - (16 * 2 + 1) * 2048

    for seq, attn_flops, total in ((2048, 805_306_368, 8_219_787_264),
                                   (8192, 3_221_225_472, 10_635_706_368)):
        assert 12 * 16 * 32 * 64 * seq == attn_flops  # QK^T and AV, fwd+bwd, no causal halving
        assert 6 * matmul + attn_flops == total
        assert flops_per_token(args, seq) == total
    # LoRA rank 16 on all seven linears: r x (in + out) each, per layer; the frozen base
    # has no weight gradients (4 x its matmuls), the adapters train (6 x theirs).
    lora = 16 * 16 * (2 * (2048 + 2048) + 2 * (2048 + 512) + 2 * (2048 + 8192) + (8192 + 2048))
    assert lora == 11_272_192  # the README's figure for the 1B
    assert flops_per_token(args, 2048, lora_params=lora) == 4 * matmul + 6 * lora + 805_306_368 == 5_815_926_784


def test_peak_table_by_device_name():
    import torch

    assert gpu_peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert gpu_peak_tflops("NVIDIA A100 80GB PCIe") == 312.0
    assert gpu_peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert gpu_peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert gpu_peak_tflops("NVIDIA H100 NVL") == 835.0
    assert gpu_peak_tflops("NVIDIA H200") == 989.0
    assert gpu_peak_tflops("NVIDIA H200 NVL") == 835.0
    assert gpu_peak_tflops("NVIDIA B200") == 2250.0
    assert gpu_peak_tflops("Tesla V100-SXM2-16GB") is None
    assert peak_flops(torch.device("cpu"), 123.0) == 123e12  # logging.peak_tflops wins
