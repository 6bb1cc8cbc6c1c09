"""Tokenizers behind one interface (``encode``, ``encode_batch``, ``decode``, ``bos_id``,
``eos_id``, ``special_id``, ``vocab_size``, ``fingerprint``):

- ``llama3``: Llama 3's exact 128,256-token vocabulary, bundled offline in the
  ``quicktok-v1`` wheel (the default for Llama configs);
- ``tiktoken``: Meta's original ``tokenizer.model`` (base64 ranks) through tiktoken with
  the Llama 3 split pattern and its 256 special tokens;
- ``hf``: a Hugging Face ``tokenizer.json`` through ``tokenizers``;
- ``bpe``: a small byte-level BPE trained on the job's corpus and cached (the demo's).

Text is encoded as plain text (special-token strings in a document are not parsed); the
packer wraps every document as ``<|begin_of_text|> ... <|end_of_text|>``.

The fingerprint of a rank-table tokenizer (llama3, tiktoken) is a hash of its token bytes
in rank order and its special tokens, so quicktok and Meta's file agree on it and shards
pretokenized with one load with the other.

``export_hf_tokenizer`` writes any of them as a Hugging Face tokenizer folder (an exported
model's), encoding as it does."""
from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np

BOS = "<|begin_of_text|>"
EOS = "<|end_of_text|>"

# Llama 3's split pattern (from Meta's published tokenizer; a fact of the format).
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
LLAMA3_NUM_BASE = 128_000
# GPT-2's split pattern, which the ByteLevel pre-tokenizer of ``tokenizers`` applies.
GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"

# A tokenizer call sees at most about this many characters: a longer document is cut at
# safe points (``split_for_encoding``) and its pieces are encoded in separate calls, so
# tokenizing it costs memory for ~1 MB of text at a time, not for the whole document.
ENCODE_CHUNK_CHARS = 1 << 20
# Candidates for a cut at p: text[p-1] == "\n" after a non-space, text[p] a word character
# that is no digit or underscore (a letter or a numeric non-digit: checked with isalpha).
_CUT_CANDIDATE = re.compile(r"(?<=\S\n)[^\W\d_]")


