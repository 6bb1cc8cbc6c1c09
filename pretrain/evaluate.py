"""Validation: the mean next-token loss (and perplexity) over ``eval.steps`` held-out
batches, read in order and packed like training, under any parallel layout. Chat
held-out data (``eval.format=chat``, by default when training is chat SFT) is rendered,
masked and packed like chat training, and its loss is the mean over the assistant tokens
of all batches and ranks.

The held-out loader is built afresh for every evaluation, so each one sees the same
batches; it has its own sources and no worker processes, and the forward pass draws no
random numbers, so an evaluation leaves training's data order and RNG untouched."""
from __future__ import annotations

from typing import Iterator

from data_pipeline.loader import LoaderSpec, RankLoader

from .config import eval_format
from .tokenizers import build_sources, image_spec


class Evaluator:
    def __init__(self, cfg, tokenizer, *, dp_rank: int, dp_world: int):
        ev, t = cfg.eval, cfg.train
        self.interval, self.steps = ev.interval, ev.steps
        self.tokenizer = tokenizer
        images = image_spec(cfg)
        # Labels hold -100 (chat; image-text data): the loss is the mean over trained tokens.
        self.chat = eval_format(cfg) == "chat" or images is not None
        if eval_format(cfg) == "chat":  # the chat special tokens: fail at start-up, not at the first evaluation
            from data_pipeline.chat import ChatRenderer

            ChatRenderer(tokenizer)
        self.sources, _, self.names = build_sources(ev.data, prefix="eval.data.", fmt=eval_format(cfg),
                                                    images=images is not None)
        self.spec = LoaderSpec(
            seq_len=t.seq_len, local_batch_size=t.local_batch_size if ev.local_batch_size == -1 else ev.local_batch_size,
            dp_rank=dp_rank, dp_world=dp_world, num_workers=0, seed=t.seed, shuffle=False, grad_accum_steps=1,
            streams_per_row=1, positions=cfg.data.document_masking, sft_packing=cfg.data.sft_packing,
            max_length=cfg.data.max_length, image=images)

    def due(self, step: int, total_steps: int) -> bool:
        return self.interval > 0 and (step % self.interval == 0 or step == total_steps)

    def batches(self) -> Iterator[dict]:
        """This rank's ``steps`` held-out batches, the same ones at every evaluation (a
        held-out set smaller than that is read again from its start)."""
        loader = RankLoader(self.sources, [1.0], self.tokenizer, self.spec)
        try:
            for _ in range(self.steps):
                yield next(loader)
        finally:
            loader.close()
