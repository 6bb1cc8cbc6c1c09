"""Hyperparameters of Llama 3.2 Vision (Mllama): a Llama 3.1-style text decoder (the
``LlamaArgs`` fields) with gated cross-attention layers, and a ViT-H/14 vision encoder
over up to ``max_num_tiles`` tiles of each image."""
from __future__ import annotations

from dataclasses import dataclass
from typing import List

from parallel.knobs import doc_field, knob

from ..llama.args import LlamaArgs


@dataclass
class MllamaArgs(LlamaArgs):
    family: str = doc_field("mllama", "The model family: mllama is Llama 3.2 Vision (a Llama 3.1 decoder with gated "
                                      "cross-attention layers and a ViT-H/14 encoder).")
    tie_embeddings: bool = doc_field(False, "Must be false: the head is untied.")
    cross_attention_layers: List[int] = knob(default_factory=lambda: [3, 8, 13, 18, 23, 28, 33, 38], ge=0,
                                             le=4095, each=True,
                                             doc="Decoder layers (indices of n_layers) that are gated cross-attention "
                                                 "layers instead of self-attention ones (11B: 8 of 40).")
    # Vision encoder: patches of a square tile, a class token, local layers then gated
    # global ones; the outputs of the intermediate layers join the final one.
    vision_dim: int = knob(1280, ge=1, le=1 << 16, doc="The vision encoder's width.")
    vision_layers: int = knob(32, ge=1, le=1024, doc="The vision encoder's local layers.")
    vision_global_layers: int = knob(8, ge=0, le=1024, doc="Gated global layers after the local ones.")
    vision_heads: int = knob(16, ge=1, le=1 << 10, doc="The vision encoder's attention heads.")
    vision_ffn_hidden_dim: int = knob(5120, ge=1, le=1 << 18, doc="The vision encoder's GELU MLP hidden size.")
    vision_norm_eps: float = knob(1e-5, gt=0, le=1e6, warn_above=0.1, doc="The vision encoder's LayerNorm "
                                                                          "epsilon.")
    image_size: int = knob(560, ge=1, le=1 << 14, doc="A tile's side in pixels.")
    patch_size: int = knob(14, ge=1, le=1 << 10, doc="A patch's side in pixels: a tile is (image_size / "
                                                     "patch_size)^2 patches plus a class token.")
    num_channels: int = knob(3, ge=1, le=64, doc="Colour channels of a picture.")
    max_num_tiles: int = knob(4, ge=1, le=64, doc="Tiles per image (an image is cut into at most that many).")
    supported_aspect_ratios: List[List[int]] = doc_field(
        doc="The tilings (rows x columns) an image may have; its aspect-ratio id is 1 + the index here, 0 for no "
            "image.",
        default_factory=lambda: [[1, 1], [1, 2], [1, 3], [1, 4], [2, 1], [2, 2], [3, 1], [4, 1]])
    intermediate_layers: List[int] = knob(default_factory=lambda: [3, 7, 15, 23, 30], ge=0, le=1023, each=True,
                                          doc="Local layers whose outputs are concatenated with the encoder's final "
                                              "output.")
    max_images: int = knob(1, ge=1, le=64, resume=False, doc="Images per sample (padded: shapes never depend on "
                                                             "the data); also the most a packed row holds.")
    # 0 is the published init: a pretrained text model is unchanged until the gates open,
    # which takes many steps; a model trained from scratch learns from its images sooner
    # with open gates (make demo-vision uses 1).
    gate_init: float = knob(0.0, ge=-20, le=20, doc="Initial weight of every tanh gate (cross-attention layers, "
                                                    "vision tiles, global layers); 0 is the published init.")

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
