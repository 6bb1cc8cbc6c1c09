"""A model family's parallel layout: plain data that ``parallel/`` reads to apply tensor
parallelism, activation checkpointing, compile, FSDP2 and the pipeline cut, so that no
module of ``parallel/`` names a model's attributes. A family (``pretrain/model/<name>/``)
builds one ``ModelLayout``; this module imports nothing from ``torch.distributed``.

Paths are dotted attribute paths inside the model (``"layers"``, ``"tok_embeddings"``) or
inside one block (``"attention.wq"``). A part a pipeline stage does not hold is ``None``
on that stage's module, and every reader skips it."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Tuple

from torch import nn


@dataclass(frozen=True)
class BlockPlan:
    """How tensor parallelism splits one block.

    ``colwise``/``rowwise``: linears split over their output / input features (a rowwise
    linear's output is reduced onto the residual stream). LoRA adapters on them follow.
    ``stream_inputs``: (submodule, number of positional args) whose first argument is the
    residual stream: gathered to a replicated tensor before it runs (sequence parallel),
    its other arguments untouched. ``seq_norms``: norms run on the sequence-sharded
    stream under sequence parallel. ``seq_gates``: modules that scale the sequence-sharded
    stream by parameters of their own (a gate) and return it; under sequence parallel
    their parameters are replicated and their gradients summed over the TP ranks.
    ``head_norms``: norms over one head's features, run on the heads a rank holds (their
    input is (batch, seq, heads, head_dim)); under TP their weight is replicated and its
    gradient summed over the ranks' heads. ``sequence_sharded``: False for a block whose
    stream stays whole on every TP rank even under sequence parallel (an encoder whose
    stream never joins the decoder's): its row-wise outputs are all-reduced."""

    colwise: Tuple[str, ...] = ()
    rowwise: Tuple[str, ...] = ()
    stream_inputs: Tuple[Tuple[str, int], ...] = ()
    seq_norms: Tuple[str, ...] = ()
    seq_gates: Tuple[str, ...] = ()
    head_norms: Tuple[str, ...] = ()
    sequence_sharded: bool = True


@dataclass(frozen=True)
class ModelLayout:
    """``blocks``: ModuleDicts whose children are the units that activation checkpointing,
    compile and FSDP2 wrap, in forward order. ``block_plan(block)``: that block's TP plan.
    ``pipeline_blocks``: the ModuleDict cut into equal pipeline stages (keys stay, so
    parameter names are those of the whole model). ``first_stage``/``last_stage``: parts
    only the first / last stage holds. ``embedding``: the token embedding (TP: sharded
    over the vocabulary); ``norm``: the final norm (sequence parallel); ``head``: an
    untied output linear (column-wise, vocabulary-sharded logits); ``tied_head``: a
    module computing logits from (hidden states, the embedding matrix). With a tied head
    the last stage also keeps the embedding, and the two copies' gradients are summed.

    ``attention_core`` / ``sequence_inputs``: what context parallelism swaps and splits.

    What crosses a stage boundary is whatever the family's module returns when it lacks
    its last-stage parts: the hidden states, or a tuple (hidden states plus what later
    stages need), which the next stage receives as its positional inputs."""

    block_plan: Callable[[nn.Module], BlockPlan]
    blocks: Tuple[str, ...]
    pipeline_blocks: str
    first_stage: Tuple[str, ...] = ()
    last_stage: Tuple[str, ...] = ()
    embedding: Optional[str] = None
    norm: Optional[str] = None
    head: Optional[str] = None
    tied_head: Optional[str] = None
    # The attention core inside each block (a child module ``core(q, k, v, doc_ids)``,
    # ``parallel/attention_core.py``): context parallelism swaps it. None: the family cannot
    # run context parallel.
    attention_core: Optional[str] = None
    # (index in the first stage's inputs, dim) of every input laid out along the sequence:
    # context parallelism gives each rank its chunks of them (and of the labels).
    sequence_inputs: Tuple[Tuple[int, int], ...] = ()

    def part(self, model: nn.Module, path: Optional[str]) -> Optional[nn.Module]:
        """The module at ``path``, or None when the layout has none or this stage dropped it."""
        if path is None:
            return None
        mod: Optional[nn.Module] = model
        for name in path.split("."):
            mod = getattr(mod, name, None)
            if mod is None:
                return None
        return mod

    def block_list(self, model: nn.Module) -> list:
        out = []
        for path in self.blocks:
            container = self.part(model, path)
            if container is not None:
                out.extend(container.values())
        return out

    def logits(self, model: nn.Module, h):
        """The head applied to (final-normed) hidden states ``h``: the untied head, or the
        tied one with the embedding matrix (the chunked loss calls this per chunk)."""
        if self.is_tied(model):
            return self.part(model, self.tied_head)(h, self.part(model, self.embedding).weight)
        return self.part(model, self.head)(h)

    def is_tied(self, model: nn.Module) -> bool:
        return self.tied_head is not None and self.part(model, self.tied_head) is not None
