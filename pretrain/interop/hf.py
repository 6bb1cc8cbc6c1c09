"""Hugging Face interop: ``python -m pretrain.hf import|export``.

    python -m pretrain.hf import <hf dir> <checkpoint dir> [--dtype fp32|bf16]
    python -m pretrain.hf export <checkpoint or run dir> <hf dir> [--dtype bf16|fp32] [--max-shard-size 5GB]
                                 [--base <hf dir>]        (LoRA: merged into the base)
    python -m pretrain.hf export-adapter <LoRA checkpoint or run dir> <adapter dir>   (PEFT)

``import`` reads a HF folder (``config.json`` and ``model.safetensors``, or shards listed in
``model.safetensors.index.json``) of a model family with a converter (``model_type`` llama:
``LlamaForCausalLM``; mllama: ``MllamaForConditionalGeneration``) into a DCP checkpoint of
this trainer (model weights only); start a run from it with ``checkpoint.load_path=<dir>
checkpoint.load_weights_only=true`` under any layout. ``model.init_from=<hf dir>`` skips the
intermediate checkpoint: every rank reads the safetensors files lazily and the weights are
scattered into the run's layout in chunks, so no rank holds more than a chunk plus its
shard. An Mllama may also start from a Llama 3.1 text folder, as Meta started the 11B's
adapter from 8B's: its layers fill the decoder's self-attention layers, the cross-attention
layers, the projector and the vision tower keep their init (``_text_start``).

``export`` writes ``config.json`` (the family converter's: rope, tied embeddings, head_dim;
Mllama's nested text and vision configs), ``generation_config.json`` and safetensors shards
of at most ``--max-shard-size`` with an index, loadable by transformers' ``from_pretrained``
of the family's class; one shard's tensors are in memory at a time. Beside them, the run's
tokenizer (``tokenizer.json``, ``tokenizer_config.json``: ``AutoTokenizer`` loads it) and, for
Mllama, ``preprocessor_config.json`` (``AutoProcessor`` gives an ``MllamaProcessor``):
``export_processor_files``: the checkpoint's own copy of the run's tokenizer (a checkpoint
without one: the run dir's; a tokenizer it no longer holds is a warning, not an error).
Both commands write into ``<out>.partial`` and rename it when done (removing it on
failure), and show progress in bytes.

Errors (exit code 4) name the file: a folder without config.json or weights, a shard the
index lists but that is missing, a corrupt file, a weight of the wrong shape (with both
shapes), a config.json this model cannot be (its key), or a config that disagrees with the
configured model (``model.<key>`` and both values)."""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Tuple

import torch
from omegaconf import OmegaConf

from parallel import knobs

from ..checkpoint import CheckpointError, complete_checkpoints, read_meta
from ..checkpoint.fit import plain
from ..checkpoint.files import CrcWriter, file_crc, load_dcp, meta_text, read_dcp_metadata, verify_files
from ..model import family_for_hf, family_names, family_of, get_family
from ..model.family import FamilyArgs, ModelFamily

log = logging.getLogger("pretrain")
EXIT_CHECKPOINT_ERROR = 4
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_HF_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


def _progress(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, disable=not enabled,
                file=sys.stderr, mininterval=0.5)


def folder_fingerprint(path) -> Optional[str]:
    """A Hugging Face folder's identity by content, not by path: a hash of its config.json
    and of each safetensors file's name and header (names, dtypes, shapes, offsets), read
    in a few KB per file. A LoRA run records its base's, so that a base copied elsewhere
    (a node's local disk) is still the base. None when the folder cannot be read."""
    import hashlib

    folder = Path(path)
    h = hashlib.sha256()
    try:
        h.update((folder / "config.json").read_bytes())
        for f in sorted(folder.glob("*.safetensors")):
            with open(f, "rb") as fh:
                n = int.from_bytes(fh.read(8), "little")
                if n > 100 << 20:
                    return None
                h.update(f.name.encode() + fh.read(n))
    except OSError:
        return None
    return h.hexdigest()[:32]


# What a Hugging Face Llama or Llama 3.2 Vision folder stores its weights as.
WEIGHT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


