"""What a model family gives the trainer, as plain data and functions (no
torch.distributed): adding a family is one folder under ``pretrain/model/`` that defines
a ``FAMILY`` plus its ``configs/model/*.yaml`` files.

``model.family`` names a family folder (``pretrain/model/<name>/``, listed by
``pretrain.model.family_names``) or a dotted import path ``package.module:NAME`` (a
family outside the tree, such as a test's, reaches torchrun workers by its name alone)."""
from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Optional, Tuple

import torch
from torch import nn

from parallel.layout import ModelLayout

# init_fn(tensor, std, fqn): fills ``tensor`` in place with a truncated normal of ``std``.
InitFn = Callable[[torch.Tensor, float, str], None]

# A problem with the model config: (key, value, what was expected).
Problem = Tuple[str, Any, str]


@dataclass(frozen=True)
class LoRASpec:
    """Linears that may get adapters, by their leaf name inside a block: named groups
    (``attention``, ``mlp``; ``all`` is every name) and aliases (Hugging Face's names)."""

    groups: Mapping[str, Tuple[str, ...]]
    aliases: Mapping[str, str] = field(default_factory=dict)  # alias -> our name

    @property
    def names(self) -> Tuple[str, ...]:
        out: list = []
        for members in self.groups.values():
            out += [m for m in members if m not in out]
        return tuple(out)


@dataclass(frozen=True)
class ModelFamily:
    """``args``: the dataclass that is the Hydra schema of ``model`` for this family (its
    ``family`` field holds the name). ``build(args, seq_len)``: the model, on the current
    default device (the trainer builds on meta); the module has ``init_weights(init_fn)``
    (``init_fn(tensor, std, name)`` fills a tensor, layout-invariantly). ``inputs(batch,
    device, args)``: a loader batch -> the model's (first stage's) positional inputs, whose
    shapes depend on the config only (``args``), never on what the batch holds.
    ``layout``: how parallel/ splits it. ``lora``: adapter targets. ``flops_per_token(args,
    seq_len, lora_params[, frozen])``: model FLOPs per trained token (MFU); ``frozen`` (the
    towers of finetune.freeze) is passed only to a family that has towers. ``check(args)``: problems
    with a model config's relations between fields (each field's own range is declared beside
    it in ``args`` with ``parallel.knobs.knob`` and checked first). ``tp_divisible(args)``:
    (key, value) that parallel.tp must divide.
    ``depth(args)``: (key, blocks) the pipeline splits into equal stages. ``hf``: the
    Hugging Face converter (a module with ``model_types``, ``args_from_hf_config``,
    ``hf_config_from_args``, ``ours_name``, ``hf_name``, ``to_ours``, ``to_hf``,
    ``hf_to_ours``, ``ours_to_hf``, ``lora_names``; optionally ``config_keys`` (the args fields
    compared with a folder's config.json, by their config.json names), ``canonical_hf_key`` /
    ``stored_hf_key`` (weight names as files store them vs module paths) and
    ``generation_config``), or None. ``document_masking``: whether ``inputs`` honours positions
    and document ids (data.document_masking is refused if not).
    ``towers`` / ``tower_of(args, name)``: the parts ``finetune.freeze`` may freeze.
    ``hidden_output(module, on)``: makes the module (or a last pipeline stage) return the
    final-normed hidden states instead of logits, so the trainer can apply the layout's head
    chunk by chunk (``train.loss_chunk``); None: the loss always takes full logits.
    Context parallelism needs the layout's ``attention_core`` and ``sequence_inputs``."""

    name: str
    args: type
    build: Callable[[Any, int], nn.Module]
    inputs: Callable[[dict, torch.device, Any], Tuple[torch.Tensor, ...]]
    layout: ModelLayout
    lora: LoRASpec
    flops_per_token: Callable[..., float]
    check: Callable[[Any], Iterable[Problem]]
    tp_divisible: Callable[[Any], Iterable[Tuple[str, int]]]
    depth: Callable[[Any], Tuple[str, int]]
    hf: Optional[Any] = None
    # Whether ``inputs`` honours data.document_masking (positions and document ids).
    document_masking: bool = True
    # Extra documentation shown by errors: the model files of this family.
    model_files: Tuple[str, ...] = ()
    # finetune.freeze: the towers a run may freeze, and tower_of(args, parameter name) ->
    # the tower that parameter belongs to (its name in the whole model).
    towers: Tuple[str, ...] = ()
    tower_of: Optional[Callable[[Any, str], str]] = None
    # Towers that learn from images only: a batch without images gives them zero gradients
    # (not none), so AdamW's weight decay still shrinks them (the trainer warns).
    image_towers: Tuple[str, ...] = ()
    # train.loss_chunk: switch the module to returning hidden states before the head.
    hidden_output: Optional[Callable[[nn.Module, bool], None]] = None
    # image_spec(args) -> what the data loader needs to feed images, as plain data (the
    # fields of data_pipeline.images.ImageSpec but max_pixels: the image token id, tile
    # size, max tiles, aspect ratios, max images per row, normalisation); None: text only.
    image_spec: Optional[Callable[[Any], dict]] = None


def count_parameters(model: nn.Module) -> int:
    """Unique parameters (a tied embedding counts once), works on meta-device models."""
    return sum(p.numel() for p in model.parameters())


def param_seed(seed: int, fqn: str) -> int:
    """A generator seed per (run seed, parameter name): init does not depend on the
    order parameters are visited in, nor on how they are sharded."""
    return (seed * 1_000_003 + zlib.crc32(fqn.encode())) % (2**63 - 1)


def seeded_trunc_normal_(tensor: torch.Tensor, std: float, fqn: str, seed: int) -> None:
    gen = torch.Generator(device=tensor.device).manual_seed(param_seed(seed, fqn))
    with torch.no_grad():
        nn.init.trunc_normal_(tensor, mean=0.0, std=std, a=-3 * std, b=3 * std, generator=gen)
