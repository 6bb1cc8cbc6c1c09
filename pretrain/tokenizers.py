"""Which tokenizer a job uses: a given tokenizer.json, or a BPE trained on the job's own
corpus once and cached (trained by one process per node, checked equal on every rank)."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

from data_pipeline.tokenizer import HFTokenizer, bpe_cache_path, corpus_sample, train_bpe
from parallel import distributed as pdist
from parallel.env import LaunchEnv

log = logging.getLogger("pretrain")


def load_tokenizer(data_cfg, files: Sequence[Path], env: LaunchEnv) -> HFTokenizer:
    """``files``: the job's corpus in sorted order (the BPE trains on its first bytes)."""
    tc = data_cfg.tokenizer
    if tc.path:
        return HFTokenizer(tc.path)
    texts = corpus_sample(files, tc.train_bytes)
    path = bpe_cache_path(tc.cache_dir, texts, tc.vocab_size)
    if env.local_rank == 0 and not path.exists():
        log.info("training a %d-token BPE on %d files (%.1f MB) -> %s", tc.vocab_size, len(texts),
                 sum(map(len, texts)) / 1e6, path)
        train_bpe(texts, tc.vocab_size, path)
    pdist.barrier()
    tok = HFTokenizer(path)
    prints = set(pdist.all_gather_object(tok.fingerprint))
    if len(prints) != 1:
        raise RuntimeError(f"ranks disagree on the tokenizer ({sorted(prints)}); is {tc.cache_dir} "
                           "different per node with different corpora?")
    return tok
