"""Data sources as lists of *units* read by position.

A unit is the smallest piece a loader slot reads on its own: a text file, a byte range of
an uncompressed JSONL file (lines are owned by the range they start in), a whole
compressed JSONL file, a Parquet row group, a range of rows of a saved Hugging Face
dataset, a block of documents of pretokenized shards, or an image file (image_folder).
Listing units is cheap (sizes, Parquet metadata, manifests), so every rank lists the same
units at start-up.

Inside a unit a document is addressed by a *cursor*: the byte offset from the range start
(uncompressed JSONL), the line number (compressed JSONL), the row (Parquet, datasets,
pretokenized) or 0 (a text file, an image file). ``iter_docs(unit, cursor)`` resumes there
directly: by seek for JSONL, by row for the rest; only compressed JSONL, which has no random
access, re-decompresses up to the cursor.

Bad records (malformed JSON, a missing or non-string field, invalid UTF-8, empty
documents, empty files, JSONL lines longer than ``max_doc_bytes``, a truncated or corrupt
compressed stream after its last whole line) are skipped and reported through
``on_skip(where, reason)``; so is a unit whose file vanished or became unreadable after
listing (any ``OSError`` while reading it). A missing path, an empty glob or an unreadable
file raises at listing time with the path. Text cells of Parquet and datasets rows and
text files longer than ``max_doc_bytes`` are cut to it (at a character boundary) and
reported through ``on_truncate(where)``. No record is ever held whole in memory before its
size is known to be within ``max_doc_bytes``, except a Parquet or datasets cell (their
readers load a column at a time).

A document's *payload* is one of:

- ``str``: a text (text_folder, jsonl, parquet, hf_dataset);
- ``chat.Messages``, a tuple of (role, content): a conversation (jsonl with
  ``format=chat``, records ``{"messages": [...]}``; see chat.py);
- ``records.Record``: text parts around images (``records.ImageRef``, read and decoded
  later by the loader's workers), only with ``image_field`` set: caption records
  ``{image_field: ..., field: ...}`` of jsonl, parquet and hf_dataset, and image_folder
  (an image file and its caption in ``<stem>.txt``). A record without the image field (or
  with null or ``[]``) is a plain text;
- ``records.ChatRecord``: a conversation with images (jsonl ``format=chat`` with
  ``image_field`` set, records ``{"messages": [...], "images": [...]}``);
- ``np.ndarray``: the token ids of a pretokenized document.

An image value is a path (local, or an fsspec URL: s3://, http(s)://, file://, ...), bytes
(a Parquet binary cell), ``{"bytes": b or None, "path": p or None}`` (how ``datasets``'
``Image`` feature stores one: the bytes if any, else the path) or a list of these. A
relative path is resolved against the folder of the record's file (jsonl, parquet) or the
dataset folder (hf_dataset), remote ones included (``resolve_image_path``); a path is never
read here. A text holding ``records.IMAGE_TEXT`` holds it once per image (the images go
there); a text without it follows its images. Records with a malformed image value, a
count of markers other than of images, or image bytes over ``max_doc_bytes`` are skipped."""
from __future__ import annotations

import errno
import gzip
import io
import json
import os
import posixpath
import re
import stat
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, List, Optional, Tuple, Union

import numpy as np

from .chat import IMAGES_KEY, UnknownRoleError, parse_record
from .records import IMAGE_TEXT, ChatRecord, ImageRef, Record
from .runs import BLANK, DataError, NoDocumentRun

SkipFn = Callable[[str, str], None]
TruncateFn = Callable[[str], None]
# (cursor of this document, cursor after it, payload: see the module docstring)
Doc = Tuple[int, int, Any]

DEFAULT_GLOBS = {
    "text_folder": "**/*.txt",
    "jsonl": "**/*.jsonl*",
    "parquet": "**/*.parquet",
    "image_folder": "**/*",  # then only IMAGE_EXTENSIONS
}
SOURCE_KINDS = ("text_folder", "jsonl", "parquet", "hf_dataset", "pretokenized", "image_folder")
# image_folder: the files that are images (case-insensitive); a caption is <stem>.txt.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
# Default of data.max_doc_bytes (see the README for the measurement behind it).
MAX_DOC_BYTES = 64 << 20
# zstd input is decompressed this many bytes at a time: at most 32768x as much output
# (an RLE block), 128 MiB, even for a hostile stream; ~4-20x for text.
_ZSTD_READ = 4096
# Lines over max_doc_bytes are stepped over, and a byte range's first line start found,
# in reads of at most this many bytes.
_SCAN_BYTES = 1 << 20


@dataclass
class SourceSpec:
    kind: str
    path: str
    glob: Optional[str] = None
    field: str = "text"
    max_file_bytes: int = 100_000_000
    chunk_bytes: int = 1 << 20
    rows_per_unit: int = 1024
    split: Optional[str] = None
    name: str = ""
    # The config key prefix named in errors (data. or data.mixture.<i>.).
    key: str = "data."
    # text | chat (jsonl only: records {"messages": [...]}, payloads are message tuples).
    format: str = "text"
    # JSONL lines longer than this are skipped unread; longer text cells and text files
    # are cut to it; records with image bytes (Parquet, datasets) longer than it are skipped.
    max_doc_bytes: int = MAX_DOC_BYTES
    # The record field (JSONL key, Parquet / datasets column) of a record's images; None:
    # images off (payloads are texts and conversations; image_folder refuses to build).
    # Set by the trainer for a model that takes images. format=chat reads "images" instead
    # (chat.IMAGES_KEY): this only turns images on.
    image_field: Optional[str] = None


def _fs(path: str):
    import fsspec

    fs, root = fsspec.core.url_to_fs(path)
    return fs, root


def _is_local(fs) -> bool:
    return type(fs).__name__ == "LocalFileSystem"


def open_binary(fs, path: str):
    """Local files with the builtin open (fsspec's path handling costs ~1 ms per open);
    remote ones (object stores, HTTP) through ``RemoteFile`` (retried reads, read-ahead
    that starts small after a seek) under a ``BufferedReader`` for a bounded ``readline``."""
    if _is_local(fs):
        return open(path, "rb")
    return io.BufferedReader(RemoteFile(fs, path), 1 << 16)


def _reading_until(f, end: Optional[int]) -> None:
    """Tells a remote file (``RemoteFile``) where its reader means to stop: read-ahead
    goes little past ``end``. Other files: nothing to do."""
    raw = getattr(f, "raw", None)
    if isinstance(raw, RemoteFile):
        raw.end = end


