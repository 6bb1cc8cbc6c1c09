"""python -m data_pipeline.pretokenize: turn any source into token shards.

Output folder:
  tokens-00000.bin   the documents' tokens back to back (uint16 when the vocabulary fits,
                     else uint32), without bos/eos (the packer adds them)
  index-00000.npy    int64 offsets, n_docs + 1: document i is tokens[idx[i]:idx[i+1]]
  manifest.json      format, dtype, tokenizer (kind, fingerprint, vocab size, bos, eos),
                     the shards with their counts, and the source it came from

The manifest is written last, under a temporary name then renamed: a folder without one
is an unfinished run, and the ``pretokenized`` source refuses it. Bad records are skipped
and counted exactly as the streaming loader does, with the same ``--max-doc-bytes`` bound
(longer JSONL lines skipped, longer text cells and files cut), so the shards' documents
are bounded when written."""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
from pathlib import Path
from typing import List, Sequence

import numpy as np

from .sources import MANIFEST, MAX_DOC_BYTES, SHARD_FORMAT, SourceSpec, build_source
from .tokenizer import build_tokenizer

log = logging.getLogger("data_pipeline")


class ShardWriter:
    def __init__(self, out: Path, dtype, shard_tokens: int):
        self.out, self.dtype, self.shard_tokens = out, dtype, shard_tokens
        self.shards: List[dict] = []
        self._toks: List[np.ndarray] = []
        self._lens: List[int] = []
        self._n = 0

    def add(self, tokens: np.ndarray) -> None:
        self._toks.append(tokens.astype(self.dtype, copy=False))
        self._lens.append(len(tokens))
        self._n += len(tokens)
        if self._n >= self.shard_tokens:
            self.flush()

    def flush(self) -> None:
        if not self._lens:
            return
        i = len(self.shards)
        name, index = f"tokens-{i:05d}.bin", f"index-{i:05d}.npy"
        np.concatenate(self._toks).tofile(self.out / name)
        offsets = np.zeros(len(self._lens) + 1, dtype=np.int64)
        np.cumsum(self._lens, out=offsets[1:])
        np.save(self.out / index, offsets)
        self.shards.append({"tokens": name, "index": index, "n_docs": len(self._lens), "n_tokens": int(offsets[-1])})
        self._toks, self._lens, self._n = [], [], 0


def pretokenize(spec: SourceSpec, tokenizer, out: Path, *, shard_tokens: int = 1 << 28,
                batch_docs: int = 256, progress: bool = True) -> dict:
    from tqdm import tqdm

    source = build_source(spec)
    if source.tokenized:
        raise ValueError("--source pretokenized: the input is already tokenized")
    dtype = np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.uint32
    out.mkdir(parents=True, exist_ok=True)
    writer = ShardWriter(out, dtype, shard_tokens)
    skipped, truncated = [0], [0]

    def on_skip(where, reason):
        skipped[0] += 1
        if skipped[0] <= 5:
            log.warning("skipped a record: %s: %s", where, reason)

    def on_truncate(where):
        truncated[0] += 1
        if truncated[0] <= 5:
            log.warning("cut a document to %s=%d bytes: %s", "max_doc_bytes", spec.max_doc_bytes, where)

    n_docs = n_tokens = 0
    bar = tqdm(total=len(source.units), desc="pretokenize", unit="unit", disable=not progress, file=sys.stderr)
    pending: List[str] = []

    def encode(texts):
        nonlocal n_docs, n_tokens
        flat, off = tokenizer.encode_batch(texts)
        for j in range(len(texts)):
            writer.add(np.asarray(flat[off[j]:off[j + 1]]))
        n_docs += len(texts)
        n_tokens += int(off[-1])

    # Stops, like the loader, after a long run of units or records without a document.
    done = 0  # units finished (the bar's own count stays 0 when it is disabled)
    for u, _, text in source.iter_all_docs(on_skip, on_truncate):
        if u > done:
            bar.set_postfix(docs=n_docs, tokens=n_tokens, skipped=skipped[0], refresh=False)
            bar.update(u - done)
            done = u
        pending.append(text)
        if len(pending) >= batch_docs:
            encode(pending)
            pending = []
    bar.update(len(source.units) - done)
    bar.close()
    if pending:
        encode(pending)
    writer.flush()
    manifest = {
        "format": SHARD_FORMAT,
        "dtype": np.dtype(dtype).name,
        "tokenizer": {"kind": getattr(tokenizer, "kind", "?"), "path": getattr(tokenizer, "path", ""),
                      "fingerprint": tokenizer.fingerprint, "vocab_size": tokenizer.vocab_size,
                      "bos_id": tokenizer.bos_id, "eos_id": tokenizer.eos_id},
        "source": {"kind": spec.kind, "path": spec.path, "glob": spec.glob, "field": spec.field,
                   "max_doc_bytes": spec.max_doc_bytes},
        "n_docs": n_docs, "n_tokens": n_tokens, "skipped": skipped[0] + len(source.listing_skipped),
        "truncated_docs": truncated[0],
        "shards": writer.shards,
    }
    tmp = out / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, out / MANIFEST)
    return manifest


