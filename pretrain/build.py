"""Everything a training job builds before its first step, in this order: data sources and
tokenizer, the model (on meta, cut into pipeline stages, LoRA, parallelized, materialized,
initialized), the optimizer, the ``TrainStep``, the loader, the checkpointer, and the
state it resumes from (or the Hugging Face weights it starts from)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

import torch
from torch import nn

from data_pipeline.loader import LoaderSpec, RankLoader, listing_skips
from parallel import distributed as pdist
from parallel.dims import ParallelDims
from parallel.env import LaunchEnv
from parallel.init import shard_aware_init
from parallel.parallelize import parallelize
from parallel.tensors import seed_tensor_parallel_rng

from .checkpoint import Checkpointer, CheckpointError
from .config import JobConfig
from .model import family_of
from .model.family import ModelFamily, count_parameters, seeded_trunc_normal_
from .optim import OptimizerParts, build_optimizer
from .loss import resolve_loss_chunk
from .step import TrainStep, resolve_dtypes
from .tokenizers import build_sources, image_spec, load_tokenizer


@dataclass
class BuiltModel:
    """The parts this rank holds (the whole model, or its pipeline stages), materialized."""

    family: ModelFamily
    parts: List[nn.Module]
    stage_ids: List[int]
    num_stages: int
    n_params: int  # the whole model's
    n_trainable: int
    param_dtype: torch.dtype
    tied: bool
    mesh: object

    @property
    def state_model(self):
        """What checkpoints save: the model, or the list of this rank's stages."""
        return self.parts if self.num_stages > 1 else self.parts[0]


def build_model(cfg: JobConfig, dims: ParallelDims, device: torch.device) -> BuiltModel:
    """The family's model on meta, its pipeline stages, LoRA adapters, then per part: the
    layout (TP, AC, compile, FSDP2), materialization and the layout-invariant seeded init."""
    t, pc, lora = cfg.train, cfg.parallel, cfg.finetune.lora
    family = family_of(cfg.model)
    with torch.device("meta"):
        whole = family.build(cfg.model, t.seq_len)
    n_params = count_parameters(whole)
    tied = family.layout.is_tied(whole)
    param_dtype, reduce_dtype = resolve_dtypes(t.mixed_precision, device)
    mesh = pdist.build_device_mesh(dims, device)
    if dims.uses_tp and device.type == "cuda":
        seed_tensor_parallel_rng(t.seed, mesh["tp"])
    stage_ids, num_stages, parts = [0], 1, [whole]
    if dims.pp > 1:
        from parallel import pp as ppar

        per_rank = ppar.stages_per_rank(pc.pp_schedule, pc.pp_stages_per_rank)
        num_stages = dims.pp * per_rank
        stage_ids = ppar.stage_ids(mesh["pp"].get_local_rank(), dims.pp, per_rank, pc.pp_schedule)
        with torch.device("meta"):
            parts = [ppar.build_stage(family.build(cfg.model, t.seq_len), family.layout, s, num_stages)
                     for s in stage_ids]
    if cfg.finetune.freeze:
        from .freeze import apply_freeze

        for part in {id(p): p for p in [whole, *parts]}.values():
            apply_freeze(part, family, cfg.model, list(cfg.finetune.freeze))
    n_trainable = sum(p.numel() for p in whole.parameters() if p.requires_grad)
    if lora.rank > 0:  # base frozen, adapters added before the layout is applied (FSDP2 shards both)
        from .lora import apply_lora

        adapters = dict(rank=lora.rank, alpha=lora.alpha, dropout=lora.dropout, targets=lora.target_modules)
        n_trainable = apply_lora(whole, family, **adapters)  # the whole model: the count
        for part in parts:
            if part is not whole:  # pipeline stages
                apply_lora(part, family, **adapters)
    for part in parts:
        _materialize(part, cfg, dims, mesh, device, family, param_dtype, reduce_dtype)
    return BuiltModel(family, parts, stage_ids, num_stages, n_params, n_trainable, param_dtype, tied, mesh)


def _materialize(part: nn.Module, cfg: JobConfig, dims, mesh, device, family, param_dtype, reduce_dtype) -> None:
    seed = cfg.train.seed
    base_init = lambda tensor, std, fqn: seeded_trunc_normal_(tensor, std, fqn, seed)  # noqa: E731
    parallelize(part, family.layout, mesh, dims, cfg.parallel, param_dtype=param_dtype, reduce_dtype=reduce_dtype,
                float8=cfg.train.float8)
    part.to_empty(device=device)
    part.init_weights(init_fn=shard_aware_init(base_init))
    if cfg.finetune.lora.rank > 0:
        from .lora import init_lora

        init_lora(part, shard_aware_init(base_init))


@dataclass
class Job:
    """What the loop runs: the model, its step, the data, the checkpointer and where the
    run starts (``start_step``, ``tokens_seen``)."""

    model: BuiltModel
    step: TrainStep
    optimizer: OptimizerParts
    sources: list
    source_names: List[str]
    tokenizer: object
    loader: RankLoader
    listing_skipped: int
    ckpt: Checkpointer
    start_step: int
    tokens_seen: int
    dp_rank: int
    dp_world: int
    is_dp_leader: bool


