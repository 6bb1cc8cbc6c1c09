"""Structured config of a training job: the dataclasses Hydra validates against.

Every YAML file under configs/ is merged onto these, so a misspelt key or a wrong type
fails at composition, naming the key, before any process or process group exists. Each
field carries its range or choices and a one-line description (``parallel.knobs``):
``python -m pretrain.docs`` writes docs/config.md from them."""
from __future__ import annotations

from dataclasses import dataclass
import sysconfig
from typing import Any, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from data_pipeline.sources import SOURCE_KINDS
from parallel.config import ParallelConfig
from parallel.knobs import doc_field, knob


# The words some fields take (their rules check them: pretrain/validate.py).
SCHEDULES = ("cosine", "linear", "wsd", "constant")
WANDB_MODES = ("online", "offline", "disabled")
FORMATS = ("text", "chat")


@dataclass
class TrainConfig:
    steps: int = knob(100, ge=1, doc="Optimizer steps, a global count (a run continued from a checkpoint of step S "
                                     "takes steps - S more).")
    seed: int = knob(0, ge=0, le=2**63 - 1, doc="Seeds the init (each parameter by seed and name: the same weights "
                                                "under every layout), the data order and the Python/torch RNGs.")
    deterministic: bool = doc_field(False, "Deterministic kernels and data order: two runs of one config on one "
                                           "machine give bitwise-identical losses.")
    seq_len: int = knob(256, ge=1, le=1 << 24, doc="Tokens per sequence (packed window); at most "
                                                   "model.max_position_embeddings.")
    local_batch_size: int = knob(8, ge=1, le=1 << 16, doc="Sequences per data-parallel rank per micro-batch.")
    grad_accum_steps: int = knob(1, ge=1, le=1 << 16, doc="Micro-batches per optimizer step: the global batch is "
                                                          "dp x local_batch_size x grad_accum_steps sequences.")
    max_norm: float = knob(1.0, ge=0, le=1e30, doc="Clip the global gradient norm (all ranks, shards and stages) "
                                                   "to this; 0 disables. The logged grad_norm is before clipping.")
    # The head and cross-entropy run one chunk at a time (recomputed in backward), never
    # holding the full (tokens x vocab) logits. -1: chunks of 256 MiB of fp32 logits when
    # one rank's logits (local_batch_size x seq_len / parallel.cp x vocab x 4 bytes) exceed 1 GiB.
    loss_chunk: int = knob(-1, ge=0, le=1 << 30, special={-1: "auto"},
                           doc="Tokens per chunk of the chunked loss (the full logits never exist); 0 = the whole "
                               "loss, -1 = chunks of 256 MiB of logits once a rank's fp32 logits exceed 1 GiB.")
    device: str = doc_field("auto", "Where the job runs; auto = cuda when a GPU is visible, else cpu.",
                            choices=("auto", "cpu", "cuda"))
    mixed_precision: str = doc_field("auto", "auto = bf16 params with fp32 gradient reduction on CUDA, fp32 on CPU; "
                                             "master weights and optimizer state are fp32.",
                                     choices=("auto", "bf16", "fp32"))
    num_threads: Optional[int] = knob(None, ge=1, le=4096, doc="Intra-op threads per process; null = the cores a "
                                                               "launcher bound it to, else cores / processes on the node.")
    # parallel/float8.py converts the blocks' linears with torchao before TP/FSDP2 apply.
    float8: str = doc_field("none", "Float8 matmuls (torchao) for the blocks' linears with dims divisible by 16; "
                                    "weights stay fp32. tensorwise: float8 FSDP2 all-gather and TP; rowwise: per-row "
                                    "scales. GPU sm89+.", choices=("none", "tensorwise", "rowwise"))


@dataclass
class OptimConfig:
    name: str = doc_field("adamw", "The optimizer.", choices=("adamw",))
    lr: float = knob(3e-4, gt=0, le=1e30, warn_above=1.0, doc="Peak learning rate.")
    weight_decay: float = knob(0.1, ge=0, le=1e6, warn_above=1.0, doc="AdamW's decoupled weight decay, on matrices "
                                                                      "(not on norm weights).")
    betas: List[float] = knob(default_factory=lambda: [0.9, 0.95], ge=0, lt=1, each=True,
                              doc="AdamW's two betas (first and second moment).")
    # > 0: a parameter whose gradients are all 0 (a tower without data) would divide 0 by 0.
    eps: float = knob(1e-8, gt=0, le=1e6, warn_above=1e-3, doc="AdamW's epsilon.")
    schedule: str = doc_field("cosine", "LR schedule after the linear warmup: cosine and linear decay to "
                                        "min_lr_ratio x lr at the last step; wsd holds lr, then decays over "
                                        "decay_fraction.", choices=SCHEDULES)
    warmup_steps: int = knob(100, ge=0, doc="Steps of linear warmup to lr.")
    min_lr_ratio: float = knob(0.1, ge=0, le=1, doc="Floor of the decay, as a fraction of lr.")
    decay_fraction: float = knob(0.2, gt=0, le=1, doc="wsd only: the fraction of the steps spent in the final "
                                                      "linear decay.")
    # Warmup from step schedule_start + 1, decay ending at train.steps.
    schedule_start: int = knob(0, ge=0, doc="The global step after which this run's schedule begins (a stage "
                                            "continued from step S sets S to warm up and decay afresh); "
                                            "< train.steps.")


