"""Cross-field checks of a composed job config, run before any process group exists.
Each failure names the key, the value and what would be valid."""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from parallel import knobs
from parallel.dims import LayoutError, ParallelDims, resolve_parallel_dims, sequence_problem

from .config import JobConfig, eval_format
from .model import ModelFamily, UnknownFamily, canonical_family_name, get_family


class ConfigError(ValueError):
    def __init__(self, key: str, value, expected: str):
        self.key = key
        super().__init__(f"{key}={value!r}: {expected}")


def _require(ok: bool, key: str, value, expected: str) -> None:
    if not ok:
        raise ConfigError(key, value, expected)


def _one_of(key: str, value, choices) -> None:
    _require(value in choices, key, value, f"expected one of {', '.join(map(str, choices))}")


def _choice(key: str, group, name: str) -> None:
    """``group.<name>`` is one of the words declared beside its field (``choices``)."""
    _one_of(key, getattr(group, name), knobs.choices_of(group, name))


def _check_schema(cfg: JobConfig) -> ModelFamily:
    """The model file gave a schema and the family ``model.family`` names takes it: that
    family, which every other rule is given (looked up once). A family outside the tree has
    no ``<name>_schema`` Hydra knows: its model file picks none and names the family
    (``family: package.module:NAME``), and its fields are typed here by the family's args."""
    m = cfg.model
    named = m.get("family") if isinstance(m, Mapping) else getattr(m, "family", None)
    if not dataclasses.is_dataclass(m) and (not isinstance(m, Mapping) or named is None):
        raise ConfigError("model", "(no schema)", "the model file must pick its family's schema first in its "
                          "defaults list, e.g. defaults: [llama_schema, _self_] (a family outside the tree: "
                          "name it, family: package.module:NAME)")
    try:
        family = get_family(named)
    except UnknownFamily as e:
        raise ConfigError("model.family", named, e.expected) from None
    if not dataclasses.is_dataclass(m):
        m = cfg.model = _typed_model(m, family)
    # An import path naming a tree family is that family: the run records its name (its
    # checkpoints then export and resume as the family's own).
    m.family = canonical_family_name(m.family)
    if type(m) is not family.args:  # exact: MllamaArgs extends LlamaArgs, yet a Llama cannot take it
        files = f" (model={' | model='.join(family.model_files)})" if family.model_files else ""
        raise ConfigError("model.family", m.family,
                          f"the model file gives a {type(m).__name__} config ({m.name}), family {m.family!r} takes "
                          f"{family.args.__name__}: pick a model file of that family{files} instead of overriding "
                          "model.family alone")
    return family


def _typed_model(m: Mapping, family: ModelFamily):
    """A model file that picked no schema, as ``family``'s args (each field of its type)."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(family.args), dict(m)))
    except OmegaConfBaseException as e:  # an unknown key, a value of the wrong type
        key = str(getattr(e, "full_key", None) or "")
        raise ConfigError(f"model.{key}" if key else "model", m.get(key.split(".")[0]) if key else dict(m),
                          f"{getattr(e, 'msg', e)} (model.family={m['family']!r} takes {family.args.__name__})"
                          ) from None


def _check_ranges(cfg: JobConfig, family: ModelFamily) -> None:
    """Every field of every group within the range declared beside it (``parallel.knobs``;
    the model's by its family's args)."""
    for key, value, expected in knobs.problems(cfg):
        raise ConfigError(key, value, expected)


def _check_model(cfg: JobConfig, family: ModelFamily) -> None:
    """The family's own checks (relations between its fields)."""
    m = cfg.model
    for key, value, expected in family.check(m):
        raise ConfigError(key, value, expected)
    from .interop.titan import titan_dir

    titan = titan_dir(m.init_from) is not None  # titan:<torchtitan step dir>
    if m.init_from and titan and family.titan is None:
        raise ConfigError("model.init_from", m.init_from, f"model family {m.family!r} has no torchtitan counterpart")
    if m.init_from and not titan and family.hf is None:
        raise ConfigError("model.init_from", m.init_from, f"model family {m.family!r} has no Hugging Face converter")
    if m.init_from and not titan and cfg.finetune.lora.rank > 0:
        from .interop.hf import partial_init_family

        text = partial_init_family(m, m.init_from, family)  # a text model for an image-text one (Mllama from Llama 3.1)
        _require(text is None, "model.init_from", m.init_from,
                 f"a {text} text model's folder, which holds only part of a {m.family} model: LoRA (finetune.lora."
                 "rank > 0) keeps every base weight frozen, so the weights it does not hold would stay at their "
                 f"random init; train those first (finetune.freeze=[text]), export, and start LoRA from that folder")
    if cfg.data.document_masking and not family.document_masking:
        raise ConfigError("data.document_masking", True, f"model family {m.family!r} does not support it (its "
                          "inputs take no document ids)")


