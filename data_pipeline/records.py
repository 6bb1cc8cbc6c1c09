"""Documents that carry more than text: records with items (images) and conversations
with images, and the reference to an image that a worker thread reads and decodes.

Sources yield these payloads; ``stream.Encoder`` turns them into tokens and items in the
loader's parallel stage (reading and decoding an image dominates the cost)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

# The text that marks an image inside a record's text or a chat message.
IMAGE_TEXT = "<|image|>"


@dataclass(frozen=True)
class ImageRef:
    """An image not yet read: ``data`` (its bytes, from a Parquet cell or a datasets row) or
    ``path`` (a local path or an fsspec URL, already resolved against the record's file).
    ``where`` names the record in logs (file and line, row or byte offset)."""

    where: str
    path: Optional[str] = None
    data: Optional[bytes] = None

    def __post_init__(self):
        if (self.path is None) == (self.data is None):
            raise ValueError("an ImageRef has either a path or bytes")


class Record:
    """A document with a payload: text parts around marker tokens, and one *item* (a dict of
    numpy arrays, an image for instance, or an ``ImageRef`` the encoder turns into one) per
    marker. Its tokens are ``enc(texts[0]) <marker> enc(texts[1]) <marker> ...``
    (``len(texts) == len(items) + 1``). Items travel with their tokens through packing and
    reach the batch as extra keys (``loader.RankLoader``); a loader state never holds them:
    a resumed run reads them again from the record."""

    __slots__ = ("texts", "items", "where")

    def __init__(self, texts: Sequence[str], items: Sequence, where: str = ""):
        if len(texts) != len(items) + 1:
            raise ValueError(f"a record of {len(items)} items needs {len(items) + 1} text parts, got {len(texts)}")
        self.texts, self.items, self.where = list(texts), list(items), where


class ChatRecord:
    """A conversation (``chat.Messages``) whose user turns hold ``IMAGE_TEXT`` once per
    image, and its images in that order."""

    __slots__ = ("messages", "items", "where")

    def __init__(self, messages: Tuple[Tuple[str, str], ...], items: Sequence, where: str = ""):
        self.messages, self.items, self.where = tuple(messages), list(items), where