@dataclass
class TokenizerConfig:
    kind: str = doc_field("llama3", "llama3: Llama 3's 128,256-token vocabulary, bundled; tiktoken: Meta's "
                                    "tokenizer.model at path; hf: a tokenizer.json at path; bpe: trained on the "
                                    "corpus, cached.", choices=("llama3", "tiktoken", "hf", "bpe"))
    vocab_size: int = knob(4096, ge=258, le=1 << 24, doc="bpe only: the vocabulary size to train; at most "
                                                         "model.vocab_size.")
    train_bytes: int = knob(8_000_000, ge=1, le=1 << 34, doc="bpe only: bytes of the corpus (its first documents "
                                                             "in listing order) the BPE trains on.")
    cache_dir: str = doc_field("${oc.env:HOME}/.cache/llama-pretrain/tokenizers",
                               "bpe only: where trained tokenizers are cached, keyed by their training text and "
                               "size.")
    path: Optional[str] = doc_field(None, "tiktoken/hf: the tokenizer file (hf: or a folder holding "
                                          "tokenizer.json); bpe: use this tokenizer.json instead of training.")


@dataclass
class SourceConfig:
    source: str = doc_field("text_folder", "The reader: one document per file, JSONL line, Parquet row, dataset "
                                           "row or shard document; image_folder: pictures with caption sidecars "
                                           "(x.jpg + x.txt).", choices=SOURCE_KINDS)
    path: Optional[str] = doc_field(None, "A file, a folder (searched with glob), a glob, or an fsspec URL (s3://, "
                                          "gs://, ...); hf_dataset: a save_to_disk folder; pretokenized: a shard "
                                          "folder.")
    glob: Optional[str] = doc_field(None, "Pattern under a folder path; null = `**/*.txt`, `**/*.jsonl*` or "
                                          "`**/*.parquet` by source (image_folder: image files).")
    field: str = doc_field("text", "jsonl: the JSON field holding the text; parquet / hf_dataset: the column.")
    split: Optional[str] = doc_field(None, "hf_dataset: the split of a saved DatasetDict.")
    max_file_bytes: int = knob(100_000_000, ge=1, doc="text_folder: larger files are skipped (and counted).")
    chunk_bytes: int = knob(1_048_576, ge=1, le=1 << 23, doc="Uncompressed jsonl: files are read in byte ranges of "
                                                             "this size, each one unit of shuffling and sharding.")
    rows_per_unit: int = knob(1024, ge=1, doc="hf_dataset / pretokenized: documents per unit of shuffling and "
                                              "sharding.")
    # The default, 64 MiB, keeps a loader worker's memory for one record to a few hundred MB.
    max_doc_bytes: int = knob(67_108_864, ge=1, le=1 << 30,
                              doc="Bytes of one record: longer JSONL lines are skipped unread (data/skipped), "
                                  "longer Parquet/datasets cells and text files cut (data/truncated_docs).")
    # A path relative to the record's file, an fsspec URL, bytes (Parquet), a datasets
    # Image, or a list of these. A record without it is a text-only sample.
    image_field: str = doc_field("image", "Image-text models only: the record field (or column) holding a "
                                          "record's picture(s); chat records hold theirs in images.")


@dataclass
class MixtureEntry(SourceConfig):
    name: Optional[str] = doc_field(None, "Label of this source in the metrics (`data/tokens/<name>`); null = "
                                          "`source<i>`.")
    weight: float = knob(1.0, gt=0, le=1e30, doc="Relative share of tokens drawn from this source.")