def _check_train(cfg: JobConfig, family: ModelFamily) -> None:
    m, t = cfg.model, cfg.train
    _require(t.seq_len <= m.max_position_embeddings, "train.seq_len", t.seq_len,
             f"must be <= model.max_position_embeddings={m.max_position_embeddings}")
    _choice("train.device", t, "device")
    _choice("train.mixed_precision", t, "mixed_precision")


def _check_float8(cfg: JobConfig, family: ModelFamily) -> None:
    """train.float8: torchao present, a GPU that has float8 matmuls, a model with linears
    to convert, and none of the features the module swap breaks. parallel.attention_kernel."""
    t, p = cfg.train, cfg.parallel
    _choice("train.float8", t, "float8")
    _choice("parallel.attention_kernel", p, "attention_kernel")
    if p.attention_kernel == "flex":
        _require(_on_cuda(t), "parallel.attention_kernel", "flex",
                 "auto or sdpa on CPU: flex attention has no CPU backward in this torch (NotImplementedError)")
    if t.float8 == "none":
        return
    from parallel.float8 import eligible, load_torchao

    try:
        load_torchao()
    except ImportError as e:
        raise ConfigError("train.float8", t.float8, f"needs torchao (pip install torchao): {e}") from None
    _require(cfg.finetune.lora.rank == 0, "train.float8", t.float8,
             "none with LoRA (finetune.lora.rank > 0): the float8 module swap would drop the adapters and the "
             "hook that adds their update")
    if _on_cuda(t):
        import torch

        cap = torch.cuda.get_device_capability() if torch.cuda.is_available() else None
        _require(cap is None or cap >= (8, 9), "train.float8", t.float8,
                 f"none on this GPU (compute capability {cap}): float8 matmuls need sm89 or newer (Ada, Hopper, "
                 "Blackwell)")
    import torch

    with torch.device("meta"):
        model = family.build(cfg.model, t.seq_len)
    n = sum(eligible(mod) for block in family.layout.block_list(model) for mod in block.modules())
    _require(n > 0, "train.float8", t.float8,
             f"none for this model: none of its blocks' linears has in and out features that are multiples of 16 "
             f"(float8 matmuls need them)")


def _check_optim(cfg: JobConfig, family: ModelFamily) -> None:
    o = cfg.optim
    _choice("optim.name", o, "name")
    _choice("optim.schedule", o, "schedule")
    _require(len(o.betas) == 2, "optim.betas", list(o.betas), "two values in [0, 1)")
    _require(o.schedule_start < cfg.train.steps, "optim.schedule_start", o.schedule_start,
             f"must be < train.steps={cfg.train.steps}: the schedule runs from step schedule_start + 1 to "
             "train.steps, which counts from the first run (a stage continued from step S for N more steps "
             "sets optim.schedule_start=S train.steps=S+N)")
    _require(o.schedule_start == 0 or not cfg.checkpoint.load_weights_only, "optim.schedule_start",
             o.schedule_start, "0 with checkpoint.load_weights_only=true (the step count restarts at 0: steps 1 to "
             "schedule_start would train at the schedule's step 0); load the whole checkpoint instead "
             "(checkpoint.resume_data=false starts the data afresh)")


# Loader streams per rank (rows of a step x streams per row): each holds a state of a few
# hundred bytes and its read-ahead; past this many, memory grows for nothing.
MAX_STREAMS_PER_RANK = 1 << 18


