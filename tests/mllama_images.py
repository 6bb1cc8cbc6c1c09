"""The Mllama family with test images, reached by ``model.family=tests.mllama_images:FAMILY``:
the image data arrives with a later issue, so each sample gets random pixels and a
hand-made ``cross_attention_mask`` drawn from a generator seeded by its own tokens (the
same sample gets the same images in every layout, whatever rank or micro-batch holds it).
Per sample: no image (a text-only row), or 1..max_images images of 1..max_num_tiles tiles
each, every image seen by the tokens from a random position on. Every tanh gate starts at
a random non-zero value (the published init is 0, which would leave the vision tower and
the cross-attention layers without gradient)."""
from __future__ import annotations

import dataclasses

import torch

from pretrain.model.mllama import FAMILY as MLLAMA
from pretrain.model.mllama import inputs as mllama_inputs
from pretrain.model.mllama.model import Mllama


class OpenGates(Mllama):
    @torch.no_grad()
    def init_weights(self, seed: int = 0, init_fn=None) -> None:
        super().init_weights(seed, init_fn)
        for fqn, p in self.named_parameters():
            if "gate" in fqn:
                init_fn(p, 1.0, fqn)  # the shard-aware seeded init: a layout-invariant value


def synthetic_images(tokens: torch.Tensor, args) -> dict:
    b, s = tokens.shape
    i, t, c, px = args.max_images, args.max_num_tiles, args.num_channels, args.image_size
    out = {"pixel_values": torch.zeros(b, i, t, c, px, px), "aspect_ratio_ids": torch.zeros(b, i, dtype=torch.long),
           "aspect_ratio_mask": torch.zeros(b, i, t, dtype=torch.long),
           "cross_attention_mask": torch.zeros(b, s, i, t, dtype=torch.long)}
    tiles_of = [r[0] * r[1] for r in args.supported_aspect_ratios]
    for row in range(b):
        g = torch.Generator().manual_seed(int((tokens[row].long() * torch.arange(1, s + 1)).sum()))
        n_images = int(torch.randint(0, i + 1, (1,), generator=g))
        for img in range(n_images):
            ar = int(torch.randint(0, len(tiles_of), (1,), generator=g))
            n_tiles = tiles_of[ar]
            out["pixel_values"][row, img, :n_tiles] = torch.randn(n_tiles, c, px, px, generator=g)
            out["aspect_ratio_ids"][row, img] = ar + 1
            out["aspect_ratio_mask"][row, img, :n_tiles] = 1
            start = int(torch.randint(0, s, (1,), generator=g))
            out["cross_attention_mask"][row, start:, img, :n_tiles] = 1
    return out


def inputs(batch: dict, device: torch.device, args):
    return mllama_inputs({**batch, **synthetic_images(batch["input_ids"], args)}, device, args)


FAMILY = dataclasses.replace(MLLAMA, build=lambda args, seq_len: OpenGates(args, rope_cache_len=seq_len),
                             inputs=inputs, image_towers=())  # its batches carry images: no warning
