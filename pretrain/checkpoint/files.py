"""Checkpoint files as data, never code: DCP's ``.metadata`` read by an unpickler that
admits exactly the classes DCP writes, non-tensor entries (optimizer ``param_groups``)
and RNG states loaded with ``torch.load(weights_only=True)``, and every file's size and
CRC32 recorded while it is written and checked before a load.

A checkpoint may come from anywhere (``checkpoint.load_path``, a copied run dir): a
crafted file is refused with its name (``CheckpointError``, exit 4) before anything in
it can run."""
from __future__ import annotations

import bisect
import io
import json
import logging
import math
import os
import pickle
import random
import re
import stat
import threading
import zlib
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, Iterable, Optional, Tuple

import numpy as np
import torch
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.filesystem import FileSystem, _StorageInfo
from torch.distributed.checkpoint.metadata import (BytesStorageMetadata, ChunkStorageMetadata, Metadata,
                                                   MetadataIndex, TensorProperties, TensorStorageMetadata)

log = logging.getLogger("pretrain")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: missing, incomplete, corrupt, crafted, of another
    shape, or one that could not be written."""


class CheckpointMismatch(CheckpointError):
    """A sound checkpoint that does not fit this job (another model shape, weights only):
    the config is at fault, not the files, so nothing is moved aside."""


# -- what DCP pickles into .metadata (torch 2.6 - 2.13), and nothing else ----------------
_DCP_MD = "torch.distributed.checkpoint.metadata"
_ALLOWED = {
    (_DCP_MD, n) for n in ("Metadata", "MetadataIndex", "ChunkStorageMetadata", "TensorStorageMetadata",
                           "BytesStorageMetadata", "TensorProperties", "StorageMeta", "_MEM_FORMAT_ENCODING")
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),  # a name -> torch.layout lookup
    ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"), ("pathlib", "WindowsPath"),
    ("pathlib", "PureWindowsPath"),
    ("collections", "OrderedDict"),
}
_DATA_FILE = re.compile(r"^__\d+_\d+\.distcp$")
MAX_BYTES_ENTRY = 1 << 20  # a pickled non-tensor value (an optimizer hyperparameter) is a few hundred bytes


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refused global {module}.{name} (not a class DCP's metadata holds)")


def checked_file(path: Path, root: Optional[Path] = None) -> Path:
    """``path`` if it is a regular file (not a FIFO, device or directory) whose real
    location is inside ``root`` (default: its own folder): a checkpoint's files are read
    whole, and a FIFO or /dev/zero would hang the job."""
    path = Path(path)
    root = Path(root) if root is not None else path.parent
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None
    except OSError as e:
        raise CheckpointError(f"{path}: unreadable ({e.strerror})") from None
    if not stat.S_ISREG(st.st_mode):
        raise CheckpointError(f"{path}: not a regular file; refused")
    if path.is_symlink() and not Path(os.path.realpath(path)).is_relative_to(os.path.realpath(root)):
        raise CheckpointError(f"{path}: a symbolic link to {os.path.realpath(path)}, outside {root}; refused")
    return path


def _ints(x, n: Optional[int] = None) -> bool:
    return (isinstance(x, (tuple, list, torch.Size)) and (n is None or len(x) == n)
            and all(type(v) is int and v >= 0 for v in x))


def _tiles(size, chunks) -> bool:
    """The chunks cover the tensor exactly once (no gap, no overlap): DCP would leave an
    uncovered part of the target unloaded, silently."""
    if not size:
        return len(chunks) == 1
    if math.prod(size) == 0:
        return True
    bounds = [sorted({0, n} | {c.offsets[d] for c in chunks} | {c.offsets[d] + c.sizes[d] for c in chunks})
              for d, n in enumerate(size)]
    if math.prod(len(b) - 1 for b in bounds) > (1 << 22):
        return False  # more fragments than any layout writes
    count = np.zeros([len(b) - 1 for b in bounds], dtype=np.int32)
    for c in chunks:
        if math.prod(c.sizes):
            count[tuple(slice(bisect.bisect_left(b, o), bisect.bisect_left(b, o + n))
                        for b, o, n in zip(bounds, c.offsets, c.sizes))] += 1
    return bool((count == 1).all())


def _check_metadata(md, f: Path, ckpt: Path) -> None:
    """Everything DCP will act on is of the types and in the ranges it writes."""
    def bad(why: str):
        raise CheckpointError(f"{f}: refused, {why}")

    if not isinstance(md, Metadata) or not isinstance(md.state_dict_metadata, dict):
        bad(f"holds a {type(md).__name__}, not DCP Metadata")
    storage = md.storage_data
    if not isinstance(storage, dict):
        bad(f"storage_data is a {type(storage).__name__}, not a map of entries to files")
    sdm = md.state_dict_metadata
    for key, v in sdm.items():
        if not isinstance(key, str):
            bad(f"entry name {key!r} is not a string")
        if isinstance(v, BytesStorageMetadata):
            continue
        if not isinstance(v, TensorStorageMetadata) or not isinstance(v.properties, TensorProperties) \
                or not isinstance(v.properties.dtype, torch.dtype) or not _ints(v.size) \
                or not isinstance(v.chunks, list):
            bad(f"entry {key!r} is not a tensor description DCP writes")
        for c in v.chunks:
            if not isinstance(c, ChunkStorageMetadata) or not _ints(c.offsets, len(v.size)) \
                    or not _ints(c.sizes, len(v.size)) or any(o + n > m for o, n, m in zip(c.offsets, c.sizes, v.size)):
                bad(f"entry {key!r} has a chunk outside its size {list(v.size)}")
        if not _tiles(tuple(v.size), v.chunks):
            bad(f"the chunks of entry {key!r} do not cover its size {list(v.size)} exactly once")
    sizes: Dict[str, int] = {}
    for idx, info in storage.items():
        if not isinstance(idx, MetadataIndex) or idx.fqn not in sdm or not isinstance(info, _StorageInfo):
            bad(f"storage entry {getattr(idx, 'fqn', idx)!r} is not one of its tensors or values")
        rel = info.relative_path
        if not isinstance(rel, str) or not _DATA_FILE.match(rel):
            bad(f"names data file {rel!r} (DCP writes __<rank>_<n>.distcp in the checkpoint folder)")
        if info.transform_descriptors:
            bad(f"entry {idx.fqn!r} asks for stream transforms {list(info.transform_descriptors)!r}, which this "
                "trainer never writes")
        if type(info.offset) is not int or type(info.length) is not int or info.offset < 0 or info.length < 0:
            bad(f"entry {idx.fqn!r} has offset {info.offset!r} and length {info.length!r}")
        if isinstance(sdm[idx.fqn], BytesStorageMetadata) and info.length > MAX_BYTES_ENTRY:
            bad(f"value {idx.fqn!r} is {info.length} bytes (at most {MAX_BYTES_ENTRY}: hyperparameters)")
        if rel not in sizes:
            sizes[rel] = checked_file(ckpt / rel, ckpt).stat().st_size
        if info.offset + info.length > sizes[rel]:
            raise CheckpointError(f"{ckpt / rel}: {sizes[rel]} bytes, but {f.name} places {idx.fqn!r} at "
                                  f"{info.offset} + {info.length} (truncated?)")


def read_dcp_metadata(path: Path) -> Metadata:
    """The ``.metadata`` of checkpoint ``path`` as data; ``CheckpointError`` naming the
    file when it is missing, not DCP metadata, or describes anything DCP does not write
    (data files outside the folder or not regular files, stream transforms, chunks that
    do not tile their tensor, entries past the end of their file)."""
    f = Path(path) / ".metadata"
    if not f.exists():
        raise CheckpointError(f"checkpoint {path}: missing {f} (incomplete or not DCP)")
    try:
        with open(checked_file(f), "rb") as fh:
            md = _MetadataUnpickler(fh).load()
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 (pickle raises many types on bad input)
        raise CheckpointError(f"{f}: refused, not DCP metadata ({type(e).__name__}: {e}); a checkpoint is "
                              "read as data, never run as code") from None
    _check_metadata(md, f, Path(path))
    return md


class SafeReader(FileSystemReader):
    """DCP's file reader with the metadata read by ``read_dcp_metadata``."""

    def read_metadata(self, *args, **kwargs) -> Metadata:
        if kwargs.get("rank") is not None:
            raise CheckpointError(f"{self.path}: per-rank DCP metadata is not read by this trainer")
        md = read_dcp_metadata(Path(self.path))
        if getattr(md, "storage_meta", None) is not None:
            md.storage_meta.load_id = self.load_id
        return md


