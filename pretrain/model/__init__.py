"""Model families: each a sub-package (``llama/``) whose ``FAMILY`` (``family.ModelFamily``)
gives the trainer its config schema, builder, layout, LoRA targets, FLOPs and Hugging
Face converter. The folder is the registration: ``family_names`` lists them.
``get_family`` resolves ``model.family``: a family's folder name or a dotted import path
``package.module:NAME``."""
from __future__ import annotations

import importlib
import pkgutil
from typing import List

from .family import LoRASpec, ModelFamily


def family_names() -> List[str]:
    """The families in the tree: every sub-package of ``pretrain/model/``."""
    return sorted(m.name for m in pkgutil.iter_modules(__path__) if m.ispkg)


class UnknownFamily(ValueError):
    pass


def get_family(name: str) -> ModelFamily:
    """The family ``model.family`` names: a folder under ``pretrain/model/`` or ``package.module:NAME``."""
    target = f"{__name__}.{name}:FAMILY" if name in family_names() else name
    if ":" not in target:
        raise UnknownFamily(f"model.family={name!r}: expected one of {', '.join(family_names())} or an import "
                            "path package.module:NAME")
    module, _, attr = target.partition(":")
    try:
        family = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise UnknownFamily(f"model.family={name!r}: cannot import {target} ({e})") from None
    if not isinstance(family, ModelFamily):
        raise UnknownFamily(f"model.family={name!r}: {target} is a {type(family).__name__}, not a ModelFamily")
    return family


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
    raise UnknownFamily(f"model_type={model_type!r}: expected one of {', '.join(known)}")


__all__ = ["LoRASpec", "ModelFamily", "UnknownFamily", "family_for_hf", "family_names", "family_of",
           "get_family"]
