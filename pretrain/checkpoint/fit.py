"""Whether a sound checkpoint fits the job that resumes it: what ``meta.json`` records of
the run that wrote it (the model, LoRA, the frozen towers) compared with this job's
config, field by field, before anything is loaded.

A difference is the config's doing, never the files': the job exits 4 naming each
setting that changed (``CheckpointMismatch``) and moves nothing aside. Compared: every
model field that changes the trained function (shapes, RoPE, norm eps, the family; the
fields declared ``resume=False`` beside them, such as ``name``, ``init_std``,
``init_from`` and ``max_position_embeddings``, are not), LoRA's rank, alpha and targets
and the base its adapters were trained on, and the frozen towers (a tower frozen in the
checkpoint's run has no optimizer state, so it cannot train now; freezing more is
fine). Checkpoints of earlier versions lack some records: those are not compared."""
from __future__ import annotations

import dataclasses
import re
from typing import Any, List, Optional

from .files import CheckpointMismatch


def plain(v):
    """A config value as plain data (a dataclass as its dict, lists of lists as lists)."""
    if dataclasses.is_dataclass(v):
        return dataclasses.asdict(v)
    if isinstance(v, (list, tuple)):
        return [plain(x) for x in v]
    return v


def _family(name) -> Any:
    """The family a checkpoint records, by its text alone (meta.json is data, never a
    reason to import code): ``pretrain.model.<tree family>:FAMILY`` is that family, as the
    job's own name already is (``validate`` records it so)."""
    from ..model import family_names

    m = re.fullmatch(r"pretrain\.model\.(\w+):FAMILY", name) if isinstance(name, str) else None
    return m.group(1) if m and m.group(1) in family_names() else name


def _resolved_head_dim(saved: dict):
    dim, heads = saved.get("dim"), saved.get("n_heads")
    return dim // heads if type(dim) is int and type(heads) is int and heads > 0 else None


def model_changes(saved: Optional[dict], model_args) -> List[str]:
    """``model.<field>=<now> (the checkpoint: <then>)`` for each field that differs."""
    if not isinstance(saved, dict):
        return []
    out = []
    for f in dataclasses.fields(model_args):
        if not f.metadata.get("resume", True) or f.name not in saved:
            continue
        now, then = plain(getattr(model_args, f.name)), saved[f.name]
        if f.name == "family":
            then = _family(then)
        if f.name == "head_dim":  # None is dim // n_heads: compare what it resolves to
            now = model_args.resolved_head_dim
            then = then if then is not None else _resolved_head_dim(saved)
        if now != then:
            out.append(f"model.{f.name}={now!r} (the checkpoint: {then!r})")
    return out


def lora_changes(saved: Optional[dict], now: Optional[dict]) -> List[str]:
    """LoRA's settings: on or off, rank, alpha, targets, and the base of the adapters
    (``model.init_from``, or with none the seeded init of ``train.seed``)."""
    if not saved and not now:
        return []
    if not saved or not now:
        return [f"finetune.lora.rank={now['rank'] if now else 0} (the checkpoint: {saved['rank'] if saved else 0}: "
                f"{'adapters only' if saved else 'every weight'})"]
    out = []
    for key in ("rank", "alpha"):
        if key in saved and saved[key] != now[key]:
            out.append(f"finetune.lora.{key}={now[key]!r} (the checkpoint: {saved[key]!r})")
    if "targets" in saved and sorted(saved["targets"]) != sorted(now["targets"]):
        out.append(f"finetune.lora.target_modules={now['targets']} (the checkpoint: {saved['targets']})")
    # The base by content where both runs know it (a copy elsewhere is the base; other weights
    # under the same path are not), else by path (checkpoints of earlier versions).
    by_content = saved.get("base_fingerprint") is not None and now.get("base_fingerprint") is not None
    if "base" in saved and (saved["base_fingerprint"] != now["base_fingerprint"] if by_content
                            else saved["base"] != now["base"]):
        out.append(f"model.init_from={now['base']!r} (the checkpoint's adapters were trained on {saved['base']!r}"
                   f"{', whose config.json and weight headers were others' if by_content else ''}: its checkpoints "
                   "hold the adapters only, the base comes from model.init_from; a copy of the base elsewhere is "
                   "accepted)")
    elif saved.get("base") is None and "seed" in saved and saved["seed"] != now["seed"]:
        out.append(f"train.seed={now['seed']} (the checkpoint's adapters were trained on the seeded init of "
                   f"train.seed={saved['seed']})")
    return out


def freeze_changes(saved: Optional[list], now: List[str]) -> List[str]:
    if saved is None:
        return []
    thawed = [t for t in saved if t not in now]
    if not thawed:
        return []
    return [f"finetune.freeze={list(now)} (the checkpoint: {list(saved)}; {', '.join(thawed)} was frozen there and "
            "has no optimizer state to continue from: freeze it again, or start a run from these weights with "
            "checkpoint.load_path=<the step dir> checkpoint.load_weights_only=true)"]


def check_fits(path, meta: dict, model_args, lora: Optional[dict], freeze: List[str]) -> None:
    """``CheckpointMismatch`` naming every setting that differs from the run that wrote
    checkpoint ``path``."""
    changes = [*model_changes(meta.get("model"), model_args), *lora_changes(meta.get("lora"), lora),
               *freeze_changes(meta.get("freeze"), freeze)]
    if changes:
        raise CheckpointMismatch(
            f"checkpoint {path} was written by a run with other settings: {'; '.join(changes)}. The checkpoint is "
            "sound and stays where it is: resume with the checkpoint's settings, or use another hydra.run.dir")
