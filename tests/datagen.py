"""Generated corpora for data tests: documents with unique, checkable content."""
from __future__ import annotations

import gzip
import json
import random
from pathlib import Path
from typing import List

WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho "
         "sigma tau upsilon phi chi psi omega river stone cloud forest ember lantern harbor "
         "meadow quartz willow").split()


def make_docs(n: int, seed: int = 0, min_words: int = 5, max_words: int = 60) -> List[str]:
    rng = random.Random(seed)
    return [f"doc {i:05d}: " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(min_words, max_words)))
            for i in range(n)]


def write_jsonl(path: Path, docs: List[str], field: str = "text") -> Path:
    lines = (json.dumps({field: d, "id": i}) for i, d in enumerate(docs))
    data = ("\n".join(lines) + "\n").encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".gz":
        path.write_bytes(gzip.compress(data))
    elif path.suffix == ".zst":
        import zstandard

        path.write_bytes(zstandard.ZstdCompressor().compress(data))
    else:
        path.write_bytes(data)
    return path


def write_parquet(path: Path, docs: List[str], row_group_size: int, field: str = "text") -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({field: docs, "id": list(range(len(docs)))}), path, row_group_size=row_group_size)
    return path
