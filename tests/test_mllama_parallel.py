"""Llama 3.2 Vision (Mllama) on every parallel layout: a tiny Mllama whose every tanh
gate starts open (``model.gate_init=0.5``; the published init is 0, which leaves the vision
tower and the cross-attention layers without gradient), fed real image-text data (caption
records with pictures drawn by the test, ``datagen.write_image_records``: text-only samples
and samples of 1 or 2 images of 1 or 2 tiles, packed with document masking), trains 5
fp32 AdamW steps to the single-process losses, grad norms (1e-5 relative) and final
weights, vision weights included (1e-5 absolute), under FSDP2 2, TP 2 + SP, FSDP2 2 x TP 2
and PP 2 with each of the five schedules. Tolerances and their
reasoning: ``tests/test_parallel_parity.py``.

Also: freezing a tower (``finetune.freeze``) trains exactly the other one; LoRA adapts
both towers' linears; an FSDP2 checkpoint resumes under TP 2."""
import math
import re
import shutil
from pathlib import Path

import pytest
import torch

from conftest import compose_job, losses, read_metrics, run_job
from datagen import write_image_records
from test_parallel_parity import RTOL, assert_parity, final_weights

MLLAMA = ["model=mllama_debug", "model.gate_init=0.5", "model.n_layers=4", "model.max_images=2", "logging.every=1"]
CKPT = ["checkpoint.interval=5"]
PP = ["parallel.pp=2", "train.local_batch_size=4"]
DATA: list = []  # the image-text data's overrides (vision_data)


@pytest.fixture(scope="module", autouse=True)
def vision_data(tmp_path_factory):
    path = write_image_records(tmp_path_factory.mktemp("vision_data"), 60)
    DATA[:] = ["data=jsonl", f"data.path={path}", "data.glob=null", "data.document_masking=true",
               "data.tokenizer.kind=bpe"]
    return path


def job(run: Path, overrides, tok_cache, nproc: int = 1, **kw):
    return run_job(run, [*MLLAMA, *DATA, *overrides], tok_cache=tok_cache, nproc=nproc,
                   launcher="torchrun" if nproc > 1 else "single", timeout=600, **kw)


def initial_weights(run: Path) -> dict:
    """The weights the run started from: its config, built and seeded as the trainer does."""
    from pretrain.config import load_job_config
    from pretrain.model.family import seeded_trunc_normal_
    from pretrain.model.mllama import Mllama

    cfg = load_job_config(run / ".hydra" / "config.yaml")
    with torch.device("meta"):
        model = Mllama(cfg.model, rope_cache_len=cfg.train.seq_len)
    model.to_empty(device="cpu")
    model.init_weights(init_fn=lambda t, std, fqn: seeded_trunc_normal_(t, std, fqn, cfg.train.seed))
    return {k: v.detach() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tok_cache):
    d = tmp_path_factory.mktemp("mllama_single")
    proc = job(d, ["train.local_batch_size=4", *CKPT], tok_cache)
    (d / "job.log").write_text(proc.stdout + proc.stderr)
    return d


def test_reference_trains_every_part(reference):
    """The single-process reference is a real test of the vision path: every weight moved
    in 5 steps (vision encoder, projector, cross-attention layers and their gates, text),
    the gates started non-zero, and the loss fell; its batches held images (no "no image"
    warning)."""
    start, end = initial_weights(reference), final_weights(reference)
    assert start.keys() == end.keys()
    still = [k for k in start if (end[k] - start[k]).abs().max().item() < 1e-7]
    assert not still, still
    gates = [k for k in start if "gate" in k]
    assert len(gates) == 3 + 2 * 2 + 2 * 1  # pre/post tile + position, 2 per cross layer, 2 per global layer
    assert all(start[k].abs().min().item() > 1e-3 for k in gates)
    got = losses(reference)
    assert got[-1] < got[0]
    assert "no image in the first step" not in (reference / "job.log").read_text()
    rows = read_metrics(reference)
    assert sum(r["data/images"] for r in rows[-1:]) >= 10 and rows[-1]["data/skipped"] == 0