class HFWeights:
    """A HF model folder opened lazily: the tensor index at start, tensors on demand. Weights
    are known by their current transformers name (the converter's ``canonical_hf_key``,
    when it has one, renames what an older transformers saved)."""

    def __init__(self, path) -> None:
        self.path = Path(path)
        self._handles: Dict[Path, object] = {}  # open safetensors files
        if not self.path.is_dir():
            raise CheckpointError(f"{self.path}: no such Hugging Face model folder")
        cfg_file = self.path / "config.json"
        if not cfg_file.is_file():
            raise CheckpointError(f"{cfg_file}: missing (a Hugging Face model folder holds config.json)")
        try:
            self.config = json.loads(cfg_file.read_text())
        except ValueError as e:
            raise CheckpointError(f"{cfg_file} is corrupt ({e})") from e
        if not isinstance(self.config, dict):
            raise CheckpointError(f"{cfg_file}: a JSON {type(self.config).__name__}, not an object of config keys")
        kind = self.config.get("model_type", "llama")
        try:
            self.family = family_for_hf(kind)
        except ValueError as e:
            raise CheckpointError(f"{cfg_file}: {e}") from None
        self.files: Dict[str, Path] = {}  # weight name -> file
        self._stored: Dict[str, str] = {}  # weight name -> the name in its file
        index = self.path / INDEX
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError, TypeError, IndexError) as e:
                raise CheckpointError(f"{index} is corrupt or has no weight_map ({e!r})") from e
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{index}: weight_map is not an object of weight name -> shard file")
            for name, fname in weight_map.items():
                # A shard is a file of this folder: the index is data from anywhere, and
                # "../x" or "/x" would read outside it. (Checked on the names, not resolved:
                # the Hugging Face cache links snapshot files to blobs elsewhere.)
                norm = os.path.normpath(fname) if isinstance(fname, str) else ""
                if not norm or os.path.isabs(norm) or norm == ".." or norm.startswith(".." + os.sep):
                    raise CheckpointError(f"{index}: weight_map entry {name!r} -> {fname!r} is outside the model "
                                          f"folder {self.path}; refused (shards must be files of the folder)")
                f = self.path / norm
                if not f.is_file():
                    raise CheckpointError(f"{f}: missing (listed for {name} in {index.name})")
                self._add(name, f)
        elif (self.path / SINGLE).is_file():
            for name in self._handle(self.path / SINGLE).keys():
                self._add(name, self.path / SINGLE)
        else:
            raise CheckpointError(
                f"{self.path}: no {SINGLE} or {INDEX} (PyTorch .bin weights are not read: re-save them with "
                "transformers' save_pretrained(..., safe_serialization=True))")

    def _add(self, stored: str, f: Path) -> None:
        canonical = getattr(self.family.hf, "canonical_hf_key", None)
        name = canonical(stored) if canonical is not None and isinstance(stored, str) else stored
        if name in self._stored:
            raise CheckpointError(f"{f}: weight {stored!r} and {self._stored[name]!r} (in {self.files[name].name}) "
                                  f"are both {name!r}")
        self.files[name], self._stored[name] = f, stored

    def _handle(self, f: Path):
        from safetensors import safe_open

        if f not in self._handles:
            try:
                self._handles[f] = safe_open(str(f), framework="pt", device="cpu")
            except Exception as e:  # noqa: BLE001 (SafetensorError and I/O errors)
                raise CheckpointError(f"{f}: not a readable safetensors file ({e})") from e
        return self._handles[f]

    def args(self) -> FamilyArgs:
        """The folder's model, as its family's (``self.family``) args."""
        try:
            args = self.family.hf.args_from_hf_config(self.config, name=self.path.name)
        except (KeyError, ValueError, TypeError, AttributeError, ArithmeticError) as e:  # 1e400 is inf in JSON
            raise CheckpointError(f"{self.path / 'config.json'}: not a supported {self.family.name} config "
                                  f"({type(e).__name__}: {e})") from e
        return check_model_args(args, self.path / "config.json", keys=dict(getattr(self.family.hf, "config_keys", ())),
                                family=self.family)

    def shape(self, key: str) -> Tuple[int, ...]:
        f = self._file(key)
        try:
            return tuple(self._handle(f).get_slice(self._stored[key]).get_shape())
        except CheckpointError:
            raise
        except Exception as e:  # noqa: BLE001 (SafetensorError: a header that lies)
            raise CheckpointError(f"{f}: cannot read {key} ({e})") from e

    def stored_name(self, key: str) -> str:
        """The name a weight has in its file (an older transformers' spelling, or ``key``)."""
        return self._stored.get(key, key)

    def _file(self, key: str) -> Path:
        if key not in self.files:
            raise CheckpointError(f"{self.path}: no weight {key!r} (it has e.g. {sorted(self.files)[:3]})")
        return self.files[key]

    def get(self, key: str) -> torch.Tensor:
        """The weight ``key``, refused unless stored as floating point (F32, F16, BF16, F64):
        a header that relabels F32 bytes as I32 would otherwise import as integers cast to
        float, without a word."""
        f = self._file(key)
        try:
            t = self._handle(f).get_tensor(self._stored[key])
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(f"{f}: cannot read {key} ({e})") from e
        if t.dtype not in WEIGHT_DTYPES:
            raise CheckpointError(f"{f}: {key} is stored as {str(t.dtype).removeprefix('torch.')}; a model weight is "
                                  f"one of {', '.join(str(d).removeprefix('torch.') for d in WEIGHT_DTYPES)} "
                                  "(a crafted or damaged header?)")
        return t


def check_args_match(ours: FamilyArgs, theirs: FamilyArgs, where: Path, *, family: Optional[ModelFamily] = None,
                     theirs_family: Optional[ModelFamily] = None) -> None:
    """The configured model must be the one in the folder: name each disagreement, on the
    fields of the family converter's ``config_keys`` (our field, config.json key; without
    them, every field that changes the trained function: not ``resume=False``).
    ``family`` / ``theirs_family``: the families of ``ours`` / ``theirs`` where the caller
    has them (else looked up by their ``family`` field)."""
    family = family or family_of(ours)
    theirs_family = theirs_family or family_of(theirs)
    if theirs_family is not family:  # another family's fields: nothing to compare
        raise CheckpointError(f"{where / 'config.json'}: a model of family {theirs_family.name!r}, the model here "
                              f"is family {ours.family!r}: give a folder of that family")
    diffs: List[str] = []
    pairs = getattr(family.hf, "config_keys", None) or [
        (f.name, f.name) for f in dataclasses.fields(ours) if f.metadata.get("resume", True) and f.name != "family"]
    for field, hf_key in pairs:
        a, b = plain(getattr(ours, field)), plain(getattr(theirs, field))
        if a != b:
            field = "head_dim" if field == "resolved_head_dim" else field
            diffs.append(f"model.{field}={a!r} but config.json has {hf_key}={b!r}")
    if diffs:
        raise CheckpointError(f"{where / 'config.json'} describes another model: " + "; ".join(diffs))


