"""docs/config.md is the schema's own reference (``python -m pretrain.docs``): the committed
file is exactly what the schema gives, every field of every group (each model family's
args included) carries a usable one-line description beside it, and ``python -m pretrain
--help`` points to the file. In-process: one Hydra composition for the comparison."""
import dataclasses
import functools
import sys
import typing

import pytest

from conftest import REPO
from parallel import knobs
from pretrain import docs

REFERENCE = REPO / "docs" / "config.md"


@functools.lru_cache(maxsize=None)
def generated() -> str:
    return docs.render()


def _fields(cls, prefix=""):
    """(dotted key, field) of every field of ``cls`` and of the dataclasses in it (as
    such, Optional or a list), walked here by the annotations, not by pretrain.docs."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key, t = f"{prefix}{f.name}", hints[f.name]
        yield key, f
        inner = [t] if dataclasses.is_dataclass(t) else [a for a in typing.get_args(t) if dataclasses.is_dataclass(a)]
        if inner:
            yield from _fields(inner[0], key + ("[]." if typing.get_origin(t) is list else "."))


def test_the_committed_reference_is_the_generated_one():
    assert REFERENCE.read_text() == generated(), "docs/config.md is stale: run python -m pretrain.docs"


def test_every_schema_field_has_a_one_line_description():
    from pretrain.config import JobConfig
    from pretrain.model import family_names, get_family

    keys, bad = [], []
    for cls, prefix in [(JobConfig, "")] + [(get_family(n).args, f"model[{n}].") for n in family_names()]:
        for key, f in _fields(cls, prefix):
            keys.append(key)
            why = docs.check_description(knobs.doc_of(f))
            if why:
                bad.append(f"{key}: {why}")
    assert not bad, bad
    assert {"train.steps", "data.mixture[].weight", "finetune.lora.rank", "model[mllama].gate_init",
            "model[llama].rope_scaling.factor"} <= set(keys)


def test_every_key_has_a_row_with_its_range_or_choices():
    text = generated()
    rows = {line.split(" | ")[0][3:-1]: line for line in text.splitlines() if line.startswith("| `")}
    assert "| `train.device` | str | `auto` | one of `auto`, `cpu`, `cuda` |" in rows["train.device"]
    assert "an integer in [1, 65536]" in rows["train.grad_accum_steps"]
    assert "or -1 (the rest of the world size)" in rows["parallel.dp_shard"]
    assert "warned above 1" in rows["optim.lr"]
    assert "`${stdlib_dir:}`" in rows["data.path"]  # the default config's value, as written
    assert "one of `online`, `offline`, `disabled`, or `null`" in rows["logging.wandb_mode"]
    for key in ("data.mixture[].weight", "eval.data.path", "model.cross_attention_layers", "finetune.lora.alpha"):
        assert key in rows


def test_check_exits_1_naming_the_stale_file(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(docs, "render", generated)
    out = tmp_path / "config.md"
    out.write_text(generated())
    assert docs.main(["--check", "--out", str(out)]) == 0
    out.write_text(generated().replace("Hidden size.", "Hidden width."))
    assert docs.main(["--check", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "-| `model.dim`" in err and "is stale (the schema gives 2 of its lines as 2 others)" in err
    assert docs.main(["--out", str(out)]) == 0 and out.read_text() == generated()


def test_help_points_to_the_reference(monkeypatch, capsys):
    from hydra.core.global_hydra import GlobalHydra

    from pretrain.__main__ import _main

    monkeypatch.setattr(sys, "argv", ["pretrain", "--help"])
    # Imported, hydra_main's module is pretrain.__main__, which Hydra would take as a config
    # package; as `python -m pretrain` runs it, its configs are found beside its file.
    monkeypatch.setenv("HYDRA_MAIN_MODULE", "__main__")
    try:
        with pytest.raises(SystemExit) as e:
            _main()
    finally:
        GlobalHydra.instance().clear()
    assert e.value.code in (0, None)
    out = capsys.readouterr().out
    assert "docs/config.md" in out and "== Configuration groups ==" in out


def _anchor(heading: str) -> str:
    """GitHub's anchor of a Markdown heading: lower case, punctuation dropped, spaces -> '-'."""
    text = heading.strip().lower()
    text = "".join(ch for ch in text if ch.isalnum() or ch in " -_")
    return text.replace(" ", "-")


def test_every_relative_link_and_anchor_resolves():
    """README.md and docs/*.md link each other by path and #anchor: a moved section or a
    renamed heading leaves a dead link no other test sees."""
    import re

    pages = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    anchors = {}
    for page in pages:
        text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
        anchors[page.resolve()] = {_anchor(h) for h in re.findall(r"^#+\s+(.*)$", text, flags=re.M)}
    dead = []
    for page in pages:
        text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):  # https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page.resolve()
            if not dest.exists():
                dead.append(f"{page.name}: {target} (no {path})")
            elif anchor and dest.suffix == ".md" and anchor not in anchors.get(dest, set()):
                dead.append(f"{page.name}: {target} (no heading #{anchor})")
    assert not dead, dead
