"""Hyperparameters of a Llama 3.x decoder, as one dataclass.

The same dataclass is the schema of the Hydra ``model`` group, so a model config file
can only name fields that exist here."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


@dataclass
class RopeScaling:
    """Llama 3 frequency scaling (``rope_scaling: {rope_type: llama3}`` in HF configs)."""

    factor: float = 32.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass
class LlamaArgs:
    # The model family (pretrain/model/): set by the model file's schema. A dotted import
    # path (package.module:NAME) picks a family outside the tree that takes these args.
    family: str = "llama"
    name: str = "debug"
    dim: int = 256
    n_layers: int = 4
    n_heads: int = 8
    n_kv_heads: int = 4
    # None means dim // n_heads (true for every published Llama 3 size).
    head_dim: Optional[int] = None
    ffn_hidden_dim: int = 768
    vocab_size: int = 4096
    norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    # None disables the llama3 scaling (plain RoPE).
    rope_scaling: Optional[RopeScaling] = field(default_factory=RopeScaling)
    max_position_embeddings: int = 131072
    tie_embeddings: bool = True
    # Std of the truncated-normal init; output projections get init_std / sqrt(2 * n_layers).
    init_std: float = 0.02
    # A Hugging Face Llama folder (config.json + safetensors) whose weights start the run,
    # under any layout; its config.json must describe this model. Ignored when the run
    # resumes from a checkpoint of its run dir.
    init_from: Optional[str] = None

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim if self.head_dim is not None else self.dim // self.n_heads