def split_for_encoding(text: str, chunk_chars: Optional[int] = None) -> Iterator[str]:
    r"""``text`` in pieces of about ``chunk_chars`` characters (default
    ``ENCODE_CHUNK_CHARS``) whose tokens, concatenated, are the tokens of ``text`` under
    the Llama 3 split pattern or GPT-2's (the ByteLevel pre-tokenizer's), each followed
    by a model that encodes every pretoken on its own (BPE). A piece ends only at a
    position p where ``text[p-1] == "\n"``, ``text[p-2]`` is not whitespace and
    ``text[p]`` is a letter. Then:

    - No pretoken spans p. The one holding the "\n" either starts before it, so it also
      holds the non-space at p-2: the only alternative that matches a non-space followed
      by "\n" is Llama 3's punctuation one, `` ?[^\s\p{L}\p{N}]+[\r\n]*``, whose
      trailing ``[\r\n]*`` stops at the letter (GPT-2 has none). Or it starts at the
      "\n": the whitespace run is that one character (p-2 is no space, p a letter), and
      Llama 3 matches it with ``\s*[\r\n]+`` (the optional prefix of its letter
      alternative excludes \r and \n), GPT-2 with ``\s+`` (``\s+(?!\S)`` fails before
      the letter): exactly "\n" both.
    - The pretokens left of p do not depend on what follows p. No match that starts
      before the "\n" and ends before it looks past it (the whitespace alternatives stop
      at the non-space at p-2, the others at the "\n"), and the match ending at p is the
      same when the text ends there: the punctuation match or ``\s*[\r\n]+`` (Llama 3),
      ``\s+(?!\S)`` on the final "\n" (GPT-2), the same characters.
    - The pretokens right of p are those of ``text[p:]``: the patterns have no
      look-behind and no anchors.

    Python's ``isspace`` holds for every Unicode White_Space character (the regex
    engines' ``\s``; it also holds for U+001C..U+001F, which only forgoes cuts) and
    ``isalpha`` is ``\p{L}``. A piece ends at the first such point at least
    ``chunk_chars / 2`` characters into it; in a stretch without one the piece grows to
    the next (larger, still exact); without any, the rest is one piece."""
    chunk = ENCODE_CHUNK_CHARS if chunk_chars is None else chunk_chars
    start, n = 0, len(text)
    while n - start > chunk:
        cut = None
        for m in _CUT_CANDIDATE.finditer(text, start + max(1, chunk // 2)):
            if m.group().isalpha():
                cut = m.start()
                break
        if cut is None:
            break
        yield text[start:cut]
        start = cut
    yield text[start:] if start else text


def _encode_bounded(raw_batch, texts: Sequence[str], chunkable: bool) -> Tuple[np.ndarray, np.ndarray]:
    """``raw_batch(list of str) -> (flat tokens, offsets)`` over ``texts`` in calls of at
    most ``ENCODE_CHUNK_CHARS`` characters (one piece may be longer: a document that is
    not ``chunkable`` or has no safe cut). Same result as one call on all ``texts``."""
    limit, texts = ENCODE_CHUNK_CHARS, list(texts)
    if sum(len(t) for t in texts) <= limit:
        return raw_batch(texts)
    per_text: List[List[np.ndarray]] = [[] for _ in texts]
    group: List[str] = []
    owners: List[int] = []
    chars = 0

    def flush():
        flat, off = raw_batch(group)
        for j, owner in enumerate(owners):
            per_text[owner].append(np.asarray(flat[off[j]:off[j + 1]], dtype=np.uint32))
        group.clear()
        owners.clear()

    for i, text in enumerate(texts):
        for piece in (split_for_encoding(text, limit) if chunkable else (text,)):
            if group and chars + len(piece) > limit:
                flush()
                chars = 0
            group.append(piece)
            owners.append(i)
            chars += len(piece)
    if group:
        flush()
    offsets = np.zeros(len(texts) + 1, dtype=np.int64)
    np.cumsum([sum(len(a) for a in arrs) for arrs in per_text], out=offsets[1:])
    flat = np.concatenate([a for arrs in per_text for a in arrs]) if offsets[-1] else np.zeros(0, np.uint32)
    return flat, offsets


def llama3_special_tokens() -> List[str]:
    """The 256 special tokens in id order, 128000..128255."""
    named = [BOS, EOS, "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
             "<|reserved_special_token_2|>", "<|reserved_special_token_3|>",
             "<|start_header_id|>", "<|end_header_id|>", "<|reserved_special_token_4|>", "<|eot_id|>"]
    return named + [f"<|reserved_special_token_{i}|>" for i in range(5, 256 - 5)]


def _ranks_fingerprint(token_bytes: Sequence[bytes], specials: Sequence[str]) -> str:
    h = hashlib.sha256(b"ranks-v1")
    for b in token_bytes:
        h.update(len(b).to_bytes(2, "little"))
        h.update(b)
    for s in specials:
        h.update(s.encode() + b"\0")
    return "ranks-" + h.hexdigest()[:16]


def _flat(ids: Sequence[Sequence[int]]) -> Tuple[np.ndarray, np.ndarray]:
    offsets = np.zeros(len(ids) + 1, dtype=np.int64)
    np.cumsum([len(x) for x in ids], out=offsets[1:])
    flat = np.fromiter((t for x in ids for t in x), dtype=np.uint32, count=int(offsets[-1]))
    return flat, offsets


class Llama3Tokenizer:
    """Llama 3 exact, offline, from quicktok's bundled vocabulary."""

    kind = "llama3"

    def __init__(self):
        import quicktok

        self._enc = quicktok.get_encoding("llama3")
        self.path = "quicktok:llama3"
        self.vocab_size = self._enc.n_vocab
        self.bos_id = self._enc.encode_single_token(BOS)
        self.eos_id = self._enc.encode_single_token(EOS)
        self._fingerprint = None

    def __reduce__(self):
        return (Llama3Tokenizer, ())

    @property
    def fingerprint(self) -> str:
        if self._fingerprint is None:
            ranks = [self._enc.decode_single_token_bytes(i) for i in range(LLAMA3_NUM_BASE)]
            self._fingerprint = _ranks_fingerprint(ranks, llama3_special_tokens())
        return self._fingerprint

    def special_id(self, token: str) -> Optional[int]:
        """The id of a special token by name (None if the vocabulary has no such one)."""
        try:
            idx = self._enc.encode_single_token(token)
        except KeyError:
            return None
        return idx if idx >= LLAMA3_NUM_BASE else None

    def encode(self, text: str) -> List[int]:
        return self._enc.encode_ordinary(text)

    def encode_batch(self, texts: Sequence[str]) -> Tuple[np.ndarray, np.ndarray]:
        """(flat uint32 tokens, int64 offsets): document i is tokens[off[i]:off[i+1]].
        Long documents are encoded a piece at a time (``split_for_encoding``)."""
        return _encode_bounded(lambda b: self._enc.encode_batch(b, 1, False), texts, True)

    def decode(self, ids: Sequence[int]) -> str:
        return self._enc.decode([int(i) for i in ids])


class TiktokenTokenizer:
    """Meta's ``tokenizer.model`` (lines of ``<base64 token> <rank>``) through tiktoken."""

    kind = "tiktoken"

    def __init__(self, path: str | os.PathLike):
        import tiktoken

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"data.tokenizer.path={str(path)!r}: no such tiktoken model file")
        ranks = {}
        for lineno, line in enumerate(path.read_bytes().splitlines(), 1):
            if not line.strip():
                continue
            try:
                tok, rank = line.split()
                ranks[base64.b64decode(tok)] = int(rank)
            except ValueError as e:
                raise ValueError(f"{path}:{lineno}: expected '<base64 token> <rank>', got {line[:60]!r}") from e
        specials = llama3_special_tokens()
        n = len(ranks)
        self._specials = {s: n + i for i, s in enumerate(specials)}
        self._enc = tiktoken.Encoding(
            name=path.name, pat_str=LLAMA3_PATTERN, mergeable_ranks=ranks,
            special_tokens=dict(self._specials),
        )
        self.path, self.vocab_size = str(path), n + len(specials)
        self.bos_id, self.eos_id = n, n + 1
        by_rank = sorted(ranks, key=ranks.__getitem__)
        self.fingerprint = _ranks_fingerprint(by_rank, specials)

    def __reduce__(self):
        return (TiktokenTokenizer, (self.path,))

    def special_id(self, token: str) -> Optional[int]:
        return self._specials.get(token)

    def encode(self, text: str) -> List[int]:
        return self._enc.encode_ordinary(text)

    def encode_batch(self, texts: Sequence[str]) -> Tuple[np.ndarray, np.ndarray]:
        return _encode_bounded(lambda b: _flat([self._enc.encode_ordinary(t) for t in b]), texts, True)

    def decode(self, ids: Sequence[int]) -> str:
        return self._enc.decode([int(i) for i in ids])


class HFTokenizer:
    """A Hugging Face ``tokenizer.json`` (tokenizers library), used for ``hf`` and the
    trained ``bpe``; it must define ``<|begin_of_text|>`` and ``<|end_of_text|>``."""

    kind = "hf"

    def __init__(self, path: str | os.PathLike):
        from tokenizers import Tokenizer as _Tok

        path = Path(path)
        if path.is_dir():  # a Hugging Face model folder: the tokenizer that ships with the weights
            path = path / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"data.tokenizer.path={str(path)!r}: no such tokenizer.json")
        raw = path.read_bytes()
        self._tok = _Tok.from_str(raw.decode())
        self.path = str(path)
        self.fingerprint = "file-" + hashlib.sha256(raw).hexdigest()[:16]
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.bos_id = self._required_id(BOS)
        self.eos_id = self._required_id(EOS)
        self.chunkable = hf_chunkable(json.loads(raw))

    def __reduce__(self):
        return (HFTokenizer, (self.path,))

    def special_id(self, token: str) -> Optional[int]:
        return self._tok.token_to_id(token)

    def _required_id(self, token: str) -> int:
        idx = self._tok.token_to_id(token)
        if idx is None:
            raise ValueError(f"tokenizer {self.path} has no {token} token")
        return idx

    def encode(self, text: str) -> List[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> Tuple[np.ndarray, np.ndarray]:
        """Long documents a piece at a time when ``chunkable`` (see ``hf_chunkable``)."""
        return _encode_bounded(self._raw_batch, texts, self.chunkable)

    def _raw_batch(self, texts: List[str]) -> Tuple[np.ndarray, np.ndarray]:
        return _flat([e.ids for e in self._tok.encode_batch_fast(texts, add_special_tokens=False)])

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)