def test_batches_mix_text_only_and_image_samples(vision_data):
    """The test data: over the reference's first batches, some samples are text-only, some
    hold one image and some two, of 1 and 2 tiles; a text-only sample sees no image."""
    from data_pipeline.images import ImageSpec
    from data_pipeline.loader import LoaderSpec, RankLoader
    from data_pipeline.sources import SourceSpec, build_source
    from data_pipeline.tokenizer import Llama3Tokenizer
    from pretrain.model.mllama import image_spec

    args = compose_job(*MLLAMA).model
    spec = ImageSpec(**{**image_spec(args), "image_token_id": 128256})  # past the llama3 vocabulary
    src = build_source(SourceSpec("jsonl", str(vision_data), image_field="image"))
    ld = RankLoader([src], [1.0], Llama3Tokenizer(), LoaderSpec(seq_len=32, local_batch_size=4, dp_rank=0,
                                                                 dp_world=1, num_workers=0, seed=0, shuffle=True,
                                                                 positions=True, image=spec))
    batches = [next(ld) for _ in range(5)]
    ld.close()
    per_doc, tiles = [], set()
    for b in batches:
        for q in range(4):
            docs = b["doc_ids"][q]
            for d in docs.unique().tolist():
                if d >= 0:
                    at = docs == d
                    per_doc.append(int((b["input_ids"][q][at] == 128256).sum()))
                    if per_doc[-1] == 0:
                        assert b["cross_attention_mask"][q][at].sum() == 0
        real = b["aspect_ratio_ids"] > 0
        tiles |= set(b["aspect_ratio_mask"].sum(-1)[real].tolist())
    assert {0, 1, 2} <= set(per_doc) and {1, 2} <= tiles


LAYOUTS = [
    ("tp2+sp", ["parallel.tp=2", "train.local_batch_size=4"], 2),
    # Activation checkpointing rides along (each mode changes no number on its own: the
    # recompute repeats the same ops), read back from the modules.
    ("fsdp2xtp2+sp+selective_ac", ["parallel=fsdp_tp", "train.local_batch_size=2",
                                   "parallel.activation_checkpoint=selective_op"], 4),
    ("pp2-gpipe+full_ac", [*PP, "parallel.pp_schedule=gpipe", "parallel.activation_checkpoint=full"], 2),
    *[(f"pp2-{s}", [*PP, f"parallel.pp_schedule={s}"], 2)
      for s in ("1f1b", "interleaved_1f1b", "interleaved_zb", "zbv")],
    # FSDP2 2 x TP 2 x PP 2 (8 processes, 65 s on 2 cores) left the suite to pay for the
    # image-text tests: each pair composes above, and the text family runs the three at once.
]


@pytest.mark.parametrize("overrides,nproc", [(o, n) for _, o, n in LAYOUTS], ids=[i for i, _, _ in LAYOUTS])
def test_layout_matches_single_process(reference, tmp_path, tok_cache, overrides, nproc):
    proc = job(tmp_path, [*overrides, *CKPT], tok_cache, nproc)
    out = proc.stderr + proc.stdout
    # 4 + 1 vision blocks and 4 decoder blocks in all; a pipeline stage holds the vision
    # encoder on the first stage only.
    found = re.findall(r"(\d+) blocks here: activation checkpointing (.*?) \|", out)
    blocks = [int(n) for n, _ in found]
    assert blocks and (max(blocks) == 9 if "parallel.pp=2" not in overrides else max(blocks) < 9), blocks
    for n, ac in found:  # every block of the rank wrapped, whatever its kind
        mode = next((o.split("=")[1] for o in overrides if o.startswith("parallel.activation_checkpoint=")), None)
        assert ac == (f"{mode} {n}" if mode else "none"), (n, ac)
    assert_parity(tmp_path, reference)


def test_fsdp_checkpoint_resumes_under_tp(reference, tmp_path, tok_cache):
    """FSDP2 on 2 ranks matches one process (the layout's parity entry), and its step-3
    checkpoint, as if the job had died after saving it, resumes under TP 2 + SP and ends
    on the single-process losses and final weights."""
    run = tmp_path / "run"
    job(run, ["train.local_batch_size=2", "checkpoint.interval=3", "checkpoint.keep_last=0"], tok_cache, 2)
    assert_parity(run, reference)
    shutil.rmtree(run / "checkpoints" / "step-5")
    proc = job(run, ["parallel.tp=2", "train.local_batch_size=4", *CKPT], tok_cache, 2)
    assert "resumed from step 3" in proc.stderr + proc.stdout
    resumed = {m["step"]: m["loss"] for m in read_metrics(run)}
    want = losses(reference)
    for step in (4, 5):
        assert math.isclose(resumed[step], want[step - 1], rel_tol=RTOL), (step, resumed[step], want[step - 1])
    a, b = final_weights(run), final_weights(reference)
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-5


def _tower_names(names, tower: str) -> set:
    """By hand for mllama_debug: the vision tower is the encoder, the projector and the
    cross-attention layers (1 and 3); the text tower everything else."""
    vision = {k for k in names if k.startswith(("vision.", "projector.", "layers.1.", "layers.3."))}
    return vision if tower == "vision" else set(names) - vision