def _check_data(cfg: JobConfig, family: ModelFamily) -> None:
    m, t, d = cfg.model, cfg.train, cfg.data
    streams = t.local_batch_size * t.grad_accum_steps * d.streams_per_row
    _require(streams <= MAX_STREAMS_PER_RANK, "train.local_batch_size", t.local_batch_size,
             f"x train.grad_accum_steps={t.grad_accum_steps} x data.streams_per_row={d.streams_per_row} = {streams} "
             f"loader streams per rank: at most {MAX_STREAMS_PER_RANK}")
    eval_chat = cfg.eval.interval > 0 and eval_format(cfg) == "chat"
    _choice("data.source", d, "source")
    if d.source == "mixture":
        _require(len(d.mixture) > 0, "data.mixture", list(d.mixture), "at least one source when data.source=mixture")
        _require(len(d.mixture) <= 16, "data.mixture", len(d.mixture), "at most 16 sources")
        for i, e in enumerate(d.mixture):
            _choice(f"data.mixture.{i}.source", e, "source")
            _require(e.path is not None, f"data.mixture.{i}.path", e.path, "a path")
    else:
        _require(d.path is not None, "data.path", d.path, f"a path for data.source={d.source}")
    _choice("data.format", d, "format")
    _choice("data.sft_packing", d, "sft_packing")
    takes_images = family.image_spec is not None
    entries = [(f"data.mixture.{i}.", e) for i, e in enumerate(d.mixture)] if d.source == "mixture" else [("data.", d)]
    for key, e in entries + ([("eval.data.", cfg.eval.data)] if cfg.eval.interval > 0 else []):
        if takes_images and e.source != "image_folder":
            # The caption itself would be read as a picture's path: every record skipped.
            _require(e.image_field != e.field, f"{key}image_field", e.image_field,
                     f"a field other than {key}field={e.field!r} (the text)")
        if e.source == "image_folder":
            _require(takes_images, f"{key}source", e.source,
                     f"an image-text model (model.family={m.family!r} takes no images)")
    _require(d.max_length == -1 or 1 <= d.max_length <= t.seq_len + 1, "data.max_length", d.max_length,
             f"must be in [1, train.seq_len+1={t.seq_len + 1}] or -1 (= train.seq_len+1)")
    if d.format == "chat":
        _require(d.source == "jsonl", "data.format", d.format,
                 f"needs data.source=jsonl (chat records), not {d.source}")
    if d.format == "chat" or eval_chat:
        # Packed conversations without document masking would attend to each other.
        _require(d.sft_packing == "pad" or d.document_masking, "data.sft_packing", d.sft_packing,
                 f"pad, or data.document_masking=true: chat data ({'data.format' if d.format == 'chat' else 'eval.format'}"
                 "=chat) packed several conversations per row would let them attend to each other")
        _require(d.tokenizer.kind != "bpe" or d.tokenizer.path is not None, "data.tokenizer.kind", "bpe",
                 "has no chat special tokens: chat data (data.format or eval.format) needs llama3, tiktoken "
                 "or a Llama 3 tokenizer.json")
    _choice("data.tokenizer.kind", d.tokenizer, "kind")
    if d.tokenizer.kind in ("tiktoken", "hf"):
        _require(d.tokenizer.path is not None, "data.tokenizer.path", d.tokenizer.path,
                 f"a tokenizer file for data.tokenizer.kind={d.tokenizer.kind}")
    if d.tokenizer.kind == "llama3":
        _require(m.vocab_size >= 128256, "model.vocab_size", m.vocab_size,
                 ">= 128256 for data.tokenizer.kind=llama3 (or pick another tokenizer)")
    if d.tokenizer.kind == "bpe":
        _require(d.tokenizer.path is not None or d.tokenizer.vocab_size <= m.vocab_size,
                 "data.tokenizer.vocab_size", d.tokenizer.vocab_size,
                 f"must be <= model.vocab_size={m.vocab_size}")


def _check_lora(cfg: JobConfig, family: ModelFamily) -> None:
    lora = cfg.finetune.lora
    if lora.rank > 0:
        _require(len(lora.target_modules) > 0, "finetune.lora.target_modules", [], "at least one target (e.g. "
                 "[attention], [all]) with finetune.lora.rank > 0")
        _require(cfg.checkpoint.load_path is None, "checkpoint.load_path", cfg.checkpoint.load_path,
                 "cannot start a LoRA run (finetune.lora.rank > 0): its base comes from model.init_from "
                 "(or the seeded init), its checkpoints hold adapters only")
        from .lora import resolve_targets

        try:
            resolve_targets(list(lora.target_modules), family.lora)
        except ValueError as e:
            raise ConfigError("finetune.lora.target_modules", list(lora.target_modules),
                              str(e).split(": ", 1)[1]) from None