Tokenizer = Llama3Tokenizer | TiktokenTokenizer | HFTokenizer


def hf_chunkable(spec: dict) -> bool:
    """Whether a ``tokenizer.json`` tokenizes a text like the concatenation of its
    ``split_for_encoding`` pieces: no normalizer; a pre-tokenizer that is ByteLevel (GPT-2
    pattern, no prefix space) or a Sequence of Splits on the Llama 3 or GPT-2 pattern
    (isolated) followed by ByteLevel without a prefix space; and no added token that could
    match across a cut (holding a newline, or stripping whitespace on its left, or
    single-word). Anything else is tokenized whole."""
    if spec.get("normalizer") is not None:
        return False
    for tok in spec.get("added_tokens") or ():
        if "\n" in tok.get("content", "") or tok.get("lstrip") or tok.get("single_word"):
            return False
    pre = spec.get("pre_tokenizer")
    if not isinstance(pre, dict):
        return False

    def byte_level(p):
        return p.get("type") == "ByteLevel" and not p.get("add_prefix_space", True)

    if pre.get("type") == "ByteLevel":
        return byte_level(pre) and bool(pre.get("use_regex", True))
    if pre.get("type") != "Sequence":
        return False
    steps = pre.get("pretokenizers") or []
    if not steps or not byte_level(steps[-1]):
        return False
    splits = steps[:-1]
    for p in splits:
        if (p.get("type") != "Split" or p.get("behavior") != "Isolated" or p.get("invert")
                or (p.get("pattern") or {}).get("Regex") not in (LLAMA3_PATTERN, GPT2_PATTERN)):
            return False
    return bool(splits) or bool(steps[-1].get("use_regex", True))


