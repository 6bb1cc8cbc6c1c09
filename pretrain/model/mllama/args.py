"""Hyperparameters of Llama 3.2 Vision (Mllama): a Llama 3.1-style text decoder (the
``LlamaArgs`` fields) with gated cross-attention layers, and a ViT-H/14 vision encoder
over up to ``max_num_tiles`` tiles of each image."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List

from parallel.knobs import knob

from ..llama.args import LlamaArgs


@dataclass
class MllamaArgs(LlamaArgs):
    family: str = "mllama"
    tie_embeddings: bool = False
    # Text decoder layers (of n_layers) that are gated cross-attention layers instead of
    # self-attention ones (11B: 3, 8, ..., 38 of 40).
    cross_attention_layers: List[int] = knob(default_factory=lambda: [3, 8, 13, 18, 23, 28, 33, 38], ge=0,
                                             le=4095, each=True)
    # Vision encoder: patches of a square tile, a class token, local layers then gated
    # global ones; the outputs of the intermediate layers join the final one.
    vision_dim: int = knob(1280, ge=1, le=1 << 16)
    vision_layers: int = knob(32, ge=1, le=1024)
    vision_global_layers: int = knob(8, ge=0, le=1024)
    vision_heads: int = knob(16, ge=1, le=1 << 10)
    vision_ffn_hidden_dim: int = knob(5120, ge=1, le=1 << 18)
    vision_norm_eps: float = knob(1e-5, gt=0, le=1e6, warn_above=0.1)
    image_size: int = knob(560, ge=1, le=1 << 14)
    patch_size: int = knob(14, ge=1, le=1 << 10)
    num_channels: int = knob(3, ge=1, le=64)
    max_num_tiles: int = knob(4, ge=1, le=64)
    # Aspect ratios (tiles high x wide) an image may be cut into; id 0 is "no image".
    supported_aspect_ratios: List[List[int]] = field(
        default_factory=lambda: [[1, 1], [1, 2], [1, 3], [1, 4], [2, 1], [2, 2], [3, 1], [4, 1]])
    intermediate_layers: List[int] = knob(default_factory=lambda: [3, 7, 15, 23, 30], ge=0, le=1023, each=True)
    # Images per sample (padded): shapes never depend on the data.
    max_images: int = knob(1, ge=1, le=64, resume=False)
    # Initial weight of every tanh gate (cross-attention layers, vision tiles and global
    # layers). 0 is the published init: a pretrained text model is unchanged until the
    # gates open, which takes many steps; a model trained from scratch learns from its
    # images sooner with open gates (make demo-vision uses 1).
    gate_init: float = knob(0.0, ge=-20, le=20)

    @property
    def patches_per_tile(self) -> int:
        """Patches of one tile plus its class token."""
        return (self.image_size // self.patch_size) ** 2 + 1

    @property
    def vision_output_dim(self) -> int:
        return self.vision_dim * (1 + len(self.intermediate_layers))

    @property
    def image_token_id(self) -> int:
        """``<|image|>``: the first of the 8 rows the embedding has past the vocabulary."""
        return self.vocab_size
