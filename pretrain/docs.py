"""``python -m pretrain.docs [--check]``: write docs/config.md, the reference of every config
key, from the schema itself (``pretrain/config.py``, ``parallel/config.py`` and each model
family's args): for each key its type, default, valid range or choices (``parallel.knobs``)
and the one-line description kept beside its field (``doc=``).

``--check`` writes nothing and exits 1, printing the first lines of the difference, when
the committed file is not what the schema gives (``tests/test_docs.py`` runs the same
comparison). The output is deterministic: no timestamps, no machine paths; defaults that
are interpolations (``${stdlib_dir:}``) are shown as written."""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import re
import sys
import typing
from pathlib import Path
from typing import Any, Dict, Iterator, List, NamedTuple, Optional, Tuple

from parallel import knobs

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "docs" / "config.md"
CONFIGS = REPO / "configs"


class Row(NamedTuple):
    key: str
    field: dataclasses.Field
    type: Any  # the resolved annotation
    owner: type  # the dataclass that declares the field


def _nested(t) -> Tuple[Optional[type], bool]:
    """The dataclass inside annotation ``t`` (itself, Optional[...] or List[...]) and
    whether it is a list of them."""
    if dataclasses.is_dataclass(t):
        return t, False
    args = typing.get_args(t)
    inner = [a for a in args if dataclasses.is_dataclass(a)]
    if inner:
        return inner[0], typing.get_origin(t) in (list, List)
    return None, False


def rows(cls, prefix: str = "") -> Iterator[Row]:
    """Every field of dataclass ``cls`` and of the dataclasses inside it, by dotted key; a
    list of dataclasses is ``key[].field``."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key, t = f"{prefix}{f.name}", hints[f.name]
        owner = next(c for c in cls.__mro__ if f.name in getattr(c, "__annotations__", {}))
        yield Row(key, f, t, owner)
        sub, many = _nested(t)
        if sub is not None:
            yield from rows(sub, key + ("[]." if many else "."))


def schema() -> List[Tuple[str, str, type, str]]:
    """(section title, the JobConfig field's name, the dataclass, the section's intro):
    each group of the job config in its order, the model once per family in the tree."""
    from .config import JobConfig
    from .model import family_names, get_family

    out = []
    for f in dataclasses.fields(JobConfig):
        if f.name == "model":
            for name in family_names():
                fam = get_family(name)
                files = ", ".join(f"`{m}`" for m in fam.model_files)
                intro = (f"{knobs.doc_of(f)} Family `{name}`" + (f": `model=` {files}." if files else ".")
                         + " Any field can be overridden (`model.dim=512`).")
                out.append((f"model (family {name})", "model", fam.args, intro))
        else:
            out.append((f.name, f.name, typing.get_type_hints(JobConfig)[f.name], knobs.doc_of(f)))
    return out


def _default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _yaml(v) -> Optional[str]:
    """A value as it is written in a config file; None for a group of keys (listed below)."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return v if v else '""'
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_yaml(x) or "{...}" for x in v) + "]"
    if dataclasses.is_dataclass(v) or isinstance(v, dict):
        return None
    raise TypeError(f"no YAML form for a default of type {type(v).__name__}")


def _type(t) -> str:
    args = typing.get_args(t)
    if typing.get_origin(t) is typing.Union:
        return " or ".join(_type(a) for a in args if a is not type(None)) + " or null"
    if typing.get_origin(t) in (list, List):
        return "list of " + _type(args[0])
    if dataclasses.is_dataclass(t):
        return "mapping"
    if t is Any:
        return "any"
    return t.__name__


def _valid(row: Row) -> str:
    """The range or the choices declared beside the field, as the config error says them."""
    rng = knobs.range_of(row.field)
    if rng is not None:
        out = rng.expected()
        if rng.warn_above is not None:
            out += f"; warned above {knobs._num(rng.warn_above)}"
        if rng.warn_below is not None:
            out += f"; warned below {knobs._num(rng.warn_below)}"
        if type(None) in typing.get_args(row.type):
            out += ", or null"
        return out
    choices = row.field.metadata.get("choices")
    if choices:
        words = ", ".join(f"`{c}`" for c in choices)
        return f"one of {words}" + (", or `null`" if type(None) in typing.get_args(row.type) else "")
    return ""