def write_tiktoken_model(tok: Llama3Tokenizer, out_path: str | os.PathLike) -> Path:
    """Write the bundled Llama 3 ranks in Meta's ``tokenizer.model`` format (what Meta
    ships; useful for tools that want the file)."""
    out_path = Path(out_path)
    lines = [base64.b64encode(tok._enc.decode_single_token_bytes(i)) + b" " + str(i).encode()
             for i in range(LLAMA3_NUM_BASE)]
    out_path.write_bytes(b"\n".join(lines) + b"\n")
    return out_path


# --- Hugging Face export ----------------------------------------------------------------

# The Llama 3 chat format as a Jinja template (transformers' ``apply_chat_template``): the
# rendering of ``chat.ChatRenderer``, which is Meta's reference ChatFormat: ``<|begin_of_text|>``,
# per message a header (``tool`` as ``ipython``), "\n\n", the content stripped, ``<|eot_id|>``.
# A content may also be a list of ``{"type": "text", "text": ...}`` and ``{"type": "image"}``
# items (transformers' multimodal messages): an image is ``<|image|>`` where it stands.
LLAMA3_CHAT_TEMPLATE = (
    "{{- '<|begin_of_text|>' -}}"
    "{%- for message in messages -%}"
    "{%- if message['content'] is string -%}{%- set content = message['content'] -%}"
    "{%- else -%}{%- set ns = namespace(text='') -%}"
    "{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{%- set ns.text = ns.text + '<|image|>' -%}"
    "{%- elif item['type'] == 'text' -%}{%- set ns.text = ns.text + item['text'] -%}{%- endif -%}"
    "{%- endfor -%}{%- set content = ns.text -%}{%- endif -%}"
    "{{- '<|start_header_id|>' + ('ipython' if message['role'] == 'tool' else message['role']) "
    "+ '<|end_header_id|>\\n\\n' + content | trim + '<|eot_id|>' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}{%- endif -%}"
)
_CHAT_TOKENS = ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
IMAGE_TOKEN = "<|image|>"
# Texts the exported tokenizer must encode as the run's does before it is written: words,
# code, whitespace runs, CRLF, contractions, digits, scripts without spaces, emoji.
_PROBES = (
    "Hello world! It's a test, isn't it? We'll see; they'd've said 'no'.",
    "def f(x):\n    return x ** 2  # squared\n\n\n\tif x >= 10_000: pass\r\n",
    "Numbers 1234567890 3.14159 -42 1e-5 0x1F; dates 2024-09-25.",
    "Ünïcödé — naïve café, Straße, Ελληνικά, русский, עברית, العربية",
    "日本語のテキスト、中文文本，한국어 텍스트。",
    "emoji 🤖🎉 👩‍👩‍👧‍👦 flags 🇫🇷 ✔︎ combining e\u0301 zero\u200bwidth",
    "   leading and trailing spaces   \n\n  \n",
)