def _check_keys(hf: HFWeights, wanted: Iterable[str], args: FamilyArgs, family: ModelFamily) -> None:
    """Every weight of the folder is one of ``wanted`` (HF names), one the converter reads
    as a derived buffer (``ours_name``: None) or one it says the model does not use
    (``unused_hf_keys``: a tied head)."""
    conv = family.hf
    wanted = {*wanted, *getattr(conv, "unused_hf_keys", lambda a: ())(args)}
    for key in sorted(hf.files):
        try:
            name = conv.ours_name(key)
        except KeyError:
            raise CheckpointError(f"{hf.files[key]}: unexpected weight {key!r} (not a parameter of a "
                                  f"{family.name} model)") from None
        if name is not None and key not in wanted:
            raise CheckpointError(f"{hf.files[key]}: weight {key!r} has no place in this model")


def _read_converted(hf: HFWeights, name: str, shape: Tuple[int, ...], dtype: torch.dtype,
                    args: FamilyArgs, family: ModelFamily) -> torch.Tensor:
    conv = family.hf
    key = conv.hf_name(name)
    have = hf.shape(key)
    want = tuple(conv.to_hf(name, torch.empty(shape, device="meta"), args).shape)  # the HF layout's shape
    if have != want:
        raise CheckpointError(f"{hf._file(key)}: {hf.stored_name(key)} (our {name}) has shape {list(have)} but this "
                              f"model expects {list(want)}")
    return conv.to_ours(name, hf.get(key), args).to(dtype).contiguous()


def _text_start(args: FamilyArgs, hf: HFWeights, family: ModelFamily) -> Optional[Tuple[FamilyArgs, Dict[str, str]]]:
    """None for a folder of the configured model's own family (every weight from it). For a
    folder of a text model that starts part of it (the converter's ``text_families``:
    Mllama from a Llama 3.1 text folder): (the text model's args, our parameter -> its
    parameter), after checking that the text model fits, naming both values. Any other
    folder is refused (``check_args_match``). The text model's family is ``hf.family``."""
    conv = family.hf
    if hf.family is family or hf.family.name not in getattr(conv, "text_families", ()):
        return None
    text = hf.args()
    problems = conv.text_model_problems(args, text)
    if problems:
        raise CheckpointError(f"{hf.path / 'config.json'}: a {hf.family.name} text model that cannot start this "
                              f"{family.name} model's self-attention layers: " + "; ".join(problems))
    return text, conv.from_text_model(args, text)


def partial_init_family(args: FamilyArgs, path, family: Optional[ModelFamily] = None) -> Optional[str]:
    """The family of the Hugging Face folder ``path`` when it starts only part of the model
    ``args`` (of ``family``; else looked up) (a text folder for an image-text model, see
    ``_text_start``); None for a folder of the model's own family, or one whose config.json
    cannot be read (loading it reports why)."""
    try:
        cfg = json.loads((Path(path) / "config.json").read_text())
        theirs = family_for_hf(cfg.get("model_type", "llama"))
    except (OSError, ValueError, AttributeError, TypeError):
        return None
    own = family or family_of(args)
    return theirs.name if theirs is not own and theirs.name in getattr(own.hf, "text_families", ()) else None


def _full_value(t: torch.Tensor) -> torch.Tensor:
    """A parameter's whole current value on the CPU (gathered from its shards: every rank
    that holds a part of it calls this, in the same order)."""
    from parallel.tensors import full_value

    return full_value(t).detach().cpu().clone()


