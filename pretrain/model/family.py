"""What a model family gives the trainer, as plain data and functions (no
torch.distributed): adding a family is one folder under ``pretrain/model/`` that defines
a ``FAMILY`` plus its ``configs/model/*.yaml`` files.

``model.family`` names a family folder (``pretrain/model/<name>/``, listed by
``pretrain.model.family_names``) or a dotted import path ``package.module:NAME`` (a
family outside the tree, such as a test's, reaches torchrun workers by its name alone)."""
from __future__ import annotations

import dataclasses
import zlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Optional, Protocol, Tuple

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


class FamilyArgs(Protocol):
    """What code outside a family's folder (``validate``, ``build``, the loop, checkpoints,
    ``interop.hf``) reads from a model config, whatever its family: a family's ``args`` is a
    dataclass (the Hydra schema of ``model``; checkpoints record it field by field, and
    ``parallel.knobs`` checks each field's declared range) with at least these fields, under
    these names and meanings. Nothing else of it is read outside the family: the family's own
    functions (``build``, ``check``, ``depth``, ...) and converter read the rest. A family
    need not share a base class with any other (``tests/toy_family.py`` does not)."""

    # The family (``model.family``): its folder name, or an import path ``package.module:NAME``.
    family: str
    # A label (checkpoints record it; ``hf import`` names the model by its folder).
    name: str
    # Token ids the model embeds (the tokenizer's must fit; the loss's width).
    vocab_size: int
    # The longest sequence it takes: ``train.seq_len`` must be at most this.
    max_position_embeddings: int
    # A Hugging Face folder (or ``titan:<torchtitan step dir>``) whose weights start the run
    # (None: the seeded init); a family without that converter (``ModelFamily.hf`` /
    # ``ModelFamily.titan``) refuses it.
    init_from: Optional[str]


# The fields of ``FamilyArgs``: every family's args dataclass has them (``ModelFamily`` checks).
FAMILY_ARGS_FIELDS = ("family", "name", "vocab_size", "max_position_embeddings", "init_from")


@dataclass(frozen=True)
class ModelFamily:
    """``args``: the dataclass that is the Hydra schema of ``model`` for this family (its
    ``family`` field holds the name): its own fields plus ``FamilyArgs``'s (family, name,
    vocab_size, max_position_embeddings, init_from), the only ones code outside the family
    reads (checked when the family is made); it may subclass another family's args or
    nothing. Shared code looks the family up once per entry point (``validate_job``,
    ``build_model``, each ``hf`` command) and passes it along. A family outside the tree has
    no ``<name>_schema`` in Hydra's model group: its model file picks no schema and names it
    (``family: package.module:NAME``), and ``validate_job`` types the fields by its ``args``
    (``tests/configs/model/toy.yaml``). ``build(args, seq_len)``: the model, on the current
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
    ``stored_hf_key`` (weight names as files store them vs module paths),
    ``unused_hf_keys(args)`` (weights a folder may hold that the model has no parameter for:
    Llama's ``lm_head.weight`` beside a tied embedding) and ``generation_config``), or None.
    ``document_masking``: whether ``inputs`` honours positions
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
    # The torchtitan converter (a module with ``titan_name``, ``titan_param``, ``split_qkv``,
    # ``merge_qkv``, ``fused_shape``, ``rope_of``, ``TITAN_ROPE``: ``pretrain.interop.titan``),
    # or None: the family has no torchtitan counterpart (import, export and
    # ``model.init_from=titan:`` refuse it).
    titan: Optional[Any] = None
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

    def __post_init__(self) -> None:
        have = {f.name for f in dataclasses.fields(self.args)} if dataclasses.is_dataclass(self.args) else set()
        missing = [f for f in FAMILY_ARGS_FIELDS if f not in have]
        if missing:
            raise TypeError(f"model family {self.name!r}: its args ({getattr(self.args, '__name__', self.args)}) "
                            f"must be a dataclass with the fields code outside the family reads (FamilyArgs: "
                            f"{', '.join(FAMILY_ARGS_FIELDS)}); missing: {', '.join(missing)}")


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