def _byte_chars() -> List[str]:
    """GPT-2's byte -> printable character table (the ``ByteLevel`` pre-tokenizer's):
    printable Latin-1 bytes stand for themselves, the others for 256 + their order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return [table[b] for b in range(256)]


def _rank_table(tok) -> Tuple[List[bytes], List[Tuple[str, int]]]:
    """(the tokens' bytes by rank, [(special token, id)]) of a rank-table tokenizer
    (``llama3``: quicktok; ``tiktoken``: Meta's file). Its ranks must be 0..n-1, each
    once (a tokenizer.model is data: anything else is refused)."""
    n = tok.bos_id  # the specials follow the ranks
    try:
        ranks = [tok._enc.decode_single_token_bytes(i) for i in range(n)]
    except KeyError as e:
        raise ValueError(f"tokenizer {tok.path}: no token of rank {e.args[0] if e.args else '?'} below its "
                         f"{n} ranks (ranks must be 0..{n - 1}, each once)") from None
    if len(set(ranks)) != n:
        raise ValueError(f"tokenizer {tok.path}: {n - len(set(ranks))} byte strings have two ranks")
    if isinstance(tok, Llama3Tokenizer):
        specials = [(tok._enc.decode_single_token_bytes(i).decode(), i) for i in range(n, tok.vocab_size)]
    else:
        specials = sorted(tok._specials.items(), key=lambda kv: kv[1])
    return ranks, specials


def _bpe_from_ranks(ranks: List[bytes]):
    """A byte-level ``tokenizers`` BPE that encodes as the rank table does. Rank-table
    BPE (tiktoken's) emits a pretoken found whole in the table, else merges, again and
    again, the adjacent pair whose concatenation has the lowest rank. Hence ``ignore_merges``
    (whole pretokens first) and a merge (a, b) for every way a token of rank r splits into
    two tokens, ordered by r: the pair merged first is then the one of lowest rank. Splits
    of one token are ordered by their parts' ranks; which of them merges first does not
    matter (two pairs forming the same token cannot overlap, and nothing formed later has
    a lower rank)."""
    from tokenizers import models

    chars = _byte_chars()
    text = [("".join(chars[b] for b in r)) for r in ranks]
    rank_of = {r: i for i, r in enumerate(ranks)}
    merges = []
    for r in ranks:
        if len(r) > 1:
            splits = sorted((rank_of[r[:k]], rank_of[r[k:]]) for k in range(1, len(r))
                            if r[:k] in rank_of and r[k:] in rank_of)
            merges.extend((text[a], text[b]) for a, b in splits)
    return models.BPE(vocab={t: i for i, t in enumerate(text)}, merges=merges, ignore_merges=True, fuse_unk=False)


def _from_ranks(tok) -> dict:
    """A rank-table tokenizer as a ``tokenizer.json`` (as a dict): Llama 3's split pattern,
    then byte-level BPE; its special tokens at their ids; ``<|begin_of_text|>`` added in
    front of a text as Meta's published Llama 3 tokenizer.json does."""
    from tokenizers import AddedToken, Regex
    from tokenizers import Tokenizer as _Tok
    from tokenizers import decoders, pre_tokenizers, processors

    ranks, specials = _rank_table(tok)
    out = _Tok(_bpe_from_ranks(ranks))
    out.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    out.decoder = decoders.ByteLevel()
    out.add_special_tokens([AddedToken(s, special=True, normalized=False) for s, _ in specials])
    out.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS}:1 $B:1",
                                      special_tokens=[(BOS, tok.bos_id)])])
    return json.loads(out.to_str())


