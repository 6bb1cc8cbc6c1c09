"""Config fields declared with their valid range beside them (dataclass field metadata),
and the walk that checks a config, or a model read from a file, against them.

Every config group's schema declares its numeric fields with ``knob``: the bounds, values
allowed outside them (``-1`` for "the rest" / "auto"), and where a legal value is
probably a mistake (a warning, not an error). ``problems`` walks nested dataclasses and
lists of them, naming each field by its dotted key (``data.mixture.0.weight``).
Relations between fields (``train.seq_len <= model.max_position_embeddings``) stay rules
of their group. Every field also carries a one-line description (``doc=``; ``doc_field``
for a field without a range, with its ``choices`` where it takes a fixed set of words):
``python -m pretrain.docs`` writes docs/config.md from them. ``parallel/`` is the lowest
layer with a config group of its own, so the helper lives here; it imports nothing but
the standard library."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional, Tuple


def _num(v) -> str:
    """A bound as a reader writes it: 31536000, not 3.1536e+07; 1e-08 as is."""
    if isinstance(v, int):
        return str(v)
    return str(int(v)) if float(v).is_integer() and abs(v) < 1e15 else f"{v:g}"


@dataclass(frozen=True)
class Range:
    """``ge``/``gt``/``le``/``lt``: bounds (None: open). ``special``: values allowed outside
    them, with what they mean (``{-1: "the rest"}``). ``each``: the field is a list and
    every element must be in range. ``warn_above``/``warn_below``: a legal value beyond
    them is probably a mistake. ``integer``: the value must be an int (a float field takes
    ints and floats, never bools; floats must be finite)."""

    ge: Optional[float] = None
    gt: Optional[float] = None
    le: Optional[float] = None
    lt: Optional[float] = None
    special: Tuple[Tuple[Any, str], ...] = ()
    integer: bool = False
    each: bool = False
    warn_above: Optional[float] = None
    warn_below: Optional[float] = None

    def expected(self) -> str:
        kind = "an integer" if self.integer else "a finite number"
        lo, hi = (self.ge if self.ge is not None else self.gt), (self.le if self.le is not None else self.lt)
        if lo is not None and hi is not None:  # [1, 1024], (0, 1]
            left, right = "[" if self.ge is not None else "(", "]" if self.le is not None else ")"
            bounds = f"in {left}{_num(lo)}, {_num(hi)}{right}"
        elif lo is not None:
            bounds = f"{'>=' if self.ge is not None else '>'} {_num(lo)}"
        elif hi is not None:
            bounds = f"{'<=' if self.le is not None else '<'} {_num(hi)}"
        else:
            bounds = ""
        out = f"{kind} {bounds}".strip()
        if self.special:
            out += ", or " + ", ".join(f"{v} ({what})" for v, what in self.special)
        return ("each " if self.each else "") + out

    def accepts(self, v) -> bool:
        if any(v == s and type(v) is type(s) for s, _ in self.special):
            return True
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            return False
        if self.integer and type(v) is not int:
            return False
        if isinstance(v, float) and not math.isfinite(v):
            return False
        return ((self.ge is None or v >= self.ge) and (self.gt is None or v > self.gt)
                and (self.le is None or v <= self.le) and (self.lt is None or v < self.lt))

    def doubtful(self, v) -> Optional[str]:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or any(v == s for s, _ in self.special):
            return None
        if self.warn_above is not None and v > self.warn_above:
            return f"above {self.warn_above:g}"
        if self.warn_below is not None and v < self.warn_below:
            return f"below {self.warn_below:g}"
        return None


def knob(default=dataclasses.MISSING, *, default_factory=dataclasses.MISSING, ge=None, gt=None, le=None, lt=None,
         special: Optional[dict] = None, each: bool = False, warn_above=None, warn_below=None, resume: bool = True,
         doc: str = ""):
    """A dataclass field with its valid range (an ``int`` field, by its annotation, takes
    integers only) and its one-line description ``doc``. ``resume=False``: a model field
    whose value does not change the trained function (a label, the init, a length limit),
    so a resume may change it."""
    rng = Range(ge=ge, gt=gt, le=le, lt=lt, special=tuple((special or {}).items()), each=each,
                warn_above=warn_above, warn_below=warn_below)
    meta = {"range": rng, "resume": resume, "doc": doc}
    if default_factory is not dataclasses.MISSING:
        return field(default_factory=default_factory, metadata=meta)
    return field(default=default, metadata=meta)


def doc_field(default=dataclasses.MISSING, doc: str = "", *, default_factory=dataclasses.MISSING,
              choices: Optional[Tuple[str, ...]] = None, resume: bool = True):
    """A dataclass field without a range (a word, a path, a flag, a list, a nested group)
    and its one-line description. ``choices``: the words it takes (null too when the field
    is Optional), which the group's rules check (``choices_of``) and the reference lists."""
    meta = {"resume": resume, "doc": doc}
    if choices is not None:
        meta["choices"] = tuple(choices)
    if default_factory is not dataclasses.MISSING:
        return field(default_factory=default_factory, metadata=meta)
    return field(default=default, metadata=meta)


def doc_of(f: dataclasses.Field) -> str:
    """The field's one-line description ("" when it has none)."""
    return f.metadata.get("doc", "")


def choices_of(obj, name: str) -> Tuple[str, ...]:
    """The words field ``name`` of dataclass ``obj`` (an instance or the class) takes, as
    declared beside it; KeyError when it declares none."""
    for f in dataclasses.fields(obj):
        if f.name == name:
            return f.metadata["choices"]
    raise KeyError(f"{type(obj).__name__ if not isinstance(obj, type) else obj.__name__} has no field {name!r}")


def range_of(f: dataclasses.Field) -> Optional[Range]:
    """The field's range; an ``int`` field's (by its annotation) takes integers only."""
    rng = f.metadata.get("range")
    kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    if rng is not None and not rng.integer and "int" in kind and "float" not in kind:
        rng = dataclasses.replace(rng, integer=True)
    return rng


def _values(v, rng: Range):
    return list(v) if rng.each and isinstance(v, (list, tuple)) else [v]


def walk(obj, prefix: str = "") -> Iterator[Tuple[str, dataclasses.Field, Any]]:
    """(dotted key, field, value) of every field of ``obj`` and of the dataclasses (and
    lists of dataclasses) inside it."""
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(v):
            yield from walk(v, key + ".")
        elif isinstance(v, (list, tuple)) and v and all(dataclasses.is_dataclass(x) for x in v):
            for i, x in enumerate(v):
                yield from walk(x, f"{key}.{i}.")
        else:
            yield key, f, v


def problems(obj, prefix: str = "") -> Iterator[Tuple[str, Any, str]]:
    """(key, value, what was expected) for every field out of its declared range; None is
    the unset value of an optional field."""
    for key, f, v in walk(obj, prefix):
        rng = range_of(f)
        if rng is None or v is None:
            continue
        if rng.each and not isinstance(v, (list, tuple)):
            yield key, v, f"expected a list, {rng.expected()}"
            continue
        if not all(rng.accepts(x) for x in _values(v, rng)):
            yield key, v, f"expected {rng.expected()}"


def doubts(obj, prefix: str = "") -> Iterator[Tuple[str, Any, str]]:
    """(key, value, why) for legal values that are probably mistakes."""
    for key, f, v in walk(obj, prefix):
        rng = range_of(f)
        if rng is None or v is None:
            continue
        for x in _values(v, rng):
            why = rng.doubtful(x)
            if why is not None:
                yield key, v, why
                break
