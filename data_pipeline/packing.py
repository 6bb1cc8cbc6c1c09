"""Documents -> token windows of seq_len+1 (inputs and shifted labels). Each document is
wrapped as <|begin_of_text|> ... <|end_of_text|>; a remainder carries into the next window."""
from __future__ import annotations

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
