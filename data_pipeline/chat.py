"""Supervised fine-tuning data: chat JSONL records rendered in the Llama 3 chat format,
with a mask of the tokens the loss covers, packed whole into windows or one per row.

A record is ``{"messages": [{"role": ..., "content": ...}, ...]}``. It is rendered as
Meta's reference ``ChatFormat`` (llama-models) does: ``<|begin_of_text|>`` then, per
message, ``<|start_header_id|>`` + encode(role) + ``<|end_header_id|>`` + encode("\\n\\n")
+ encode(content.strip()) + ``<|eot_id|>`` (role and content encoded as plain text, so a
special-token string inside a message stays text). The ``tool`` role is rendered with the
``ipython`` header, as Meta's Llama 3.1 template does. The loss covers an assistant
message's content tokens and its closing ``<|eot_id|>`` (the model learns to stop), never
a header or any other role's tokens; labels are ``IGNORE_INDEX`` (-100, PyTorch's default
``ignore_index``) everywhere else, padding included.

Packing (``ChatPacker``): conversations are never split. ``pack`` fills a window of
seq_len+1 tokens with whole conversations in reading order and pads the rest when the
next one does not fit; ``pad`` puts one conversation per window. Padding tokens have the
document key ``PAD_KEY`` (-1). A conversation longer than ``max_length`` tokens is cut to
``max_length`` (and counted as truncated)."""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from .records import IMAGE_TEXT, ChatRecord

IGNORE_INDEX = -100
PAD_KEY = -1
# Roles the loss never covers, and the one it does.
CONTEXT_ROLES = ("system", "user", "ipython", "tool")
TRAINED_ROLE = "assistant"
ROLES = ("system", "user", TRAINED_ROLE, "ipython", "tool")
PACKING_MODES = ("pack", "pad")
# The header a role is rendered with (Llama 3.1: tool results are "ipython" messages).
_HEADER_ROLE = {"tool": "ipython"}

BOS = "<|begin_of_text|>"
START_HEADER = "<|start_header_id|>"
END_HEADER = "<|end_header_id|>"
EOT = "<|eot_id|>"
PAD_TOKEN = "<|finetune_right_pad_id|>"  # Llama 3.1's name for 128004; absent in Llama 3.0 vocabularies

# A parsed conversation: ((role, content), ...).
Messages = Tuple[Tuple[str, str], ...]


class UnknownRoleError(ValueError):
    """A message role outside ``ROLES``: the data uses another schema (fatal, not skipped)."""


# The record key of a conversation's images (read when a source takes images).
IMAGES_KEY = "images"


