"""Structured config of a training job: the dataclasses Hydra validates against.

Every YAML file under configs/ is merged onto these, so a misspelt key or a wrong type
fails at composition, naming the key, before any process or process group exists."""
from __future__ import annotations

from dataclasses import dataclass, field
import sysconfig
from typing import Any, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from parallel.config import ParallelConfig
from parallel.knobs import knob


@dataclass
class TrainConfig:
    steps: int = knob(100, ge=1)
    seed: int = knob(0, ge=0, le=2**63 - 1)
    # Deterministic kernels and no data-order nondeterminism: two runs of one config on
    # the same machine give bitwise-identical losses.
    deterministic: bool = False
    seq_len: int = knob(256, ge=1, le=1 << 24)
    # Sequences per data-parallel rank per micro-batch.
    local_batch_size: int = knob(8, ge=1, le=1 << 16)
    grad_accum_steps: int = knob(1, ge=1, le=1 << 16)
    # Global-norm gradient clipping; 0 disables.
    max_norm: float = knob(1.0, ge=0, le=1e30)
    # Tokens per chunk of the chunked loss: the head and cross-entropy run one chunk at a
    # time (recomputed in backward), never holding the full (tokens x vocab) logits. 0 = the
    # whole loss; -1 = auto: chunks of 256 MiB of fp32 logits when one rank's logits
    # (local_batch_size x seq_len / parallel.cp x vocab x 4 bytes) exceed 1 GiB.
    loss_chunk: int = knob(-1, ge=0, le=1 << 30, special={-1: "auto"})
    # auto | cpu | cuda
    device: str = "auto"
    # auto (bf16 params + fp32 reduce on CUDA, fp32 on CPU) | bf16 | fp32
    mixed_precision: str = "auto"
    # Intra-op threads per process; null = cores / processes on the node.
    num_threads: Optional[int] = knob(None, ge=1, le=4096)


@dataclass
class OptimConfig:
    name: str = "adamw"
    # Peak learning rate; above 1 is legal but almost surely a typo (warned).
    lr: float = knob(3e-4, gt=0, le=1e30, warn_above=1.0)
    weight_decay: float = knob(0.1, ge=0, le=1e6, warn_above=1.0)
    betas: List[float] = knob(default_factory=lambda: [0.9, 0.95], ge=0, lt=1, each=True)
    # > 0: a parameter whose gradients are all 0 (a tower without data) would divide 0 by 0.
    eps: float = knob(1e-8, gt=0, le=1e6, warn_above=1e-3)
    # cosine | linear | wsd | constant (each after a linear warmup)
    schedule: str = "cosine"
    warmup_steps: int = knob(100, ge=0)
    # Floor of the decay, as a fraction of lr.
    min_lr_ratio: float = knob(0.1, ge=0, le=1)
    # wsd only: fraction of the steps spent in the final linear decay.
    decay_fraction: float = knob(0.2, gt=0, le=1)
    # The global step after which this run's schedule begins (warmup from step
    # schedule_start + 1, decay ending at train.steps): a continued-pretraining stage
    # loaded from step S sets it to S so its schedule starts over. 0 = from the first step.
    schedule_start: int = knob(0, ge=0)


@dataclass
class TokenizerConfig:
    # llama3: Llama 3's exact 128,256-token vocabulary, bundled offline (quicktok-v1).
    # tiktoken: Meta's tokenizer.model at `path`. hf: a tokenizer.json at `path`.
    # bpe: a byte-level BPE trained on the corpus and cached (or the one at `path`).
    kind: str = "llama3"
    # bpe only: vocabulary size to train.
    vocab_size: int = knob(4096, ge=258, le=1 << 24)
    # bpe only: bytes of the corpus (first documents in listing order) used to train it.
    train_bytes: int = knob(8_000_000, ge=1, le=1 << 34)
    # bpe only: where trained tokenizers are cached, keyed by corpus and settings.
    cache_dir: str = "${oc.env:HOME}/.cache/llama-pretrain/tokenizers"
    # tiktoken/hf: the tokenizer file; bpe: use this tokenizer.json instead of training.
    path: Optional[str] = None