@dataclass
class DataConfig(SourceConfig):
    source: str = doc_field("text_folder", "The reader (as for a mixture entry), or mixture: several weighted "
                                           "sources (data.mixture).", choices=(*SOURCE_KINDS, "mixture"))
    mixture: List[MixtureEntry] = doc_field(doc="With source=mixture: the sources, each with the source keys plus "
                                                "name and weight (override one as data.mixture.0.path=...).",
                                            default_factory=list)
    shuffle: bool = doc_field(True, "Shuffle unit order each epoch (by seed and epoch; pretokenized also documents "
                                    "inside a unit); false reads in listing order.")
    streams_per_row: int = knob(8, ge=1, le=4096, doc="Streams feeding each batch row in turn (a row's "
                                                      "consecutive steps come from more places in the corpus); "
                                                      "part of the data order.")
    num_workers: int = knob(1, ge=0, le=256, doc="Tokenizer threads per rank in the loader graph; 0 = everything "
                                                 "in the training thread. Batches do not depend on it.")
    document_masking: bool = doc_field(False, "Block-causal attention per document inside a packed window, "
                                              "positions restarting at each document; false = causal across the "
                                              "window.")
    audit: bool = doc_field(False, "Write `<run dir>/data_audit/rank-<r>.jsonl`: per step, the tokens taken from "
                                   "each document.")
    format: str = doc_field("text", "text: documents for next-token prediction; chat (jsonl only): fine-tuning on "
                                    "{\"messages\": [...]} records, loss on the assistant tokens.", choices=FORMATS)
    max_length: int = knob(-1, ge=1, special={-1: "train.seq_len + 1"},
                           doc="chat: longer conversations are cut to this many tokens (data/truncated); at most "
                               "train.seq_len + 1.")
    sft_packing: str = doc_field("pack", "chat: pack = whole conversations packed into each window, the rest "
                                         "padded (needs document_masking); pad = one conversation per row.",
                                 choices=("pack", "pad"))
    max_image_pixels: int = knob(89_478_485, ge=1, le=178_956_970,  # Pillow refuses more (its bomb bound)
                                 doc="Image-text models: pictures with more pixels (width x height, from the "
                                     "header) are skipped unread (data/skipped): no decompression bomb.")
    tokenizer: TokenizerConfig = doc_field(doc="Which tokenizer (the keys below).", default_factory=TokenizerConfig)


@dataclass
class LoggingConfig:
    # A logged step reads values back from the device: observe/metrics.py, LOG_EVERY_CUDA.
    every: Optional[int] = knob(None, ge=1, doc="Log every N steps (and the first and last); null = 1 on CPU, 10 on "
                                                "CUDA.")
    console: bool = doc_field(True, "Print the progress line.")
    tensorboard: bool = doc_field(True, "Write TensorBoard events under `<run dir>/tb/`.")
    peak_tflops: Optional[float] = knob(None, gt=0, le=1e9, doc="Peak TFLOP/s per device for MFU; null = a table "
                                                                "of known GPUs, a matmul probe on CPU.")
    wandb: bool = doc_field(False, "Also log every logged step's metrics to a Weights & Biases run (rank 0 only).")
    wandb_project: str = doc_field("llama-pretrain", "The W&B project.")
    wandb_entity: Optional[str] = doc_field(None, "The W&B team or user; null = your default entity.")
    wandb_run_name: Optional[str] = doc_field(None, "The W&B run's display name; null = the run dir's name.")
    wandb_tags: List[str] = doc_field(doc="W&B tags, e.g. [baseline,1b].", default_factory=list)
    wandb_group: Optional[str] = doc_field(None, "The W&B group; null = the sweep dir's name for a Hydra multirun "
                                                 "job, else none.")
    wandb_mode: Optional[str] = doc_field(None, "W&B's mode; null = the WANDB_MODE environment variable decides "
                                                "(W&B's default: online).", choices=WANDB_MODES)


@dataclass
class EvalConfig:
    interval: int = knob(0, ge=0, doc="Evaluate every N optimizer steps and after the last step; 0 = never.")
    steps: int = knob(10, ge=1, doc="Held-out batches per evaluation (the same batches every time).")
    local_batch_size: int = knob(-1, ge=1, special={-1: "train.local_batch_size"},
                                 doc="Rows per data-parallel rank in an eval batch (train.local_batch_size under pp).")
    # Same tokenizer, train.seq_len and document masking as training.
    data: SourceConfig = doc_field(doc="The held-out source (keys as for data, no mixture): read in listing order, "
                                       "never shuffled, packed like training.", default_factory=SourceConfig)
    # chat: JSONL messages, loss on assistant tokens, packed by data.sft_packing and cut at data.max_length.
    format: Optional[str] = doc_field(None, "The held-out records' format; null = data.format.", choices=FORMATS)


def eval_format(cfg) -> str:
    """The held-out records' format: ``eval.format``, or the training data's when null."""
    return cfg.eval.format or cfg.data.format