# Reads of remote files are retried REMOTE_READ_ATTEMPTS times in all, REMOTE_RETRY_DELAY
# seconds after the first failure and twice as long after each next one, when the failure
# is transient: a connection refused, reset or cut mid-response, a timeout, an HTTP 5xx
# (or 408, 429). A missing object (404), a refusal (403) or another 4xx, and an object
# replaced while it is read, are not retried: they raise at once (an ``OSError``, so the
# unit is a counted skip, like a vanished local file); so does a transient failure that
# outlasts the attempts (``RemoteReadError``). These retries come on top of the client's
# own: s3fs retries a cut or failed connection 5 times (0.1 s, x1.7), botocore an HTTP
# 5xx/429 or a connection error per its retry mode (AWS_RETRY_MODE, AWS_MAX_ATTEMPTS;
# legacy by default: 5 attempts); what gets through those is retried here.
REMOTE_READ_ATTEMPTS = 5
REMOTE_RETRY_DELAY = 0.1
# A remote file is fetched in blocks: the first after an open or a seek of READAHEAD_MIN
# bytes (a resume reads little of a large file), each next one in a sequential read
# twice the size of the last, up to READAHEAD_MAX (few requests for a long read). With
# an ``end`` (a JSONL byte range's), blocks stop READAHEAD_TAIL bytes past it (the rest of
# the range's last line, mostly), and past it they start at that size again and double.
READAHEAD_MIN, READAHEAD_MAX, READAHEAD_TAIL = 64 << 10, 8 << 20, 16 << 10


class RemoteReadError(OSError):
    """A transient failure to read a remote file that outlasted the retries."""


class RemoteFileChanged(OSError):
    """A remote file reopened after a failed read is not the one first opened."""


_TRANSPORT_ERRORS: Optional[tuple] = None


def _transport_errors() -> tuple:
    """Exception types of HTTP clients that mean a failed connection or response (not an
    HTTP status): they are not ``OSError``s."""
    global _TRANSPORT_ERRORS
    if _TRANSPORT_ERRORS is None:
        import http.client

        found: list = [http.client.HTTPException]
        for module, names in (("botocore.exceptions", ("HTTPClientError", "ConnectionError", "IncompleteReadError")),
                              ("aiohttp", ("ClientError",)), ("urllib3.exceptions", ("HTTPError",))):
            try:
                mod = __import__(module, fromlist=list(names))
            except ImportError:
                continue
            found.extend(getattr(mod, n) for n in names if hasattr(mod, n))
        _TRANSPORT_ERRORS = tuple(found)
    return _TRANSPORT_ERRORS


def _http_status(e: BaseException) -> Optional[int]:
    response = getattr(e, "response", None)
    if isinstance(response, dict):  # botocore's ClientError
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    elif response is not None:  # requests' HTTPError
        status = getattr(response, "status_code", None)
    else:
        status = getattr(e, "status", None)  # aiohttp's ClientResponseError
    return status if isinstance(status, int) else None


def _transient(e: BaseException) -> bool:
    """Whether a failed remote read is worth retrying (see REMOTE_READ_ATTEMPTS). The HTTP
    status decides where one is known: s3fs raises ``OSError``s caused by the client's error."""
    chain, seen = e, set()
    while chain is not None and id(chain) not in seen:
        seen.add(id(chain))
        if isinstance(chain, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError,
                              RemoteFileChanged)) \
                or type(chain).__name__ == "FileExpired":  # s3fs: the object changed while open
            return False
        status = _http_status(chain)
        if status is not None:
            return status >= 500 or status in (408, 429)
        chain = chain.__cause__ or chain.__context__
    if isinstance(e, OSError):
        return e.errno != errno.EINVAL  # s3fs's errno for most 4xx
    return isinstance(e, _transport_errors())


class RemoteFile(io.RawIOBase):
    """A remote file of an fsspec filesystem, read by position with retries (see
    REMOTE_READ_ATTEMPTS): a failed fetch is tried again on a reopened file at the same
    offset, so the bytes returned are the file's whatever failed on the way. Reopening
    checks that the file is the one first opened (size, ETag where the filesystem has one);
    a changed file raises ``OSError``. Fetches blocks (see READAHEAD_MIN; ``end``: where the
    reader means to stop) through the filesystem's file without its own cache."""

    def __init__(self, fs, path: str, end: Optional[int] = None):
        super().__init__()
        self._fs, self._path, self.end = fs, path, end
        self._f = None
        self._id: Optional[tuple] = None
        self._pos = 0
        self._block, self._block_at, self._next = b"", 0, READAHEAD_MIN
        self._retry(None, "open")
        self.name = path

    def _reopen(self) -> None:
        self._drop()
        f = self._fs.open(self._path, "rb", cache_type="none")
        details = getattr(f, "details", None) or {}
        size = getattr(f, "size", None)
        ident = (size if size is not None else self._fs.size(self._path), details.get("ETag"))
        if self._id is not None and ident != self._id:
            f.close()
            raise RemoteFileChanged(f"{self._path} changed while it was read (size, ETag {self._id} -> {ident})")
        self._f, self._id = f, ident

    def _drop(self) -> None:
        f, self._f = self._f, None
        if f is not None:
            try:
                f.close()
            except Exception:  # noqa: BLE001 (a broken connection's file: nothing to keep)
                pass

    def _retry(self, fn: Optional[Callable[[], Any]], what: str):
        """``fn()`` (None: just open) on the open file, reopened first after a failure."""
        for attempt in range(REMOTE_READ_ATTEMPTS):
            try:
                if self._f is None:
                    self._reopen()
                return fn() if fn is not None else None
            except Exception as e:  # noqa: BLE001 (which ones are retried: _transient)
                if not _transient(e):
                    status = _http_status(e)
                    if isinstance(e, OSError) or status is None:
                        raise
                    # An HTTP client's own error for a status, not an OSError: raised as one (a skip).
                    kind = {401: PermissionError, 403: PermissionError, 404: FileNotFoundError,
                            410: FileNotFoundError}.get(status, OSError)
                    raise kind(f"{self._path}: {what}: HTTP {status} ({type(e).__name__}: {e})") from e
                self._drop()
                if attempt + 1 == REMOTE_READ_ATTEMPTS:
                    raise RemoteReadError(f"{self._path}: {what} failed {REMOTE_READ_ATTEMPTS} times, the last with "
                                          f"{type(e).__name__}: {e}") from e
                time.sleep(REMOTE_RETRY_DELAY * 2 ** attempt)

    @property
    def size(self) -> int:
        return self._id[0]

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self.size}[whence]
        if base + offset < 0:
            raise ValueError(f"negative seek position {base + offset}")
        self._pos = base + offset
        return self._pos

    def readinto(self, buf) -> int:
        pos, want = self._pos, len(buf)
        if pos >= self.size or not want:
            return 0
        at = pos - self._block_at
        if not 0 <= at < len(self._block):
            sequential = self._block and pos == self._block_at + len(self._block)
            self._next = min(2 * self._next, READAHEAD_MAX) if sequential else READAHEAD_MIN
            n, end = self._next, self.end
            if end is not None:
                n = min(n, end - pos + READAHEAD_TAIL) if pos < end else min(max(pos - end, READAHEAD_TAIL), n)
            n = min(n, self.size - pos)  # less than ``want`` at times: the caller reads on
            self._block, self._block_at, at = self._fetch(pos, n), pos, 0
        got = min(want, len(self._block) - at)
        buf[:got] = self._block[at:at + got]
        self._pos += got
        return got

    def _fetch(self, pos: int, n: int) -> bytes:
        def read():
            self._f.seek(pos)
            data = self._f.read(n)
            if len(data) != n:
                raise OSError(f"{self._path}: read {len(data)} bytes at {pos}, expected {n}")
            return data

        return self._retry(read, f"reading bytes {pos}-{pos + n - 1}")

    def close(self) -> None:
        self._drop()
        self._block = b""
        super().close()


