"""A second model family that lives outside the tree, reached by
``model.family=tests.toy_family:FAMILY``: a residual MLP stack with renamed parts
(``embed``, ``stack``, ``mixer.fc_in``/``fc_out``, ``final_norm``, ``lm_head``) and an extra
tensor across pipeline stages (a per-token ``scale`` the first stage derives from the
token ids; later stages cannot rebuild it and refuse to run without it). It takes the
Llama schema's fields it needs (dim, n_layers, ffn_hidden_dim, vocab_size, norm_eps,
init_std): a family may reuse another's args dataclass."""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from parallel.layout import BlockPlan, ModelLayout
from pretrain.model.family import LoRASpec, ModelFamily
from pretrain.model.llama.args import LlamaArgs


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
    def __init__(self, a: LlamaArgs):
        super().__init__()
        self.norm = Norm(a.dim, a.norm_eps)
        self.mixer = Mixer(a.dim, a.ffn_hidden_dim)

    def forward(self, h, scale):
        return h + self.mixer(self.norm(h), scale)


class Toy(nn.Module):
    def __init__(self, a: LlamaArgs):
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


def matmul_params(a: LlamaArgs) -> int:
    return a.n_layers * 2 * a.dim * a.ffn_hidden_dim + a.dim * a.vocab_size


FAMILY = ModelFamily(
    name="toy", args=LlamaArgs, build=lambda a, seq_len: Toy(a),
    inputs=lambda batch, device, args=None: (batch["input_ids"].to(device),),
    layout=LAYOUT, lora=LoRASpec(groups={"mlp": ("fc_in", "fc_out")}),
    flops_per_token=lambda a, seq_len, lora_params=0: 6.0 * matmul_params(a),
    check=lambda a: [("model.tie_embeddings", True, "false: the toy family has an untied head")]
    if a.tie_embeddings else [],
    tp_divisible=lambda a: [("model.ffn_hidden_dim", a.ffn_hidden_dim), ("model.vocab_size", a.vocab_size)],
    depth=lambda a: ("model.n_layers", a.n_layers), document_masking=False,
)


class OtherArgs:  # a schema of another family: a model file of the Llama schema cannot feed it
    pass


OTHER = ModelFamily(name="other", args=OtherArgs, build=None, inputs=None, layout=LAYOUT, lora=LoRASpec(groups={}),
                    flops_per_token=None, check=lambda a: [], tp_divisible=lambda a: [], depth=lambda a: ("", 1),
                    model_files=("other_tiny",))
