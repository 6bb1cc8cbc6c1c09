"""Run under torchrun (2 processes, gloo): Meta's rule for Llama 3.2 Vision (text that sees
no image gets nothing from the images) under TP 2 + SP and PP 2 (where the mask crosses
the stage boundary). Per layout, the trainer builds the tiny Mllama (every gate opened)
and its ``TrainStep`` evaluates one batch of ``test_mllama.rule_batch`` twice, with other
pixels the second time, as a chat loss over chosen tokens: the tokens that see no tile
(their loss must not move, bit for bit) and, as the control, those that see one (it must).
Prints one JSON line per layout (rank 0)."""
from __future__ import annotations

import json
import os

import torch

from parallel import distributed as pdist
from parallel.env import detect_launch_env
from pretrain.build import build_model
from pretrain.step import TrainStep
from pretrain.validate import validate_job
from tests.conftest import compose_job
from tests.test_mllama import rule_batch

MODEL = ["model=mllama_debug", "model.dim=64", "model.n_heads=4", "model.n_kv_heads=2", "model.ffn_hidden_dim=128",
         "model.vocab_size=512", "data.tokenizer.vocab_size=512", "model.max_images=2", "train.seq_len=12", "train.local_batch_size=4"]
LAYOUTS = {"tp2+sp": ["parallel.tp=2"], "pp2-1f1b": ["parallel.pp=2", "parallel.pp_microbatches=2"]}


def losses(cfg, dims, batches):
    """The chat loss of each (inputs, labels) in ``batches``, evaluated by the trainer's step."""
    model = build_model(cfg, dims, torch.device("cpu"))
    with torch.no_grad():
        for part in model.parts:
            for name, p in part.named_parameters():
                if "gate" in name:
                    p.fill_(0.7)  # the published init (0) would hide the image path
    step = TrainStep(model.family, model.parts, None, dims=dims, pc=cfg.parallel, grad_accum_steps=1, max_norm=0.0,
                     chat=True, device=torch.device("cpu"), param_dtype=torch.float32, mesh=model.mesh,
                     stage_ids=model.stage_ids, num_stages=model.num_stages, model_args=cfg.model)
    out = []
    for inputs, labels in batches:
        keys = ("input_ids", "pixel_values", "aspect_ratio_ids", "aspect_ratio_mask", "cross_attention_mask")
        out.append(step.evaluate([{**dict(zip(keys, inputs)), "labels": labels}], 1, chat=True))
    return out


def main():
    env = detect_launch_env()
    torch.set_num_threads(1)
    pdist.init_distributed(env, torch.device("cpu"))
    for name, overrides in LAYOUTS.items():
        cfg = compose_job(*MODEL, *overrides)
        dims = validate_job(cfg, env.world_size)
        g = torch.Generator().manual_seed(3)
        inputs, sees = rule_batch(cfg.model, g)
        other = (inputs[0], torch.randn(inputs[1].shape, generator=g), *inputs[2:])
        labels = torch.randint(0, cfg.model.vocab_size, sees.shape, generator=g)
        unseen, seen = labels.masked_fill(sees, -100), labels.masked_fill(~sees, -100)
        got = losses(cfg, dims, [(inputs, unseen), (other, unseen), (inputs, seen), (other, seen)])
        if env.rank == 0:
            print(json.dumps({"layout": name, "unseen": got[:2], "seen": got[2:]}), flush=True)
    pdist.shutdown_distributed()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