def _add_tokens(spec: dict, where: str, image_token_id: Optional[int]) -> dict:
    """``spec`` with ``<|image|>`` at ``image_token_id`` (when given and absent). A
    tokenizer.json cannot skip ids (``tokenizers`` renumbers an added token that would
    leave a gap), so ids between the vocabulary's end and the image token are filled with
    special tokens ``<|reserved_N|>`` (N: the id) that no text produces."""
    from tokenizers import Tokenizer as _Tok

    if image_token_id is None:
        return spec
    tok = _Tok.from_str(json.dumps(spec))
    have = tok.token_to_id(IMAGE_TOKEN)
    if have is not None:
        if have != image_token_id:
            raise ValueError(f"{where} has {IMAGE_TOKEN} at id {have}, the model's image token is id {image_token_id}")
        return spec
    size = tok.get_vocab_size(with_added_tokens=True)
    if size > image_token_id:
        raise ValueError(f"{where} has {size} tokens: id {image_token_id} (the model's {IMAGE_TOKEN}) is its token "
                         f"{tok.id_to_token(image_token_id)!r}")
    added = []
    for i in range(size, image_token_id + 1):
        name = IMAGE_TOKEN if i == image_token_id else f"<|reserved_{i}|>"
        if tok.token_to_id(name) is not None:
            raise ValueError(f"{where} already has a token {name!r}: cannot pad its ids up to {image_token_id}")
        added.append({"id": i, "content": name, "single_word": False, "lstrip": False, "rstrip": False,
                      "normalized": False, "special": True})
    return {**spec, "added_tokens": [*(spec.get("added_tokens") or []), *added]}


def _check_same(tok, spec: dict, where: str, image_token_id: Optional[int]) -> None:
    """The exported tokenizer encodes the probe texts as ``tok`` does, has ``tok``'s
    special tokens at their ids and the image token at its id; ValueError otherwise."""
    from tokenizers import Tokenizer as _Tok

    out = _Tok.from_str(json.dumps(spec))
    for text in _PROBES:
        want, got = list(tok.encode(text)), out.encode(text, add_special_tokens=False).ids
        if want != got:
            raise ValueError(f"{where}: encodes {text[:40]!r} as {got[:12]} but the run's tokenizer as {want[:12]}")
    for name in (BOS, EOS, *_CHAT_TOKENS):
        if tok.special_id(name) is not None and out.token_to_id(name) != tok.special_id(name):
            raise ValueError(f"{where}: {name} is id {out.token_to_id(name)}, the run's tokenizer has it at "
                             f"{tok.special_id(name)}")
    if image_token_id is not None and out.token_to_id(IMAGE_TOKEN) != image_token_id:
        raise ValueError(f"{where}: {IMAGE_TOKEN} is id {out.token_to_id(IMAGE_TOKEN)}, not {image_token_id}")