def _check_freeze(cfg: JobConfig, family: ModelFamily) -> None:
    freeze = list(cfg.finetune.freeze)
    if not freeze:
        return
    towers = family.towers
    for name in freeze:
        _require(name in towers, "finetune.freeze", freeze,
                 f"{name!r} is not a tower of family {cfg.model.family!r}: expected a subset of "
                 f"{list(towers)}" if towers else f"family {cfg.model.family!r} has no towers to freeze")
    _require(len(set(freeze)) == len(freeze), "finetune.freeze", freeze, "names a tower twice")
    _require(len(set(freeze)) < len(towers), "finetune.freeze", freeze, "must leave at least one tower to train")
    _require(cfg.finetune.lora.rank == 0, "finetune.freeze", freeze,
             "cannot combine with LoRA (finetune.lora.rank > 0 already freezes every base weight)")


def _check_eval(cfg: JobConfig, family: ModelFamily) -> None:
    d = cfg.data
    eval_chat = cfg.eval.interval > 0 and eval_format(cfg) == "chat"
    ev = cfg.eval
    if ev.interval > 0:
        _choice("eval.data.source", ev.data, "source")
        if ev.format is not None:
            _choice("eval.format", ev, "format")
        if eval_chat:
            _require(ev.data.source == "jsonl", "eval.data.source", ev.data.source,
                     f"jsonl: the held-out data is chat (eval.format={ev.format or 'null'}, data.format={d.format})")
        _require(ev.data.path is not None, "eval.data.path", ev.data.path,
                 "the held-out data (a path) when eval.interval > 0")


def _check_run(cfg: JobConfig, family: ModelFamily) -> None:
    """logging, checkpoint and profiling."""
    m = cfg.model
    if cfg.logging.wandb_mode is not None:
        _choice("logging.wandb_mode", cfg.logging, "wandb_mode")
    _require(not cfg.checkpoint.load_weights_only or cfg.checkpoint.load_path is not None,
             "checkpoint.load_weights_only", True, "needs checkpoint.load_path")
    _require(not (m.init_from and cfg.checkpoint.load_path), "model.init_from", m.init_from,
             f"conflicts with checkpoint.load_path={cfg.checkpoint.load_path!r}: start from one of them")


def _on_cuda(t) -> bool:
    """Whether the job runs on CUDA (train.device cuda, or auto with a GPU visible)."""
    import torch

    return t.device == "cuda" or (t.device == "auto" and torch.cuda.is_available())