def _first_line_start(f, a: int, b: int) -> Optional[int]:
    """The offset of the first line that starts in [a, b) (a > 0): after the first
    newline in [a-1, b-1); None when there is none (the range lies inside one line)."""
    pos, end, size = a - 1, b - 1, 4096
    f.seek(pos)
    while pos < end:
        piece = f.read(min(size, end - pos))
        if not piece:
            return None
        i = piece.find(b"\n")
        if i >= 0:
            return pos + i + 1
        pos += len(piece)
        size = _SCAN_BYTES
    return None


def _skip_line(f) -> Tuple[int, bool]:
    """Read past the next newline (or to the end) in bounded reads: (bytes read, whether
    they ended with a newline)."""
    n = 0
    while True:
        piece = f.readline(_SCAN_BYTES)
        n += len(piece)
        if not piece or piece.endswith(b"\n"):
            return n, bool(piece)


def _read_line(f, limit: int, rewind: bool) -> Tuple[Optional[bytes], int]:
    """(the next line, its length in bytes) if it has at most ``limit`` bytes before its
    newline; (None, length) for a longer one, which is read past in bounded pieces, never
    held whole; (b"", 0) at the end. A line longer than ``_SCAN_BYTES`` is measured
    first: with ``rewind`` (a seekable file) by reading to its end in bounded pieces and
    seeking back to read it only when it fits, so a skipped line costs ``_SCAN_BYTES`` of
    memory; without (a decompressed stream), by holding up to ``limit`` bytes of it."""
    first = min(limit, _SCAN_BYTES)
    line = f.readline(first + 1)
    if len(line) <= first or line.endswith(b"\n"):
        return line, len(line)
    if limit <= _SCAN_BYTES:  # limit + 1 bytes without a newline
        return None, len(line) + _skip_line(f)[0]
    if rewind:
        start = f.tell() - len(line)
        n, newline = _skip_line(f)
        n += len(line)
        if n - newline > limit:
            return None, n
        f.seek(start)
        return f.read(n), n
    line += f.readline(limit - first)
    if len(line) > limit and not line.endswith(b"\n"):
        return None, len(line) + _skip_line(f)[0]
    return line, len(line)


def _utf8_prefix(raw: bytes, limit: int) -> bytes:
    """The first ``limit`` bytes of UTF-8 ``raw``, moved back to a character boundary."""
    if len(raw) <= limit:
        return raw
    cut = limit
    while cut > 0 and (raw[cut] & 0xC0) == 0x80:
        cut -= 1
    return raw[:cut]


def _cut_text(value: str, limit: int) -> Optional[str]:
    """``value`` cut to at most ``limit`` UTF-8 bytes at a character boundary, or None
    when it is within the limit."""
    if len(value) <= limit // 4:  # at most 4 bytes per character
        return None
    if len(value) <= limit:
        raw = value.encode("utf-8", "surrogatepass")
        if len(raw) <= limit:
            return None
    else:
        raw = value[:limit].encode("utf-8", "surrogatepass")  # >= limit bytes
    return _utf8_prefix(raw, limit).decode("utf-8", "surrogatepass")


class _TruncatedStream(EOFError):
    """A compressed stream that ends inside a frame; the message is the skip reason."""


class _ZstdStream(io.RawIOBase):
    """A zstd file (one or more frames) decompressed ``_ZSTD_READ`` input bytes at a
    time. ``zstandard``'s stream reader ends silently at the cut of a truncated file;
    this raises ``_TruncatedStream`` there, after everything decoded before the cut."""

    def __init__(self, raw):
        import zstandard

        self._raw, self._dctx = raw, zstandard.ZstdDecompressor()
        self._obj = self._dctx.decompressobj()
        self._in_frame = False  # the current frame has input but has not ended
        self._out, self._pos, self._done = b"", 0, False

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        while self._pos >= len(self._out):
            if self._done:
                return 0
            self._decompress_more()
        n = min(len(buf), len(self._out) - self._pos)
        buf[:n] = memoryview(self._out)[self._pos:self._pos + n]
        self._pos += n
        return n

    def _decompress_more(self) -> None:
        data = self._raw.read(_ZSTD_READ)
        if not data:
            if self._in_frame:
                raise _TruncatedStream("truncated zstd stream")
            self._done = True
            return
        out = []
        while data:
            out.append(self._obj.decompress(data))
            self._in_frame = True
            if not self._obj.eof:
                break
            data = self._obj.unused_data  # the next frame's start
            self._obj, self._in_frame = self._dctx.decompressobj(), False
        self._out, self._pos = b"".join(out), 0


def _has_magic(s: str) -> bool:
    return any(c in s for c in "*?[")


def list_files(spec: SourceSpec) -> Tuple[Any, List[str]]:
    """(filesystem, sorted file paths): ``path`` is a file, a folder searched with
    ``glob``, or a glob itself; local paths or fsspec URLs."""
    fs, root = _fs(spec.path)
    pattern = spec.glob or DEFAULT_GLOBS.get(spec.kind, "**/*")
    if _has_magic(root):
        files = fs.glob(root)
    elif fs.isdir(root):
        files = fs.glob(root.rstrip("/") + "/" + pattern)
    elif fs.exists(root):
        files = [root]
    else:
        raise FileNotFoundError(f"{spec.key}path={spec.path!r}: no such file or directory")
    files = sorted(f for f in files if fs.isfile(f))
    if not files:
        raise FileNotFoundError(f"{spec.key}glob={pattern!r} matched no file under {spec.key}path={spec.path!r}")
    if _is_local(fs):
        for f in files:
            if not os.access(f, os.R_OK):
                raise PermissionError(f"{spec.key}path: cannot read {f}")
    return fs, files