def _write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def export_hf_tokenizer(tok: Tokenizer, out_dir: str | os.PathLike, *, image_token_id: Optional[int] = None,
                        chat: bool = False, model_max_length: Optional[int] = None) -> dict:
    """Write ``tok`` as a Hugging Face tokenizer into the folder ``out_dir``:
    ``tokenizer.json``, ``tokenizer_config.json`` and ``special_tokens_map.json``, which
    ``transformers.AutoTokenizer`` loads and which encode every text to ``tok``'s ids
    (plain text, ``add_special_tokens=False``; checked on a few texts before anything is
    written). Returns the ``tokenizer_config.json`` written.

    - ``llama3``/``tiktoken`` (rank tables): converted to a byte-level BPE (``_bpe_from_ranks``)
      with Llama 3's split pattern and 256 special tokens; it adds ``<|begin_of_text|>``
      in front of a text unless ``add_special_tokens=False``, as Meta's does.
    - ``hf``/``bpe`` (a ``tokenizer.json``): that file, as it is.
    - ``image_token_id``: an image-text model's ``<|image|>`` (a special token; ids up to
      it padded, see ``_add_tokens``). ValueError if the tokenizer has another token there.
    - The Llama 3 chat template (``LLAMA3_CHAT_TEMPLATE``, the rendering of ``chat.py``)
      when the vocabulary has its special tokens; eos is ``<|eot_id|>`` for a chat model
      (``chat``), else ``<|end_of_text|>``, as Meta's Instruct and base configs.
    Decoding keeps spaces as they are (``clean_up_tokenization_spaces`` false)."""
    out_dir = Path(out_dir)
    if isinstance(tok, HFTokenizer):
        where = tok.path
        raw = Path(tok.path).read_text(encoding="utf-8")
        spec = json.loads(raw)
        if not isinstance(spec, dict):
            raise ValueError(f"{where}: not a tokenizer.json (a JSON {type(spec).__name__})")
    elif isinstance(tok, (Llama3Tokenizer, TiktokenTokenizer)):
        where, raw = f"the tokenizer.json converted from {tok.path}", None
        spec = _from_ranks(tok)
    else:
        raise TypeError(f"export_hf_tokenizer takes a Llama3Tokenizer, TiktokenTokenizer or HFTokenizer, not "
                        f"{type(tok).__name__}")
    padded = _add_tokens(spec, where, image_token_id)
    _check_same(tok, padded, where, image_token_id)
    has_chat = all(tok.special_id(t) is not None for t in _CHAT_TOKENS)
    eos = "<|eot_id|>" if chat and has_chat else EOS
    decoder = {str(t["id"]): {k: t[k] for k in ("content", "lstrip", "normalized", "rstrip", "single_word", "special")
                              if k in t} for t in padded.get("added_tokens") or ()}
    config = {"added_tokens_decoder": decoder, "bos_token": BOS, "eos_token": eos,
              "clean_up_tokenization_spaces": False, "model_input_names": ["input_ids", "attention_mask"],
              "model_max_length": model_max_length or 131072, "tokenizer_class": "PreTrainedTokenizerFast"}
    if has_chat:
        config["chat_template"] = LLAMA3_CHAT_TEMPLATE
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_atomic(out_dir / "tokenizer.json", raw if padded is spec and raw is not None else
                  json.dumps(padded, ensure_ascii=False, indent=2))
    _write_atomic(out_dir / "tokenizer_config.json", json.dumps(config, ensure_ascii=False, indent=2))
    _write_atomic(out_dir / "special_tokens_map.json", json.dumps({"bos_token": BOS, "eos_token": eos}, indent=2))
    return config


