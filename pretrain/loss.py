"""Next-token cross-entropy, whole or chunked.

The whole loss takes the full logits (B, S, vocab): at 131,072 tokens and Llama 3's
128,256-token vocabulary that is 67 GB in fp32 per sequence. The chunked loss
(``train.loss_chunk``) takes the final-normed hidden states instead (the family's
``hidden_output``) and applies the layout's head to one chunk of tokens at a time, under
activation checkpointing: each chunk's logits live only while its cross-entropy is taken,
in the forward and again in the backward (recomputed there). Same sums, in another order."""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

# train.loss_chunk=-1 (auto) turns chunking on when one rank's logits would exceed this
# (fp32), with chunks of AUTO_CHUNK_BYTES of fp32 logits each.
AUTO_ABOVE_BYTES = 1 << 30
AUTO_CHUNK_BYTES = 1 << 28


def resolve_loss_chunk(loss_chunk: int, *, local_batch_size: int, seq_len: int, cp: int, vocab_size: int) -> int:
    """Tokens per chunk of the loss (0: the whole loss). -1 (auto): chunks of 256 MiB of
    fp32 logits (523 tokens for a 128,256 vocabulary) when the rank's logits,
    local_batch_size x seq_len / cp x vocab x 4 bytes, exceed 1 GiB; otherwise whole."""
    if loss_chunk >= 0:
        return loss_chunk
    if local_batch_size * (seq_len // cp) * vocab_size * 4 <= AUTO_ABOVE_BYTES:
        return 0
    return max(1, AUTO_CHUNK_BYTES // (vocab_size * 4))


def next_token_loss(logits: torch.Tensor, labels: torch.Tensor, *, summed: bool) -> torch.Tensor:
    """Cross-entropy in fp32 over (batch x seq) positions, labels -100 ignored: summed
    (chat, weighed by trained tokens later) or the mean."""
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), reduction="sum" if summed else "mean")


def _chunk_sum(h: torch.Tensor, labels: torch.Tensor, logits_of: Callable) -> torch.Tensor:
    return next_token_loss(logits_of(h), labels, summed=True)


def chunked_next_token_loss(h: torch.Tensor, labels: torch.Tensor, logits_of: Callable, chunk_tokens: int, *,
                            summed: bool, seq_shards: int = 1, count: Optional[int] = None) -> torch.Tensor:
    """The loss of ``next_token_loss(logits_of(h), labels)`` without holding more than
    about ``chunk_tokens`` tokens' logits at once.

    ``h`` (B, S / seq_shards, D): this rank's hidden states; under sequence parallel its
    shard r of ``seq_shards`` contiguous ones, whose head gathers the shards of every rank
    (so a chunk's logits rows are every shard's rows, shard-major, and the labels are
    taken in that order). ``labels`` (B, S). ``count``: the number of labels that are not
    -100 when the caller knows it without a device sync (the mean's divisor)."""
    b, local = h.shape[0], h.shape[1]
    lab = labels.reshape(b, seq_shards, local)
    step = max(1, chunk_tokens // (b * seq_shards))
    total = None
    for j in range(0, local, step):
        x, y = h[:, j:j + step], lab[:, :, j:j + step].reshape(b, -1)
        if torch.is_grad_enabled():
            part = checkpoint(_chunk_sum, x, y, logits_of, use_reentrant=False)
        else:
            part = _chunk_sum(x, y, logits_of)
        total = part if total is None else total + part
    if summed:
        return total
    n = count if count is not None else torch.clamp((labels != -100).sum(), min=1)
    return total / n