@pytest.mark.parametrize("frozen,overrides,nproc", [
    ("text", ["train.local_batch_size=2"], 2),  # FSDP2: the root unit mixes frozen and trained weights
    ("vision", [*PP, "parallel.pp_schedule=1f1b"], 2),
], ids=["text-fsdp2", "vision-pp2"])
def test_freeze_trains_the_other_tower_only(tmp_path, tok_cache, frozen, overrides, nproc):
    """``finetune.freeze=[text]`` trains the vision encoder, projector and cross-attention
    layers (Meta's adapter) on a fixed language model; ``[vision]`` the opposite. The
    checkpoint holds every weight (it resumes and exports on its own): the frozen tower's
    exactly as they started, every weight of the other tower moved; the log counts those."""
    proc = job(tmp_path, [*overrides, f"finetune.freeze=[{frozen}]", *CKPT], tok_cache, nproc)
    trained = "vision" if frozen == "text" else "text"
    start, end = initial_weights(tmp_path), final_weights(tmp_path)
    want = _tower_names(start, trained)
    assert set(end) == set(start) and want and want != set(start)
    assert all((end[k] - start[k]).abs().max().item() > 1e-7 for k in want)
    assert all(torch.equal(end[k], start[k]) for k in set(start) - want)
    n = sum(start[k].numel() for k in want)
    assert f"frozen: {frozen} | {n:,} trainable parameters" in proc.stderr + proc.stdout
    # MFU counts no weight gradients for the frozen tower (and no backward below it).
    from pretrain.config import load_job_config
    from pretrain.model.mllama import FAMILY

    cfg = load_job_config(tmp_path / ".hydra" / "config.yaml")
    logged = float(re.search(r"MFU = (\S+) FLOPs/token", proc.stderr + proc.stdout)[1])
    want_fpt = FAMILY.flops_per_token(cfg.model, cfg.train.seq_len, frozen=(frozen,))
    assert logged == want_fpt < FAMILY.flops_per_token(cfg.model, cfg.train.seq_len)
    got = losses(tmp_path)
    assert got[-1] < got[0]


def test_freeze_resumes_the_frozen_tower_from_the_checkpoint(tmp_path, tok_cache):
    """A full-training checkpoint resumed with the text frozen keeps its trained text
    weights (not the init), and the frozen run's own checkpoint resumes bit for bit."""
    fast = ["train.local_batch_size=4", "optim.lr=1e-2", "optim.warmup_steps=0"]
    full, frozen = tmp_path / "full", tmp_path / "frozen"
    job(full, [*fast, "checkpoint.interval=3", "train.steps=3"], tok_cache)
    shutil.copytree(full / "checkpoints", frozen / "checkpoints")
    proc = job(frozen, [*fast, "finetune.freeze=[text]", "checkpoint.interval=4", "train.steps=4"], tok_cache)
    assert "resumed from step 3" in proc.stderr + proc.stdout
    at3, at4 = final_weights(full, step=3), final_weights(frozen, step=4)
    text = _tower_names(at3, "text")
    assert all(torch.equal(at3[k], at4[k]) for k in text)
    assert all(not torch.equal(at3[k], at4[k]) for k in set(at3) - text)
    straight = tmp_path / "straight"
    job(straight, [*fast, "finetune.freeze=[text]", "checkpoint.interval=2", "checkpoint.keep_last=0"], tok_cache)
    shutil.rmtree(straight / "checkpoints" / "step-4")
    shutil.rmtree(straight / "checkpoints" / "step-5", ignore_errors=True)
    before = losses(straight)
    job(straight, [*fast, "finetune.freeze=[text]", *CKPT], tok_cache)
    resumed = {m["step"]: m["loss"] for m in read_metrics(straight)}
    assert [resumed[s] for s in (3, 4, 5)] == before[2:5]
    # Thawing the frozen tower (it has no optimizer state there) or dropping the vision
    # tower's global layer is a config change, not a corruption: what the checkpoint records
    # names both before anything loads (exit 4, nothing moved: test_hostile; the thawed tower
    # used to move step-5 aside as corrupt, "Missing key ... optim.state").
    from pretrain.checkpoint import CheckpointMismatch, read_meta
    from pretrain.checkpoint.fit import check_fits
    from pretrain.config import load_job_config

    cfg = load_job_config(straight / ".hydra" / "config.yaml")
    meta = read_meta(straight / "checkpoints" / "step-5")
    check_fits("ck", meta, cfg.model, None, ["text"])
    cfg.model.vision_global_layers = 0
    with pytest.raises(CheckpointMismatch) as e:
        check_fits("ck", meta, cfg.model, None, [])
    assert "model.vision_global_layers=0 (the checkpoint: 1)" in str(e.value)
    assert "finetune.freeze=[] (the checkpoint: ['text']; text was frozen there" in str(e.value)