def parse_record(obj, where: str, on_skip: Callable[[str, str], None],
                 images: Optional[Callable[[Any], Union[list, str]]] = None
                 ) -> Union[Messages, ChatRecord, None]:
    """The messages of one decoded JSON record, or None after ``on_skip(where, reason)``
    for a record that is not ``{"messages": [{"role": str, "content": str}, ...]}`` or has
    no assistant message. Raises ``UnknownRoleError`` for a role outside ``ROLES``.

    ``images`` (None: a record's ``"images"`` are ignored) turns the value of the record's
    ``"images"`` key into a list of ``records.ImageRef`` or a reason to skip it. A record
    with images is a ``ChatRecord``: its user turns hold ``IMAGE_TEXT`` once per image, in
    order, and no other turn holds it (else the record is skipped). No ``"images"``, null or
    an empty list: the plain messages."""
    if not isinstance(obj, dict) or "messages" not in obj:
        on_skip(where, "no field 'messages'")
        return None
    msgs = obj["messages"]
    if not isinstance(msgs, list):
        on_skip(where, f"field 'messages' is {type(msgs).__name__}, not a list")
        return None
    if not msgs:
        on_skip(where, "empty conversation")
        return None
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            on_skip(where, f"message {i} is {type(m).__name__}, not an object")
            return None
        role, content = m.get("role"), m.get("content")
        if not isinstance(role, str):
            on_skip(where, f"message {i}: role is {type(role).__name__}, not a string")
            return None
        if role not in ROLES:
            raise UnknownRoleError(f"message {i} has role {role!r}; expected one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            on_skip(where, f"message {i}: content is {type(content).__name__}, not a string")
            return None
        out.append((role, content))
    if not any(r == TRAINED_ROLE for r, _ in out):
        on_skip(where, "no assistant message (nothing to train on)")
        return None
    if images is None or obj.get(IMAGES_KEY) is None:
        return tuple(out)
    refs = images(obj[IMAGES_KEY])
    if isinstance(refs, str):
        on_skip(where, refs)
        return None
    if not refs:
        return tuple(out)
    for i, (role, content) in enumerate(out):
        if role != "user" and IMAGE_TEXT in content:
            on_skip(where, f"message {i} ({role}) holds {IMAGE_TEXT}: images belong in user messages")
            return None
    n = sum(content.count(IMAGE_TEXT) for role, content in out if role == "user")
    if n != len(refs):
        on_skip(where, f"{n} {IMAGE_TEXT} in the user messages for {len(refs)} images")
        return None
    return ChatRecord(tuple(out), refs, where)


def _as_pairs(messages) -> Messages:
    """Dicts ``{"role", "content"}`` or (role, content) pairs -> pairs; roles checked."""
    pairs = []
    for i, m in enumerate(messages):
        role, content = (m["role"], m["content"]) if isinstance(m, dict) else m
        if role not in ROLES:
            raise UnknownRoleError(f"message {i} has role {role!r}; expected one of {', '.join(ROLES)}")
        pairs.append((role, content))
    return tuple(pairs)


def special_id(tokenizer, token: str) -> int:
    idx = tokenizer.special_id(token)
    if idx is None:
        raise ValueError(f"tokenizer {getattr(tokenizer, 'path', '')} has no {token} token: data.format=chat "
                         "needs a tokenizer with Llama 3's chat special tokens (llama3, tiktoken or a Llama 3 "
                         "tokenizer.json)")
    return idx


def pad_id(tokenizer) -> int:
    """``<|finetune_right_pad_id|>`` where the vocabulary names it, else ``<|end_of_text|>``
    (padding is never attended to by a conversation nor trained on: its value is moot)."""
    idx = tokenizer.special_id(PAD_TOKEN)
    return tokenizer.eos_id if idx is None else idx


class ChatRenderer:
    """Llama 3 chat format for one tokenizer; each role's header is encoded once."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.bos = special_id(tokenizer, BOS)
        self.eot = special_id(tokenizer, EOT)
        start, end = special_id(tokenizer, START_HEADER), special_id(tokenizer, END_HEADER)
        nl = list(tokenizer.encode("\n\n"))
        self.headers: Dict[str, np.ndarray] = {
            r: np.asarray([start, *tokenizer.encode(_HEADER_ROLE.get(r, r)), end, *nl], dtype=np.int64)
            for r in ROLES}

    def render_batch(self, convs: Sequence[Messages], max_length: int = -1, marker_id: Optional[int] = None
                     ) -> List[Tuple[np.ndarray, np.ndarray, bool]]:
        """(tokens int64, loss mask bool, truncated) per conversation; ``max_length`` < 0
        keeps every token. Contents are tokenized in one batch call. With ``marker_id``
        each ``<|image|>`` text in a content becomes that token (images in user turns:
        ``records.ChatRecord``), never a loss target."""
        parts_of = []  # per content: its text parts around image markers
        for conv in convs:
            for _, c in conv:
                c = c.strip()
                parts_of.append(c.split(IMAGE_TEXT) if marker_id is not None and IMAGE_TEXT in c else [c])
        flat, off = self.tok.encode_batch([p for parts in parts_of for p in parts])
        mark = np.asarray([marker_id if marker_id is not None else 0], dtype=np.int64)
        out, j, k = [], 0, 0
        for conv in convs:
            pieces, masks = [np.asarray([self.bos], dtype=np.int64)], [np.zeros(1, dtype=bool)]
            for role, _ in conv:
                segs = []
                for n, _ in enumerate(parts_of[k]):
                    if n:
                        segs.append(mark)
                    segs.append(flat[off[j]:off[j + 1]])
                    j += 1
                k += 1
                body = np.empty(sum(len(x) for x in segs) + 1, dtype=np.int64)
                body[:-1] = np.concatenate(segs) if len(segs) > 1 else segs[0]
                body[-1] = self.eot
                head = self.headers[role]
                pieces += [head, body]
                m = np.full(len(body), role == TRAINED_ROLE)
                if marker_id is not None:
                    m &= body != marker_id
                masks += [np.zeros(len(head), dtype=bool), m]
            tokens, mask = np.concatenate(pieces), np.concatenate(masks)
            truncated = 0 <= max_length < len(tokens)
            if truncated:
                tokens, mask = tokens[:max_length], mask[:max_length]
            out.append((tokens, mask, truncated))
        return out

    def render(self, messages, max_length: int = -1) -> Tuple[np.ndarray, np.ndarray, bool]:
        return self.render_batch([_as_pairs(messages)], max_length)[0]


def render_llama3(messages, tokenizer, max_length: Optional[int] = None
                  ) -> Tuple[np.ndarray, np.ndarray, bool]:
    """(token ids, assistant mask, truncated) of one conversation (``messages``: dicts with
    role and content, or (role, content) pairs). ``mask[i]`` is True where token i is a
    loss target: an assistant message's content or its closing ``<|eot_id|>``. More than
    ``max_length`` tokens (None = no limit) are cut to ``max_length``."""
    return ChatRenderer(tokenizer).render(messages, -1 if max_length is None else max_length)


def shifted_labels(tokens: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Labels of the inputs ``tokens[..., :-1]``: ``labels[i] = tokens[i+1]`` where
    ``mask[i+1]``, else ``IGNORE_INDEX``."""
    return np.where(mask[..., 1:], tokens[..., 1:], IGNORE_INDEX)


class ChatPacker:
    """Whole documents -> windows of ``window`` tokens (see the module docstring): chat
    conversations, and with images every image-text sample. Same interface as
    ``packing.Packer`` plus a loss mask; its state is the references of the documents
    waiting for a window (rendered again on restore). A document may carry items (images,
    one per marker token): ``pack`` closes a window before the document whose items would
    take it past ``max_items``, and each window's items are ``self.items``."""

    def __init__(self, window: int, mode: str, pad_token: int, max_items: Optional[int] = None):
        if mode not in PACKING_MODES:
            raise ValueError(f"data.sft_packing={mode!r}: expected one of {', '.join(PACKING_MODES)}")
        self.window, self.mode, self.pad_token, self.max_items = window, mode, pad_token, max_items
        self._docs: List[Tuple[int, np.ndarray, np.ndarray, dict, list]] = []
        self._len = 0
        self.items: list = []  # the last window's items, in the order of their markers

    def fits(self, n_tokens: int, n_items: int) -> bool:
        """Whether a document of this size can be packed at all (else it is dropped)."""
        return 0 < n_tokens <= self.window and (self.max_items is None or n_items <= self.max_items)

    def add(self, key: int, rendered: Tuple[np.ndarray, np.ndarray], ref: dict, items: Sequence = ()) -> None:
        tokens, mask = rendered
        if not self.fits(len(tokens), len(items)):
            raise ValueError(f"a document of {len(tokens)} tokens and {len(items)} items does not fit a window of "
                             f"{self.window} tokens and {self.max_items} items")
        self._docs.append((key, tokens, mask, ref, list(items)))
        self._len += len(tokens)

    def ready(self) -> bool:
        # pack: once the queue reaches a window (or a window's items), the next window's
        # documents are known.
        if self.mode == "pad" or not self._docs:
            return bool(self._docs)
        if self._len >= self.window:
            return True
        return self.max_items is not None and sum(len(d[4]) for d in self._docs) > self.max_items

    def cut(self) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(tokens, document keys, run lengths, loss mask) of the next window."""
        n, used, items = 1, len(self._docs[0][1]), len(self._docs[0][4])
        if self.mode == "pack":
            while n < len(self._docs) and used + len(self._docs[n][1]) <= self.window and (
                    self.max_items is None or items + len(self._docs[n][4]) <= self.max_items):
                used += len(self._docs[n][1])
                items += len(self._docs[n][4])
                n += 1
        docs, self._docs = self._docs[:n], self._docs[n:]
        self._len -= used
        self.items = [it for d in docs for it in d[4]]
        keys, lens = [d[0] for d in docs], [len(d[1]) for d in docs]
        tokens, mask = [d[1] for d in docs], [d[2] for d in docs]
        if used < self.window:
            keys.append(PAD_KEY)
            lens.append(self.window - used)
            tokens.append(np.full(self.window - used, self.pad_token, dtype=np.int64))
            mask.append(np.zeros(self.window - used, dtype=bool))
        return (np.concatenate(tokens), np.asarray(keys, dtype=np.int64), np.asarray(lens, dtype=np.int64),
                np.concatenate(mask))

    def state_dict(self) -> List[dict]:
        return [{"key": key, "ref": ref} for key, _, _, ref, _ in self._docs]

    def load_fragments(self, frags: List[dict], fetch: Callable[[dict], Optional[tuple]]) -> None:
        """Append saved documents; ``fetch(ref)`` renders a referenced one again as
        ((tokens, mask), items), or returns None when it can no longer be read or used (it
        is dropped)."""
        for fr in frags:
            if "ref" not in fr:
                raise ValueError("the loader state holds text fragments but data.format=chat: the checkpoint "
                                 "was written by a data.format=text job")
            got = fetch(fr["ref"])
            if got is not None:
                self.add(fr["key"], got[0], fr["ref"], got[1])