def load_hf_weights(model: torch.nn.Module, hf_dir, args: FamilyArgs, *, family: Optional[ModelFamily] = None,
                    chunk_bytes: int = 1 << 30, progress: bool = False) -> None:
    """Copy a HF folder's weights into ``model`` under any layout (plain, FSDP2 DTensors, TP,
    a pipeline stage's part: each rank reads only the weights it holds). Called by every
    rank; reads tensors lazily and loads them ``chunk_bytes`` at a time. A text model's
    folder (``_text_start``) fills the parameters it has (a weight with fewer rows, the
    embedding, its first rows); the others keep their init. ``family``: the family of
    ``args`` (looked up when not given)."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         set_model_state_dict)

    family = family or family_of(args)
    hf = HFWeights(hf_dir)
    start = _text_start(args, hf, family)
    if start is None:
        check_args_match(args, hf.args(), hf.path, family=family, theirs_family=hf.family)
    from ..lora import is_lora_param

    targets = {k: v for k, v in get_model_state_dict(model).items() if not is_lora_param(k)}  # base weights only
    # The folder must fit the whole model; ``model`` may be a part of it (a pipeline stage).
    if start is None:
        _check_keys(hf, (family.hf.hf_name(n) for n in _model_param_shapes(args, family)), args, family)
    else:
        text, names = start
        theirs = _model_param_shapes(text, hf.family)
        _check_keys(hf, (hf.family.hf.hf_name(n) for n in theirs), text, hf.family)
        ours = _model_param_shapes(args, family)
        for name, src in names.items():  # every mapped shape, before any weight moves
            a, b = ours[name], theirs[src]
            if a != b and not (len(a) == len(b) == 2 and a[1] == b[1] and b[0] < a[0]):
                raise CheckpointError(f"{hf.path}: {hf.family.hf.hf_name(src)} has shape {list(b)}, which "
                                      f"does not fit our {name} of shape {list(a)}")
        n_all = len(targets)
        targets = {k: v for k, v in targets.items() if k in names}
    total = sum(t.numel() * t.element_size() for t in targets.values())
    opts = StateDictOptions(full_state_dict=True, strict=False)
    batch: Dict[str, torch.Tensor] = {}
    size = 0
    with _progress(total, f"loading {hf.path.name}", progress) as bar:
        for i, (name, t) in enumerate(targets.items()):
            if start is None:
                batch[name] = _read_converted(hf, name, tuple(t.shape), t.dtype, args, family)
            else:
                src = start[1][name]
                w = _read_converted(hf, src, theirs[src], t.dtype, text, hf.family)
                if tuple(w.shape) != tuple(t.shape):  # the embedding: rows past the text model's keep their init
                    full = _full_value(t)
                    full[: w.shape[0]] = w
                    w = full
                batch[name] = w
            size += batch[name].numel() * batch[name].element_size()
            if size >= chunk_bytes or i == len(targets) - 1:
                set_model_state_dict(model, batch, options=opts)
                bar.update(size)
                batch, size = {}, 0
    if start is None:
        log.info("initialized weights from Hugging Face folder %s", hf.path)
    else:
        log.info("initialized weights from Hugging Face folder %s (a %s text model: %d of %d parameters here; the "
                 "others keep their init)", hf.path, hf.family.name, len(targets), n_all)


# -- import -------------------------------------------------------------------------------
def check_out(out: Path, force: bool, source: Optional[Path] = None) -> None:
    """An output folder a converter may write: empty or absent (or ``force``), a folder (not
    a file), not the working directory or one above it, and neither holding ``source`` (what
    is being converted) nor inside it. Checked before any reading, and again when writing."""
    real, cwd = Path(os.path.realpath(out)), Path(os.path.realpath(os.getcwd()))
    if cwd.is_relative_to(real):
        raise CheckpointError(f"{out}: the working directory or a folder above it: refusing to write there")
    if source is not None and Path(os.path.realpath(source)).is_relative_to(real):
        raise CheckpointError(f"{out} holds the input {source}: refusing to replace it with the output")
    if source is not None and real.is_relative_to(os.path.realpath(source)):
        raise CheckpointError(f"{out} is inside the input {source}: write the output elsewhere")
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"{out} exists and is not a folder")
    nonempty = any(out.iterdir()) if out.is_dir() else False
    if nonempty and not force:
        raise CheckpointError(f"{out} exists and is not empty (pass --force to replace it)")


def _fresh_out(out: Path, force: bool, source: Optional[Path] = None) -> Path:
    """``<out>.partial``, made empty, after ``check_out``."""
    check_out(out, force, source)
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    return partial


def _finish(partial: Path, out: Path) -> None:
    if out.exists():
        shutil.rmtree(out)
    partial.rename(out)


def import_hf(hf_dir, out, *, dtype: torch.dtype = torch.float32, force: bool = False,
              progress: bool = True) -> FamilyArgs:
    """HF folder -> a weights-only DCP checkpoint at ``out`` (plus ``model.yaml``, the
    Hydra model config of these weights); returns the model's args."""
    hf = HFWeights(hf_dir)
    args, family = hf.args(), hf.family
    out = Path(out)
    shapes = _model_param_shapes(args, family)
    _check_keys(hf, (family.hf.hf_name(n) for n in shapes), args, family)
    sd: Dict[str, torch.Tensor] = {}
    total = sum(_numel(s) * dtype.itemsize for s in shapes.values())
    with _progress(total, f"reading {hf.path.name}", progress) as bar:
        for name, shape in shapes.items():
            sd[name] = _read_converted(hf, name, shape, dtype, args, family)
            bar.update(sd[name].numel() * dtype.itemsize)
    write_checkpoint(out, force, hf.path, {"model": sd}, {
        "step": 0, "tokens_seen": 0, "world_size": 1, "model": dataclasses.asdict(args), "weights_only": True,
        "source": str(hf.path.resolve())}, args)
    return args


def write_checkpoint(out: Path, force: bool, source: Path, state: dict, meta: dict, args) -> None:
    """``state`` (``{"model": ...}``, with ``"optim"`` for a full checkpoint) as a checkpoint
    of this trainer at ``out``: DCP, ``meta.json`` (``meta`` plus every file's size and
    CRC32) and ``model.yaml`` (the Hydra model config of these weights), written into
    ``<out>.partial`` and renamed when done; nothing half-written stays behind."""
    import torch.distributed.checkpoint as dcp
    import yaml

    partial = _fresh_out(out, force, source)
    try:
        writer = CrcWriter(partial)
        dcp.save(state, storage_writer=writer, no_dist=True)
        meta = {**meta, "files": {**{k: list(v) for k, v in writer.files.items()},
                                  ".metadata": list(file_crc(partial / ".metadata"))}}
        model_cfg = {"defaults": [f"{args.family}_schema", "_self_"],
                     **{k: v for k, v in dataclasses.asdict(args).items() if k != "init_from"}}
        (partial / "model.yaml").write_text("# Hydra model config of these weights (copy to configs/model/)\n"
                                            + yaml.safe_dump(model_cfg, sort_keys=False))
        (partial / "meta.json").write_text(meta_text(meta))
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    _finish(partial, out)


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _model_param_shapes(args: FamilyArgs, family: Optional[ModelFamily] = None) -> Dict[str, Tuple[int, ...]]:
    """Our parameters in model order with their shapes (built on the meta device by
    ``family``, the family of ``args``: looked up when not given)."""

    with torch.device("meta"):
        model = (family or family_of(args)).build(args, 1)
    return {n: tuple(p.shape) for n, p in model.named_parameters()}