class Source:
    """Base: ``units`` (a list), ``iter_docs(unit, cursor)``, ``unit_label(unit)``."""

    tokenized = False  # payloads are token arrays (pretokenized) rather than text

    @property
    def chat(self) -> bool:
        """Payloads are conversations (``chat.Messages``) rather than text."""
        return self.spec.format == "chat"

    def __init__(self, spec: SourceSpec):
        self.spec = spec
        self.units: List[tuple] = []
        self.listing_skipped: List[Tuple[str, str]] = []

    def _images(self, base: str) -> Optional["_Images"]:
        """How image values of records under ``base`` become ``ImageRef``s; None: images off."""
        return None if self.spec.image_field is None else _Images(self.spec, base)

    def iter_docs(self, unit, cursor: int, on_skip: SkipFn, on_truncate: Optional[TruncateFn] = None):
        """The documents of ``unit`` from ``cursor`` on, as (cursor, cursor after, payload).
        ``on_skip(where, reason)`` hears each skipped record, and each blank JSONL line with
        the reason ``BLANK`` (no record, but read: counted toward the no-document limits).
        A unit whose file vanished or became unreadable (an ``OSError`` while reading it)
        ends with ``on_skip(label, "vanished or unreadable (<error>)")``. The generator
        returns False for a byte range in which no record starts (inside one long line),
        else None."""
        try:
            return (yield from self._iter_docs(unit, cursor, on_skip, on_truncate or _ignore))
        except OSError as e:
            on_skip(self.unit_label(unit), f"vanished or unreadable ({e})")

    def _iter_docs(self, unit, cursor: int, on_skip: SkipFn, on_truncate: TruncateFn) -> Iterator[Doc]:
        raise NotImplementedError

    def _list_file_units(self, units_of: Callable[[str, int], Any], none_left: str,
                         keep: Optional[Callable[[str], bool]] = None) -> None:
        """List the matched files into ``self.units``: ``units_of(path, size)`` returns
        the file's units or a reason to skip it; empty files are skipped (and counted).
        ``keep(path)`` False: a matched file that is not a unit's (not counted)."""
        self.fs, files = list_files(self.spec)
        for f in files:
            if keep is not None and not keep(f):
                continue
            size = self.fs.size(f)
            got = "empty file" if size == 0 else units_of(f, size)
            if isinstance(got, str):
                self.listing_skipped.append((f, got))
            else:
                self.units.extend(got)
        if not self.units:
            raise FileNotFoundError(f"{self.spec.key}path={self.spec.path!r}: {none_left}")

    def unit_label(self, unit) -> str:
        return str(unit)

    @property
    def listing(self) -> str:
        """A fingerprint of what the units are: their labels (file names, byte ranges, row
        groups, shards) relative to the parent of the folder they all share, so that the
        same files under another root (a dataset moved to another mount, or named by another
        path and glob) list the same, while other files, another glob's choice or the same
        count of other units do not. Loader states record it: the saved positions index
        this listing."""
        if getattr(self, "_listing", None) is None:
            import hashlib

            labels = [self.unit_label(u) for u in self.units]
            common = os.path.commonprefix(labels)
            cut = common.rfind("/", 0, max(common.rfind("/"), 0)) + 1  # keep the shared folder's own name
            h = hashlib.sha256()
            for label in labels:
                h.update(label[cut:].encode() + b"\n")
            self._listing = h.hexdigest()[:32]
        return self._listing

    def read_one(self, unit, cursor: int) -> Any:
        """The payload of the document at ``cursor`` (used to rebuild a partly packed one).
        Raises ``OSError`` when its file vanished or cannot be read."""
        for c, _, payload in self._iter_docs(unit, cursor, _ignore, _ignore):
            if c == cursor:
                return payload
            break
        raise RuntimeError(f"no document at cursor {cursor} of {self.unit_label(unit)}: the data changed "
                           "since the checkpoint was written")

    def iter_texts(self) -> Iterator[str]:
        """Every document in listing order (tokenizer training, pretokenizing): texts as
        they are, a ``Record``'s text parts joined (without the image markers), a
        ``ChatRecord``'s messages (as a conversation without images). Like a loader
        stream, stops with ``DataError`` after ``runs.EMPTY_UNITS_LIMIT`` units, or
        ``runs.EMPTY_RECORDS_LIMIT`` records, in a row without a document, rather than
        read a whole corpus of bad records."""
        for _, _, payload in self.iter_all_docs():
            if isinstance(payload, Record):
                yield "".join(payload.texts)
            elif isinstance(payload, ChatRecord):
                yield payload.messages
            else:
                yield payload

    def iter_all_docs(self, on_skip: Optional[SkipFn] = None, on_truncate: Optional[TruncateFn] = None):
        """(unit index, cursor, payload) of every document in listing order, with the loader's
        no-document limits (``runs.NoDocumentRun``); ``on_skip`` also hears every skipped
        record (not blank lines)."""
        run = NoDocumentRun(self, on_skip)
        for u, unit in enumerate(self.units):
            for cursor, _, payload in run.read(u, self.iter_docs(unit, 0, run.on_skip, on_truncate)):
                yield u, cursor, payload

    def __getstate__(self):
        state = dict(self.__dict__)
        state.pop("_cache", None)
        return state


def _ignore(*_) -> None:
    pass


def _decode(raw: bytes, where: str, on_skip: SkipFn) -> Optional[str]:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        on_skip(where, f"invalid UTF-8 at byte {e.start}")
        return None
    if not text:
        on_skip(where, "empty document")
        return None
    return text


_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://")


def _is_url(path: str) -> bool:
    return _URL.match(path) is not None or path.startswith("data:")


def _as_url(fs, path: str) -> str:
    """A path of ``fs`` as something that names it alone: local paths as they are, remote
    ones with their protocol (fsspec lists ``bucket/key`` for ``s3://bucket/key``)."""
    return path if _is_local(fs) else fs.unstrip_protocol(path)


def file_dir(fs, path: str) -> str:
    """The folder of a listed file of ``fs``, as a local path or a URL: what the relative
    image paths of its records are resolved against."""
    return _as_url(fs, (os.path if _is_local(fs) else posixpath).dirname(path.rstrip("/")))


def resolve_image_path(path: str, base: str) -> str:
    """An image path of a record, resolved against ``base`` (``file_dir``): URLs and
    absolute paths as they are, a relative path joined to ``base`` (a local folder or a
    URL: ``img/a.png`` in ``s3://bucket/dir/x.jsonl`` is ``s3://bucket/dir/img/a.png``)."""
    if _is_url(path) or os.path.isabs(path):
        return path
    m = _URL.match(base)
    if m is None:
        return os.path.normpath(os.path.join(base, path))
    return base[:m.end()] + posixpath.normpath(posixpath.join(base[m.end():], path))


