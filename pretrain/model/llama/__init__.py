"""The Llama 3.x text family: the decoder (``model.py``), its hyperparameters
(``args.py``), FLOPs (``flops.py``), the Hugging Face converter (``hf.py``) and, here, its
parallel layout and LoRA targets."""
from __future__ import annotations

from typing import Iterable, List, Sequence, Tuple

import torch

from parallel.layout import BlockPlan, ModelLayout

from ..family import LoRASpec, ModelFamily, Problem, count_parameters, param_seed, seeded_trunc_normal_
from . import hf, titan
from .args import LlamaArgs, RopeScaling
from .flops import flops_per_token, matmul_params
from .model import Llama, build_llama, llama3_inv_freq

# Every block is a TransformerBlock: attention(x, cos, sin, doc_ids) and feed_forward(x) read
# the residual stream; q/k/v and the SwiGLU gate/up split by output features (heads and
# hidden units), wo and w2 by input features.
BLOCK = BlockPlan(
    colwise=("attention.wq", "attention.wk", "attention.wv", "feed_forward.w1", "feed_forward.w3"),
    rowwise=("attention.wo", "feed_forward.w2"),
    stream_inputs=(("attention", 4), ("feed_forward", 1)),
    seq_norms=("attention_norm", "ffn_norm"),
)

LAYOUT = ModelLayout(
    block_plan=lambda block: BLOCK,
    blocks=("layers",),
    pipeline_blocks="layers",
    first_stage=("tok_embeddings",),
    last_stage=("norm", "output", "tied_head"),
    embedding="tok_embeddings",
    norm="norm",
    head="output",
    tied_head="tied_head",
    attention_core="attention.core",
    # tokens, positions and document ids, all (B, S): context parallelism splits them on dim 1.
    sequence_inputs=((0, 1), (1, 1), (2, 1)),
)

LORA = LoRASpec(groups={"attention": ("wq", "wk", "wv", "wo"), "mlp": ("w1", "w2", "w3")},
                aliases={v: k for k, v in hf.lora_names.items()})


def build(args: LlamaArgs, seq_len: int) -> Llama:
    return Llama(args, rope_cache_len=seq_len)


def inputs(batch: dict, device: torch.device, args=None) -> Tuple[torch.Tensor, ...]:
    """(tokens, positions) or, with document masking, (tokens, positions restarting per
    document, document ids): whole windows (context parallelism splits them later)."""
    tokens = batch["input_ids"].to(device, non_blocking=True)
    if batch.get("positions") is None:
        positions = torch.arange(tokens.shape[1], device=device).expand(tokens.shape[0], -1).contiguous()
        return tokens, positions
    # Contiguous: a pipeline stage sends them on to the next.
    return (tokens, batch["positions"].to(device, non_blocking=True).long().contiguous(),
            batch["doc_ids"].to(device, non_blocking=True).long().contiguous())


def hidden_output(model, on: bool) -> None:
    """The module (or a last pipeline stage) returns the final-normed hidden states instead
    of logits (the chunked loss)."""
    model.hidden_only = on


def check(m: LlamaArgs) -> Iterable[Problem]:
    """Relations between fields; each field's own range is declared in ``args.py`` and
    checked first (``parallel.knobs``)."""
    if m.n_heads % m.n_kv_heads:
        yield "model.n_kv_heads", m.n_kv_heads, f"must divide model.n_heads={m.n_heads} (grouped-query attention)"
    if m.head_dim is None and m.dim % m.n_heads:
        yield "model.n_heads", m.n_heads, f"must divide model.dim={m.dim} (or set model.head_dim)"
    if m.resolved_head_dim % 2:
        yield "model.head_dim", m.resolved_head_dim, "must be even (RoPE rotates pairs)"
    rs = m.rope_scaling
    if rs is not None:
        if rs.high_freq_factor <= rs.low_freq_factor:
            yield ("model.rope_scaling.high_freq_factor", rs.high_freq_factor,
                   f"must exceed low_freq_factor={rs.low_freq_factor}")


def tp_divisible(m: LlamaArgs) -> List[Tuple[str, int]]:
    return [("model.n_heads", m.n_heads), ("model.n_kv_heads", m.n_kv_heads),
            ("model.ffn_hidden_dim", m.ffn_hidden_dim), ("model.vocab_size", m.vocab_size)]


def lora_param_count(args: LlamaArgs, rank: int, targets: Sequence[str]) -> int:
    """r x (in + out) per adapted linear, per layer: the formula the tests check."""
    from ...lora import resolve_targets

    hd = args.resolved_head_dim
    shapes = {"wq": (args.dim, args.n_heads * hd), "wk": (args.dim, args.n_kv_heads * hd),
              "wv": (args.dim, args.n_kv_heads * hd), "wo": (args.n_heads * hd, args.dim),
              "w1": (args.dim, args.ffn_hidden_dim), "w3": (args.dim, args.ffn_hidden_dim),
              "w2": (args.ffn_hidden_dim, args.dim)}
    return args.n_layers * sum(rank * sum(shapes[t]) for t in resolve_targets(list(targets), LORA))


FAMILY = ModelFamily(
    name="llama", args=LlamaArgs, build=build, inputs=inputs, layout=LAYOUT, lora=LORA,
    flops_per_token=flops_per_token, check=check, tp_divisible=tp_divisible,
    depth=lambda m: ("model.n_layers", m.n_layers), hf=hf, titan=titan, hidden_output=hidden_output,
    model_files=("debug", "llama3_2_1b", "llama3_2_3b", "llama3_1_8b", "llama3_1_70b"),
)

__all__ = ["FAMILY", "LAYOUT", "LORA", "Llama", "LlamaArgs", "RopeScaling", "build_llama", "count_parameters",
           "flops_per_token", "lora_param_count", "llama3_inv_freq", "matmul_params", "param_seed",
           "seeded_trunc_normal_"]
