"""Which tokenizer a job uses: a given tokenizer.json, or a BPE trained on the job's own
corpus once and cached (trained by one process per node, checked equal on every rank)."""
from __future__ import annotations

import logging

from data_pipeline.text_folder import list_text_files
from data_pipeline.tokenizer import HFTokenizer, bpe_cache_path, corpus_sample, train_bpe
from parallel import distributed as pdist
from parallel.env import LaunchEnv

log = logging.getLogger("pretrain")


def load_tokenizer(data_cfg, env: LaunchEnv) -> HFTokenizer:
    tc = data_cfg.tokenizer
    if tc.path:
        return HFTokenizer(tc.path)
    files = list_text_files(data_cfg.root, data_cfg.glob, data_cfg.max_file_bytes)
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