# What a run of this tool writes in its output folder: all that --overwrite removes.
_OUTPUT_FILE = re.compile(rf"^(tokens-\d{{5,}}\.bin|index-\d{{5,}}\.npy|{re.escape(MANIFEST)}(\.tmp)?)$")


def inputs_inside(spec: SourceSpec, out: Path) -> List[str]:
    """The input files (or the dataset folder) inside the output folder ``out``: writing
    there, and above all ``--overwrite``, would destroy them. Remote inputs are never
    inside a local folder."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(spec.path)
    if "file" not in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)):
        return []
    if spec.kind == "hf_dataset":
        files = [root]
    else:
        from .sources import list_files

        files = list_files(spec)[1]
    top = Path(os.path.realpath(out))
    return [f for f in files if Path(os.path.realpath(f)).is_relative_to(top)]


def remove_earlier_output(out: Path) -> None:
    """Removes the files an earlier run of this tool wrote in ``out`` (shards, indexes,
    the manifest) and nothing else: whatever else the folder holds stays."""
    mine = sorted(f for f in out.iterdir() if _OUTPUT_FILE.match(f.name) and f.is_file() and not f.is_symlink())
    others = [f.name for f in out.iterdir() if f not in mine]
    for f in mine:
        f.unlink()
    log.info("--overwrite: removed %d file(s) of an earlier run from %s", len(mine), out)
    if others:
        log.warning("--overwrite: %s also holds %s, not written by this tool: left in place", out,
                    ", ".join(others[:5]) + (" ..." if len(others) > 5 else ""))


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m data_pipeline.pretokenize", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", required=True, choices=["text_folder", "jsonl", "parquet", "hf_dataset"])
    p.add_argument("--path", required=True, help="file, folder, glob or fsspec URL")
    p.add_argument("--glob", default=None, help="pattern under a folder path (default per source)")
    p.add_argument("--field", default="text", help="JSON field / column holding the text")
    p.add_argument("--split", default=None, help="split of a saved DatasetDict")
    p.add_argument("--max-file-bytes", type=int, default=100_000_000, help="text_folder: skip larger files")
    p.add_argument("--max-doc-bytes", type=int, default=MAX_DOC_BYTES,
                   help="skip longer JSONL lines, cut longer text cells / files (default 64 MiB)")
    p.add_argument("--tokenizer", default="llama3", choices=["llama3", "tiktoken", "hf"])
    p.add_argument("--tokenizer-path", default=None, help="tokenizer.model (tiktoken) or tokenizer.json (hf)")
    p.add_argument("--shard-tokens", type=int, default=1 << 28, help="tokens per shard file")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the shards of an earlier run in the output folder (only the files this tool writes)")
    p.add_argument("out", type=Path)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    spec = SourceSpec(kind=a.source, path=a.path, glob=a.glob, field=a.field, split=a.split,
                      max_file_bytes=a.max_file_bytes, max_doc_bytes=a.max_doc_bytes, key="--")
    try:
        inside = inputs_inside(spec, a.out)
    except (FileNotFoundError, PermissionError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if inside:
        more = " and more" if len(inside) > 1 else ""
        print(f"error: the output folder {a.out} contains the input ({inside[0]}{more}): write the shards elsewhere",
              file=sys.stderr)
        return 2
    if a.out.exists() and not a.out.is_dir():
        print(f"error: {a.out} exists and is not a folder", file=sys.stderr)
        return 2
    try:  # before anything of an earlier run is removed: a bad tokenizer loses nothing
        tok = build_tokenizer(a.tokenizer, a.tokenizer_path)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if a.out.exists() and any(a.out.iterdir()):
        if not a.overwrite:
            print(f"error: {a.out} exists and is not empty (pass --overwrite to replace the shards of an earlier "
                  "run there)", file=sys.stderr)
            return 2
        remove_earlier_output(a.out)
    try:
        m = pretokenize(spec, tok, a.out, shard_tokens=a.shard_tokens)
    except (FileNotFoundError, PermissionError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {a.out}: {m['n_docs']:,} documents, {m['n_tokens']:,} tokens in {len(m['shards'])} shard(s), "
          f"{m['dtype']}, {m['skipped']} skipped, {m['truncated_docs']} cut to --max-doc-bytes", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
