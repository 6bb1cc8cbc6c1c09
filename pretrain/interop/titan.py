"""torchtitan interop: ``python -m pretrain.titan import|export``.

    python -m pretrain.titan import <torchtitan step dir> <checkpoint dir> [--model llama3_2_1b] [key=value ...]
    python -m pretrain.titan export <checkpoint or run dir> <torchtitan step dir>

torchtitan (0.3.0, its ``llama3`` model) keeps a checkpoint as DCP under
``<dump>/checkpoint/step-<N>/`` with flat model keys, its optimizer state keyed by
parameter (q/k/v fused per KV-head group), ``lr_scheduler``, ``train_state.{step,
ntokens_seen}`` and a pickled data loader state. Names and layouts:
``pretrain/model/llama/titan.py``.

``import`` writes a checkpoint of this trainer: the weights, AdamW's moments and step
counts (the fused q/k/v moments split exactly), the step and tokens seen. A torchtitan
step dir records no model config, so the import takes ours (``--model`` and Hydra-style
overrides, ``model.*`` and ``optim.*``) and checks every tensor's shape against it; the
RoPE settings default to torchtitan's (``scaling_factor`` 8, see ``TITAN_ROPE``) unless
an override sets them or the folder is one our ``export`` wrote (it records them). The
data loader's state is never unpickled (it is code as much as data) and cannot be
carried: resume the import with ``checkpoint.load_path=<dir> checkpoint.resume_data=false``
(the data starts afresh at the imported step). A step dir with weights only (torchtitan
saves its last step model-only by default) gives a weights-only checkpoint:
``checkpoint.load_weights_only=true`` or ``model.init_from=titan:<dir>``.

``export`` writes a torchtitan step dir: model, optimizer (moments merged into the fused
layout; every parameter's hyperparameters those of our decayed group: torchtitan keeps
one group), ``lr_scheduler.last_epoch`` and ``train_state`` at our step, no data loader
state. torchtitan loads it with ``checkpoint.initial_load_path=<dir>`` (model only, its
default), or fully with ``checkpoint.initial_load_model_only=false`` and
``checkpoint.exclude_from_loading=["dataloader"]``; its model needs the RoPE settings and
weight tying ``pretrain_export.json`` records (printed by the command).

Text families only (Llama 3.x): ``model.family=mllama`` is refused. Both commands write
``<out>.partial`` and rename it when done, show progress in bytes, and exit 4 naming the
key and both shapes when a tensor does not fit."""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import shutil
import sys
from pathlib import Path
from typing import Dict, List, Optional

import torch

from ..checkpoint import CheckpointError, read_meta
from ..checkpoint.files import checked_file, load_dcp, read_dcp_metadata
from ..model import family_of
from .hf import (EXIT_CHECKPOINT_ERROR, _checkpoint_args, _finish, _fresh_out, _model_param_shapes, _progress,
                 _saved_metadata, check_out, resolve_checkpoint, write_checkpoint)

log = logging.getLogger("pretrain")

MOMENTS = ("exp_avg", "exp_avg_sq")
EXPORT_NOTE = "pretrain_export.json"  # beside an export: what torchtitan's model config must say
# The hyperparameters torchtitan 0.3.0's AdamW keeps per parameter in its flat optimizer state
# (``optimizer.param_groups.<fqn>.<key>``); its full load needs every one.
_TITAN_GROUP_KEYS = ("lr", "betas", "eps", "weight_decay", "amsgrad", "maximize", "foreach", "capturable",
                     "differentiable", "fused", "decoupled_weight_decay", "initial_lr")
_STATE_PREFIXES = ("optimizer.", "lr_scheduler.", "train_state.", "dataloader")


def _converter(args, where: str):
    """The family's torchtitan converter (``ModelFamily.titan``); refused naming
    model.family when it has none."""
    fam = family_of(args)
    if fam.titan is None:
        raise CheckpointError(f"{where}: model.family={fam.name!r} has no torchtitan counterpart: torchtitan interop "
                              "carries text models of the llama family only (torchtitan has no Llama 3.2 Vision)")
    why = fam.titan.unsupported(args)
    if why:
        raise CheckpointError(f"{where}: {why}")
    return fam.titan