def test_freeze_config_errors():
    """Before any process: an unknown tower, both towers, freeze with LoRA, a family without
    towers, and a pipeline stage left with nothing to train (interleaved: 4 stages of one
    layer; with the text frozen, stage 2 holds only self-attention layer 2)."""
    from pretrain.validate import ConfigError, validate_job

    cases = [
        (["finetune.freeze=[audio]"], 1, "'audio' is not a tower of family"),
        (["finetune.freeze=[text,vision]"], 1, "must leave at least one tower to train"),
        (["finetune.freeze=[text,text]"], 1, "names a tower twice"),
        (["finetune.freeze=[text]", "finetune.lora.rank=4"], 1, "cannot combine with LoRA"),
        ([*PP, "parallel.pp_schedule=interleaved_1f1b", "finetune.freeze=[text]"], 2,
         "leaves pipeline stage(s) [2] of 4 with nothing to train"),
    ]
    for overrides, world, message in cases:
        with pytest.raises(ConfigError) as e:
            validate_job(compose_job(*MLLAMA, *overrides), world)
        assert e.value.key == "finetune.freeze" and message in str(e.value), str(e.value)
    with pytest.raises(ConfigError, match="family 'llama' has no towers to freeze"):
        validate_job(compose_job("finetune.freeze=[text]"), 1)
    validate_job(compose_job(*MLLAMA, *PP, "parallel.pp_schedule=1f1b", "finetune.freeze=[text]"), 2)


def test_lora_adapts_both_towers_and_matches_under_tp(tmp_path, tok_cache):
    """LoRA on ``all`` targets adapts the vision encoder's linears (local and global
    layers), the self- and the cross-attention layers; TP 2 + SP trains the adapters to the
    single-process losses and final adapter weights."""
    lora = ["finetune.lora.rank=4", "finetune.lora.target_modules=[all]", *CKPT]
    one, tp = tmp_path / "one", tmp_path / "tp"
    job(one, ["train.local_batch_size=4", *lora], tok_cache)
    job(tp, ["parallel.tp=2", "train.local_batch_size=4", *lora], tok_cache, 2)
    names = set(final_weights(one))
    for adapted in ("vision.layers.0.attention.wq", "vision.layers.0.mlp.fc1", "vision.global_layers.0.mlp.fc2",
                    "layers.0.attention.wo", "layers.0.feed_forward.w2", "layers.1.cross_attention.wk",
                    "layers.1.feed_forward.w1"):
        assert {f"{adapted}.lora_a.weight", f"{adapted}.lora_b.weight"} <= names, adapted
    assert all(".lora_" in k for k in names)
    assert_parity(tp, one)


def test_compile_per_block(reference, tmp_path, tok_cache):
    """Every block of the three kinds (vision, self-attention, cross-attention) compiled,
    composed with activation checkpointing (every_n=2: blocks 0, 2, 4, 6, 8 of the 9), read
    back from the modules; within the parity tolerance (measured: equal)."""
    proc = job(tmp_path, ["train.local_batch_size=4", "parallel.compile=true", "parallel.activation_checkpoint=every_n",
                          "parallel.ac_every_n=2", *CKPT], tok_cache)
    out = proc.stderr + proc.stdout
    assert "9 blocks here: activation checkpointing every_n 5 | compiled 9 |" in out, out[-2000:]
    assert int(re.search(r"torch.compile graphs built: (\d+)", out)[1]) >= 3  # one per block kind at least
    assert_parity(tmp_path, reference)


def test_text_only_data_decays_the_vision_tower_and_warns(tmp_path, tok_cache):
    """The real family on text-only data: the vision tower gets zero gradients, so
    AdamW moves it by weight decay alone (each step x (1 - lr x weight_decay), exactly as the
    log warns); with ``finetune.freeze=[vision]`` it stays as it started and no warning."""
    plain = ["model=mllama_debug", "model.n_layers=4", "train.local_batch_size=2", "train.steps=3",
             "checkpoint.interval=3", "optim.weight_decay=0.5", "optim.lr=5e-2", "optim.warmup_steps=0"]
    warned = run_job(tmp_path / "a", plain, tok_cache=tok_cache)
    kept = run_job(tmp_path / "b", [*plain, "finetune.freeze=[vision]"], tok_cache=tok_cache)
    assert "no image in the first step's batches (data.image_field='image'): if the data has none, the vision " \
           "tower(s) get zero gradients" in warned.stderr + warned.stdout
    assert "no image in the first step" not in kept.stderr + kept.stdout
    start = initial_weights(tmp_path / "a")
    factor = 1.0
    for row in read_metrics(tmp_path / "a"):
        factor *= 1 - row["lr"] * 0.5
    for run, want in ((tmp_path / "a", factor), (tmp_path / "b", 1.0)):
        end = final_weights(run, step=3)
        for k in ("projector.weight", "vision.patch_embed.weight", "layers.1.cross_attention.wq.weight"):
            torch.testing.assert_close(end[k], start[k] * want, rtol=1e-6, atol=0)
    assert factor < 0.99