@dataclass
class CheckpointConfig:
    interval: int = knob(0, ge=0, doc="Save a DCP checkpoint (model, optimizer, data position; any layout) every N "
                                      "steps and at the last step; 0 disables.")
    keep_last: int = knob(2, ge=0, doc="Keep only the newest N complete checkpoints; 0 keeps all.")
    resume: bool = doc_field(True, "Resume from the newest complete checkpoint in the run dir; false sets an "
                                   "earlier run's checkpoints aside and starts at step 1.")
    async_save: bool = doc_field(False, "Write checkpoints from a background thread while training continues (one "
                                        "save in flight).")
    load_path: Optional[str] = doc_field(None, "When the run dir has no checkpoint of its own, start from this "
                                               "step-N folder (model, optimizer, data position, step).")
    load_weights_only: bool = doc_field(False, "With load_path: take only the model weights (new optimizer, data "
                                               "from the start, step 0).")
    # A restart of the same job (torchrun, SLURM requeue) still resumes its own checkpoints' data.
    resume_data: bool = doc_field(True, "Restore the data loader's position with the checkpoint; false starts the "
                                        "data afresh (a new corpus, mixture or train.seq_len).")
    # Steps running, not evaluation, logging or saves between them; torch.compile's first
    # step counts too: raise it where that takes minutes.
    stop_timeout_s: float = knob(120.0, ge=1, le=31_536_000,
                                 doc="After a stop signal: seconds of steps to wait for a step boundary, where it "
                                     "saves (exit 3); past them it ends without a checkpoint.")


@dataclass
class ProfilingConfig:
    enable: bool = doc_field(False, "torch.profiler over a window of steps: every rank writes "
                                    "`<run dir>/profile/trace-rank<r>.pt.trace.json` (Chrome trace).")
    start_step: int = knob(3, ge=1, doc="First profiled step (global, 1-based); a run resumed past it profiles "
                                        "nothing.")
    steps: int = knob(3, ge=1, doc="Steps in the window.")
    memory: bool = doc_field(False, "Record allocations: memory counters in the trace, a per-op memory table, on "
                                    "CUDA a memory snapshot.")
    record_shapes: bool = doc_field(False, "Record each op's input shapes (bigger trace).")
    with_stack: bool = doc_field(False, "Record each op's Python stack (much more overhead).")


@dataclass
class LoRAConfig:
    rank: int = knob(0, ge=0, le=1 << 16, doc="Adapter rank r; 0 = no LoRA (every weight trains).")
    alpha: float = knob(16.0, gt=0, le=1e6, warn_above=1e3, doc="The update is (alpha / rank) B A x.")
    dropout: float = knob(0.0, ge=0, lt=1, doc="Dropout on the adapters' input while training.")
    target_modules: List[str] = doc_field(doc="Linears that get adapters: ours (wq wk wv wo w1 w2 w3, fc1 fc2), "
                                              "Hugging Face's (q_proj ... down_proj), attention, mlp or all.",
                                          default_factory=lambda: ["attention"])


@dataclass
class FinetuneConfig:
    lora: LoRAConfig = doc_field(doc="LoRA adapters, on with rank > 0: every base weight frozen, checkpoints hold "
                                     "the adapters.", default_factory=LoRAConfig)
    freeze: List[str] = doc_field(doc="Towers of the model family kept frozen (Mllama: text, vision; Llama has "
                                      "none); [] trains everything.", default_factory=list)


@dataclass
class JobConfig:
    # The model file's family schema (configs/model/*.yaml pick it in their defaults list:
    # llama_schema is LlamaArgs); an OmegaConf field cannot be a union of dataclasses.
    model: Any = doc_field(None, "Architecture: the fields of the model family's args (`model=<file>` picks a "
                                 "family and its published hyperparameters).")
    parallel: ParallelConfig = doc_field(doc="Parallel degrees and layout.", default_factory=ParallelConfig)
    train: TrainConfig = doc_field(doc="Steps, batch, precision, seed.", default_factory=TrainConfig)
    optim: OptimConfig = doc_field(doc="Optimizer and LR schedule.", default_factory=OptimConfig)
    data: DataConfig = doc_field(doc="Sources and tokenizer.", default_factory=DataConfig)
    logging: LoggingConfig = doc_field(doc="Sinks and cadence.", default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = doc_field(doc="Checkpoint cadence and resume.", default_factory=CheckpointConfig)
    profiling: ProfilingConfig = doc_field(doc="A torch.profiler window (off).", default_factory=ProfilingConfig)
    eval: EvalConfig = doc_field(doc="Validation on held-out data (off).", default_factory=EvalConfig)
    finetune: FinetuneConfig = doc_field(doc="LoRA and frozen towers (off).", default_factory=FinetuneConfig)


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
