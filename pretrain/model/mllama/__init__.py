"""Llama 3.2 Vision (Mllama): a vision encoder and projector feeding the gated
cross-attention layers of a Llama 3.1-style decoder (``model.py``), its hyperparameters
(``args.py``), FLOPs (``flops.py``), the Hugging Face converter (``hf.py``) and, here, its
parallel layout, inputs and LoRA targets.

The model's inputs (``inputs``): token ids, the images (pixels, aspect-ratio ids, tile
mask) and the per-token ``cross_attention_mask``, then, under ``data.document_masking``,
each token's position (restarting per document) and document id: several samples packed
in a row attend within their own document, each reading its own images through the
mask."""
from __future__ import annotations

from typing import Iterable, List, Tuple

import torch

from parallel.layout import BlockPlan, ModelLayout

from ..family import LoRASpec, ModelFamily, Problem
from ..llama import BLOCK as SELF_ATTENTION
from ..llama import check as check_text
from . import hf
from .args import MllamaArgs
from .flops import flops_per_token
from .model import CrossAttentionBlock, Mllama, VisionBlock, build_mllama

# Vision blocks: heads and MLP hidden units split over TP; the encoder's stream (every
# patch of every tile) stays whole on each TP rank, under sequence parallel too.
VISION = BlockPlan(
    colwise=("attention.wq", "attention.wk", "attention.wv", "mlp.fc1"),
    rowwise=("attention.wo", "mlp.fc2"),
    stream_inputs=(("attention", 2), ("mlp", 1)),
    sequence_sharded=False,
)
# Cross-attention blocks: queries from the (gathered) text stream, keys and values from
# the image states, which every TP rank holds whole (each rank projects them for its own
# kv heads, once per forward); the q/k norms run on a rank's heads.
CROSS_ATTENTION = BlockPlan(
    colwise=("cross_attention.wq", "cross_attention.wk", "cross_attention.wv", "feed_forward.w1",
             "feed_forward.w3"),
    rowwise=("cross_attention.wo", "feed_forward.w2"),
    stream_inputs=(("cross_attention", 4), ("feed_forward", 2)),
    seq_norms=("attention_norm", "ffn_norm"),
    seq_gates=("attn_gate", "ffn_gate"),
    head_norms=("cross_attention.q_norm", "cross_attention.k_norm"),
)


def block_plan(block) -> BlockPlan:
    if isinstance(block, VisionBlock):
        return VISION
    return CROSS_ATTENTION if isinstance(block, CrossAttentionBlock) else SELF_ATTENTION


LAYOUT = ModelLayout(
    block_plan=block_plan,
    blocks=("vision.layers", "vision.global_layers", "layers"),
    pipeline_blocks="layers",
    first_stage=("vision", "projector", "tok_embeddings"),
    last_stage=("norm", "output"),
    embedding="tok_embeddings",
    norm="norm",
    head="output",
)

LORA = LoRASpec(groups={"attention": ("wq", "wk", "wv", "wo"), "mlp": ("w1", "w2", "w3", "fc1", "fc2")},
                aliases={v: k for k, v in hf.lora_names.items()})

# finetune.freeze: the parameters of each tower, by name prefix. "vision" is the image
# side Meta trained as the adapter: the encoder, the projector and the decoder's
# cross-attention layers; "text" is the rest of the decoder.
def tower_of(args: MllamaArgs, name: str) -> str:
    if name.startswith(("vision.", "projector.")):
        return "vision"
    parts = name.split(".")
    if parts[0] == "layers" and int(parts[1]) in set(args.cross_attention_layers):
        return "vision"
    return "text"


def build(args: MllamaArgs, seq_len: int) -> Mllama:
    return Mllama(args, rope_cache_len=seq_len)


