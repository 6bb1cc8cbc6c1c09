"""Model families: each a folder (``llama/``) whose ``FAMILY`` (``family.ModelFamily``)
gives the trainer its config schema, builder, layout, LoRA targets, FLOPs and Hugging
Face converter. ``get_family`` resolves ``model.family``: a registered name or a dotted
import path ``package.module:NAME``."""
from __future__ import annotations

import importlib
from typing import Dict

from .family import LoRASpec, ModelFamily

# name -> "module:attribute", imported on first use.
REGISTRY: Dict[str, str] = {
    "llama": "pretrain.model.llama:FAMILY",
}


class UnknownFamily(ValueError):
    pass


def get_family(name: str) -> ModelFamily:
    """The family ``model.family`` names: a key of ``REGISTRY`` or ``package.module:NAME``."""
    target = REGISTRY.get(name, name)
    if ":" not in target:
        raise UnknownFamily(f"model.family={name!r}: expected one of {', '.join(sorted(REGISTRY))} or an import "
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
    for name in REGISTRY:
        fam = get_family(name)
        if fam.hf is not None and model_type in fam.hf.model_types:
            return fam
    known = [t for n in REGISTRY for t in (get_family(n).hf.model_types if get_family(n).hf else ())]
    raise UnknownFamily(f"model_type={model_type!r}: expected one of {', '.join(known)}")


__all__ = ["REGISTRY", "LoRASpec", "ModelFamily", "UnknownFamily", "family_for_hf", "family_of", "get_family"]