class TitanStep:
    """A torchtitan step dir, read as data: its DCP metadata through the safe unpickler,
    tensors one key at a time, plain values (step counts) with ``weights_only``."""

    def __init__(self, path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise CheckpointError(f"{self.path}: not a folder (expected a torchtitan step dir, "
                                  "<dump>/checkpoint/step-<N>)")
        self.entries = read_dcp_metadata(self.path).state_dict_metadata
        if any(k.startswith("model.") for k in self.entries):
            raise CheckpointError(f"{self.path}: a checkpoint of this trainer (model.* keys), not torchtitan's: "
                                  "use it as it is")
        if "tok_embeddings.weight" not in self.entries:
            raise CheckpointError(f"{self.path}: no tok_embeddings.weight: not a torchtitan Llama checkpoint (it has "
                                  f"e.g. {sorted(self.entries)[:3]})")

    def shape(self, key: str):
        e = self.entries.get(key)
        return tuple(e.size) if e is not None and hasattr(e, "size") else None

    def tensors(self, keys) -> Dict[str, torch.Tensor]:
        """Several tensors in one DCP read (its metadata parsed once, not once per key)."""
        state = {}
        for key in keys:
            e = self.entries[key]
            if not e.properties.dtype.is_floating_point:
                raise CheckpointError(f"{self.path}: {key} is stored as {e.properties.dtype}, expected floating point")
            state[key] = torch.empty(tuple(e.size), dtype=e.properties.dtype)
        if state:
            load_dcp(state, self.path, no_dist=True)
        return state

    def tensor(self, key: str) -> torch.Tensor:
        return self.tensors([key])[key]

    def value(self, key: str):
        state = {key: None}
        load_dcp(state, self.path, no_dist=True)
        return state[key]

    @property
    def has_optimizer(self) -> bool:
        return any(k.startswith("optimizer.state.") for k in self.entries)


def _check_shape(where, key: str, have, want) -> None:
    if have is None:
        raise CheckpointError(f"{where}: no {key} (expected shape {list(want)}): the model config differs, or the "
                              "checkpoint is not of this model")
    if tuple(have) != tuple(want):
        raise CheckpointError(f"{where}: {key} has shape {list(have)} in the checkpoint but {list(want)} in this "
                              "model: the model config differs")


def _nbytes(t) -> int:
    return t.numel() * t.element_size()


def _by_block(names_in_order) -> List[List[str]]:
    """Our parameter names grouped by block (``layers.<i>.``; everything else alone), in
    order: the unit of one batched read."""
    groups: List[List[str]] = []
    last = None
    for n in names_in_order:
        block = ".".join(n.split(".")[:2]) if n.startswith("layers.") else n
        if block != last:
            groups.append([])
            last = block
        groups[-1].append(n)
    return groups


def _check_tie(src: "TitanStep", tied: bool, head_state: Optional[bool], tok: Optional[torch.Tensor] = None) -> None:
    """The tie of ``src`` against ``model.tie_embeddings``: its optimizer's state for
    lm_head.weight (``head_state``) when it has one, else the two weights' equality."""
    if tied and head_state is None and src.shape("lm_head.weight") is not None:
        head_state = not torch.equal(src.tensor("lm_head.weight"),
                                     tok if tok is not None else src.tensor("tok_embeddings.weight"))
    if tied and head_state:
        raise CheckpointError(f"{src.path}: its lm_head.weight is trained apart from tok_embeddings.weight "
                              "(torchtitan's enable_weight_tying=false), but model.tie_embeddings=true here: "
                              "set model.tie_embeddings=false")
    if not tied and head_state is False:
        raise CheckpointError(f"{src.path}: its optimizer has no state for lm_head.weight (torchtitan's "
                              "enable_weight_tying=true), but model.tie_embeddings=false here: set "
                              "model.tie_embeddings=true")


# -- import --------------------------------------------------------------------------------
def import_titan(step_dir, out, args, optim_cfg, *, force: bool = False, progress: bool = True) -> dict:
    """torchtitan step dir -> a checkpoint of this trainer at ``out`` (model, optimizer
    moments and step counts, step, tokens seen; or weights only) for the model ``args``
    and optimizer config ``optim_cfg`` (its hyperparameters go into the optimizer state as
    our loader expects them). Returns what it wrote: step, tokens_seen, weights_only."""
    out = Path(out)
    src = TitanStep(step_dir)
    check_out(out, force, src.path)
    names = _converter(args, str(src.path))
    ours = _model_param_shapes(args)
    full = _check_import(src, args, ours, names)
    model, optim = _read_import(src, args, ours, full, progress, names)
    step = tokens = 0
    if full:
        optim.update(_our_param_groups(args, optim_cfg))
        step = src.value("train_state.step")
        tokens = src.value("train_state.ntokens_seen") if "train_state.ntokens_seen" in src.entries else 0
        for key, v in (("train_state.step", step), ("train_state.ntokens_seen", tokens)):
            if type(v) is not int or v < 0:
                raise CheckpointError(f"{src.path}: {key}={v!r}, expected an integer >= 0")
    meta = {"step": step, "tokens_seen": tokens, "world_size": 1, "model": dataclasses.asdict(args), "freeze": [],
            "source": str(src.path.resolve()), "imported_from": "torchtitan"}
    if not full:
        meta["weights_only"] = True
    write_checkpoint(out, force, src.path, {"model": model, **({"optim": optim} if full else {})}, meta, args)
    return {"step": step, "tokens_seen": tokens, "weights_only": not full}


def _check_import(src: TitanStep, args, ours: Dict[str, tuple], names) -> bool:
    """Every tensor of ``src`` against our model ``ours`` (shapes, no extra layers, the
    tie); True when it holds an optimizer and a train state (a full checkpoint)."""
    tied = "output.weight" not in ours
    for n, shape in ours.items():
        _check_shape(src.path, names.titan_name(n), src.shape(names.titan_name(n)), shape)
    if tied and src.shape("lm_head.weight") is not None:
        _check_shape(src.path, "lm_head.weight", src.shape("lm_head.weight"), ours["tok_embeddings.weight"])
    known = {names.titan_name(n) for n in ours} | {"lm_head.weight"}
    extra = sorted(k for k in src.entries if not k.startswith(_STATE_PREFIXES) and k not in known)
    if extra:
        raise CheckpointError(f"{src.path} holds {len(extra)} model tensor(s) this model lacks (e.g. "
                              f"{', '.join(extra[:3])}): the model config differs (model.n_layers?)")
    full = src.has_optimizer
    if full and "train_state.step" not in src.entries:
        raise CheckpointError(f"{src.path}: optimizer state but no train_state.step: not a checkpoint torchtitan's "
                              "CheckpointManager wrote whole")
    if full:
        _check_tie(src, tied, any(k.startswith("optimizer.state.lm_head.weight.") for k in src.entries))
    return full


def _read_import(src: TitanStep, args, ours: Dict[str, tuple], full: bool, progress: bool, names):
    """(our model tensors, our flat optimizer state) from ``src``, key by key; the fused
    q/k/v moments split per KV group."""
    tied = "output.weight" not in ours
    model: Dict[str, torch.Tensor] = {}
    optim: Dict[str, object] = {}
    total = sum(math.prod(s) * 4 for s in ours.values()) * (3 if full else 1)
    with _progress(total, f"reading {src.path.name}", progress) as bar:
        for group in _by_block(ours):
            keys = {n: [names.titan_name(n)] for n in group}
            if full:
                for n in group:
                    param, part = names.titan_param(n)
                    moment = names.fused_shape(args) if part else ours[n]
                    for k, want in ((MOMENTS[0], moment), (MOMENTS[1], moment), ("step", ())):
                        keys[n].append(f"optimizer.state.{param}.{k}")
                        _check_shape(src.path, keys[n][-1], src.shape(keys[n][-1]), want)
            got = src.tensors(sorted({k for ks in keys.values() for k in ks}))
            splits: Dict[str, dict] = {}  # a fused q/k/v moment split once for its three parts
            for n in group:
                model[n] = got[keys[n][0]]
                bar.update(_nbytes(model[n]))
                if not full:
                    continue
                part = names.titan_param(n)[1]
                for k, key in zip((*MOMENTS, "step"), keys[n][1:]):
                    if part is not None and k != "step" and key not in splits:
                        splits[key] = names.split_qkv(got[key], args)
                    t = splits[key][part] if part is not None and k != "step" else got[key]
                    optim[f"state.{n}.{k}"] = t
                    bar.update(_nbytes(t) if k != "step" else 0)
        if tied and not full:
            _check_tie(src, tied, None, model["tok_embeddings.weight"])
    return model, optim


def _our_param_groups(args, optim_cfg) -> Dict[str, object]:
    """Our optimizer's flat ``param_groups.<name>.<key>`` entries, as a run of ``args`` and
    ``optim_cfg`` builds them (on the meta device: no memory): a full load reads them."""
    from ..optim import build_optimizer

    with torch.device("meta"):
        model = family_of(args).build(args, 1)
    opt = build_optimizer(model, optim_cfg)
    name_of = {id(p): n for n, p in model.named_parameters()}
    out: Dict[str, object] = {}
    for group in opt.param_groups:
        for p in group["params"]:
            for k, v in group.items():
                if k != "params":
                    # foreach: the resuming run's device decides (the meta device is not one).
                    out[f"param_groups.{name_of[id(p)]}.{k}"] = None if k == "foreach" else v
    return out


TITAN_PREFIX = "titan:"  # model.init_from=titan:<torchtitan step dir>


def titan_dir(init_from) -> Optional[str]:
    """The step dir of ``model.init_from=titan:<dir>``; None for any other value."""
    if isinstance(init_from, str) and init_from.startswith(TITAN_PREFIX):
        return init_from[len(TITAN_PREFIX):]
    return None


def titan_fingerprint(step_dir) -> Optional[str]:
    """A step dir's identity by content (its DCP metadata: every key, shape and offset), so
    a LoRA run records the base it adapted; None when unreadable."""
    import hashlib

    f = Path(step_dir) / ".metadata"
    try:
        checked_file(f)  # a regular file inside the dir: not a FIFO, not /dev/zero
        if f.stat().st_size > 256 << 20:
            return None
        return hashlib.sha256(f.read_bytes()).hexdigest()[:32]
    except (OSError, CheckpointError):
        return None


def _start_point(step_dir, args):
    """A torchtitan step dir as a start point for ``args``: (dir, converter, our shapes),
    every weight's shape and the tie checked."""
    src = TitanStep(step_dir)
    names = _converter(args, str(src.path))
    ours = _model_param_shapes(args)
    for n, shape in ours.items():
        _check_shape(src.path, names.titan_name(n), src.shape(names.titan_name(n)), shape)
    if "output.weight" not in ours:  # tied here: an untied head there would be dropped
        _check_tie(src, True, any(k.startswith("optimizer.state.lm_head.weight.") for k in src.entries)
                   if src.has_optimizer else None)
    return src, names, ours


def read_titan_weights(step_dir, args) -> Dict[str, torch.Tensor]:
    """Every weight of a torchtitan step dir by our name, in fp32, checked against ``args``
    (a LoRA run's base, merged into its adapters on export)."""
    src, names, ours = _start_point(step_dir, args)
    got = src.tensors([names.titan_name(n) for n in ours])
    return {n: got[names.titan_name(n)].float() for n in ours}


def load_titan_weights(model: torch.nn.Module, step_dir, args, *, chunk_bytes: int = 1 << 30,
                       progress: bool = False) -> None:
    """A torchtitan step dir's weights into ``model`` under any layout (plain, FSDP2
    DTensors, TP, a pipeline stage's part: each rank reads the tensors its part holds, whole,
    and keeps its shard), ``chunk_bytes`` at a time. Called by every rank."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         set_model_state_dict)

    from ..lora import is_lora_param

    src, names, ours = _start_point(step_dir, args)
    targets = [k for k in get_model_state_dict(model) if not is_lora_param(k)]  # base weights only
    unknown = [k for k in targets if k not in ours]
    if unknown:
        raise CheckpointError(f"{src.path}: this model's {unknown[0]} has no torchtitan counterpart")
    opts = StateDictOptions(full_state_dict=True, strict=False)
    chunks: List[List[str]] = [[]]
    size = 0
    for name in targets:
        if chunks[-1] and size + math.prod(ours[name]) * 4 > chunk_bytes:
            chunks.append([])
            size = 0
        chunks[-1].append(name)
        size += math.prod(ours[name]) * 4
    with _progress(sum(math.prod(ours[k]) * 4 for k in targets), f"loading {src.path.name}", progress) as bar:
        for chunk in chunks:
            got = src.tensors([names.titan_name(n) for n in chunk])
            batch = {n: got[names.titan_name(n)].float() for n in chunk}
            set_model_state_dict(model, batch, options=opts)
            bar.update(sum(_nbytes(t) for t in batch.values()))
    log.info("initialized weights from torchtitan step dir %s", src.path)


# -- export --------------------------------------------------------------------------------
def export_titan(checkpoint, out, *, force: bool = False, progress: bool = True) -> dict:
    """A checkpoint of this trainer (or a run dir: its newest) -> a torchtitan step dir.
    Returns the torchtitan model settings it needs (``pretrain_export.json``)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemWriter

    ckpt = resolve_checkpoint(checkpoint)
    meta = read_meta(ckpt)
    args = _checkpoint_args(ckpt, meta)
    names = _converter(args, str(ckpt / "meta.json"))
    if meta.get("lora"):
        raise CheckpointError(f"{ckpt}: a LoRA checkpoint (adapters only): torchtitan has no adapters; export it to "
                              "Hugging Face (python -m pretrain.hf export merges it) and import that into torchtitan")
    check_out(Path(out), force, ckpt)
    saved = _saved_metadata(ckpt, meta)
    ours = _model_param_shapes(args)
    for n, shape in ours.items():
        have = saved.get(f"model.{n}")
        _check_shape(ckpt, f"model.{n}", tuple(have.size) if have is not None else None, shape)
    full = not meta.get("weights_only") and any(k.startswith("optim.state.") for k in saved)
    if full and meta.get("freeze"):
        full = False
        log.warning("%s: finetune.freeze=%s left those parameters without optimizer state: exporting the weights "
                    "only", ckpt, meta["freeze"])
    flat = _read_export(_OurStep(ckpt, saved), args, ours, full, int(meta.get("step", 0)),
                        int(meta.get("tokens_seen", 0)), progress, names)
    note = {"model": dataclasses.asdict(args), "enable_weight_tying": "output.weight" not in ours,
            "rope": names.rope_of(args), "step": int(meta.get("step", 0)),
            "tokens_seen": int(meta.get("tokens_seen", 0)), "optimizer": full, "source": str(ckpt.resolve())}
    out = Path(out)
    partial = _fresh_out(out, force, ckpt)
    try:
        dcp.save(flat, storage_writer=FileSystemWriter(str(partial)), no_dist=True)
        (partial / EXPORT_NOTE).write_text(json.dumps(note, indent=2) + "\n")
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    _finish(partial, out)
    return note


class _OurStep:
    """A checkpoint of ours read key by key (its files already checked against meta.json)."""

    def __init__(self, path: Path, saved: dict):
        self.path, self.saved = path, saved

    def tensor(self, key: str) -> torch.Tensor:
        if key not in self.saved:
            raise CheckpointError(f"{self.path}: no {key}")
        e = self.saved[key]
        state = {key: torch.empty(tuple(e.size), dtype=e.properties.dtype)}
        load_dcp(state, self.path, no_dist=True)
        return state[key]

    def value(self, key: str):
        if key not in self.saved:
            raise CheckpointError(f"{self.path}: no {key}")
        state = {key: None}
        load_dcp(state, self.path, no_dist=True)
        return state[key]


def _read_export(src: _OurStep, args, ours: Dict[str, tuple], full: bool, step: int, tokens: int,
                 progress: bool, names) -> Dict[str, object]:
    """torchtitan's flat state from ours: model (a tied head under both names), and when
    ``full`` the optimizer (q/k/v moments merged per KV group), schedule and train state."""
    flat: Dict[str, object] = {}
    total = sum(math.prod(s) * 4 for s in ours.values()) * (3 if full else 1)
    with _progress(total, f"reading {src.path.name}", progress) as bar:
        for n in ours:
            flat[names.titan_name(n)] = t = src.tensor(f"model.{n}")
            bar.update(_nbytes(t))
        if "output.weight" not in ours:
            flat["lm_head.weight"] = flat["tok_embeddings.weight"]
        if not full:
            return flat
        decayed = next(n for n, s in ours.items() if len(s) >= 2)
        hyper = {k: src.value(f"optim.param_groups.{decayed}.{k}") for k in ("lr", "betas", "eps", "weight_decay")}
        hyper.update(amsgrad=False, maximize=False, foreach=False, capturable=False, differentiable=False,
                     fused=False, decoupled_weight_decay=True, initial_lr=hyper["lr"])
        parts: Dict[tuple, dict] = {}
        for n in ours:
            param, part = names.titan_param(n)
            for k in (*MOMENTS, "step"):
                t = src.tensor(f"optim.state.{n}.{k}")
                bar.update(_nbytes(t) if k != "step" else 0)
                if part is None:
                    flat[f"optimizer.state.{param}.{k}"] = t
                else:
                    parts.setdefault((param, k), {})[part] = t
            for k in _TITAN_GROUP_KEYS:
                flat[f"optimizer.param_groups.{param}.{k}"] = hyper[k]
    for (param, k), qkv in parts.items():
        if k != "step":
            flat[f"optimizer.state.{param}.{k}"] = names.merge_qkv(qkv["wq"], qkv["wk"], qkv["wv"], args)
        elif torch.equal(qkv["wq"], qkv["wk"]) and torch.equal(qkv["wq"], qkv["wv"]):
            flat[f"optimizer.state.{param}.step"] = qkv["wq"]
        else:
            raise CheckpointError(f"{src.path}: {param}'s q/k/v took different numbers of optimizer steps "
                                  f"({[float(qkv[p]) for p in ('wq', 'wk', 'wv')]}): they cannot share torchtitan's "
                                  "fused parameter")
    flat.update({"lr_scheduler.last_epoch": step, "train_state.step": step, "train_state.ntokens_seen": tokens})
    return flat


_ROPE_NUMBERS = ("theta", "scaling_factor", "low_freq_factor", "high_freq_factor",
                 "original_max_position_embeddings")


def _recorded_rope(step_dir: Path) -> Optional[dict]:
    """The RoPE settings our export recorded beside a step dir (``pretrain_export.json``),
    read as JSON data; None when there is none. A record that is not one (not JSON, a
    setting missing, not a positive finite number) is a CheckpointError naming the file."""
    f = Path(step_dir) / EXPORT_NOTE
    if not f.exists():
        return None
    try:
        checked_file(f)
        if f.stat().st_size > 1 << 20:
            raise ValueError("larger than 1 MiB")
        rope = json.loads(f.read_text())["rope"]
        scaled = rope["scaling"] == "llama"
        if rope["scaling"] not in ("llama", "none"):
            raise ValueError(f"scaling={rope['scaling']!r}, expected 'llama' or 'none'")
        for key in _ROPE_NUMBERS if scaled else ("theta",):
            v = rope[key]
            if type(v) not in (int, float) or not math.isfinite(v) or v <= 0:
                raise ValueError(f"{key}={v!r}, expected a positive number")
    except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{f}: not the RoPE record our export writes ({type(e).__name__}: {e})") from None
    return rope


def _rope_overrides(rope: dict, told: List[str]) -> List[str]:
    """Overrides that set ``rope``, less those the user's overrides (``told``: their keys)
    set themselves (Hydra refuses a key given twice)."""
    if rope.get("scaling") == "none":
        out = {"model.rope_theta": rope["theta"], "model.rope_scaling": "null"}
    else:
        out = {"model.rope_theta": rope["theta"], **{f"model.rope_scaling.{k}": rope[v] for k, v in (
            ("factor", "scaling_factor"), ("low_freq_factor", "low_freq_factor"),
            ("high_freq_factor", "high_freq_factor"),
            ("original_max_position_embeddings", "original_max_position_embeddings"))}}
    whole = "model.rope_scaling" in told  # the node set (or deleted) as a whole
    return [f"{k}={v}" for k, v in out.items()
            if k not in told and not (whole and k.startswith("model.rope_scaling"))]


def compose_import_config(step_dir, model: str, overrides: List[str]):
    """The job config an import writes for: ``model=<model>`` and the overrides, with the
    RoPE settings of the step dir (our export's record, else torchtitan's defaults: the
    family's ``TITAN_ROPE``) where an override does not set them, validated as a run's
    (model and optimizer rules: ``ConfigError`` naming the key). Returns (config, the RoPE settings assumed)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from ..config import register_configs
    from ..validate import validate_model_and_optim

    told = [o.lstrip("+~").split("=", 1)[0] for o in overrides]
    register_configs()
    configs = Path(__file__).resolve().parents[2] / "configs"
    with initialize_config_dir(str(configs), version_base="1.3"):
        cfg = OmegaConf.to_object(compose("config", overrides=[f"model={model}", *overrides]))
        conv = family_of(cfg.model).titan
        rope = None
        if conv is not None:  # a family without a converter: the import refuses it, naming it
            rope = _recorded_rope(Path(step_dir)) or {**conv.TITAN_ROPE, "scaling": "llama"}
            cfg = OmegaConf.to_object(compose("config", overrides=[
                f"model={model}", *_rope_overrides(rope, told), *overrides]))
    validate_model_and_optim(cfg)
    return cfg, rope


# -- CLI ----------------------------------------------------------------------------------
class _Terminated(BaseException):
    """SIGTERM while converting: unwinds like Ctrl-C, so ``<out>.partial`` is removed."""


def _interrupt_code(e: BaseException) -> Optional[int]:
    """130 (Ctrl-C) or 143 (SIGTERM) when ``e`` is, or wraps (DCP wraps what its writer
    raised), an interrupt; else None."""
    from ..checkpoint.files import _chain

    for x in _chain(e):
        if isinstance(x, KeyboardInterrupt):
            return 130
        if isinstance(x, _Terminated):
            return 143
    return None


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pretrain.titan", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    imp = sub.add_parser("import", help="torchtitan step dir -> checkpoint of this trainer")
    imp.add_argument("step_dir")
    imp.add_argument("out", help="checkpoint directory to write")
    imp.add_argument("--model", default="llama3_2_1b", help="configs/model/<name> the weights are (default "
                                                             "llama3_2_1b)")
    imp.add_argument("overrides", nargs="*", help="Hydra overrides of the model and optimizer: model.n_layers=2 "
                                                  "optim.weight_decay=0.1 ...")
    exp = sub.add_parser("export", help="checkpoint (or run dir: its newest) -> torchtitan step dir")
    exp.add_argument("checkpoint")
    exp.add_argument("out", help="torchtitan step dir to write (<dump>/checkpoint/step-<N>)")
    for sp in (imp, exp):
        sp.add_argument("--force", action="store_true", help="replace a non-empty output directory")
        sp.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _run_import(a, p: argparse.ArgumentParser) -> None:
    bad = [o for o in a.overrides if not o.lstrip("+~").startswith(("model.", "optim."))]
    if bad:
        p.error(f"{bad[0]}: only model.* and optim.* overrides shape an import")
    if "=" in Path(a.out).name:
        p.error(f"{a.out}: the output folder looks like an override (give the checkpoint dir to write first)")
    from ..validate import ConfigError

    try:
        cfg, rope = compose_import_config(a.step_dir, a.model, a.overrides)
    except (CheckpointError, ConfigError):
        raise
    except Exception as e:  # noqa: BLE001 (Hydra's errors name the key)
        p.error(f"the model config: {type(e).__name__}: {e}")
    if rope is not None:
        print(f"RoPE as the step dir records it or torchtitan's llama3 flavors build it (theta {rope['theta']:g}, "
              f"scaling_factor {rope.get('scaling_factor', 'none')}) where no override sets it; override "
              "model.rope_scaling.* if the torchtitan run used others", file=sys.stderr)
    done = import_titan(a.step_dir, a.out, cfg.model, cfg.optim, force=a.force, progress=not a.no_progress)
    if done["weights_only"]:
        print(f"wrote {a.out}: weights only (the step dir has no optimizer state). Start from it with "
              f"checkpoint.load_path={a.out} checkpoint.load_weights_only=true, or model.init_from=titan:{a.step_dir}")
    else:
        print(f"wrote {a.out}: step {done['step']}, {done['tokens_seen']} tokens seen, AdamW moments. The data "
              "loader's state is torchtitan's pickle and is not carried: resume with "
              f"checkpoint.load_path={a.out} checkpoint.resume_data=false and model={a.model} (+ the same "
              f"overrides; {a.out}/model.yaml is the model config)")


def _run_export(a) -> None:
    note = export_titan(a.checkpoint, a.out, force=a.force, progress=not a.no_progress)
    r = note["rope"]
    rope = f"theta={r['theta']:g}, scaling={r['scaling']!r}" + (
        f", scaling_factor={r['scaling_factor']:g}" if r["scaling"] == "llama" else "") + (
        " (its llama3 flavors build 8)" if r.get("scaling_factor", 8.0) != 8.0 else "")
    what = f"model, optimizer, step {note['step']}" if note["optimizer"] else "weights only"
    load = ("load it with checkpoint.initial_load_path (model only), or fully with "
            "checkpoint.initial_load_model_only=false and checkpoint.exclude_from_loading=['dataloader']"
            if note["optimizer"] else "load it with checkpoint.initial_load_path")
    print(f"wrote {a.out} ({what}). torchtitan's model needs enable_weight_tying={note['enable_weight_tying']} "
          f"and RoPE {rope}; {load} (see {EXPORT_NOTE})")


def main(argv: Optional[List[str]] = None) -> int:
    import signal
    import threading

    from ..validate import ConfigError

    p = _parser()
    a, rest = p.parse_known_args(argv)  # overrides may follow the options
    unknown = [r for r in rest if a.cmd != "import" or r.startswith("-") or ("=" not in r and r[:1] != "~")]
    if unknown:
        p.error(f"unrecognized arguments: {' '.join(unknown)}")
    if a.cmd == "import":
        a.overrides = [*a.overrides, *rest]
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    old = None
    if threading.current_thread() is threading.main_thread():
        def _term(signum, frame):
            raise _Terminated()
        old = signal.signal(signal.SIGTERM, _term)
    try:
        _run_import(a, p) if a.cmd == "import" else _run_export(a)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_CHECKPOINT_ERROR
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except BaseException as e:  # noqa: BLE001 (an interrupt, perhaps wrapped by DCP)
        code = _interrupt_code(e)
        if code is None:
            raise
        print(f"interrupted: {a.out} not written (nothing half-written left)", file=sys.stderr)
        return code
    finally:
        if old is not None:
            signal.signal(signal.SIGTERM, old)
    return 0


if __name__ == "__main__":
    sys.exit(main())