def train_bpe(texts: Sequence[str], vocab_size: int, out_path: str | os.PathLike) -> HFTokenizer:
    """Train a byte-level BPE with bos/eos specials; written atomically to ``out_path``."""
    from tokenizers import Tokenizer as _Tok, decoders, models, pre_tokenizers, trainers

    if vocab_size < 256 + 2:
        raise ValueError(f"vocab_size={vocab_size}: a byte-level BPE needs at least 258 entries")
    tok = _Tok(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out_path.parent, prefix=out_path.name, suffix=".tmp")
    os.close(fd)
    tok.save(tmp)
    os.replace(tmp, out_path)  # never a half-written tokenizer under the final name
    return HFTokenizer(out_path)


def bpe_cache_path(cache_dir: str, texts: Sequence[str], vocab_size: int) -> Path:
    h = hashlib.sha256(f"bpe-bytelevel-v1|{vocab_size}|".encode())
    for t in texts:
        h.update(hashlib.sha256(t.encode()).digest())
    return Path(cache_dir) / f"bpe{vocab_size}-{h.hexdigest()[:16]}.json"


def sample_texts(docs: Iterable[str], max_bytes: int) -> List[str]:
    """The first ``max_bytes`` of a document stream, whole documents."""
    out, total = [], 0
    for text in docs:
        if total >= max_bytes:
            break
        out.append(text)
        total += len(text.encode())
    return out


def build_tokenizer(kind: str, path: str | None = None) -> Tokenizer:
    """A ready tokenizer of kind llama3, tiktoken or hf (bpe is trained by the caller)."""
    if kind == "llama3":
        return Llama3Tokenizer()
    if kind == "tiktoken":
        if not path:
            raise ValueError("data.tokenizer.kind=tiktoken needs data.tokenizer.path (Meta's tokenizer.model)")
        return TiktokenTokenizer(path)
    if kind in ("hf", "bpe"):
        if not path:
            raise ValueError(f"data.tokenizer.kind={kind} needs data.tokenizer.path (a tokenizer.json)")
        return HFTokenizer(path)
    raise ValueError(f"data.tokenizer.kind={kind!r}: expected one of llama3, tiktoken, hf, bpe")


def main(argv: Sequence[str] | None = None) -> int:
    """python -m data_pipeline.tokenizer train|export-llama3 ...: train a small BPE on any
    data source, or write the bundled Llama 3 ranks as a tiktoken tokenizer.model."""
    import argparse

    p = argparse.ArgumentParser(description=main.__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="train a byte-level BPE on the first bytes of a source")
    t.add_argument("--source", default="text_folder", choices=["text_folder", "jsonl", "parquet", "hf_dataset"])
    t.add_argument("--path", required=True, help="file, folder, glob or fsspec URL")
    t.add_argument("--glob", default=None)
    t.add_argument("--field", default="text")
    t.add_argument("--vocab-size", type=int, required=True)
    t.add_argument("--train-bytes", type=int, default=8_000_000)
    t.add_argument("out")
    e = sub.add_parser("export-llama3", help="write Llama 3's ranks as tokenizer.model")
    e.add_argument("out")
    a = p.parse_args(argv)
    if a.cmd == "export-llama3":
        write_tiktoken_model(Llama3Tokenizer(), a.out)
        print(f"wrote {a.out}", file=sys.stderr)
        return 0
    from .sources import SourceSpec, build_source

    spec = SourceSpec(kind=a.source, path=a.path, glob=a.glob, field=a.field)
    src = build_source(spec)
    tok = train_bpe(sample_texts(src.iter_texts(), a.train_bytes), a.vocab_size, a.out)
    print(f"wrote {a.out}: vocab {tok.vocab_size}, fingerprint {tok.fingerprint}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
