"""Every config knob is documented (docs/config.md, the reference generated from the
schema: tests/test_docs.py keeps it current) and the README keeps its two commands."""
import dataclasses
import typing

from conftest import REPO
from pretrain.config import JobConfig


def _keys(cls, prefix=""):
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        t = hints[f.name]
        inner = [a for a in typing.get_args(t) if dataclasses.is_dataclass(a)]
        sub = t if dataclasses.is_dataclass(t) else (inner[0] if inner else None)
        yield key
        if sub is not None:  # a list of groups: key[].field
            yield from _keys(sub, key + ("[]." if typing.get_origin(t) is list else "."))


def test_every_knob_is_documented():
    from pretrain.model import family_names, get_family

    reference = (REPO / "docs" / "config.md").read_text()
    keys = list(_keys(JobConfig))
    for name in family_names():  # `model` is the schema of the model file's family
        keys += list(_keys(get_family(name).args, "model."))
    assert "train.grad_accum_steps" in keys and "model.rope_scaling.factor" in keys
    assert "data.mixture[].weight" in keys
    missing = [k for k in keys if f"| `{k}` |" not in reference and "." in k]
    assert not missing, f"knobs without a row in docs/config.md: {missing}"


def test_two_commands_and_makefile_targets():
    readme = (REPO / "README.md").read_text()
    assert "make demo" in readme and "make test" in readme
    makefile = (REPO / "Makefile").read_text()
    assert "\ndemo:" in makefile and "\ntest:" in makefile
    ci = (REPO / ".ci" / "run").read_text()
    assert "make test" in ci