class SafeLoadPlanner(DefaultLoadPlanner):
    """Non-tensor entries (optimizer hyperparameters) loaded with ``weights_only=True``:
    DCP's default planner unpickles them with ``weights_only=False``."""

    def __init__(self, ckpt: Path, **kw):
        super().__init__(**kw)
        self.ckpt = Path(ckpt)

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        from torch.distributed.checkpoint._traverse import set_element

        try:
            obj = torch.load(value, weights_only=True)
        except Exception as e:  # noqa: BLE001
            info = (self.metadata.storage_data or {}).get(read_item.storage_index) if self.metadata else None
            where = self.ckpt / getattr(info, "relative_path", "<a .distcp file>")
            why = load_error(e)
            if isinstance(e, pickle.UnpicklingError):
                raise CheckpointError(f"{where}: entry {read_item.dest_index.fqn!r} refused, not plain data ({why}); "
                                      "a checkpoint is read as data, never run as code") from None
            raise CheckpointError(f"{where}: entry {read_item.dest_index.fqn!r} unreadable, the file is damaged "
                                  f"({why[:160]})") from None
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


def load_dcp(state: dict, path: Path, **kw) -> None:
    """``dcp.load`` of checkpoint ``path`` into ``state`` through the safe reader and
    planner. DCP wraps each rank's error in ``CheckpointException`` (a BaseException):
    a signal's exception goes on as itself, a ``CheckpointError`` of ours (naming the
    file) as it is, anything else as ``CheckpointError`` naming the checkpoint."""
    import torch.distributed.checkpoint as dcp

    try:
        dcp.load(state, storage_reader=SafeReader(str(path)), planner=SafeLoadPlanner(path), **kw)
    except CheckpointError:
        raise
    except (Exception, CheckpointException) as e:  # noqa: BLE001
        reraise_interrupt(e)
        inner = dcp_failure(e)
        if isinstance(inner, CheckpointError):
            raise type(inner)(str(inner)) from None
        raise CheckpointError(f"checkpoint {path} could not be read: {describe_error(e)}") from None


