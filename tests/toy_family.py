"""A second model family that lives outside the tree, reached by
``model.family=tests.toy_family:FAMILY``: a residual MLP stack with renamed parts
(``embed``, ``stack``, ``mixer.fc_in``/``fc_out``, ``final_norm``, ``lm_head``) and an extra
tensor across pipeline stages (a per-token ``scale`` the first stage derives from the
token ids; later stages cannot rebuild it and refuse to run without it). Its args
(``ToyArgs``) are its own, sharing no base with Llama's: the fields every family's args
have (``pretrain.model.family.FamilyArgs``) plus its own. Hydra knows no ``toy_schema``:
its model file, ``tests/configs/model/toy.yaml`` (``TOY_MODEL``: the search path and
``model=toy``), picks no schema and names the family, and validation types it by
``ToyArgs``."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from parallel.knobs import knob
from parallel.layout import BlockPlan, ModelLayout
from pretrain.model.family import LoRASpec, ModelFamily

# The overrides that pick the toy's model file (a job's, or conftest.compose_job's).
TOY_MODEL = [f"hydra.searchpath=[file://{Path(__file__).resolve().parent / 'configs'}]", "model=toy"]


@dataclass
class ToyArgs:
    # FamilyArgs: what code outside the family reads.
    family: str = "tests.toy_family:FAMILY"
    name: str = field(default="toy", metadata={"resume": False})
    vocab_size: int = knob(4096, ge=1, le=1 << 24)
    max_position_embeddings: int = knob(4096, ge=1, le=1 << 31, resume=False)
    init_from: Optional[str] = field(default=None, metadata={"resume": False})
    # The toy's own.
    dim: int = knob(64, ge=1, le=1 << 16)
    n_layers: int = knob(2, ge=1, le=1024)
    ffn_hidden_dim: int = knob(128, ge=1, le=1 << 18)
    norm_eps: float = knob(1e-5, gt=0, le=1)
    init_std: float = knob(0.02, gt=0, le=1e3, resume=False)
    # The head is its own weight: true (the embedding's) is refused by the family's check.
    tie_embeddings: bool = False


class Norm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps, self.weight = eps, nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)


class Mixer(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc_in = nn.Linear(dim, hidden, bias=False)
        self.fc_out = nn.Linear(hidden, dim, bias=False)

    def forward(self, x, scale):
        return self.fc_out(F.gelu(self.fc_in(x)) * scale)


class Block(nn.Module):
    def __init__(self, a: ToyArgs):
        super().__init__()
        self.norm = Norm(a.dim, a.norm_eps)
        self.mixer = Mixer(a.dim, a.ffn_hidden_dim)

    def forward(self, h, scale):
        return h + self.mixer(self.norm(h), scale)


class Toy(nn.Module):
    def __init__(self, a: ToyArgs):
        super().__init__()
        self.args = a
        self.embed = nn.Embedding(a.vocab_size, a.dim)
        self.stack = nn.ModuleDict({str(i): Block(a) for i in range(a.n_layers)})
        self.final_norm = Norm(a.dim, a.norm_eps)
        self.lm_head = nn.Linear(a.dim, a.vocab_size, bias=False)

    def forward(self, x: torch.Tensor, scale: Optional[torch.Tensor] = None):
        if x.is_floating_point():  # a later pipeline stage: hidden states and the scale
            if scale is None:
                raise RuntimeError("toy family: the scale did not cross the stage boundary")
            h = x
        else:
            h = self.embed(x)
            scale = 0.5 + (x % 7).unsqueeze(-1).to(torch.float32) / 7  # (B, S, 1)
        for block in self.stack.values():
            h = block(h, scale)
        if self.final_norm is None:
            return h, scale
        return self.lm_head(self.final_norm(h))

    @torch.no_grad()
    def init_weights(self, init_fn):
        a = self.args
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name == "lm_head.weight":
                init_fn(p, a.dim ** -0.5, name)
            else:
                init_fn(p, a.init_std / (math.sqrt(2 * a.n_layers) if name.endswith("fc_out.weight") else 1), name)


PLAN = BlockPlan(colwise=("mixer.fc_in",), rowwise=("mixer.fc_out",), stream_inputs=(("mixer", 2),),
                 seq_norms=("norm",))
LAYOUT = ModelLayout(block_plan=lambda block: PLAN, blocks=("stack",), pipeline_blocks="stack",
                     first_stage=("embed",), last_stage=("final_norm", "lm_head"), embedding="embed",
                     norm="final_norm", head="lm_head")


def matmul_params(a: ToyArgs) -> int:
    return a.n_layers * 2 * a.dim * a.ffn_hidden_dim + a.dim * a.vocab_size


FAMILY = ModelFamily(
    name="toy", args=ToyArgs, build=lambda a, seq_len: Toy(a),
    inputs=lambda batch, device, args=None: (batch["input_ids"].to(device),),
    layout=LAYOUT, lora=LoRASpec(groups={"mlp": ("fc_in", "fc_out")}),
    flops_per_token=lambda a, seq_len, lora_params=0: 6.0 * matmul_params(a),
    check=lambda a: [("model.tie_embeddings", True, "false: the toy family has an untied head")]
    if a.tie_embeddings else [],
    tp_divisible=lambda a: [("model.ffn_hidden_dim", a.ffn_hidden_dim), ("model.vocab_size", a.vocab_size)],
    depth=lambda a: ("model.n_layers", a.n_layers), document_masking=False, model_files=("toy",),
)


@dataclass
class OtherArgs:  # a schema of another family: a model file of the Llama schema cannot feed it
    family: str = "tests.toy_family:OTHER"
    name: str = "other"
    vocab_size: int = 512
    max_position_embeddings: int = 4096
    init_from: Optional[str] = None


OTHER = ModelFamily(name="other", args=OtherArgs, build=None, inputs=None, layout=LAYOUT, lora=LoRASpec(groups={}),
                    flops_per_token=None, check=lambda a: [], tp_divisible=lambda a: [], depth=lambda a: ("", 1),
                    model_files=("other_tiny",))
