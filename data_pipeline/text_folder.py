"""A folder of text files as a stream of documents, one document per file, in an
order that is a pure function of (seed, epoch)."""
from __future__ import annotations

import random
from pathlib import Path
from typing import Iterator, List, Tuple


def list_text_files(root: str, glob: str, max_file_bytes: int) -> List[Path]:
    base = Path(root)
    if not base.is_dir():
        raise FileNotFoundError(f"data.root={root!r} is not a directory")
    files = sorted(
        f for f in base.glob(glob)
        if f.is_file() and 0 < f.stat().st_size <= max_file_bytes
    )
    if not files:
        raise FileNotFoundError(
            f"data.glob={glob!r} matched no non-empty file of at most {max_file_bytes} bytes "
            f"under data.root={root!r}"
        )
    return files


def epoch_order(n: int, seed: int, epoch: int, shuffle: bool) -> List[int]:
    order = list(range(n))
    if shuffle:
        random.Random(f"{seed}:{epoch}").shuffle(order)
    return order


def iter_documents(
    files: List[Path], seed: int, shuffle: bool, start_epoch: int = 0
) -> Iterator[Tuple[int, str]]:
    """Yields (epoch, text) forever, epoch after epoch."""
    epoch = start_epoch
    while True:
        for i in epoch_order(len(files), seed, epoch, shuffle):
            yield epoch, files[i].read_text(encoding="utf-8", errors="replace")
        epoch += 1