def dcp_failure(e: BaseException) -> BaseException:
    """The first underlying exception of DCP's ``CheckpointException`` (a BaseException
    that wraps each rank's error), else ``e``."""
    if isinstance(e, CheckpointException):
        for _, wrapped in sorted(e.failures.items()):
            inner = wrapped[0] if isinstance(wrapped, tuple) else wrapped
            if isinstance(inner, BaseException):
                return inner
    return e


def _chain(e: BaseException):
    """``e`` and every exception behind it: causes, contexts, and each rank's failure
    inside DCP's ``CheckpointException``."""
    seen, stack = set(), [e]
    while stack:
        x = stack.pop()
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        yield x
        if isinstance(x, CheckpointException):
            stack.extend(w[0] if isinstance(w, tuple) else w for w in x.failures.values())
        stack.extend([x.__cause__, x.__context__])


def reraise_interrupt(e: BaseException) -> None:
    """Signals' exceptions go on as themselves (KeyboardInterrupt, ``signals.Interrupted``),
    not as a checkpoint error, wherever they were raised: DCP wraps each rank's error, and
    torch's C++ file writer turns one raised in its write callback into a RuntimeError
    ("enforce fail at inline_container.cc") whose context it is."""
    for x in _chain(e):
        if not isinstance(x, (Exception, CheckpointException)):
            raise x


def os_error_of(e: BaseException) -> Optional[OSError]:
    """An OSError behind ``e`` (DCP wraps it; torch.save's writer turns a failed write
    into "enforce fail at inline_container.cc" with the OSError as its context)."""
    for x in _chain(e):
        if isinstance(x, OSError) and x.errno is not None:
            return x
    return None


def describe_error(e: BaseException) -> str:
    """One line: the path and errno of an OSError behind ``e`` (ENOSPC: "disk full"),
    else the exception."""
    ose = os_error_of(e)
    if ose is not None:
        what = {28: "disk full", 122: "disk quota exceeded", 30: "read-only file system"}.get(ose.errno, "")
        name = f"{ose.filename}: " if ose.filename else ""
        return f"{name}[Errno {ose.errno}] {os.strerror(ose.errno)}{f' ({what})' if what else ''}"
    inner = dcp_failure(e)
    return f"{type(inner).__name__}: {str(inner).strip().splitlines()[-1] if str(inner).strip() else ''}"


# -- per-file sizes and CRC32s, computed while writing ---------------------------------------
class _CrcStream(io.RawIOBase):
    """Write-through wrapper that keeps the CRC32 and size of what went through it; a
    seek elsewhere than the end marks the running CRC invalid (recomputed from disk)."""

    def __init__(self, raw, record):
        self.raw, self._record, self.crc, self.size, self.sequential = raw, record, 0, 0, True

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        n = self.raw.write(b)
        view = memoryview(b).cast("B")[:n] if n is not None else memoryview(b).cast("B")
        self.crc = zlib.crc32(view, self.crc)
        self.size += len(view)
        return len(view)

    def tell(self) -> int:
        return self.raw.tell()

    def seek(self, pos, whence=0):
        out = self.raw.seek(pos, whence)
        if out != self.size:
            self.sequential = False
        return out

    def seekable(self) -> bool:
        return True

    def flush(self) -> None:
        if not self.raw.closed:
            self.raw.flush()

    def fileno(self) -> int:
        return self.raw.fileno()

    def close(self) -> None:
        if not self.closed:
            self.raw.close()
            self._record(self)
        super().close()