def build_job(cfg: JobConfig, env: LaunchEnv, dims: ParallelDims, device: torch.device, run_dir: Path) -> Job:
    t = cfg.train
    images = image_spec(cfg)
    sources, weights, source_names = build_sources(cfg.data, images=images is not None)
    tokenizer = load_tokenizer(cfg.data, sources, env)
    check_vocabulary(tokenizer, cfg.model.vocab_size, images)
    model = build_model(cfg, dims, device)
    optimizer = OptimizerParts([build_optimizer(part, cfg.optim) for part in model.parts])
    step = TrainStep(model.family, model.parts, optimizer, dims=dims, pc=cfg.parallel,
                     grad_accum_steps=t.grad_accum_steps, max_norm=t.max_norm,
                     # labels hold -100 (chat: outside assistant turns; pictures: image tokens, padding)
                     chat=cfg.data.format == "chat" or images is not None,
                     device=device, param_dtype=model.param_dtype, mesh=model.mesh, stage_ids=model.stage_ids,
                     num_stages=model.num_stages, tied=model.tied, model_args=cfg.model,
                     loss_chunk=_loss_chunk(cfg, dims, model.family))
    dp_rank, dp_world, is_dp_leader = dims.dp_coordinates(env.rank)
    loader = RankLoader(sources, weights, tokenizer, LoaderSpec(
        seq_len=t.seq_len, local_batch_size=t.local_batch_size, dp_rank=dp_rank, dp_world=dp_world,
        num_workers=cfg.data.num_workers, seed=t.seed, shuffle=cfg.data.shuffle, grad_accum_steps=t.grad_accum_steps,
        streams_per_row=cfg.data.streams_per_row, positions=cfg.data.document_masking,
        sft_packing=cfg.data.sft_packing, max_length=cfg.data.max_length, image=images))
    listing_skipped = listing_skips(sources) if env.rank == 0 else 0
    ckpt = Checkpointer(run_dir / "checkpoints", cfg.checkpoint, rank=env.rank, world_size=env.world_size,
                        model_args=cfg.model, lora=_lora_meta(cfg, model.family), freeze=cfg.finetune.freeze,
                        tokenizer=tokenizer, chat=cfg.data.format == "chat")
    start_step, tokens_seen, loader_states = ckpt.maybe_resume(model.state_model, optimizer,
                                                               loader.load_rank_states)
    if start_step < cfg.optim.schedule_start:
        raise CheckpointError(
            f"optim.schedule_start={cfg.optim.schedule_start} but the run starts at step {start_step} "
            f"({'checkpoint.load_path=' + repr(cfg.checkpoint.load_path) if cfg.checkpoint.load_path else 'no checkpoint'}): "
            "steps before schedule_start would train at the schedule's step 0 (lr 0 in warmup); start from the "
            "checkpoint of step schedule_start or set optim.schedule_start to the step the run starts at")
    _start_weights(cfg, model, loader_states, progress=env.rank == 0)
    return Job(model, step, optimizer, sources, source_names, tokenizer, loader, listing_skipped, ckpt,
               start_step, tokens_seen, dp_rank, dp_world, is_dp_leader)


def check_vocabulary(tokenizer, vocab_size: int, images) -> None:
    """The tokenizer's ids fit the model. An image-text model's ``<|image|>`` is id
    ``model.vocab_size`` (the embedding's first row past the vocabulary): a tokenizer may
    count it (the published 11B tokenizer.json has 128,257 tokens) but nowhere else."""
    name = getattr(tokenizer, "path", "") or type(tokenizer).__name__
    image_id = tokenizer.special_id("<|image|>") if images is not None else None
    if image_id is not None and image_id != images.image_token_id:
        raise ValueError(f"tokenizer {name} has <|image|> at id {image_id}, but the model's image token is "
                         f"model.vocab_size={vocab_size}")
    limit = vocab_size + (image_id is not None)
    if tokenizer.vocab_size > limit:
        raise ValueError(f"tokenizer {name} has {tokenizer.vocab_size} tokens but model.vocab_size={vocab_size}"
                         + (" (+1 for its <|image|>)" if image_id is not None else ""))


def _loss_chunk(cfg: JobConfig, dims: ParallelDims, family: ModelFamily) -> int:
    """train.loss_chunk resolved (auto: by size; a family that cannot return its hidden
    states always takes the whole loss, validation refused an explicit chunk for it)."""
    t = cfg.train
    if family.hidden_output is None:
        return 0
    return resolve_loss_chunk(t.loss_chunk, local_batch_size=t.local_batch_size, seq_len=t.seq_len, cp=dims.cp,
                              vocab_size=cfg.model.vocab_size)


def _lora_meta(cfg: JobConfig, family: ModelFamily) -> Optional[dict]:
    lora = cfg.finetune.lora
    if lora.rank <= 0:
        return None
    from .interop.hf import folder_fingerprint
    from .interop.titan import titan_dir, titan_fingerprint
    from .lora import resolve_targets

    base = cfg.model.init_from
    step_dir = titan_dir(base)
    fingerprint = titan_fingerprint(step_dir) if step_dir else folder_fingerprint(base) if base else None
    return {"rank": lora.rank, "alpha": lora.alpha, "dropout": lora.dropout,
            "targets": resolve_targets(list(lora.target_modules), family.lora), "base": base,
            "base_fingerprint": fingerprint, "seed": cfg.train.seed}


def _start_weights(cfg: JobConfig, model: BuiltModel, loader_states, *, progress: bool) -> None:
    """``model.init_from``: the Hugging Face weights (or ``titan:<torchtitan step dir>``) a
    fresh run starts from. LoRA checkpoints hold the adapters only: their base comes from
    init_from every start."""
    lora = cfg.finetune.lora.rank > 0
    if (loader_states is None or lora) and not cfg.checkpoint.load_path and cfg.model.init_from:
        from .interop.hf import load_hf_weights
        from .interop.titan import load_titan_weights, titan_dir

        step_dir = titan_dir(cfg.model.init_from)
        for part in model.parts:
            if step_dir is not None:
                load_titan_weights(part, step_dir, cfg.model, progress=progress)
            else:
                load_hf_weights(part, cfg.model.init_from, cfg.model, family=model.family, progress=progress)