def _image_ref(v, base: str, where: str, max_bytes: int, label: str, key: str) -> Union[ImageRef, str]:
    if isinstance(v, dict):  # datasets' Image feature: {"bytes": b or None, "path": p or None}
        data, path = v.get("bytes"), v.get("path")
        if data is not None and not isinstance(data, (bytes, bytearray, memoryview)):
            return f"{label}: bytes is {type(data).__name__}, not bytes"
        if data is None or not len(data):
            if path is None or (isinstance(path, str) and not path):
                return f"{label} holds neither bytes nor a path"
            if not isinstance(path, str):
                return f"{label}: path is {type(path).__name__}, not a string"
        v = data if data is not None and len(data) else path
    if isinstance(v, (bytes, bytearray, memoryview)):
        if not len(v):
            return f"{label} is empty bytes"
        if len(v) > max_bytes:
            return f"{label}: an image of {len(v)} bytes, longer than {key}max_doc_bytes={max_bytes}"
        return ImageRef(where=where, data=bytes(v))
    if isinstance(v, str):
        if not v:
            return f"{label} is an empty path"
        return ImageRef(where=where, path=resolve_image_path(v, base))
    return f"{label} is {type(v).__name__}, not an image (a path, bytes, {{bytes, path}} or a list of them)"


def image_refs(value, base: str, where: str, max_bytes: int, name: str, key: str = "data."
               ) -> Union[List[ImageRef], str]:
    """The images of a record's value ``name`` (see the module docstring): a list, empty
    for null or ``[]``, or the reason to skip the record. Relative paths are resolved
    against ``base``; no path is read."""
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        refs = []
        for i, v in enumerate(value):
            ref = _image_ref(v, base, where, max_bytes, f"image {name!r}[{i}]", key)
            if isinstance(ref, str):
                return ref
            refs.append(ref)
        return refs
    ref = _image_ref(value, base, where, max_bytes, f"image {name!r}", key)
    return ref if isinstance(ref, str) else [ref]


def text_with_images(text: str, refs: List[ImageRef], where: str, on_skip: SkipFn) -> Union[str, Record, None]:
    """A record's text and its images: the text itself without images; a ``Record`` split
    at ``IMAGE_TEXT`` (once per image) or, without it, with the images first; None after
    ``on_skip`` when the markers do not match the images."""
    if not refs:
        return text
    n = text.count(IMAGE_TEXT)
    if not n:
        return Record([""] * len(refs) + [text], refs, where)
    if n != len(refs):
        on_skip(where, f"{n} {IMAGE_TEXT} in the text for {len(refs)} images")
        return None
    return Record(text.split(IMAGE_TEXT), refs, where)


class _Images:
    """A source's image values -> ``ImageRef``s, relative paths against ``base``."""

    def __init__(self, spec: SourceSpec, base: str):
        self.spec, self.base = spec, base

    def refs(self, value, where: str, name: str) -> Union[List[ImageRef], str]:
        return image_refs(value, self.base, where, self.spec.max_doc_bytes, name, self.spec.key)

    def record(self, text: str, value, where: str, on_skip: SkipFn) -> Union[str, Record, None]:
        """``text`` with the images of ``value`` (``text_with_images``), or None after ``on_skip``."""
        refs = self.refs(value, where, self.spec.image_field)
        if isinstance(refs, str):
            on_skip(where, refs)
            return None
        return text_with_images(text, refs, where, on_skip)


def _read_prefix(fs, path: str, limit: int, where: str, on_truncate: TruncateFn) -> bytes:
    """A whole file of at most ``limit`` bytes; a longer one cut to it at a UTF-8 character
    boundary, reported as ``on_truncate(where)``. Never reads more than ``limit + 1``."""
    with open_binary(fs, path) as f:
        raw = f.read(limit + 1)
    if len(raw) > limit:
        raw = _utf8_prefix(raw, limit)
        on_truncate(where)
    return raw


def _whole_files(spec: SourceSpec):
    """Units of a file source whose every file is one document: the file, or a reason to
    skip it (larger than max_file_bytes)."""

    def units(f, size):
        if size > spec.max_file_bytes:
            return f"larger than {spec.key}max_file_bytes={spec.max_file_bytes}"
        return [(f,)]

    return units


class TextFolderSource(Source):
    """One document per file."""

    def __init__(self, spec: SourceSpec):
        super().__init__(spec)
        self._list_file_units(_whole_files(spec), "every matched file is empty or too large")

    def _iter_docs(self, unit, cursor, on_skip, on_truncate):
        if cursor > 0:
            return
        (path,) = unit
        raw = _read_prefix(self.fs, path, self.spec.max_doc_bytes, path, on_truncate)
        text = _decode(raw, path, on_skip)
        if text is not None:
            yield 0, 1, text


# A blank JSONL line holds no record: it is reported to ``on_skip`` with this reason, so
# that readers count it toward their no-document limit (300 MiB of blank lines compress to
# 10 KB), but it is not a skipped record (``data/skipped`` does not count it).


def _jsonl_record(line: bytes, field: str, where: str, on_skip: SkipFn, chat: bool = False,
                  images: Optional[_Images] = None) -> Optional[Any]:
    if not line.strip():
        on_skip(where, BLANK)  # a separator, not a record
        return None
    try:
        obj = json.loads(line)
    except UnicodeDecodeError as e:
        on_skip(where, f"invalid UTF-8 ({e.reason})")
        return None
    except ValueError as e:
        on_skip(where, f"malformed JSON ({e})")
        return None
    if chat:
        resolve = None if images is None else (lambda value: images.refs(value, where, IMAGES_KEY))
        return parse_record(obj, where, on_skip, resolve)
    if not isinstance(obj, dict) or field not in obj:
        on_skip(where, f"no field {field!r}")
        return None
    text = obj[field]
    if not isinstance(text, str):
        on_skip(where, f"field {field!r} is {type(text).__name__}, not a string")
        return None
    if not text:
        on_skip(where, "empty document")
        return None
    if images is not None and obj.get(images.spec.image_field) is not None:
        return images.record(text, obj[images.spec.image_field], where, on_skip)
    return text


