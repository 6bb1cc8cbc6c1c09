"""Hyperparameters of a Llama 3.x decoder, as one dataclass.

The same dataclass is the schema of the Hydra ``model`` group, so a model config file
can only name fields that exist here. Each field's range is declared beside it
(``parallel.knobs``): the upper bounds are far past any published Llama (405B: 126
layers, dim 16384, ffn 53248, vocab 128256), so a config past them, typed or read from a
crafted file, is refused before millions of modules are built. ``resume=False`` marks
fields a resumed run may change (they do not change the trained function)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from parallel.knobs import doc_field, knob


@dataclass
class RopeScaling:
    """Llama 3 frequency scaling (``rope_scaling: {rope_type: llama3}`` in HF configs)."""

    factor: float = knob(32.0, ge=1, le=1e6, doc="Long wavelengths are stretched by this factor (Llama 3.1: 8, "
                                                 "Llama 3.2: 32).")
    low_freq_factor: float = knob(1.0, gt=0, le=1e6, doc="Wavelengths longer than original_max_position_embeddings "
                                                         "/ low_freq_factor are scaled by factor.")
    high_freq_factor: float = knob(4.0, gt=0, le=1e6, doc="Wavelengths shorter than original_max_position_embeddings "
                                                          "/ high_freq_factor are kept; those between interpolate.")
    original_max_position_embeddings: int = knob(8192, ge=1, le=1 << 31, doc="The context length the frequencies "
                                                                             "had before scaling.")


@dataclass
class LlamaArgs:
    # family, name, vocab_size, max_position_embeddings and init_from are the fields every
    # family's args have (pretrain.model.family.FamilyArgs): code outside the family reads only those.
    family: str = doc_field("llama", "The model family (`pretrain/model/<family>/`), set by the model file's "
                                     "schema; `package.module:NAME` names one outside the tree.")
    name: str = doc_field("debug", "Label of the architecture.", resume=False)
    dim: int = knob(256, ge=1, le=1 << 20, doc="Hidden size.")
    n_layers: int = knob(4, ge=1, le=4096, doc="Transformer blocks.")
    n_heads: int = knob(8, ge=1, le=1 << 14, doc="Query heads.")
    n_kv_heads: int = knob(4, ge=1, le=1 << 14, doc="Key/value heads (grouped-query attention); must divide "
                                                    "n_heads.")
    head_dim: Optional[int] = knob(None, ge=2, le=1 << 16, doc="Per-head size; null = dim / n_heads (every "
                                                               "published Llama 3).")
    ffn_hidden_dim: int = knob(768, ge=1, le=1 << 22, doc="SwiGLU hidden size.")
    vocab_size: int = knob(4096, ge=1, le=1 << 24, doc="Embedding rows; at least the tokenizer's vocabulary.")
    # > 0: an all-zero hidden vector would divide 0 by 0.
    norm_eps: float = knob(1e-5, gt=0, le=1e6, warn_above=0.1, doc="RMSNorm epsilon.")
    rope_theta: float = knob(500000.0, gt=0, le=1e15, warn_below=100.0, doc="RoPE base.")
    rope_scaling: Optional[RopeScaling] = doc_field(doc="Llama 3 frequency scaling (the keys below), or null for "
                                                        "plain RoPE.", default_factory=RopeScaling)
    max_position_embeddings: int = knob(131072, ge=1, le=1 << 31, resume=False,
                                        doc="The longest sequence (train.seq_len must not exceed it); changes no "
                                            "weight.")
    tie_embeddings: bool = doc_field(True, "The output head reuses the embedding matrix (Llama 3.2 1B and 3B).")
    init_std: float = knob(0.02, gt=0, le=1e3, warn_above=1.0, resume=False,
                           doc="Std of the truncated-normal init; output projections get `init_std / sqrt(2 * "
                               "n_layers)`, an untied head `dim**-0.5`.")
    # Its config.json must describe this model.
    init_from: Optional[str] = doc_field(None, "A Hugging Face folder of this model, or `titan:<torchtitan step "
                                               "dir>`, whose weights start the run under any layout; ignored once "
                                               "the run dir has a checkpoint.", resume=False)

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim if self.head_dim is not None else self.dim // self.n_heads