def inputs(batch: dict, device: torch.device, args: MllamaArgs) -> Tuple[torch.Tensor, ...]:
    """(tokens, pixels, aspect_ratio_ids, aspect_ratio_mask, cross_attention_mask) or, with
    document masking (the batch holds ``positions``), those and (positions restarting per
    document, document ids), shaped by the config alone: a batch without images (no
    ``pixel_values`` key) gets zero pixels, ids and masks, so every rank and every pipeline
    stage sees the same shapes.
    Shapes: tokens (B, seq), pixels (B, max_images, max_num_tiles, num_channels, image_size,
    image_size), ids (B, max_images), aspect_ratio_mask (B, max_images, max_num_tiles),
    cross_attention_mask (B, seq, max_images, max_num_tiles) as float (per token: packed,
    each token sees its own document's images only), positions and doc_ids (B, seq) int64,
    contiguous."""
    tokens = batch["input_ids"].to(device, non_blocking=True)
    b, s = tokens.shape
    i, t, c, px = args.max_images, args.max_num_tiles, args.num_channels, args.image_size
    want = {"pixel_values": (b, i, t, c, px, px), "aspect_ratio_ids": (b, i), "aspect_ratio_mask": (b, i, t),
            "cross_attention_mask": (b, s, i, t)}
    documents = ()
    if batch.get("positions") is not None:
        for key in ("positions", "doc_ids"):
            if tuple(batch[key].shape) != (b, s):
                raise ValueError(f"batch[{key!r}] has shape {tuple(batch[key].shape)}, expected {(b, s)} (as "
                                 "input_ids)")
        # Contiguous: a pipeline stage sends them on to the next.
        documents = tuple(batch[key].to(device, non_blocking=True).long().contiguous()
                          for key in ("positions", "doc_ids"))
    if batch.get("pixel_values") is None:
        return (tokens, torch.zeros(want["pixel_values"], device=device),
                torch.zeros(want["aspect_ratio_ids"], dtype=torch.long, device=device),
                torch.zeros(want["aspect_ratio_mask"], dtype=torch.long, device=device),
                torch.zeros(want["cross_attention_mask"], device=device), *documents)
    out = [tokens]
    for key, shape in want.items():
        x = batch[key]
        if tuple(x.shape) != shape:
            raise ValueError(f"batch[{key!r}] has shape {tuple(x.shape)}, expected {shape} (model.max_images="
                             f"{i}, model.max_num_tiles={t}, model.image_size={px})")
        if key == "aspect_ratio_ids" and x.device.type == "cpu" and len(x) and (
                x.min() < 0 or x.max() > len(args.supported_aspect_ratios)):  # a loader batch: no device sync
            raise ValueError(f"batch['aspect_ratio_ids'] holds {x.min().item()}..{x.max().item()}, expected 0 (no "
                             f"image) to {len(args.supported_aspect_ratios)} (model.supported_aspect_ratios)")
        x = x.to(device, non_blocking=True)
        out.append(x.float() if key in ("pixel_values", "cross_attention_mask") else x.long())
    return (*out, *documents)


# The published preprocessor_config.json's normalisation (OpenAI CLIP's mean and std).
IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)


def image_spec(args: MllamaArgs) -> dict:
    """What the data loader needs to feed this model images (data_pipeline.images.ImageSpec
    fields): tiles of ``image_size`` pixels, up to ``max_num_tiles`` per image in one of
    the supported aspect ratios, ``max_images`` per row, ``<|image|>`` = ``vocab_size``."""
    return {"image_token_id": args.image_token_id, "tile_size": args.image_size, "max_tiles": args.max_num_tiles,
            "aspect_ratios": tuple(tuple(int(x) for x in r) for r in args.supported_aspect_ratios),
            "max_images": args.max_images, "mean": IMAGE_MEAN, "std": IMAGE_STD, "channels": args.num_channels}


def check(m: MllamaArgs) -> Iterable[Problem]:
    yield from check_text(m)
    if m.vision_dim % m.vision_heads:
        yield "model.vision_heads", m.vision_heads, f"must divide model.vision_dim={m.vision_dim}"
    if m.image_size < m.patch_size or m.image_size % m.patch_size:
        yield "model.image_size", m.image_size, f"must be a multiple of model.patch_size={m.patch_size}"
    layers = list(m.cross_attention_layers)
    if not layers or sorted(set(layers)) != layers or layers[0] < 0 or layers[-1] >= m.n_layers:
        yield ("model.cross_attention_layers", layers,
               f"must be increasing, distinct layer indices in [0, model.n_layers={m.n_layers}), at least one")
    inter = list(m.intermediate_layers)
    if sorted(set(inter)) != inter or (inter and (inter[0] < 0 or inter[-1] >= m.vision_layers)):
        yield ("model.intermediate_layers", inter,
               f"must be increasing, distinct indices in [0, model.vision_layers={m.vision_layers})")
    ratios = [list(r) for r in m.supported_aspect_ratios]
    if not ratios or any(len(r) != 2 or min(r) < 1 or r[0] * r[1] > m.max_num_tiles for r in ratios):
        yield ("model.supported_aspect_ratios", ratios,
               f"must be [rows, columns] pairs of >= 1 with rows x columns <= model.max_num_tiles={m.max_num_tiles}")
    if m.tie_embeddings:
        yield "model.tie_embeddings", True, "must be false (Mllama's head is untied)"


def tp_divisible(m: MllamaArgs) -> List[Tuple[str, int]]:
    return [("model.n_heads", m.n_heads), ("model.n_kv_heads", m.n_kv_heads),
            ("model.ffn_hidden_dim", m.ffn_hidden_dim), ("model.vocab_size", m.vocab_size),
            ("model.vocab_size + 8 (the embedding's image-token rows)", m.vocab_size + 8),
            ("model.vision_heads", m.vision_heads), ("model.vision_ffn_hidden_dim", m.vision_ffn_hidden_dim)]


FAMILY = ModelFamily(
    name="mllama", args=MllamaArgs, build=build, inputs=inputs, layout=LAYOUT, lora=LORA,
    flops_per_token=flops_per_token, check=check, tp_divisible=tp_divisible,
    depth=lambda m: ("model.n_layers", m.n_layers), hf=hf, document_masking=True,
    hidden_output=lambda model, on: setattr(model, "hidden_only", on),
    model_files=("mllama_debug", "llama3_2_11b_vision", "llama3_2_90b_vision"),
    towers=("text", "vision"), tower_of=tower_of, image_towers=("vision",), image_spec=image_spec,
)

__all__ = ["FAMILY", "LAYOUT", "LORA", "Mllama", "MllamaArgs", "build_mllama", "inputs", "tower_of"]