# -- export -------------------------------------------------------------------------------
def resolve_checkpoint(path) -> Path:
    """A step dir as is; a run dir (or its checkpoints/ folder) -> its newest complete one."""
    path = Path(path)
    if (path / "meta.json").is_file():
        return path
    for root in (path / "checkpoints", path):
        done = complete_checkpoints(root)
        if done:
            return done[-1][1]
    raise CheckpointError(f"{path}: not a checkpoint (no meta.json) and no complete checkpoint under it")


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)?\s*", text, re.I)
    if not m:
        raise ValueError(f"size {text!r}: expected e.g. 5GB, 500MB or a number of bytes")
    unit = (m.group(2) or "").upper().rstrip("B")
    base = 1024 if unit.endswith("I") else 1000
    power = {"": 0, "K": 1, "M": 2, "G": 3, "T": 4}[unit.rstrip("I")]
    return int(float(m.group(1)) * base ** power)


def _plan_shards(entries: List[Tuple[str, Tuple[int, ...]]], itemsize: int, limit: int) -> List[List[str]]:
    shards: List[List[str]] = [[]]
    size = 0
    for name, shape in entries:
        nbytes = _numel(shape) * itemsize
        if shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def check_model_args(args: FamilyArgs, where, keys: Optional[Dict[str, str]] = None, *,
                     family: Optional[ModelFamily] = None) -> FamilyArgs:
    """A model config read from a file (config.json, meta.json): every field of the
    family's args of its type and within the range declared beside it (``parallel.knobs``:
    far past published sizes, so nothing is built from a crafted one; finite numbers), then
    the family's own checks. ``keys``: our field -> the file's key, to name the key a reader
    of the file knows. ``family``: the family of ``args`` (looked up when not given)."""
    family = family or family_of(args)

    def name(field: str) -> str:
        top = field.split(".", 1)[0]
        return f"{keys[top]}{field[len(top):]} (model.{field})" if keys and top in keys else field

    for field, value, expected in knobs.problems(args):
        raise CheckpointError(f"{where}: {name(field)}={value!r}, {expected}")
    try:
        problems = list(family.check(args))
    except (TypeError, ValueError, AttributeError, ArithmeticError) as e:  # a value of the wrong kind
        raise CheckpointError(f"{where}: not a valid {family.name} model ({type(e).__name__}: {e})") from None
    if problems:
        key, value, expected = problems[0]  # key: "model.<field>"
        field = key.split(".", 1)[1] if key.startswith("model.") else key
        raise CheckpointError(f"{where}: {name(field) if keys and field.split('.')[0] in keys else key}={value!r} "
                              f"{expected}")
    return args


def _checkpoint_args(ckpt: Path, meta: dict):
    """The model config a checkpoint's meta.json records, as its family's args. The family
    must be a folder of this tree with a Hugging Face converter: meta.json is data, never
    a reason to import code."""
    where = ckpt / "meta.json"
    if not meta.get("model") or not isinstance(meta["model"], dict):
        raise CheckpointError(f"{where} has no model config: written by an older version")
    margs = dict(meta["model"])
    name = margs.get("family", "llama")
    if not isinstance(name, str) or name not in family_names():
        raise CheckpointError(f"{where}: model.family={name!r} is not a model family of this tree (expected one of "
                              f"{', '.join(family_names())}); a family outside it cannot be exported")
    family = get_family(name)
    if family.hf is None:
        raise CheckpointError(f"{where}: model family {name!r} has no Hugging Face converter")
    fields = {f.name for f in dataclasses.fields(family.args)}
    try:
        args = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(family.args),
                                                   {k: v for k, v in margs.items() if k in fields}))
    except Exception as e:  # a wrong type or value: OmegaConf's validation errors
        raise CheckpointError(f"{where}: 'model' is not a {family.args.__name__} config ({e})") from None
    return check_model_args(args, where, family=family)


def _load_model_tensors(ckpt: Path, saved: dict) -> Dict[str, torch.Tensor]:
    """Every ``model.*`` tensor of a checkpoint (``saved``: its DCP metadata), by our name."""
    state = {"model": {k[len("model."):]: torch.empty(tuple(v.size), dtype=v.properties.dtype)
                       for k, v in saved.items() if k.startswith("model.") and hasattr(v, "size")}}
    load_dcp(state, ckpt, no_dist=True)
    return state["model"]


def _saved_metadata(ckpt: Path, meta: dict) -> dict:
    """The checkpoint's DCP tensor metadata, read as data, after checking every file
    against the sizes and CRC32s of its meta.json (when it has them)."""
    if meta.get("files") is not None:
        verify_files(ckpt, meta["files"], sorted(meta["files"]))
    return read_dcp_metadata(ckpt).state_dict_metadata


