"""The job's data sources and tokenizer: built from the config on every rank, the BPE (if
any) trained once per node and cached, and the tokenizer checked equal on every rank and
against pretokenized shards."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

from data_pipeline.sources import Source, SourceSpec, build_source
from data_pipeline.tokenizer import Tokenizer, bpe_cache_path, build_tokenizer, sample_texts, train_bpe
from parallel import distributed as pdist
from parallel.env import LaunchEnv

log = logging.getLogger("pretrain")

def image_spec(cfg):
    """The loader's ``ImageSpec`` for an image-text model family (its ``image_spec`` plus
    data.max_image_pixels), or None for a text-only family."""
    from .model import family_of

    family = family_of(cfg.model)
    if family.image_spec is None:
        return None
    from data_pipeline.images import ImageSpec

    return ImageSpec(**family.image_spec(cfg.model), max_pixels=cfg.data.max_image_pixels)


_SPEC_KEYS = ("path", "glob", "field", "split", "max_file_bytes", "chunk_bytes", "rows_per_unit", "max_doc_bytes")


def build_sources(data_cfg, prefix: str = "data.", fmt: Optional[str] = None, images: bool = False
                  ) -> Tuple[List[Source], List[float], List[str]]:
    """(sources, weights, names) for data.source or data.mixture; ``prefix`` names the
    config keys in errors (eval.data. for the held-out data); ``fmt`` the records' format
    where the config section has no ``format`` key of its own (eval.data)."""
    if data_cfg.source == "mixture":
        entries = [(f"{prefix}mixture.{i}.", e, e.weight, e.name or f"source{i}")
                   for i, e in enumerate(data_cfg.mixture)]
    else:
        entries = [(prefix, data_cfg, 1.0, data_cfg.source)]
    sources, weights, names = [], [], []
    for key, e, weight, name in entries:
        # data.format is a job-level key (DataConfig): mixture entries are text; eval.data
        # gets its format from the caller (eval.format).
        spec = SourceSpec(kind=e.source, key=key, name=name, format=fmt or getattr(e, "format", "text"),
                          image_field=e.image_field if images else None,
                          **{k: getattr(e, k) for k in _SPEC_KEYS})
        sources.append(build_source(spec))
        weights.append(float(weight))
        names.append(name)
    return sources, weights, names


def bpe_corpus(tc, sources: Sequence[Source]) -> Tuple[List[str], Path]:
    """(the texts a data.tokenizer.kind=bpe without a path trains on, the cache file they
    key): the first ``train_bytes`` of the text sources, in listing order."""
    text_sources = [s for s in sources if not s.tokenized]
    if not text_sources:
        raise ValueError("data.tokenizer.kind=bpe without data.tokenizer.path needs a text source to train on")
    texts = sample_texts((t for s in text_sources for t in s.iter_texts()), tc.train_bytes)
    if not texts:  # every record skipped: nothing to train on (and nothing to cache)
        keys = " / ".join(f"{s.spec.key}field={s.spec.field!r} {s.spec.key}path={s.spec.path!r}"
                          for s in text_sources)
        raise ValueError(f"data.tokenizer.kind=bpe: no document to train the tokenizer on in {keys}: every "
                         "record was skipped (check the field and the path)")
    return texts, bpe_cache_path(tc.cache_dir, texts, tc.vocab_size)


def load_tokenizer(data_cfg, sources: Sequence[Source], env: LaunchEnv) -> Tokenizer:
    tc = data_cfg.tokenizer
    if tc.kind == "bpe" and not tc.path:
        texts, path = bpe_corpus(tc, sources)
        if env.local_rank == 0 and not path.exists():
            log.info("training a %d-token BPE on %d documents (%.1f MB) -> %s", tc.vocab_size, len(texts),
                     sum(map(len, texts)) / 1e6, path)
            train_bpe(texts, tc.vocab_size, path)
        pdist.barrier()
        tok = build_tokenizer("hf", str(path))
    else:
        tok = build_tokenizer(tc.kind, tc.path)
    prints = set(pdist.all_gather_object(tok.fingerprint))
    if len(prints) != 1:
        raise RuntimeError(f"ranks disagree on the tokenizer ({sorted(prints)}); is {tc.cache_dir} "
                           "different per node with different corpora?")
    for s in sources:
        if s.tokenized and s.fingerprint != tok.fingerprint:
            made = s.manifest["tokenizer"]
            raise ValueError(
                f"{s.spec.key}path={s.spec.path!r}: shards were made with tokenizer {made.get('kind')} "
                f"{made.get('path', '')} (fingerprint {s.fingerprint}), but data.tokenizer is {tc.kind} "
                f"{getattr(tok, 'path', '')} (fingerprint {tok.fingerprint}); pretokenize again or set "
                "data.tokenizer to the shards' tokenizer")
        if s.tokenized and s.manifest["tokenizer"]["vocab_size"] != tok.vocab_size:
            raise ValueError(f"{s.spec.key}path={s.spec.path!r}: manifest.json tokenizer.vocab_size="
                             f"{s.manifest['tokenizer']['vocab_size']}, but the tokenizer of that fingerprint has "
                             f"{tok.vocab_size} tokens (a damaged or edited manifest)")
    return tok