def _check_parallel(cfg: JobConfig, world_size: int, family: ModelFamily) -> ParallelDims:
    m, t = cfg.model, cfg.train
    p = cfg.parallel
    try:
        dims = resolve_parallel_dims(dp_replicate=p.dp_replicate, dp_shard=p.dp_shard, tp=p.tp, pp=p.pp, cp=p.cp,
                                     pp_schedule=p.pp_schedule, world_size=world_size)
    except LayoutError as e:
        raise ConfigError(e.key, e.value, e.expected) from None
    _choice("parallel.cp_impl", p, "cp_impl")
    if p.cp_impl == "ring":
        _require(False, "parallel.cp_impl", "ring",
                 "allgather: torch's ring context_parallel has handlers for CUDA attention kernels only"
                 if not _on_cuda(t) else "allgather: the ring implementation is not built yet (no GPU to test it on)")
    if dims.cp > 1:
        _require(family.layout.attention_core is not None, "parallel.cp", p.cp,
                 f"1: model family {m.family!r} names no attention core in its layout (its attention "
                 "cannot be split along the sequence)" + (
                     "; Llama 3.2 Vision's cross-attention masks and self-attention are not on the "
                     "core slot yet" if m.family == "mllama" else ""))
        _require(not p.compile, "parallel.compile", True,
                 f"false with parallel.cp={p.cp}: the context-parallel attention (all-gather and blockwise "
                 "masks) is not compiled yet")
    if t.loss_chunk > 0:
        _require(family.hidden_output is not None, "train.loss_chunk", t.loss_chunk,
                 f"0: model family {m.family!r} cannot return its hidden states before the head")
    _choice("parallel.activation_checkpoint", p, "activation_checkpoint")
    if p.compile:
        from parallel.compile import missing_prerequisites

        missing = missing_prerequisites("cuda" if _on_cuda(t) else "cpu")
        _require(not missing, "parallel.compile", True, "needs on every node " + "; and ".join(missing))
    if dims.tp > 1:
        for key, v in family.tp_divisible(m):
            _require(v % dims.tp == 0, key, v, f"must divide by parallel.tp={dims.tp} (each rank holds 1/tp of it)")
    problem = sequence_problem(dims, t.seq_len, p.sequence_parallel)
    if problem is not None:
        raise ConfigError(problem.key, problem.value, problem.expected)
    if dims.tp == 1:
        _require(not p.loss_parallel, "parallel.loss_parallel", True, "needs parallel.tp > 1")
    if dims.pp > 1:
        from parallel.pp import stages_per_rank

        per = stages_per_rank(p.pp_schedule, p.pp_stages_per_rank)
        stages = dims.pp * per
        key, depth = family.depth(m)
        _require(depth % stages == 0, key, depth,
                 f"must divide into parallel.pp={dims.pp} x {per} stage(s) per rank = {stages} equal stages")
        if cfg.finetune.freeze:
            from .freeze import stages_with_nothing_to_train

            empty = stages_with_nothing_to_train(family, m, t.seq_len, list(cfg.finetune.freeze), stages)
            _require(not empty, "finetune.freeze", list(cfg.finetune.freeze),
                     f"leaves pipeline stage(s) {empty} of {stages} with nothing to train: pick another "
                     f"parallel.pp / parallel.pp_schedule, or freeze less")
        mbs = stages if p.pp_microbatches == -1 else p.pp_microbatches
        _require(mbs >= 1 and t.local_batch_size % mbs == 0, "parallel.pp_microbatches", mbs,
                 f"must divide train.local_batch_size={t.local_batch_size} (each micro-batch is a slice of it)")
        if cfg.eval.interval > 0:  # the stages' buffers are shaped by the training micro-batch
            _require(cfg.eval.local_batch_size in (-1, t.local_batch_size), "eval.local_batch_size",
                     cfg.eval.local_batch_size, f"must be -1 or train.local_batch_size={t.local_batch_size} "
                     "with parallel.pp > 1")
        if p.pp_schedule == "1f1b":
            _require(mbs >= stages, "parallel.pp_microbatches", mbs, f">= the {stages} stages for 1f1b")
        if p.pp_schedule in ("interleaved_1f1b", "interleaved_zb"):
            rounds = max(1, mbs // dims.pp)
            _require(mbs % rounds == 0, "parallel.pp_microbatches", mbs,
                     f"a multiple of max(1, microbatches // pp) for {p.pp_schedule}")
        _require(not p.loss_parallel, "parallel.loss_parallel", True, "is not supported with parallel.pp > 1 yet")
    return dims


# Rules per config group, in the order errors are reported, after _check_schema: each is given
# the job config and its model family.
RULES = (_check_ranges, _check_model, _check_train, _check_float8, _check_optim, _check_data, _check_lora,
         _check_freeze, _check_eval, _check_run)


def config_warnings(cfg: JobConfig) -> list:
    """Legal values that are probably mistakes (``warn_above`` / ``warn_below`` beside
    their fields), one line each naming the key; rank 0 logs them once at start."""
    return [f"{key}={value!r} is {why}: legal, but probably a mistake" for key, value, why in knobs.doubts(cfg)]


def validate_job(cfg: JobConfig, world_size: int) -> ParallelDims:
    """Every rule; the first failure raises ``ConfigError`` naming the key. Returns the
    resolved parallel degrees. The model family is looked up once (``_check_schema``) and
    given to every rule."""
    family = _check_schema(cfg)
    for rule in RULES:
        rule(cfg, family)
    return _check_parallel(cfg, world_size, family)


def validate_model_and_optim(cfg: JobConfig) -> ModelFamily:
    """The rules of the model and optimizer groups alone (schema, every range, the family's
    own checks, AdamW's settings): a converter that writes a checkpoint for a model config
    (``python -m pretrain.titan import``) checks what the checkpoint will record."""
    family = _check_schema(cfg)
    _check_ranges(cfg, family)
    _check_model(cfg, family)
    _check_optim(cfg, family)
    return family