@dataclass
class SourceConfig:
    # text_folder | jsonl | parquet | hf_dataset | pretokenized | image_folder (image-text models:
    # pictures with caption sidecars, x.jpg + x.txt) (mixture: see data.mixture).
    source: str = "text_folder"
    # A file, a folder (searched with `glob`), a glob, or an fsspec URL (s3://, gs://, ...);
    # hf_dataset: a folder written by Dataset.save_to_disk; pretokenized: a shard folder.
    path: Optional[str] = None
    # Pattern under a folder `path`; null = **/*.txt, **/*.jsonl* or **/*.parquet by source
    # (image_folder: **/* filtered by image extension).
    glob: Optional[str] = None
    # jsonl: the JSON field holding the text; parquet / hf_dataset: the column.
    field: str = "text"
    # hf_dataset: the split of a saved DatasetDict.
    split: Optional[str] = None
    # text_folder: larger files are skipped (and counted).
    max_file_bytes: int = knob(100_000_000, ge=1)
    # jsonl (uncompressed): a file is read in units of this many bytes, each shuffled as one.
    chunk_bytes: int = knob(1_048_576, ge=1, le=1 << 23)
    # hf_dataset / pretokenized: rows (documents) per unit.
    rows_per_unit: int = knob(1024, ge=1)
    # Bytes of one record: longer JSONL lines are skipped unread (data/skipped); longer
    # Parquet / datasets cells and text files are cut to it (data/truncated_docs). The
    # default, 64 MiB, keeps a loader worker's memory for one record to a few hundred MB.
    max_doc_bytes: int = knob(67_108_864, ge=1, le=1 << 30)
    # Image-text models only (model.family=mllama): the record field holding a record's
    # image(s): a path relative to the record's file, an fsspec URL, bytes (Parquet), a
    # datasets Image, or a list of these; chat records hold theirs in "images". A record
    # without it is a text-only sample.
    image_field: str = "image"


@dataclass
class MixtureEntry(SourceConfig):
    # Name shown in the metrics (data/tokens/<name>); default source<i>.
    name: Optional[str] = None
    # Relative share of tokens drawn from this source.
    weight: float = knob(1.0, gt=0, le=1e30)


@dataclass
class DataConfig(SourceConfig):
    # Several sources with weights, used when source=mixture.
    mixture: List[MixtureEntry] = field(default_factory=list)
    # Shuffle unit order each epoch (by seed and epoch); pretokenized also shuffles
    # documents inside a unit. false reads in listing order.
    shuffle: bool = True
    # Streams feeding each batch row in turn (more = consecutive steps of a row come from
    # more places in the corpus); part of the data order, like the seed.
    streams_per_row: int = knob(8, ge=1, le=4096)
    # Loader worker processes per rank (tokenize and pack off the training thread);
    # 0 = in the training process.
    num_workers: int = knob(1, ge=0, le=256)
    # Block-causal attention per document inside a window, with positions restarting at
    # each document. false = plain causal attention across the packed window.
    document_masking: bool = False
    # Write <run dir>/data_audit/rank-<r>.jsonl: per step, tokens taken from each document.
    audit: bool = False
    # text: documents for next-token prediction. chat (jsonl only): supervised fine-tuning
    # on {"messages": [...]} records in the Llama 3 chat format, loss on assistant tokens.
    format: str = "text"
    # chat: conversations longer than this many tokens are cut (and counted as
    # data/truncated); -1 = train.seq_len + 1 (a whole window).
    max_length: int = knob(-1, ge=1, special={-1: "train.seq_len + 1"})
    # chat: pack = whole conversations packed into each window, the rest padded;
    # pad = one conversation per row, padded.
    sft_packing: str = "pack"
    # Image-text models: images with more pixels (width x height) are skipped unread
    # (data/skipped), before decoding: a decompression bomb cannot exhaust a worker.
    max_image_pixels: int = knob(89_478_485, ge=1, le=178_956_970)  # Pillow refuses more (its bomb bound)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)