def _composed() -> Tuple[Dict[str, Any], Dict[str, str]]:
    """The values ``python -m pretrain`` composes with no overrides, by dotted key (not
    resolved), and the file it picked in each group."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from .config import register_configs

    register_configs()
    with initialize_config_dir(str(CONFIGS), version_base="1.3", job_name="docs"):
        cfg = compose("config", return_hydra_config=True)
    choices = {k: v for k, v in OmegaConf.to_container(cfg.hydra.runtime.choices).items() if "/" not in k}
    flat: Dict[str, Any] = {}

    def walk(node, prefix):
        for k, v in node.items():
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}.")
            else:
                flat[f"{prefix}{k}"] = v

    walk({k: v for k, v in OmegaConf.to_container(cfg, resolve=False).items() if k != "hydra"}, "")
    return flat, choices


_CODE = re.compile(r"`[^`]*`")


def _cell(text: str) -> str:
    """A table cell: ``|`` escaped (also inside code spans, as GitHub tables need)."""
    return text.replace("|", "\\|")


def check_description(doc: str) -> Optional[str]:
    """Why ``doc`` is not a usable one-line description (None when it is): empty, more
    than one line, over 200 characters, or markdown that would not render as written
    (``<`` or ``*`` outside a code span, an unclosed one)."""
    if not doc.strip():
        return "no description (doc= beside the field)"
    if "\n" in doc or len(doc) > 200:
        return f"not one line of at most 200 characters ({len(doc)})"
    if doc.count("`") % 2:
        return "an unclosed code span"
    bare = _CODE.sub("", doc)
    if re.search(r"<[A-Za-z/!?]", bare) or "*" in bare:
        return "'<' or '*' outside a code span (markdown would eat it)"
    return None


def render() -> str:
    """docs/config.md as the schema gives it."""
    from .model import get_family

    composed, picked = _composed()
    default_args = get_family(composed["model.family"]).args
    sections = schema()
    out = [
        "# Configuration reference",
        "",
        "<!-- Generated by `python -m pretrain.docs` from the schema: do not edit by hand. -->",
        "",
        "Every key of every config group: its type, its default, the values it accepts and what it",
        "does. Generated from the dataclasses Hydra validates against (`pretrain/config.py`,",
        "`parallel/config.py`, each model family's args in `pretrain/model/<family>/args.py`), where",
        "each field declares its range or choices and a one-line description (`knob(..., doc=...)`,",
        "`doc_field(default, doc, choices=...)`: `parallel/knobs.py`). After changing a field, run",
        "`python -m pretrain.docs` to rewrite this file; `python -m pretrain.docs --check` (and",
        "`tests/test_docs.py`) fail while it is stale.",
        "",
        "Set any key on the command line (`python -m pretrain train.steps=500 optim.lr=1e-4`) or in a",
        "group file (`configs/<group>/*.yaml`). A value outside its range, or a word that is not one of",
        "its choices, stops the job before any process group starts, naming the key (exit 2); a value",
        "past \"warned above/below\" is legal and logged once as a probable mistake. The default is the",
        "schema's; where the group files `python -m pretrain` picks with no overrides set another",
        "value, that follows it (`data=stdlib`: ...). `key[].field` is a field of every entry of a",
        "list (`data.mixture.0.path=...` sets the first entry's).",
        "",
        "Groups: " + ", ".join(title for title, *_ in sections) + ".",
    ]
    for title, group, cls, intro in sections:
        files = sorted(p.stem for p in (CONFIGS / group).glob("*.yaml") if not p.stem.endswith("_schema"))
        out += ["", f"## {title}", "", intro]
        if group != "model" and files:
            out[-1] += f" Files in `configs/{group}/`: " + ", ".join(f"`{f}`" for f in files) + \
                f" (default `{picked.get(group)}`)."
        out += ["", "| key | type | default | valid | description |", "|---|---|---|---|---|"]
        own = group != "model" or cls is default_args  # the default config's values beside its own family's
        for row in rows(cls, f"{group}."):
            default = _yaml(_default(row.field))
            shown = "(keys below)" if default is None else f"`{default}`"
            if own and default is not None and row.key in composed:
                now = _yaml(composed[row.key])
                if now is not None and now != default:
                    shown += f"; `{group}={picked.get(group)}`: `{now}`"
            out.append("| " + " | ".join(_cell(c) for c in (
                f"`{row.key}`", _type(row.type), shown, _valid(row), knobs.doc_of(row.field))) + " |")
    return "\n".join(out) + "\n"


def problems() -> List[str]:
    """Every field of the schema whose description is missing or unusable, by key."""
    from .config import JobConfig

    out = []
    for f in dataclasses.fields(JobConfig):  # the groups' own descriptions (their sections' intros)
        why = check_description(knobs.doc_of(f))
        if why:
            out.append(f"{f.name} (JobConfig.{f.name}): {why}")
    for _, group, cls, _ in schema():
        for row in rows(cls, f"{group}."):
            why = check_description(knobs.doc_of(row.field))
            if why:
                out.append(f"{row.key} ({row.owner.__name__}.{row.field.name}): {why}")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pretrain.docs", description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if docs/config.md differs from the schema")
    ap.add_argument("--out", type=Path, default=OUT, help="where to write (default: docs/config.md)")
    args = ap.parse_args(argv)
    bad = problems()
    if bad:
        print("fields without a usable description:\n  " + "\n  ".join(bad), file=sys.stderr)
        return 1
    text = render()
    if args.check:
        old = args.out.read_text() if args.out.exists() else ""
        if old == text:
            return 0
        diff = list(difflib.unified_diff(old.splitlines(), text.splitlines(), str(args.out), "the schema",
                                         lineterm="", n=0))
        removed = sum(1 for d in diff[2:] if d.startswith("-"))
        added = sum(1 for d in diff[2:] if d.startswith("+"))
        print("\n".join(diff[:40]) + (f"\n... ({len(diff) - 40} more diff lines)" if len(diff) > 40 else ""),
              file=sys.stderr)
        print(f"{args.out} is stale (the schema gives {removed} of its lines as {added} others): run "
              "python -m pretrain.docs", file=sys.stderr)
        return 1
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"wrote {args.out} ({sum(1 for line in text.splitlines() if line.startswith('| `'))} keys)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
