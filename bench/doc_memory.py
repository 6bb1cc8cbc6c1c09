"""Memory of one long document through the loader's path: read it from a JSONL line,
decode the JSON, tokenize it, wrap it for the packer (int64 tokens). Reported: the peak
RSS above the RSS before reading, per byte of the line. The basis of the default of
``data.max_doc_bytes``.

    python bench/doc_memory.py --mb 64 --modes chunked
    python bench/doc_memory.py --mb 16 --modes chunked,whole

The document is the standard library's top-level sources, concatenated and repeated to
``--mb`` MiB (ASCII code: ~4 characters per token). ``chunked`` tokenizes as the loader
does (``encode_batch`` cuts a long document at safe points, ~1 MiB per tokenizer call);
``whole`` makes one tokenizer call for the whole document (as the loader did before).
Each (tokenizer, mode) runs in a fresh process; the peak is VmHWM, reset through
/proc/self/clear_refs before the document is read. The last line is key=value pairs."""
from __future__ import annotations

import argparse
import glob
import json
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _status_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {key} in /proc/self/status")


def _stdlib_text() -> str:
    files = sorted(glob.glob(sysconfig.get_paths()["stdlib"] + "/*.py"))
    return "".join(Path(f).read_text(encoding="utf-8", errors="replace") for f in files)


def child(a) -> None:
    import gc

    import numpy as np

    import data_pipeline.tokenizer as T
    from data_pipeline.packing import Packer
    from data_pipeline.sources import SourceSpec, build_source

    base = _stdlib_text()
    work = Path(a.workdir)
    if a.tokenizer == "llama3":
        tok = T.Llama3Tokenizer()
    else:
        path = work / "bpe.json"
        tok = T.HFTokenizer(path) if path.exists() else T.train_bpe([base[:2_000_000]], 4096, path)
    if a.mode == "whole":
        T.ENCODE_CHUNK_CHARS = 1 << 62
    line = work / f"doc-{a.mb}.jsonl"
    if not line.exists():
        text = (base * (a.mb * 2**20 // len(base) + 1))[:a.mb * 2**20]
        line.write_text(json.dumps({"text": text}) + "\n")
        del text
    size = line.stat().st_size
    src = build_source(SourceSpec("jsonl", str(line), max_doc_bytes=1 << 40))
    packer = Packer(4097, tok.bos_id, tok.eos_id)
    tok.encode_batch([base[:100_000]])  # warm-up: lazy tables, thread pools
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    before = _status_kb("VmRSS")
    n_tokens = 0
    for unit in src.units:
        for _, _, text in src.iter_docs(unit, 0, lambda *_: None):
            flat, off = tok.encode_batch([text])
            wrapped = packer.wrap(np.asarray(flat[off[0]:off[1]]))
            n_tokens += len(wrapped)
            del text, flat, off, wrapped
    peak = _status_kb("VmHWM")
    print(json.dumps({"tokenizer": a.tokenizer, "mode": a.mode, "bytes": size, "tokens": n_tokens,
                      "peak_mb": (peak - before) / 1024, "per_byte": (peak - before) * 1024 / size}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mb", type=int, default=64, help="document size, MiB")
    p.add_argument("--tokenizers", default="llama3,bpe")
    p.add_argument("--modes", default="chunked",
                   help="chunked, whole or chunked,whole (whole: one tokenizer call, GBs at 64 MiB)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--tokenizer", help=argparse.SUPPRESS)
    p.add_argument("--mode", help=argparse.SUPPRESS)
    p.add_argument("--workdir", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        child(a)
        return
    rows = []
    with tempfile.TemporaryDirectory() as work:
        for tok in a.tokenizers.split(","):
            for mode in a.modes.split(","):
                out = subprocess.run([sys.executable, __file__, "--child", "--tokenizer", tok, "--mode", mode,
                                      "--mb", str(a.mb), "--workdir", work],
                                     capture_output=True, text=True, check=True).stdout
                rows.append(json.loads(out.strip().splitlines()[-1]))
                r = rows[-1]
                print(f"{r['tokenizer']:7s} {r['mode']:8s} {r['bytes'] / 2**20:7.1f} MiB line "
                      f"{r['tokens']:>11,} tokens  peak +{r['peak_mb']:8.1f} MB  {r['per_byte']:6.1f} B/B",
                      flush=True)
    print(" ".join(f"{r['tokenizer']}_{r['mode']}_per_byte={r['per_byte']:.1f}" for r in rows))


if __name__ == "__main__":
    main()