@dataclass
class LoggingConfig:
    # Log every N steps (and the first and last); null = 1 on CPU, 10 on CUDA (a logged
    # step reads values back from the device: observe/metrics.py, LOG_EVERY_CUDA).
    every: Optional[int] = knob(None, ge=1)
    console: bool = True
    tensorboard: bool = True
    # Peak FLOP/s per device for MFU; null = table for known GPUs, a matmul probe on CPU.
    peak_tflops: Optional[float] = knob(None, gt=0, le=1e9)
    # Weights & Biases (rank 0 only): log every logged step's metrics to a W&B run.
    wandb: bool = False
    wandb_project: str = "llama-pretrain"
    wandb_entity: Optional[str] = None
    # null = the run dir's name.
    wandb_run_name: Optional[str] = None
    wandb_tags: List[str] = field(default_factory=list)
    # null = the sweep dir's name for a Hydra multirun job (its jobs grouped), else none.
    wandb_group: Optional[str] = None
    # online | offline | disabled; null = the WANDB_MODE environment variable decides.
    wandb_mode: Optional[str] = None


@dataclass
class EvalConfig:
    # Evaluate every N optimizer steps and after the last step; 0 = never.
    interval: int = knob(0, ge=0)
    # Batches per evaluation; each is eval.local_batch_size rows per data-parallel rank.
    steps: int = knob(10, ge=1)
    # Rows per data-parallel rank in an eval batch; -1 = train.local_batch_size.
    local_batch_size: int = knob(-1, ge=1, special={-1: "train.local_batch_size"})
    # The held-out data: any single source, read in listing order (never shuffled) and
    # packed like training (same tokenizer, train.seq_len, document masking).
    data: SourceConfig = field(default_factory=SourceConfig)
    # Its records: text or chat (JSONL messages, loss on assistant tokens, packed by
    # data.sft_packing and cut at data.max_length); null = data.format.
    format: Optional[str] = None


def eval_format(cfg) -> str:
    """The held-out records' format: ``eval.format``, or the training data's when null."""
    return cfg.eval.format or cfg.data.format


@dataclass
class CheckpointConfig:
    # Save a DCP checkpoint every N steps (and at the end); 0 disables.
    interval: int = knob(0, ge=0)
    # Keep only the newest N complete checkpoints; 0 keeps all.
    keep_last: int = knob(2, ge=0)
    # Resume from the newest complete checkpoint in the run dir when there is one.
    resume: bool = True
    # Write checkpoints in a background thread while training continues (one in flight).
    async_save: bool = False
    # Start from this checkpoint (a step-N folder) when the run dir has none of its own.
    load_path: Optional[str] = None
    # With load_path: take only the model weights (new optimizer, data from the start, step 0).
    load_weights_only: bool = False
    # Restore the data loader's position with the checkpoint. false restores weights,
    # optimizer, step and tokens seen and starts the data afresh (a new corpus or mixture, a
    # new train.seq_len, a checkpoint without a loader state); a restart of the same job
    # (torchrun, SLURM requeue) still resumes its own checkpoints' data.
    resume_data: bool = True
    # After a stop signal (SIGTERM, SIGUSR1, SIGINT) in the step loop: seconds of steps
    # running (not evaluation, logging or saves between them) the job waits for the next
    # step boundary, where it saves; past them it ends without a checkpoint (exit 128 +
    # signal, status failed): a step stuck on a data read or a peer. Counts torch.compile's
    # first step too: raise it where that takes minutes.
    stop_timeout_s: float = knob(120.0, ge=1, le=31_536_000)


