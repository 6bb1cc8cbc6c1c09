"""Errors and limits shared by the sources and the loader's readers: ``DataError``, the
``BLANK`` skip reason, and the no-document limits (``NoDocumentRun``) that stop a stream
which would otherwise read on forever, epoch after epoch, without a document.

A reader of a source raises ``DataError`` after ``EMPTY_UNITS_LIMIT`` consecutive units, or
``EMPTY_RECORDS_LIMIT`` consecutive records, without a document (every record bad or
blank, every file gone)."""
from __future__ import annotations

import re
from collections import Counter
from typing import Optional

BLANK = "blank line"  # the skip reason of a blank JSONL line: read, but no record


class DataError(ValueError):
    """The data cannot feed training (e.g. no unit yields a document): a config or corpus
    problem, named by its config key, never retried."""


# Consecutive units without a document (per slot and source) that stop the job, or every
# unit of the source in a row, whichever comes first. On a corpus where half the units hold
# no document, a slot sees 64 in a row with probability 0.5**64 = 5e-20 per unit read; on
# one where none does, it takes 64 units (seconds on a small file), or all of them, to say so.
EMPTY_UNITS_LIMIT = 64
# Consecutive records without a document (skipped ones and blank lines), however few units
# hold them: a compressed file is one unit, and 300 MiB of blank lines (10 KB as .zst)
# took minutes to read while the first step waited. A million blank lines read in about a
# second; a real corpus does not hold a million bad records in a row.
EMPTY_RECORDS_LIMIT = 1_000_000


def _returning(gen, box: list):
    """``gen``'s items; its return value is appended to ``box`` when it ends."""
    box.append((yield from gen))


def _reason_kind(reason: str) -> str:
    """A skip reason without its per-record detail (parenthesized error, byte offset)."""
    return re.sub(r" \(.*\)$| at byte \d+", "", reason)


class NoDocumentRun:
    """Units and records read in a row without a document (a new run starts at each
    document), the skips seen in them, and the limits: ``unit_without_document`` raises
    ``DataError`` at ``EMPTY_UNITS_LIMIT`` units, ``on_skip`` at ``EMPTY_RECORDS_LIMIT``
    records (skipped ones and blank lines) inside however few units. ``report(where,
    reason)`` hears every skipped record (not blank lines)."""

    def __init__(self, source, report=None):
        self.source, self.report = source, report
        self._start()

    def _start(self) -> None:
        self.units, self.distinct, self.skipped, self.blank = 0, set(), 0, 0
        self.kinds: Counter = Counter()
        self.first: Optional[tuple] = None

    def document(self) -> None:
        """A document was read: the run starts over (called for every document: cheap)."""
        if self.units or self.skipped or self.blank:
            self._start()

    def read(self, u: int, docs, from_start: bool = True):
        """``docs`` (the source's ``iter_docs`` of unit ``u``, reporting its skips to
        ``on_skip``), each document starting the run over. A unit read from its start that
        held none extends the run; a byte range inside one long line (``iter_docs`` returns
        False: it holds no record) and the rest of a unit resumed in its middle do not."""
        found, box = False, []
        for item in _returning(docs, box):
            found = True
            self.document()
            yield item
        if not found and from_start and box != [False]:
            self.unit_without_document(u)

    def on_skip(self, where: str, reason: str) -> None:
        if reason is BLANK:
            self.blank += 1
        else:
            self.skipped += 1
            self.kinds[_reason_kind(reason)] += 1
            if self.first is None:
                self.first = (where, reason)
            if self.report is not None:
                self.report(where, reason)
        if self.skipped + self.blank >= EMPTY_RECORDS_LIMIT:
            raise self.error()

    def unit_without_document(self, u: int) -> None:
        """Also every unit of the source, read in a row without a document: nothing will come
        (a one-file corpus of one huge bad line is decompressed once, not 64 times)."""
        self.units += 1
        self.distinct.add(u)
        if self.units >= EMPTY_UNITS_LIMIT or len(self.distinct) >= len(self.source.units):
            raise self.error()

    def error(self) -> DataError:
        source = self.source
        spec = source.spec
        k = spec.key
        top = self.kinds.most_common(1)[0][0] if self.kinds else ""
        if "max_doc_bytes" in top:
            head, keys = f"{k}max_doc_bytes={spec.max_doc_bytes}", [f"{k}max_doc_bytes"]
        elif "field" in top and source.chat:
            head, keys = f"{k}format='chat'", [f"{k}format"]
        elif "field" in top:
            head, keys = f"{k}field={spec.field!r}", [f"{k}field"]
        else:
            head, keys = "", []
        where = f"{k}path={spec.path!r}"
        kinds = ", ".join(f"{kind} x{n}" for kind, n in self.kinds.most_common(3))
        if len(self.kinds) > 3:
            kinds += f", {len(self.kinds) - 3} other reasons"
        records = self.skipped + self.blank
        held = f"{records} records read, {self.skipped} skipped" + (f": {kinds}" if kinds else "")
        if self.blank:
            held += f"; {self.blank} blank lines"
        if self.first is not None:
            held += f"; the first: {self.first[0]}: {self.first[1]}"
        if records >= EMPTY_RECORDS_LIMIT:
            run = f"{records} consecutive records"
        elif len(self.distinct) >= len(self.source.units) and self.units < EMPTY_UNITS_LIMIT:
            run = f"every unit ({len(self.distinct)})"
        else:
            run = f"{self.units} consecutive units ({len(self.distinct)} distinct)"
        what = f"{head}: {run} of {where} held no document" if head else f"{where}: {run} held no document"
        return DataError(f"{what} ({held}); check {' / '.join(keys + [f'{k}path'])}")