class JsonlSource(Source):
    """JSON Lines; ``.gz`` and ``.zst`` files are read as streams (one unit per file),
    plain files in ranges of ``chunk_bytes`` reached by seek. With ``format=chat`` a
    record is a conversation (``chat.parse_record``); a role outside ``chat.ROLES`` is
    an error naming the file and line."""

    def __init__(self, spec: SourceSpec):
        super().__init__(spec)

        def units(f, size):
            if f.endswith((".gz", ".zst")):
                return [(f, 0, -1)]
            return [(f, a, min(a + spec.chunk_bytes, size)) for a in range(0, size, spec.chunk_bytes)]

        self._list_file_units(units, "every matched file is empty")

    def unit_label(self, unit):
        path, a, b = unit
        return path if b < 0 else f"{path}[{a}:{b}]"

    def _too_long(self, n: int) -> str:
        return f"longer than {self.spec.key}max_doc_bytes={self.spec.max_doc_bytes} ({n} bytes)"

    def _iter_docs(self, unit, cursor, on_skip, on_truncate):
        path, a, b = unit
        images = self._images(file_dir(self.fs, path))
        if b < 0:
            yield from self._iter_compressed(path, cursor, on_skip, images)
            return
        limit = self.spec.max_doc_bytes
        with open_binary(self.fs, path) as f:
            _reading_until(f, b)
            pos = a + cursor
            if pos > 0 and cursor == 0:
                # A range starts at the first line that begins inside it: after the first
                # newline in [a-1, b-1), looked for in bounded reads (a long line may span
                # many ranges).
                pos = _first_line_start(f, a, b)
                if pos is None:
                    return False
            f.seek(pos)
            while pos < b:
                line, n = _read_line(f, limit, rewind=True)
                if not n:
                    return
                where = f"{path}@byte{pos}"
                if line is None:
                    on_skip(where, self._too_long(n))
                    text = None
                elif self.chat:
                    text = self._chat_record(line, where, on_skip, path, pos, images=images)
                else:
                    text = _jsonl_record(line, self.spec.field, where, on_skip, images=images)
                line = None  # only the document stays in memory while it is used
                if text is not None:
                    yield pos - a, pos + n - a, text
                pos += n

    def _chat_record(self, line, where, on_skip, path, pos, lineno=None, images=None):
        try:
            return _jsonl_record(line, self.spec.field, where, on_skip, chat=True, images=images)
        except UnknownRoleError as e:
            if lineno is None:  # a plain file read from a byte offset: count its lines (once, to fail)
                lineno = 1
                with open_binary(self.fs, path) as f:
                    for at in range(0, pos, _SCAN_BYTES):
                        lineno += f.read(min(_SCAN_BYTES, pos - at)).count(b"\n")
            raise ValueError(f"{path}:{lineno}: {e} ({self.spec.key}format=chat)") from None

    def _iter_compressed(self, path, cursor, on_skip, images=None):
        import zstandard

        limit = self.spec.max_doc_bytes
        with open_binary(self.fs, path) as raw:
            if path.endswith(".gz"):
                stream = gzip.GzipFile(fileobj=raw)
            else:
                stream = io.BufferedReader(_ZstdStream(raw), 1 << 16)
            lineno = 0
            try:
                while True:
                    line, n = _read_line(stream, limit, rewind=False)
                    if not n:
                        return
                    lineno += 1
                    if lineno <= cursor:
                        continue
                    where = f"{path}:{lineno}"
                    if line is None:
                        on_skip(where, self._too_long(n))
                        continue
                    if self.chat:
                        text = self._chat_record(line, where, on_skip, path, None, lineno, images)
                    else:
                        text = _jsonl_record(line, self.spec.field, where, on_skip, images=images)
                    line = None
                    if text is not None:
                        yield lineno - 1, lineno, text
            except _TruncatedStream as e:  # the documents before the cut were read
                on_skip(path, str(e))
            except (EOFError, gzip.BadGzipFile, zlib.error, zstandard.ZstdError) as e:
                on_skip(path, f"unreadable compressed stream ({e})")  # truncated or corrupt: the rest


class ParquetSource(Source):
    """One unit per row group; only the configured column is read, and with ``image_field``
    the image column too in a file that has one (a file without it holds texts)."""

    def __init__(self, spec: SourceSpec):
        import pyarrow.parquet as pq

        super().__init__(spec)
        self.fs, files = list_files(spec)
        for f in files:
            try:
                pf = pq.ParquetFile(open_binary(self.fs, f))
            except Exception as e:  # noqa: BLE001 (arrow raises several types)
                raise ValueError(f"{spec.key}path: {f} is not a readable Parquet file ({e})") from e
            names = pf.schema_arrow.names
            if spec.field not in names:
                raise ValueError(f"{spec.key}field={spec.field!r}: {f} has no such column (columns: {names})")
            for rg in range(pf.metadata.num_row_groups):
                if pf.metadata.row_group(rg).num_rows:
                    self.units.append((f, rg))
        if not self.units:
            raise FileNotFoundError(f"{spec.key}path={spec.path!r}: every matched Parquet file is empty")

    def unit_label(self, unit):
        return f"{unit[0]}#rowgroup{unit[1]}"

    def _file(self, path):
        import pyarrow.parquet as pq

        cache = self.__dict__.setdefault("_cache", {})
        if path not in cache:
            if len(cache) > 8:
                cache.clear()
            # open_binary: remote files read in blocks with retries, like JSONL (RemoteFile)
            cache[path] = pq.ParquetFile(open_binary(self.fs, path))
        return cache[path]

    def _iter_docs(self, unit, cursor, on_skip, on_truncate):
        path, rg = unit
        limit, field, image_field = self.spec.max_doc_bytes, self.spec.field, self.spec.image_field
        pf = self._file(path)
        images = image_col = None
        if image_field is not None and image_field != field and image_field in pf.schema_arrow.names:
            table = pf.read_row_group(rg, columns=[field, image_field])
            col, image_col = table.column(field), table.column(image_field)
            images = self._images(file_dir(self.fs, path))
        else:
            col = pf.read_row_group(rg, columns=[field]).column(0)
        for row in range(cursor, len(col)):
            value = col[row].as_py()
            where = f"{path}#rowgroup{rg}:row{row}"
            if isinstance(value, bytes):
                if len(value) > limit:
                    value = _utf8_prefix(value, limit)
                    on_truncate(where)
                value = _decode(value, where, on_skip)
            elif value is None:
                on_skip(where, f"field {self.spec.field!r} is null")
                continue
            elif not isinstance(value, str):
                on_skip(where, f"field {self.spec.field!r} is {type(value).__name__}, not a string")
                continue
            elif not value:
                on_skip(where, "empty document")
                continue
            else:
                cut = _cut_text(value, limit)
                if cut is not None:
                    value = cut
                    on_truncate(where)
            if value is not None and images is not None:
                value = images.record(value, image_col[row].as_py(), where, on_skip)
            if value is not None:
                yield row, row + 1, value


# hf_dataset with images: rows read at a time (a unit's images are not all held at once).
_HF_IMAGE_ROWS = 64


