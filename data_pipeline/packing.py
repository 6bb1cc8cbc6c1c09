"""Documents -> token windows of seq_len+1 (inputs and shifted labels). Each document is
wrapped as <|begin_of_text|> ... <|end_of_text|>; a remainder carries into the next window."""
from __future__ import annotations

import random
from typing import Iterable, Iterator, List, Sequence


def pack_windows(docs: Iterable[Sequence[int]], seq_len: int, bos_id: int, eos_id: int) -> Iterator[List[int]]:
    window = seq_len + 1
    buf: List[int] = []
    for ids in docs:
        buf.append(bos_id)
        buf.extend(ids)
        buf.append(eos_id)
        while len(buf) >= window:
            yield buf[:window]
            del buf[:window]


def shuffle_windows(windows: Iterable[List[int]], buffer_size: int, seed: int) -> Iterator[List[int]]:
    """Seeded shuffle buffer: consecutive windows of one long document are spread out,
    so a batch mixes documents. Deterministic for a seed, so every rank sees one order."""
    if buffer_size <= 1:
        yield from windows
        return
    rng = random.Random(f"windows:{seed}")
    buf: List[List[int]] = []
    for w in windows:
        if len(buf) < buffer_size:
            buf.append(w)
            continue
        i = rng.randrange(buffer_size)
        yield buf[i]
        buf[i] = w
    rng.shuffle(buf)
    yield from buf
