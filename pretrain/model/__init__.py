"""Model families: each a sub-package (``llama/``) whose ``FAMILY`` (``family.ModelFamily``)
gives the trainer its config schema, builder, layout, LoRA targets, FLOPs and Hugging
Face converter. The folder is the registration: ``family_names`` lists them.
``get_family`` resolves ``model.family``: a family's folder name or a dotted import path
``package.module:NAME``."""
from __future__ import annotations

import functools
import importlib
import pkgutil
import re
from typing import Tuple

from .family import LoRASpec, ModelFamily


_TARGET = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*")


@functools.lru_cache(maxsize=None)
def family_names() -> Tuple[str, ...]:
    """The families in the tree: the sub-packages of ``pretrain/model/`` that define a
    ``FAMILY`` (a package of shared helpers there is not one). A family folder that fails
    to import fails loudly, naming it."""
    names = []
    for m in pkgutil.iter_modules(__path__):
        if m.ispkg and isinstance(getattr(importlib.import_module(f"{__name__}.{m.name}"), "FAMILY", None),
                                  ModelFamily):
            names.append(m.name)
    return tuple(sorted(names))


class UnknownFamily(ValueError):
    """``model.family`` names no family; ``expected`` says what would."""

    def __init__(self, name, expected: str):
        self.value, self.expected = name, expected
        super().__init__(f"model.family={name!r}: {expected}")


def get_family(name: str) -> ModelFamily:
    """The family ``model.family`` names: a folder under ``pretrain/model/`` or an import
    path ``package.module:NAME`` (imported: the user's own code, never a checkpoint's)."""
    if isinstance(name, str) and name in family_names():
        target = f"{__name__}.{name}:FAMILY"
    elif isinstance(name, str) and _TARGET.fullmatch(name):
        target = name
    else:
        raise UnknownFamily(name, f"expected one of {', '.join(family_names())} or an import path "
                                  "package.module:NAME")
    module, _, attr = target.partition(":")
    try:
        family = getattr(importlib.import_module(module), attr)
    except (Exception, SystemExit) as e:  # whatever the module does on import: it is not a family
        raise UnknownFamily(name, f"cannot import {target} ({type(e).__name__}: {e})") from None
    if not isinstance(family, ModelFamily):
        raise UnknownFamily(name, f"{target} is a {type(family).__name__}, not a ModelFamily")
    return family


def canonical_family_name(name: str) -> str:
    """``name`` as the tree calls it: an import path whose target is a tree family's
    ``FAMILY`` (``pretrain.model.llama:FAMILY``) is that family's folder name, so its
    checkpoints export and resume as the family's own; any other name is returned as is."""
    if not isinstance(name, str) or name in family_names() or not _TARGET.fullmatch(name):
        return name
    try:
        family = get_family(name)
    except UnknownFamily:
        return name
    for tree in family_names():
        if get_family(tree) is family:
            return tree
    return name


def family_of(args) -> ModelFamily:
    """The family of a model config (its ``family`` field)."""
    return get_family(getattr(args, "family", "llama"))


def family_for_hf(model_type: str) -> ModelFamily:
    """The registered family whose converter reads Hugging Face ``model_type``."""
    families = [get_family(name) for name in family_names()]
    for fam in families:
        if fam.hf is not None and model_type in fam.hf.model_types:
            return fam
    known = [t for fam in families if fam.hf is not None for t in fam.hf.model_types]
    raise ValueError(f"model_type={model_type!r}: expected one of {', '.join(known)}")


__all__ = ["LoRASpec", "ModelFamily", "UnknownFamily", "canonical_family_name", "family_for_hf", "family_names",
           "family_of", "get_family"]