class HFDatasetSource(Source):
    """A Hugging Face ``datasets`` dataset saved with ``save_to_disk`` (a DatasetDict
    needs ``split``); units are ranges of ``rows_per_unit`` rows. With ``image_field`` and
    a dataset that has that column, the text and image columns are read as Arrow (an
    ``Image`` feature is never decoded: its cells are ``{"bytes", "path"}``), in slices of
    ``_HF_IMAGE_ROWS`` rows; relative image paths are resolved against the dataset folder."""

    def __init__(self, spec: SourceSpec):
        super().__init__(spec)
        ds = self._dataset()
        if spec.field not in ds.column_names:
            raise ValueError(f"{spec.key}field={spec.field!r}: dataset at {spec.path} has columns {ds.column_names}")
        n = len(ds)
        if n == 0:
            raise FileNotFoundError(f"{spec.key}path={spec.path!r}: the dataset has no rows")
        self.units = [(a, min(a + spec.rows_per_unit, n)) for a in range(0, n, spec.rows_per_unit)]

    def _dataset(self):
        cache = self.__dict__.setdefault("_cache", {})
        if "ds" not in cache:
            import datasets

            fs, root = _fs(self.spec.path)
            if not fs.exists(root):
                raise FileNotFoundError(f"{self.spec.key}path={self.spec.path!r}: no such dataset directory")
            ds = datasets.load_from_disk(self.spec.path)
            if isinstance(ds, datasets.DatasetDict):
                if self.spec.split not in ds:
                    raise ValueError(f"{self.spec.key}split={self.spec.split!r}: {self.spec.path} holds "
                                     f"splits {list(ds)}")
                ds = ds[self.spec.split]
            cache["ds"] = ds
        return cache["ds"]

    def _image_rows(self):
        """(the text and image columns in Arrow format, how their images resolve), or None
        without images (images off, or no such column)."""
        cache = self.__dict__.setdefault("_cache", {})
        if "rows" not in cache:
            field, image_field = self.spec.field, self.spec.image_field
            ds = self._dataset()
            if image_field is None or image_field == field or image_field not in ds.column_names:
                cache["rows"] = None
            else:
                fs, root = _fs(self.spec.path)
                cache["rows"] = (ds.select_columns([field, image_field]).with_format("arrow"),
                                 self._images(_as_url(fs, root.rstrip("/") or root)))
        return cache["rows"]

    def unit_label(self, unit):
        return f"{self.spec.path}[rows {unit[0]}:{unit[1]}]"

    def _iter_docs(self, unit, cursor, on_skip, on_truncate):
        a, b = unit
        rows = self._image_rows()
        step = b - a if rows is None else _HF_IMAGE_ROWS
        for lo in range(a + cursor, b, step):
            hi = min(lo + step, b)
            if rows is None:
                values, image_values, images = self._dataset()[lo:hi][self.spec.field], None, None
            else:
                table, images = rows[0][lo:hi], rows[1]
                values = table.column(self.spec.field).to_pylist()
                image_values = table.column(self.spec.image_field).to_pylist()
            for k, value in enumerate(values):
                i = lo - a + k
                where = f"{self.spec.path}:row{a + i}"
                if not isinstance(value, str):
                    on_skip(where, f"field {self.spec.field!r} is {type(value).__name__}, not a string")
                    continue
                if not value:
                    on_skip(where, "empty document")
                    continue
                cut = _cut_text(value, self.spec.max_doc_bytes)
                if cut is not None:
                    value = cut
                    on_truncate(where)
                if images is not None:
                    value = images.record(value, image_values[k], where, on_skip)
                    if value is None:
                        continue
                yield i, i + 1, value


class ImageFolderSource(Source):
    """One document per image file (``IMAGE_EXTENSIONS``, case-insensitive; other matched
    files are passed over): the image, then its caption, the text of ``<stem>.txt`` in the
    same folder (``text_with_images``: a caption holding ``IMAGE_TEXT`` once puts the image
    there). A missing, empty or non-UTF-8 caption skips the image when it is read; a
    longer caption than ``max_doc_bytes`` is cut to it. Image files larger than
    ``max_file_bytes`` are skipped (and counted) at listing; no image is read here. Needs
    ``image_field`` set (images on); its value is not used."""

    def __init__(self, spec: SourceSpec):
        super().__init__(spec)
        self._list_file_units(_whole_files(spec), f"no matched file is a non-empty image ({' '.join(IMAGE_EXTENSIONS)}) of at "
                                     f"most {spec.key}max_file_bytes={spec.max_file_bytes} bytes",
                              keep=lambda f: f.lower().endswith(IMAGE_EXTENSIONS))

    def unit_label(self, unit):
        return unit[0]

    def _iter_docs(self, unit, cursor, on_skip, on_truncate):
        if cursor > 0:
            return
        (path,) = unit
        caption = posixpath.splitext(path)[0] + ".txt"
        try:
            raw = _read_prefix(self.fs, caption, self.spec.max_doc_bytes, path, on_truncate)
        except FileNotFoundError:
            on_skip(path, f"no caption file ({caption})")
            return
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            on_skip(path, f"caption not UTF-8 ({caption}: invalid byte at {e.start})")
            return
        if not text:
            on_skip(path, f"empty caption ({caption})")
            return
        payload = text_with_images(text, [ImageRef(where=path, path=_as_url(self.fs, path))], path, on_skip)
        if payload is not None:
            yield 0, 1, payload


MANIFEST = "manifest.json"
SHARD_FORMAT = "llama-pretrain-tokens-v1"


class PretokenizedSource(Source):
    """Token shards written by ``python -m data_pipeline.pretokenize``: memory-mapped,
    documents shuffled within blocks of ``rows_per_unit`` and blocks shuffled globally."""

    tokenized = True

    def __init__(self, spec: SourceSpec):
        super().__init__(spec)
        fs, root = _fs(spec.path)
        mpath = root.rstrip("/") + "/" + MANIFEST
        if not fs.exists(mpath):
            raise FileNotFoundError(f"{spec.key}path={spec.path!r}: no {MANIFEST} (make shards with "
                                    "python -m data_pipeline.pretokenize)")
        if not _is_local(fs):
            raise ValueError(f"{spec.key}path={spec.path!r}: pretokenized shards are memory-mapped and must be "
                             "on a local or mounted filesystem")
        self.root = root
        self.manifest = _read_manifest(Path(mpath))
        for i, shard in enumerate(self.manifest["shards"]):
            for a in range(0, shard["n_docs"], spec.rows_per_unit):
                self.units.append((i, a, min(a + spec.rows_per_unit, shard["n_docs"])))
        if not self.units:
            raise FileNotFoundError(f"{spec.key}path={spec.path!r}: the shards hold no documents")
        # Set by the loader: documents are permuted within a unit by (seed, unit).
        self.seed, self.shuffle = 0, True

    @property
    def fingerprint(self) -> str:
        return self.manifest["tokenizer"]["fingerprint"]

    def _shard(self, i):
        cache = self.__dict__.setdefault("_cache", {})
        if i not in cache:
            s = self.manifest["shards"][i]
            tokens = np.memmap(os.path.join(self.root, s["tokens"]), dtype=self.manifest["dtype"], mode="r")
            index = np.load(os.path.join(self.root, s["index"]), mmap_mode="r")
            cache[i] = (tokens, index)
        return cache[i]

    def unit_label(self, unit):
        return f"{self.manifest['shards'][unit[0]]['tokens']}[docs {unit[1]}:{unit[2]}]"

    def _iter_docs(self, unit, cursor, on_skip, on_truncate):
        # Documents were bounded when written: pretokenize applies max_doc_bytes too. The
        # manifest was checked against the files (``_read_manifest``); a document's own
        # offsets and token ids are checked as it is read (a crafted or damaged shard: a
        # counted skip, like any bad record; an id past the vocabulary would fail the step).
        i, a, b = unit
        tokens, index = self._shard(i)
        vocab = self.manifest["tokenizer"]["vocab_size"]
        order = np.random.default_rng([self.seed, i, a]).permutation(b - a) if self.shuffle else None
        for row in range(cursor, b - a):
            d = a + (int(order[row]) if order is not None else row)
            lo, hi = int(index[d]), int(index[d + 1])
            doc = tokens[lo:hi] if 0 <= lo <= hi <= len(tokens) else None
            if doc is not None and (not len(doc) or int(doc.max()) < vocab):
                yield row, row + 1, doc
                continue
            where = f"{os.path.join(self.root, self.manifest['shards'][i]['tokens'])}#doc{d}"
            if doc is None:
                on_skip(where, f"offsets {lo}:{hi} outside the shard's {len(tokens)} tokens (a damaged index)")
            else:
                on_skip(where, f"token id {int(doc.max())} >= the tokenizer's vocabulary {vocab} (a damaged shard)")