def _lora_checkpoint(ckpt: Path, meta: dict, saved: dict, args: FamilyArgs, base,
                     family: Optional[ModelFamily] = None) -> Dict[str, torch.Tensor]:
    """A LoRA run's checkpoint (adapters only) merged into its base: W + (alpha/r) B A,
    every weight in memory (fine-tuning sizes), in our names and layout. ``family``: the
    family of ``args`` (looked up when not given)."""

    from ..lora import merge_lora_state

    lora = meta["lora"]
    base = base or lora.get("base")
    if not base:
        raise CheckpointError(f"{ckpt} holds LoRA adapters only and its run had no model.init_from: "
                              "give the base model's HF folder with --base")
    family = family or family_of(args)
    from .titan import read_titan_weights, titan_dir

    if titan_dir(base) is not None:  # a run started from model.init_from=titan:<step dir>
        state = read_titan_weights(titan_dir(base), args)
        state.update(_load_model_tensors(ckpt, saved))
        return merge_lora_state(state, alpha=lora["alpha"], rank=lora["rank"])
    hf = HFWeights(base)
    if partial_init_family(args, hf.path, family):
        name = family.name
        raise CheckpointError(f"{hf.path / 'config.json'}: a {hf.family.name} text model, which holds only part of "
                              f"this {name} model: a LoRA base must hold every weight (give the whole {name} folder "
                              "with --base)")
    check_args_match(args, hf.args(), hf.path, family=family, theirs_family=hf.family)
    state = {n: _read_converted(hf, n, shape, torch.float32, args, family)
             for n, shape in _model_param_shapes(args, family).items()}
    state.update(_load_model_tensors(ckpt, saved))  # the adapters: all the checkpoint holds
    return merge_lora_state(state, alpha=lora["alpha"], rank=lora["rank"])


