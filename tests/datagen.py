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


def write_image_records(root: Path, n: int, seed: int = 0) -> Path:
    """``root/records.jsonl`` of ``n`` image-text records for a tiny Mllama (28-pixel tiles,
    up to 2 tiles and 2 images): a fifth text-only, the rest one or two pictures drawn by
    ``pretrain.demo_vision.draw`` (one or two coloured shapes) of 1 or 2 tiles, captioned,
    the files in ``root/img/`` named relative to the records."""
    import numpy as np

    from pretrain.demo_vision import draw

    rng = np.random.default_rng(seed)
    (root / "img").mkdir(parents=True, exist_ok=True)
    sizes = [(28, 28), (56, 28), (28, 56), (40, 30)]
    with open(root / "records.jsonl", "w") as f:
        for i in range(n):
            kind = i % 5
            if kind == 0:
                f.write(json.dumps({"text": " ".join(make_docs(1, seed=seed * 1000 + i, max_words=12))}) + "\n")
                continue
            paths, captions = [], []
            for j in range(1 + (kind >= 3)):
                img, caption = draw(rng)
                w, h = sizes[int(rng.integers(len(sizes)))]
                rel = f"img/{i}-{j}.png"
                img.resize((w, h)).save(root / rel)
                paths.append(rel)
                captions.append(caption)
            text = "<|image|>" + " then <|image|>".join(captions) if len(paths) > 1 else captions[0]
            f.write(json.dumps({"image": paths if len(paths) > 1 else paths[0], "text": text}) + "\n")
    return root / "records.jsonl"