@dataclass
class ProfilingConfig:
    # torch.profiler over a window of optimizer steps; every rank writes a Chrome trace
    # to <run dir>/profile/trace-rank<r>.pt.trace.json.
    enable: bool = False
    # First profiled step (a global step number, 1-based); a run resumed past it profiles nothing.
    start_step: int = knob(3, ge=1)
    # Steps in the window.
    steps: int = knob(3, ge=1)
    # Allocator events in the trace and a per-op memory table; on CUDA also a memory snapshot.
    memory: bool = False
    # Input shapes of each op (more overhead, bigger trace).
    record_shapes: bool = False
    # Python call stacks of each op (much more overhead).
    with_stack: bool = False


@dataclass
class LoRAConfig:
    # Adapter rank r; 0 = no LoRA (every weight trains).
    rank: int = knob(0, ge=0, le=1 << 16)
    # The update is (alpha / rank) B A x.
    alpha: float = knob(16.0, gt=0, le=1e6, warn_above=1e3)
    # Dropout on the adapters' input while training (draws random numbers per rank).
    dropout: float = knob(0.0, ge=0, lt=1)
    # Linears that get adapters: ours (wq wk wv wo w1 w2 w3), Hugging Face's names
    # (q_proj k_proj v_proj o_proj gate_proj up_proj down_proj), attention, mlp or all.
    target_modules: List[str] = field(default_factory=lambda: ["attention"])


@dataclass
class FinetuneConfig:
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    # Towers of the model family kept frozen (Mllama: text, vision); [] trains everything.
    freeze: List[str] = field(default_factory=list)


@dataclass
class JobConfig:
    # The model file's family schema (configs/model/*.yaml pick it in their defaults list:
    # llama_schema is LlamaArgs); an OmegaConf field cannot be a union of dataclasses.
    model: Any = None
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    profiling: ProfilingConfig = field(default_factory=ProfilingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)


def _stdlib_dir() -> str:
    return sysconfig.get_paths()["stdlib"]


def register_configs() -> None:
    """Idempotent: the schema goes into Hydra's ConfigStore, resolvers into OmegaConf."""
    cs = ConfigStore.instance()
    cs.store(name="job_schema", node=JobConfig)
    # One schema per model family, named <family>_schema in the model group.
    from .model import family_names, get_family

    for name in family_names():
        cs.store(group="model", name=f"{name}_schema", node=get_family(name).args)
    if not OmegaConf.has_resolver("stdlib_dir"):
        # The Python standard library's own sources: text every interpreter ships.
        OmegaConf.register_new_resolver("stdlib_dir", _stdlib_dir)


def load_model_file(path) -> object:
    """A ``configs/model/*.yaml`` file (or an ``hf import``'s ``model.yaml``) as its family's
    args dataclass: the schema its defaults list names (``<family>_schema``)."""
    raw = OmegaConf.load(path)
    if not isinstance(raw, DictConfig):
        raise ValueError(f"{path}: a model file is a mapping of model fields, not a {type(raw).__name__}")
    defaults = raw.pop("defaults", [])
    schemas = [d for d in defaults if isinstance(d, str) and d.endswith("_schema")]
    family = schemas[0][: -len("_schema")] if schemas else raw.get("family", "llama")
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(_family_args(family, path)), raw))


def load_job_config(path) -> JobConfig:
    """A composed job config saved by a run (``<run dir>/.hydra/config.yaml``) as the
    dataclasses, its ``model`` by the schema of its ``model.family``."""
    register_configs()  # its resolvers (stdlib_dir)
    raw = OmegaConf.load(path)
    if not isinstance(raw, DictConfig) or not isinstance(raw.get("model"), DictConfig):
        raise ValueError(f"{path}: not a job config (no model mapping)")
    base = OmegaConf.structured(JobConfig)
    base.model = OmegaConf.structured(_family_args(raw.model.get("family", "llama"), path))
    return OmegaConf.to_object(OmegaConf.merge(base, raw))


def _family_args(family, path) -> type:
    """The args dataclass of ``family``; ValueError naming ``path`` when there is none."""
    from .model import UnknownFamily, get_family

    try:
        return get_family(family).args
    except UnknownFamily as e:
        raise ValueError(f"{path}: {e}") from None