MAX_MANIFEST_BYTES = 64 << 20


def _read_manifest(path: Path) -> dict:
    """A shard folder's manifest.json, checked against the files before any is read: a
    JSON object of this format, a known dtype, the tokenizer's fingerprint and vocabulary,
    and per shard its files (plain names of regular files inside the folder), counts that
    are integers, a tokens file of n_tokens x the dtype's bytes and an index of n_docs + 1
    int64 offsets from 0 to n_tokens. ``DataError`` names the file and the field."""
    def bad(field: str, why: str):
        raise DataError(f"{path}: {field} {why}")

    if not path.is_file() or path.stat().st_size > MAX_MANIFEST_BYTES:
        raise DataError(f"{path}: not a regular file of at most {MAX_MANIFEST_BYTES} bytes")
    try:
        m = json.loads(path.read_bytes())
    except ValueError as e:
        raise DataError(f"{path}: not JSON ({e})") from None
    if not isinstance(m, dict):
        raise DataError(f"{path}: a JSON {type(m).__name__}, not an object")
    if m.get("format") != SHARD_FORMAT:
        bad("format", f"is {m.get('format')!r}, expected {SHARD_FORMAT!r}")
    if m.get("dtype") not in ("uint16", "uint32"):
        bad("dtype", f"is {m.get('dtype')!r}, expected uint16 or uint32")
    tok = m.get("tokenizer")
    if not (isinstance(tok, dict) and isinstance(tok.get("fingerprint"), str) and type(tok.get("vocab_size")) is int
            and 1 <= tok["vocab_size"] <= np.iinfo(m["dtype"]).max + 1):
        bad("tokenizer", f"must hold a fingerprint and a vocab_size in [1, {np.iinfo(m['dtype']).max + 1}] (the "
            f"dtype's range), not {tok!r}")
    if not isinstance(m.get("shards"), list):
        bad("shards", "is not a list")
    folder, itemsize = path.parent, np.dtype(m["dtype"]).itemsize
    seen: dict = {}
    for k, shard in enumerate(m["shards"]):
        field = f"shards[{k}]"
        if not isinstance(shard, dict) or any(type(shard.get(x)) is not int or shard[x] < 0
                                              for x in ("n_docs", "n_tokens")):
            bad(field, "must hold n_docs and n_tokens, integers >= 0")
        files = {}
        for key in ("tokens", "index"):
            name = shard.get(key)
            f = folder / name if isinstance(name, str) else None
            if f is None or not name or name != os.path.basename(name) or name in (".", "..") \
                    or not stat.S_ISREG(os.stat(f).st_mode if f.exists() else 0) \
                    or not Path(os.path.realpath(f)).is_relative_to(os.path.realpath(folder)):
                bad(f"{field}.{key}", f"is {name!r}: expected the name of a file in {folder}")
            if name in seen:  # its documents would be read twice an epoch
                bad(f"{field}.{key}", f"is {name!r}, already {seen[name]}")
            seen[name] = f"{field}.{key}"
            files[key] = f
        size = files["tokens"].stat().st_size
        if size != shard["n_tokens"] * itemsize:
            bad(f"{field}.n_tokens", f"is {shard['n_tokens']}, but {files['tokens'].name} holds {size} bytes "
                f"({size / itemsize:g} {m['dtype']} tokens)")
        try:
            index = np.load(files["index"], mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError) as e:
            raise DataError(f"{files['index']}: not a .npy index ({e})") from None
        if index.dtype != np.int64 or index.shape != (shard["n_docs"] + 1,):
            bad(f"{field}.n_docs", f"is {shard['n_docs']}, but {files['index'].name} holds {index.dtype} of shape "
                f"{index.shape} (expected int64 of ({shard['n_docs'] + 1},))")
        if index[0] != 0 or index[-1] != shard["n_tokens"]:
            bad(f"{field}.index", f"{files['index'].name} runs from {index[0]} to {index[-1]}, expected 0 to "
                f"n_tokens={shard['n_tokens']}")
    for key in ("n_docs", "n_tokens"):  # the totals the tool wrote: the sums over the shards
        total = sum(shard[key] for shard in m["shards"])
        if m.get(key, total) != total:
            bad(key, f"is {m.get(key)!r}, but the shards hold {total}")
    return m


def build_source(spec: SourceSpec) -> Source:
    classes = {"text_folder": TextFolderSource, "jsonl": JsonlSource, "parquet": ParquetSource,
               "hf_dataset": HFDatasetSource, "pretokenized": PretokenizedSource,
               "image_folder": ImageFolderSource}
    if spec.kind not in classes:
        raise ValueError(f"{spec.key}source={spec.kind!r}: expected one of {', '.join(classes)}")
    if spec.format not in ("text", "chat"):
        raise ValueError(f"{spec.key}format={spec.format!r}: expected one of text, chat")
    if spec.format == "chat" and spec.kind != "jsonl":
        raise ValueError(f"{spec.key}format=chat: needs {spec.key}source=jsonl, not {spec.kind}")
    if spec.max_doc_bytes < 1:
        raise ValueError(f"{spec.key}max_doc_bytes={spec.max_doc_bytes}: must be > 0")
    if spec.kind == "image_folder" and spec.image_field is None:
        raise ValueError(f"{spec.key}source=image_folder: image-text documents need a model that takes images "
                         "(this job reads no images)")
    return classes[spec.kind](spec)