class _CrcFileSystem(FileSystem):
    def __init__(self):
        super().__init__()
        self.files: Dict[str, Tuple[int, int]] = {}
        self._lock = threading.Lock()

    @contextmanager
    def create_stream(self, path, mode):
        if "w" not in mode:
            with super().create_stream(path, mode) as s:
                yield s
            return
        path = Path(path)

        def record(s: _CrcStream) -> None:
            entry = (s.size, s.crc) if s.sequential else file_crc(path)
            with self._lock:
                self.files[path.name] = entry

        with open(path, mode) as raw:
            s = _CrcStream(raw, record)
            try:
                yield s
            finally:
                s.close()


class CrcWriter(FileSystemWriter):
    """DCP's file writer that records each data file's size and CRC32 as it writes
    (``files``); ``.metadata`` is summed by the caller after the save."""

    def __init__(self, path, **kw):
        super().__init__(path, **kw)
        self.fs = _CrcFileSystem()

    @property
    def files(self) -> Dict[str, Tuple[int, int]]:
        return {k: v for k, v in self.fs.files.items() if _DATA_FILE.match(k)}


def file_crc(path: Path, chunk: int = 8 << 20) -> Tuple[int, int]:
    """(size, CRC32) of a file, read in pieces."""
    crc, size = 0, 0
    with open(path, "rb") as f:
        while block := f.read(chunk):
            crc = zlib.crc32(block, crc)
            size += len(block)
    return size, crc


def write_file(path: Path, data: bytes) -> Tuple[int, int]:
    """Writes ``data``; returns (size, CRC32) for the manifest."""
    with open(path, "wb") as f:
        f.write(data)
    return len(data), zlib.crc32(data)


# The run's tokenizer file, copied into each checkpoint by kind of vocabulary (the bundled
# llama3 one is no file): what an export made anywhere else writes beside the weights.
TOKENIZER_FILES = {"hf": "tokenizer/tokenizer.json", "tiktoken": "tokenizer/tokenizer.model"}
_MANIFEST_NAME = re.compile(r"^(\.metadata|__\d+_\d+\.distcp|rng/rank-\d+\.pt|loader/dp-\d+\.json"
                            r"|tokenizer/tokenizer\.json|tokenizer/tokenizer\.model)$")


def check_manifest_names(ckpt: Path, files: Dict[str, list]) -> None:
    """A manifest names the files a checkpoint of this trainer has, inside its folder."""
    for rel in files:
        if not _MANIFEST_NAME.match(rel):
            raise CheckpointError(f"{ckpt / 'meta.json'}: 'files' lists {rel!r}, not a file of a checkpoint "
                                  "(.metadata, __<r>_<n>.distcp, rng/rank-<r>.pt, loader/dp-<r>.json, "
                                  "tokenizer/tokenizer.json|.model); refused")


def verify_files(ckpt: Path, files: Dict[str, list], mine: Iterable[str]) -> None:
    """The files in ``mine`` (this rank's share of the manifest ``files``) exist with
    their size and CRC32. ``CheckpointError`` names the first bad file."""
    check_manifest_names(ckpt, files)
    for rel in mine:
        size, crc = files[rel]
        f = ckpt / rel
        if not f.exists():
            raise CheckpointError(f"{f}: missing; the checkpoint is incomplete")
        have = checked_file(f, ckpt).stat().st_size
        if have != size:
            raise CheckpointError(f"{f}: {have} bytes, {size} when written (truncated or replaced)")
        if file_crc(f)[1] != crc:
            raise CheckpointError(f"{f}: CRC32 differs from the one recorded when it was written (corrupt)")


# -- RNG states as tensors and numbers -------------------------------------------------------
def rng_state() -> dict:
    """This process's RNG states as tensors, ints and floats only (``weights_only`` loads
    them). CUDA: this process's device only (a resume with another number of visible
    devices per process still loads it)."""
    import numpy as np

    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"format": 2, "python": [version, list(internal), gauss],
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def save_rng(path: Path) -> Tuple[int, int]:
    buf = io.BytesIO()
    torch.save(rng_state(), buf)
    return write_file(path, buf.getvalue())