def export_hf(checkpoint, out, *, dtype: torch.dtype = torch.bfloat16, max_shard_size: int = 5 * 10**9,
              force: bool = False, progress: bool = True, base=None) -> Path:
    """A checkpoint of this trainer -> a HF folder that transformers loads (the family's
    class: ``LlamaForCausalLM``, ``MllamaForConditionalGeneration``). A LoRA checkpoint is
    merged into its base (``base``, else the run's model.init_from)."""
    from safetensors.torch import save_file

    ckpt = resolve_checkpoint(checkpoint)
    meta = read_meta(ckpt)
    args = _checkpoint_args(ckpt, meta)
    family = family_of(args)
    saved = _saved_metadata(ckpt, meta)
    merged = _lora_checkpoint(ckpt, meta, saved, args, base, family) if meta.get("lora") else None
    if merged is not None:
        entries = [(n, tuple(t.shape)) for n, t in merged.items()]
    else:
        entries = [(k[len("model."):], tuple(v.size)) for k, v in saved.items()
                   if k.startswith("model.") and hasattr(v, "size")]
    if not entries:
        raise CheckpointError(f"{ckpt}: holds no model weights")
    expected = _model_param_shapes(args, family)
    order = {n: i for i, n in enumerate(expected)}
    for name, shape in entries:
        if name not in expected:
            raise CheckpointError(f"{ckpt}: tensor model.{name} is not a parameter of the model in meta.json")
        if shape != expected[name]:
            raise CheckpointError(f"{ckpt}: model.{name} has shape {list(shape)} but the model in meta.json "
                                  f"expects {list(expected[name])}")
    missing = sorted(set(expected) - {n for n, _ in entries})
    if missing:
        raise CheckpointError(f"{ckpt}: no tensor model.{missing[0]}")
    entries.sort(key=lambda e: order[e[0]])
    conv = family.hf
    try:  # before anything is written: a model transformers cannot express is refused here
        cfg = conv.hf_config_from_args(args)
    except ValueError as e:
        raise CheckpointError(f"{ckpt / 'meta.json'}: cannot be a Hugging Face {family.name} model ({e})")
    cfg["torch_dtype"] = cfg["dtype"] = _HF_DTYPE_NAMES[dtype]
    gen = getattr(conv, "generation_config", lambda a: {})(args)
    # The names transformers' save_pretrained writes (an older spelling, for some families).
    stored_key = getattr(conv, "stored_hf_key", lambda key: key)
    shards = _plan_shards(entries, dtype.itemsize, max_shard_size)
    shapes = dict(entries)
    out = Path(out)
    partial = _fresh_out(out, force, ckpt)
    try:
        weight_map: Dict[str, str] = {}
        total = sum(_numel(s) * dtype.itemsize for _, s in entries)
        with _progress(total, f"exporting {ckpt.name}", progress) as bar:
            for i, names in enumerate(shards):
                fname = SINGLE if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                if merged is not None:
                    state = {"model": {n: merged[n] for n in names}}
                else:
                    saved_dtype = {n: saved[f"model.{n}"].properties.dtype for n in names}
                    state = {"model": {n: torch.empty(shapes[n], dtype=saved_dtype[n]) for n in names}}
                    load_dcp(state, ckpt, no_dist=True)
                tensors = {stored_key(conv.hf_name(n)): conv.to_hf(n, w, args).to(dtype).contiguous()
                           for n, w in state["model"].items()}
                save_file(tensors, str(partial / fname), metadata={"format": "pt"})
                weight_map.update({k: fname for k in tensors})
                bar.update(sum(t.numel() * t.element_size() for t in tensors.values()))
        if len(shards) > 1:
            (partial / INDEX).write_text(json.dumps(
                {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2))
        (partial / "config.json").write_text(json.dumps(cfg, indent=2))
        (partial / "generation_config.json").write_text(json.dumps(gen, indent=2))
        export_processor_files(ckpt, partial, args)
    except BaseException:  # nothing half-written stays behind (a full disk, a corrupt checkpoint file, ^C)
        shutil.rmtree(partial, ignore_errors=True)
        raise
    _finish(partial, out)
    return out


# The tokenizer files ``export_hf_tokenizer`` writes (removed again if it fails midway).
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def _run_tokenizer(cfg):
    """The tokenizer of a run, rebuilt from its config as ``build_job`` built it, never
    trained anew: the BPE a run trained (``data.tokenizer.kind=bpe`` without a path) is the
    file of ``data.tokenizer.cache_dir`` keyed by the corpus's first ``train_bytes``, which
    are read again to find it."""
    from data_pipeline.tokenizer import build_tokenizer

    from ..tokenizers import bpe_corpus, build_sources

    tc = cfg.data.tokenizer
    if tc.kind == "bpe" and not tc.path:
        _, path = bpe_corpus(tc, build_sources(cfg.data, images=family_of(cfg.model).image_spec is not None)[0])
        if not path.is_file():
            raise FileNotFoundError(f"{path}: missing (the {tc.vocab_size}-token BPE the run trained on its corpus, "
                                    "cached in data.tokenizer.cache_dir)")
        return build_tokenizer("hf", str(path))
    return build_tokenizer(tc.kind, tc.path)


def _checkpoint_tokenizer(ckpt: Path):
    """(tokenizer, chat) as the checkpoint records them (meta.json's ``tokenizer``; its copy
    of the tokenizer's file under ``tokenizer/``, checked against the size and CRC32 of the
    manifest and the recorded fingerprint before use: a checkpoint is data), or None for a
    checkpoint that records none (an import, an earlier version)."""
    from data_pipeline.tokenizer import build_tokenizer

    meta = read_meta(ckpt)
    rec = meta.get("tokenizer")
    if rec is None:
        return None
    if rec["file"] is not None:
        if rec["file"] not in (meta.get("files") or {}):
            raise CheckpointError(f"{ckpt / 'meta.json'}: 'tokenizer' names {rec['file']}, which 'files' does not "
                                  "list (nothing to check the copy against)")
        verify_files(ckpt, meta["files"], [rec["file"]])
    tok = build_tokenizer(rec["kind"], None if rec["file"] is None else str(ckpt / rec["file"]))
    if tok.fingerprint != rec["fingerprint"]:
        raise CheckpointError(f"{ckpt / 'meta.json'}: the tokenizer has fingerprint {tok.fingerprint}, the one "
                              f"recorded when the checkpoint was written is {rec['fingerprint']}")
    return tok, rec["chat"]


def export_processor_files(ckpt: Path, out: Path, args: FamilyArgs) -> List[str]:
    """Beside the weights in ``out``: the run's tokenizer (``tokenizer.json``,
    ``tokenizer_config.json``, ``special_tokens_map.json``: ``export_hf_tokenizer``) and,
    for an image-text family, ``preprocessor_config.json`` (its image spec) and the chat
    template as ``chat_template.json``: transformers' ``AutoTokenizer`` /
    ``AutoProcessor`` load the folder. The tokenizer is the one the checkpoint records
    (``_checkpoint_tokenizer``: its own copy of the file), else, for a checkpoint that
    records none (an import, an earlier version), the one in the run's
    ``.hydra/config.yaml`` (``<run>/checkpoints/step-N``'s run); one that cannot be
    reproduced (no run config, a tokenizer file gone, a BPE cache deleted) is a warning
    naming the file: the weights are exported all the same. Returns the files written."""
    from data_pipeline.tokenizer import export_hf_tokenizer

    family = family_of(args)
    written: List[str] = []
    spec = None
    if family.image_spec is not None:
        from data_pipeline.images import ImageSpec

        spec = ImageSpec(**family.image_spec(args))
        try:
            pre = family.hf.preprocessor_config(spec)
        except ValueError as e:
            log.warning("%s: no preprocessor_config.json written (transformers cannot express this model's images: "
                        "%s)", ckpt / "meta.json", e)
        else:
            (out / "preprocessor_config.json").write_text(json.dumps(pre, indent=2))
            written.append("preprocessor_config.json")
    config_file = ckpt.parent.parent / ".hydra" / "config.yaml"
    source = ckpt / "meta.json"
    try:
        from ..build import check_vocabulary

        found = _checkpoint_tokenizer(ckpt)
        if found is None:
            source = config_file
            if not config_file.is_file():
                log.warning("%s: missing, so the run's tokenizer is unknown: no tokenizer files written beside the "
                            "weights (a checkpoint outside its run dir, of a version that did not copy the tokenizer "
                            "into it: copy the tokenizer's files beside them)", config_file)
                return written
            from ..config import load_job_config

            cfg = load_job_config(config_file)
            if cfg.model.vocab_size != args.vocab_size:
                raise ValueError(f"{config_file}: model.vocab_size={cfg.model.vocab_size}, but the checkpoint's model "
                                 f"has {args.vocab_size} (the config of another run?)")
            found = _run_tokenizer(cfg), cfg.data.format == "chat"
        tok, chat = found
        check_vocabulary(tok, args.vocab_size, spec)
        tok_config = export_hf_tokenizer(tok, out, image_token_id=None if spec is None else spec.image_token_id,
                                         chat=chat, model_max_length=args.max_position_embeddings)
    except Exception as e:  # noqa: BLE001 (the run's files are data: whatever fails, the weights stand)
        for name in _TOKENIZER_FILES:
            (out / name).unlink(missing_ok=True)
        log.warning("no tokenizer files written beside the weights: the run's tokenizer (%s) cannot be reproduced: "
                    "%s", source, e)
        return written
    written += list(_TOKENIZER_FILES)
    if spec is not None and tok_config.get("chat_template"):  # what AutoProcessor reads its template from
        (out / "chat_template.json").write_text(json.dumps({"chat_template": tok_config["chat_template"]}, indent=2))
        written.append("chat_template.json")
    return written


def export_adapter(checkpoint, out, *, force: bool = False) -> Path:
    """A LoRA checkpoint -> a PEFT adapter folder (``adapter_config.json`` +
    ``adapter_model.safetensors``) that ``PeftModel.from_pretrained`` loads onto the HF
    base. B's rows of q/k projections are permuted like the weights they update."""
    from safetensors.torch import save_file


    ckpt = resolve_checkpoint(checkpoint)
    meta = read_meta(ckpt)
    lora = meta.get("lora")
    if not lora:
        raise CheckpointError(f"{ckpt / 'meta.json'}: not a LoRA checkpoint (no adapters to export); "
                              "use `export` for full weights")
    args = _checkpoint_args(ckpt, meta)
    conv = family_of(args).hf
    saved = _saved_metadata(ckpt, meta)
    tensors = {}
    for name, w in _load_model_tensors(ckpt, saved).items():
        base, which = name.rsplit(".lora_", 1)  # layers.0.attention.wq, "a.weight"
        hf_base = conv.hf_name(f"{base}.weight")[: -len(".weight")]  # model.layers.0.self_attn.q_proj
        if which == "b.weight":
            w = conv.to_hf(f"{base}.weight", w, args)  # rows follow the q/k weight's layout
        tensors[f"base_model.model.{hf_base}.lora_{which[0].upper()}.weight"] = w.float().contiguous()
    out = Path(out)
    partial = _fresh_out(out, force, ckpt)
    save_file(tensors, str(partial / "adapter_model.safetensors"), metadata={"format": "pt"})
    (partial / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": lora["rank"], "lora_alpha": lora["alpha"],
        "lora_dropout": lora["dropout"], "target_modules": sorted(conv.lora_names[t] for t in lora["targets"]),
        "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
        "init_lora_weights": True, "inference_mode": True, "modules_to_save": None,
        "base_model_name_or_path": lora.get("base")}, indent=2))
    _finish(partial, out)
    return out


