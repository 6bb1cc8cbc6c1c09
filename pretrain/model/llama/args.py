"""Hyperparameters of a Llama 3.x decoder, as one dataclass.

The same dataclass is the schema of the Hydra ``model`` group, so a model config file
can only name fields that exist here. Each field's range is declared beside it
(``parallel.knobs``): the upper bounds are far past any published Llama (405B: 126
layers, dim 16384, ffn 53248, vocab 128256), so a config past them, typed or read from a
crafted file, is refused before millions of modules are built. ``resume=False`` marks
fields a resumed run may change (they do not change the trained function)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from parallel.knobs import knob


@dataclass
class RopeScaling:
    """Llama 3 frequency scaling (``rope_scaling: {rope_type: llama3}`` in HF configs)."""

    factor: float = knob(32.0, ge=1, le=1e6)
    low_freq_factor: float = knob(1.0, gt=0, le=1e6)
    high_freq_factor: float = knob(4.0, gt=0, le=1e6)
    original_max_position_embeddings: int = knob(8192, ge=1, le=1 << 31)


@dataclass
class LlamaArgs:
    # The model family (pretrain/model/): set by the model file's schema. family, name,
    # vocab_size, max_position_embeddings and init_from are the fields every family's args
    # have (pretrain.model.family.FamilyArgs): code outside the family reads only those.
    family: str = "llama"
    name: str = field(default="debug", metadata={"resume": False})
    dim: int = knob(256, ge=1, le=1 << 20)
    n_layers: int = knob(4, ge=1, le=4096)
    n_heads: int = knob(8, ge=1, le=1 << 14)
    n_kv_heads: int = knob(4, ge=1, le=1 << 14)
    # None means dim // n_heads (true for every published Llama 3 size).
    head_dim: Optional[int] = knob(None, ge=2, le=1 << 16)
    ffn_hidden_dim: int = knob(768, ge=1, le=1 << 22)
    vocab_size: int = knob(4096, ge=1, le=1 << 24)
    # > 0: an all-zero hidden vector would divide 0 by 0.
    norm_eps: float = knob(1e-5, gt=0, le=1e6, warn_above=0.1)
    rope_theta: float = knob(500000.0, gt=0, le=1e15, warn_below=100.0)
    # None disables the llama3 scaling (plain RoPE).
    rope_scaling: Optional[RopeScaling] = field(default_factory=RopeScaling)
    # The longest sequence (train.seq_len); changes no weight.
    max_position_embeddings: int = knob(131072, ge=1, le=1 << 31, resume=False)
    tie_embeddings: bool = True
    # Std of the truncated-normal init; output projections get init_std / sqrt(2 * n_layers).
    init_std: float = knob(0.02, gt=0, le=1e3, warn_above=1.0, resume=False)
    # A Hugging Face Llama folder (config.json + safetensors) whose weights start the run,
    # under any layout; its config.json must describe this model. Ignored when the run
    # resumes from a checkpoint of its run dir.
    init_from: Optional[str] = field(default=None, metadata={"resume": False})

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim if self.head_dim is not None else self.dim // self.n_heads