def load_rng(path: Path) -> None:
    """Restores the RNG states saved by ``save_rng`` (or by earlier versions, whose numpy
    arrays load through torch's allowlist of numpy's array classes)."""
    import numpy as np

    legacy = [np._core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))] \
        if hasattr(np, "_core") else []
    checked_file(path, Path(path).parent.parent)
    try:
        with torch.serialization.safe_globals(legacy):
            state = torch.load(path, weights_only=True)
        if state.get("format") == 2:
            py, nq = state["python"], state["numpy"]
            random.setstate((py[0], tuple(py[1]), py[2]))
            np.random.set_state((nq["kind"], nq["keys"].numpy().astype(np.uint32), nq["pos"], nq["has_gauss"],
                                 nq["cached_gaussian"]))
        else:  # format 1: (python state tuple, numpy state tuple)
            random.setstate(state["python"])
            np.random.set_state(state["numpy"])
        torch.set_rng_state(state["torch"])
        if "cuda" in state:
            _restore_cuda_rng(state["cuda"], path)
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 (unpickling refusals, wrong shapes and types)
        raise CheckpointError(f"{path}: refused, not an RNG state of this trainer ({load_error(e)}); a checkpoint "
                              "is read as data, never run as code") from None


def _restore_cuda_rng(cuda, path: Path) -> None:
    """Onto this process's current device: the state of the device the saving rank used
    (any index: a resume under another GPU-to-process mapping still gets its rank's
    stream). A list (an older version's one state per visible GPU) gives this device's
    entry when it has one; otherwise the CUDA generator keeps its seed, and we say so."""
    def is_state(t) -> bool:
        return isinstance(t, torch.Tensor) and t.dtype == torch.uint8 and t.dim() == 1 and t.numel() > 0

    if not (is_state(cuda) or (isinstance(cuda, (list, tuple)) and cuda and all(map(is_state, cuda)))):
        raise CheckpointError(f"{path}: its 'cuda' entry is not a CUDA RNG state (a non-empty 1-D uint8 tensor, or "
                              f"a list of them); a checkpoint is read as data, never run as code")
    if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
        return  # this process computes on the CPU: its CUDA generator is not used
    if isinstance(cuda, torch.Tensor):
        torch.cuda.set_rng_state(cuda)
        return
    index = torch.cuda.current_device()
    if index < len(cuda):
        torch.cuda.set_rng_state(cuda[index])
    else:
        log.warning("%s: CUDA RNG saved for %d devices, this process uses device %d: CUDA RNG not restored "
                    "(dropout masks on GPU differ from the uninterrupted run)", path, len(cuda), index)


def load_error(e: BaseException) -> str:
    """The line of a ``torch.load`` failure that says what was refused (torch's message
    ends with advice that names nothing)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    useful = [ln for ln in lines if not ln.startswith(("Weights only load failed", "Check the documentation",
                                                       "(1)", "(2)"))]
    return ((useful or lines or [type(e).__name__])[0])[:300]


META_CRC = "meta_crc"


def _meta_crc(meta: dict) -> int:
    """The CRC32 of a meta.json's content, its own ``meta_crc`` left out."""
    return zlib.crc32(json.dumps({k: v for k, v in meta.items() if k != META_CRC}, sort_keys=True).encode())


def meta_text(meta: dict) -> str:
    """``meta.json``'s text, with the CRC32 of its own content (under ``meta_crc``): the file
    that says what the others hold checks itself too, so a damaged byte in it (a layer
    count, a dimension) reads as corruption, to fall back from, not as a changed config."""
    return json.dumps({**{k: v for k, v in meta.items() if k != META_CRC}, META_CRC: _meta_crc(meta)})


def check_meta_crc(data: dict, path: Path) -> None:
    """A meta.json read back against its ``meta_crc`` (checkpoints of earlier versions have none)."""
    if META_CRC in data and data[META_CRC] != _meta_crc(data):
        raise CheckpointError(f"{path}: CRC32 differs from the one recorded when it was written (corrupt)")


MAX_JSON_BYTES = 64 << 20  # meta.json and loader states are kilobytes


def read_json(path: Path, what: str) -> dict:
    try:
        if Path(path).exists():
            checked_file(path, Path(path).parent.parent)
            if Path(path).stat().st_size > MAX_JSON_BYTES:
                raise CheckpointError(f"{path}: {Path(path).stat().st_size} bytes, too large for {what}")
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing ({what})") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable or not JSON ({e}) ({what})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: not a JSON object ({what})")
    return data

