"""Model FLOPs per token of a Llama 3.x decoder, the numerator of MFU."""
from __future__ import annotations

from .args import LlamaArgs


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