# -- CLI ----------------------------------------------------------------------------------
def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pretrain.hf", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    imp = sub.add_parser("import", help="HF model folder -> weights-only checkpoint")
    imp.add_argument("hf_dir")
    imp.add_argument("out", help="checkpoint directory to write")
    imp.add_argument("--dtype", choices=sorted(_DTYPES), default="fp32",
                     help="dtype of the stored weights (training keeps fp32 masters; default fp32)")
    exp = sub.add_parser("export", help="checkpoint (or run dir: its newest) -> HF model folder")
    exp.add_argument("checkpoint")
    exp.add_argument("out", help="HF folder to write")
    exp.add_argument("--dtype", choices=sorted(_DTYPES), default="bf16", help="dtype of the exported weights")
    exp.add_argument("--max-shard-size", default="5GB", help="largest safetensors file (default 5GB)")
    exp.add_argument("--base", help="LoRA checkpoints: the base HF folder to merge into (default: the run's "
                                    "model.init_from)")
    ada = sub.add_parser("export-adapter", help="LoRA checkpoint -> PEFT adapter folder")
    ada.add_argument("checkpoint")
    ada.add_argument("out", help="adapter folder to write")
    for sp in (imp, exp, ada):
        sp.add_argument("--force", action="store_true", help="replace a non-empty output directory")
        sp.add_argument("--no-progress", action="store_true", help="no progress bar")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if a.cmd == "import":
            args = import_hf(a.hf_dir, a.out, dtype=_DTYPES[a.dtype], force=a.force, progress=not a.no_progress)
            print(f"wrote {a.out}: a {args.family} model ({args.name}), vocab {args.vocab_size}. Train from it "
                  f"with checkpoint.load_path={a.out} "
                  f"checkpoint.load_weights_only=true and a model config equal to {a.out}/model.yaml")
        elif a.cmd == "export-adapter":
            export_adapter(a.checkpoint, a.out, force=a.force)
            print(f"wrote {a.out}: load with peft.PeftModel.from_pretrained(<base model>, {a.out!r})")
        else:
            try:
                limit = parse_size(a.max_shard_size)
            except ValueError as e:
                p.error(f"--max-shard-size: {e}")
            export_hf(a.checkpoint, a.out, dtype=_DTYPES[a.dtype], max_shard_size=limit, force=a.force,
                      progress=not a.no_progress, base=a.base)
            print(f"wrote {a.out}")
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_CHECKPOINT_ERROR
    return 0


if __name__ == "__main__":
    sys.exit(main())
