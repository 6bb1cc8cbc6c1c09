"""Mllama Hugging Face interop through the real CLI and real files: a random
MllamaForConditionalGeneration (every gate open) saved sharded by transformers -> our
checkpoint -> logits of images of 1 and 2 tiles and a text-only row; our export ->
transformers -> bit-equal weights and config; ``model.init_from`` + the imported model.yaml
-> a run whose first loss is transformers' on the same batch; hostile folders refused
naming the file, the key and both values, leaving nothing behind."""
import dataclasses
import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from tests.conftest import read_metrics, run_job

transformers = pytest.importorskip("transformers")

from pretrain.checkpoint import CheckpointError  # noqa: E402
from pretrain.config import load_job_config, load_model_file  # noqa: E402
from pretrain.interop.hf import import_hf, load_hf_weights  # noqa: E402
from pretrain.interop.hf import main as hf_main  # noqa: E402
from pretrain.model.mllama.hf import args_from_hf_config, hf_config_from_args  # noqa: E402
from pretrain.model.mllama.model import build_mllama  # noqa: E402
from tests.test_hf_io import cli  # noqa: E402
from tests.test_mllama import TINY, image_batch, tiny_hf  # noqa: E402

SHARD = "300KB"  # the tiny model is 1.1 MB in fp32: 4 shards
INDEX = "model.safetensors.index.json"


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    """(folder, model): the tiny Mllama of test_mllama with every gate open (transformers
    starts them at 0, which would hide the vision path) and its norms moved off 1, saved
    sharded by transformers."""
    torch.manual_seed(0)
    model = transformers.MllamaForConditionalGeneration(tiny_hf()).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "gate" in name:
                p.uniform_(0.3, 1.2)
            elif p.dim() == 1 and "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    path = tmp_path_factory.mktemp("mllama") / "hf"
    model.save_pretrained(path, max_shard_size=SHARD)
    return path, model


@pytest.fixture(scope="module")
def imported(hf_folder, tmp_path_factory):
    """The folder imported by the CLI: (checkpoint dir, CLI process)."""
    ck = tmp_path_factory.mktemp("mllama_ck") / "ck"
    return ck, cli("import", hf_folder[0], ck)


def test_import_gives_transformers_logits(hf_folder, imported):
    import torch.distributed.checkpoint as dcp

    path, hf = hf_folder
    ck, proc = imported
    assert len(set(json.loads((path / INDEX).read_text())["weight_map"].values())) >= 3, "must be sharded"
    assert "100%" in proc.stderr
    meta = json.loads((ck / "meta.json").read_text())
    assert meta["weights_only"] and meta["model"]["family"] == "mllama"
    args = load_model_file(ck / "model.yaml")  # what `model=<copy of model.yaml>` gives
    assert args == dataclasses.replace(TINY, name="hf")
    ours = build_mllama(args, rope_cache_len=64, device="cpu")
    ours.init_buffers()
    state = {"model": {k: torch.full_like(v, float("nan")) for k, v in ours.state_dict().items()
                       if not k.startswith("rope_")}}
    dcp.load(state, checkpoint_id=str(ck), no_dist=True)
    ours.load_state_dict(state["model"], strict=False)
    assert all(not torch.isnan(p).any() for p in ours.parameters()), "a weight was not loaded"
    tokens, pixels, ar_ids, ar_mask, cam = image_batch()
    with torch.no_grad():
        got = ours(tokens, pixels, ar_ids, ar_mask, cam)
        want = hf(input_ids=tokens[:2], pixel_values=pixels[:2], aspect_ratio_ids=ar_ids[:2],
                  aspect_ratio_mask=ar_mask[:2], cross_attention_mask=cam[:2]).logits
        text_only = hf(input_ids=tokens[2:3]).logits  # transformers skips cross-attention without images
    # Rows 0-1: every token sees its image, where transformers and Meta's rule agree.
    assert (got[:2] - want).abs().max().item() <= 1e-4
    assert (got[2:3] - text_only).abs().max().item() <= 1e-4
    # The image rows read their images: without them the logits move.
    with torch.no_grad():
        blind = ours(tokens, pixels, ar_ids, ar_mask, torch.zeros_like(cam))
    assert (blind[:2] - got[:2]).abs().max().item() > 1e-3


def test_export_reloads_bit_identical_with_the_same_config(hf_folder, imported, tmp_path):
    path, hf = hf_folder
    out = tmp_path / "out"
    assert hf_main(["export", str(imported[0]), str(out), "--dtype", "fp32", "--max-shard-size", SHARD,
                    "--no-progress"]) == 0
    # The names, the shards and the index transformers' own save_pretrained writes.
    index = json.loads((out / INDEX).read_text())["weight_map"]
    assert sorted(index) == sorted(json.loads((path / INDEX).read_text())["weight_map"])
    assert len(set(index.values())) >= 3
    back = transformers.MllamaForConditionalGeneration.from_pretrained(out, dtype=torch.float32)
    a, b = hf.state_dict(), back.state_dict()
    assert sorted(a) == sorted(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    for sub, keys in (("text_config", ("vocab_size", "hidden_size", "hidden_act", "num_hidden_layers",
                                       "num_attention_heads", "num_key_value_heads", "intermediate_size",
                                       "rope_parameters", "rms_norm_eps", "max_position_embeddings",
                                       "tie_word_embeddings", "cross_attention_layers")),
                      ("vision_config", ("hidden_size", "hidden_act", "num_hidden_layers", "num_global_layers",
                                         "attention_heads", "num_channels", "intermediate_size",
                                         "vision_output_dim", "image_size", "patch_size", "norm_eps",
                                         "max_num_tiles", "intermediate_layers_indices",
                                         "supported_aspect_ratios"))):
        for key in keys:
            assert getattr(getattr(back.config, sub), key) == getattr(getattr(hf.config, sub), key), (sub, key)
    assert back.config.image_token_index == hf.config.image_token_index == 300


def test_init_from_loads_every_weight_as_the_import(hf_folder, imported):
    """model.init_from's loader (load_hf_weights, here on one process) fills every parameter,
    vision tower included, with the imported checkpoint's values."""
    import torch.distributed.checkpoint as dcp

    model = build_mllama(TINY, rope_cache_len=64, device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))
    load_hf_weights(model, hf_folder[0], TINY, chunk_bytes=100_000)  # several chunks
    want = {"model": {k: torch.empty_like(v) for k, v in model.named_parameters()}}
    dcp.load(want, checkpoint_id=str(imported[0]), no_dist=True)
    for k, v in model.named_parameters():
        assert torch.equal(v, want["model"][k]), k


def test_the_published_11b_config_is_the_11b_model_file():
    """transformers' MllamaConfig defaults are Llama-3.2-11B-Vision's but for the image size
    (448; published 560) and the rope (published: Llama 3.1's scaling, in the transformers 4
    keys): read, they describe configs/model/llama3_2_11b_vision.yaml exactly, so
    ``model=llama3_2_11b_vision model.init_from=<that folder>`` passes the config check;
    written back, transformers reads them with Llama 3's special tokens."""
    from pretrain.interop.hf import check_args_match
    from tests.conftest import compose_job

    ours = compose_job("model=llama3_2_11b_vision").model
    rope = {"rope_theta": 500000.0, "rope_scaling": {"factor": 8.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                                                     "original_max_position_embeddings": 8192, "rope_type": "llama3"}}
    published = transformers.MllamaConfig(vision_config={"image_size": 560}).to_dict()
    published["text_config"].pop("rope_parameters")
    published["text_config"].update(rope)
    # Keys left out of config.json mean transformers' defaults to us too.
    sparse = {"model_type": "mllama", "text_config": {"rope_scaling": rope["rope_scaling"]},
              "vision_config": {"image_size": 560}}
    for cfg in (published, sparse):
        check_args_match(ours, args_from_hf_config(cfg), Path("published"))
    back = transformers.MllamaConfig(**hf_config_from_args(ours))
    assert args_from_hf_config(back.to_dict(), name=ours.name) == dataclasses.replace(ours, head_dim=None)
    assert (back.text_config.bos_token_id, back.text_config.eos_token_id, back.text_config.pad_token_id) == (
        128000, 128001, 128004)


def test_transformers4_config_and_weight_names(hf_folder, imported, tmp_path):
    """The published checkpoints' form: rope_theta + rope_scaling in text_config, and weights
    under transformers 4 names (what save_pretrained writes) or 5 names: the same import."""
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import load_file, save_file

    cfg = hf_config_from_args(TINY)
    v4 = json.loads(json.dumps(cfg))
    del v4["text_config"]["rope_parameters"]
    v5 = json.loads(json.dumps(cfg))
    for k in ("rope_theta", "rope_scaling"):
        del v5["text_config"][k]
    for form in (v4, v5, transformers.MllamaConfig(**cfg).to_dict()):
        assert args_from_hf_config(form, name=TINY.name) == TINY
    # Weights under the module paths (model.language_model.*): renamed, the same tensors.
    path = hf_folder[0]
    renamed = tmp_path / "v5"
    renamed.mkdir()
    shutil.copy(path / "config.json", renamed)
    weights = {}
    for f in sorted(path.glob("model-*.safetensors")):
        weights.update(load_file(f))
    hf = hf_folder[1]
    assert sorted(weights) != sorted(hf.state_dict())  # the folder holds the old names
    save_file(hf.state_dict(), str(renamed / "model.safetensors"), metadata={"format": "pt"})
    import_hf(renamed, tmp_path / "ck", progress=False)
    read = lambda ck: dcp.FileSystemReader(str(ck)).read_metadata().state_dict_metadata  # noqa: E731
    assert sorted(read(tmp_path / "ck")) == sorted(read(imported[0]))
    mine, theirs = ({k: torch.empty(tuple(v.size)) for k, v in read(ck).items()} for ck in (tmp_path / "ck",
                                                                                            imported[0]))
    dcp.load(mine, checkpoint_id=str(tmp_path / "ck"), no_dist=True)
    dcp.load(theirs, checkpoint_id=str(imported[0]), no_dist=True)
    for k in mine:
        assert torch.equal(mine[k], theirs[k]), k


def _imported_model_run(tmp: Path, imported, overrides, tok_cache, **kw):
    """(run dir, process): one step of the imported model.yaml (``model=`` from a config dir
    under ``tmp``) on text with a 300-token BPE, a checkpoint at step 1."""
    conf = tmp / "conf" / "model"
    conf.mkdir(parents=True)
    shutil.copy(imported[0] / "model.yaml", conf / "imported_mllama.yaml")
    run = tmp / "run"
    proc = run_job(run, [f"hydra.searchpath=[file://{tmp / 'conf'}]", "model=imported_mllama", *overrides,
                         "data.glob=json/*.py", "data.tokenizer.vocab_size=300", "data.num_workers=0",
                         "train.seq_len=32", "train.steps=1", "logging.every=1", "logging.tensorboard=false",
                         "checkpoint.interval=1"], tok_cache=tok_cache, tiny=False, **kw)
    return run, proc


@pytest.fixture(scope="module")
def mllama_run(hf_folder, imported, tmp_path_factory, tok_cache):
    """(run dir, process): one step of the imported model.yaml (``model=`` from a config
    dir) with model.init_from=<folder>, on text with a 300-token BPE, a checkpoint at step 1."""
    tmp = tmp_path_factory.mktemp("mllama_run")
    run, proc = _imported_model_run(tmp, imported, [f"model.init_from={hf_folder[0]}", "train.local_batch_size=2"],
                                    tok_cache)
    return run, proc


def test_init_from_starts_at_transformers_loss_and_the_run_exports(hf_folder, mllama_run, tmp_path):
    """The run of ``mllama_run``: its first loss is transformers' on the same first batch (a
    text batch: no images, so every cross-attention layer adds nothing, as in
    transformers); its checkpoint exports back to transformers."""
    import torch.nn.functional as F

    from data_pipeline.loader import LoaderSpec, RankLoader
    from parallel.env import LaunchEnv
    from pretrain.tokenizers import build_sources, image_spec, load_tokenizer

    path, hf = hf_folder
    run, proc = mllama_run
    assert "initialized weights from Hugging Face folder" in proc.stderr + proc.stdout
    (row,) = read_metrics(run)
    # The run's first batch, rebuilt from its saved config as build_job builds its loader.
    cfg = load_job_config(run / ".hydra" / "config.yaml")
    assert cfg.model.family == "mllama" and cfg.model.init_from == str(path)
    t, d = cfg.train, cfg.data
    sources, weights, _ = build_sources(d, images=True)  # as build_job: an image-text family
    tok = load_tokenizer(d, sources, LaunchEnv(0, 1, 0, 1, "127.0.0.1", 0, "single"))
    loader = RankLoader(sources, weights, tok, LoaderSpec(
        seq_len=t.seq_len, local_batch_size=t.local_batch_size, dp_rank=0, dp_world=1, num_workers=d.num_workers,
        seed=t.seed, shuffle=d.shuffle, grad_accum_steps=t.grad_accum_steps, streams_per_row=d.streams_per_row,
        positions=d.document_masking, sft_packing=d.sft_packing, max_length=d.max_length,
        image=image_spec(cfg)))
    try:
        batch = next(loader)
    finally:
        loader.close()
    with torch.no_grad():
        logits = hf(input_ids=batch["input_ids"]).logits
    want = F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten()).item()
    assert math.isclose(row["loss"], want, rel_tol=1e-5), (row["loss"], want)
    # The run dir exports (its newest checkpoint, bf16 by default) and transformers loads it.
    assert hf_main(["export", str(run), str(tmp_path / "out"), "--no-progress"]) == 0
    back = transformers.MllamaForConditionalGeneration.from_pretrained(tmp_path / "out")
    assert back.dtype == torch.bfloat16 and back.config.text_config.num_hidden_layers == 5


def test_the_export_loads_as_an_mllama_processor(mllama_run, tmp_path):
    """The export of an Mllama run holds the run's tokenizer (its 300-token BPE, <|image|>
    at model.vocab_size) and preprocessor_config.json: ``AutoProcessor`` gives an
    MllamaProcessor whose pixels, aspect ratio, tokens and cross-attention mask on a
    picture and a caption are those of data_pipeline.images and the run's tokenizer."""
    import io

    import numpy as np
    from PIL import Image

    from data_pipeline.images import ImageSpec, cross_attention_mask, load_image, normalize_tiles, tile_image
    from parallel.env import LaunchEnv
    from pretrain.model.mllama import image_spec
    from pretrain.tokenizers import build_sources, load_tokenizer

    run = mllama_run[0]
    out = tmp_path / "out"
    assert hf_main(["export", str(run), str(out), "--no-progress"]) == 0
    assert {"tokenizer.json", "tokenizer_config.json", "preprocessor_config.json"} <= {p.name for p in out.iterdir()}
    processor = transformers.AutoProcessor.from_pretrained(out)
    assert type(processor).__name__ == "MllamaProcessor"
    cfg = load_job_config(run / ".hydra" / "config.yaml")
    assert processor.tokenizer.convert_tokens_to_ids("<|image|>") == processor.image_token_id == cfg.model.vocab_size
    ours = load_tokenizer(cfg.data, build_sources(cfg.data)[0], LaunchEnv(0, 1, 0, 1, "127.0.0.1", 0, "single"))
    spec = ImageSpec(**image_spec(cfg.model))
    picture = Image.fromarray(np.random.default_rng(0).integers(0, 256, (33, 45, 3), dtype=np.uint8))
    buf = io.BytesIO()
    picture.save(buf, format="PNG")
    caption = " A picture of noise, 12 pixels wide?"
    got = processor(images=[[picture]], text=["<|image|>" + caption], return_tensors="np")
    item = tile_image(load_image(buf.getvalue(), spec), spec)
    n = int(item["n_tiles"])
    assert n == 2 and got["pixel_values"].shape == (1, 1, spec.max_tiles, 3, spec.tile_size, spec.tile_size)
    assert np.array_equal(got["pixel_values"][0, 0], normalize_tiles(item["tiles"], n, spec))
    assert got["aspect_ratio_ids"].tolist() == [[int(item["ratio_id"])]]
    assert got["aspect_ratio_mask"].tolist() == [[[1] * n + [0] * (spec.max_tiles - n)]]
    ids = [spec.image_token_id, ours.bos_id, *ours.encode(caption)]  # the processor puts bos after the image
    assert got["input_ids"].tolist() == [ids]
    mask = cross_attention_mask(np.array([ids]), np.zeros((1, len(ids)), dtype=np.int64), np.array([[n]]), spec)
    assert np.array_equal(got["cross_attention_mask"], mask)


def test_a_chat_run_exports_the_processor_chat_template(tmp_path):
    """An Mllama chat run with a Llama 3 rank table (Meta's tokenizer.model form; its first
    344 ranks and 256 special tokens: 600 ids, <|image|> at 600): the export's processor
    renders a conversation with a picture as the trainer's chat rendering does
    (data_pipeline.chat, ``<|image|>`` where the picture stands), its eos is <|eot_id|>.
    The run dir is made by hand (its config and an imported checkpoint): no training."""
    import yaml

    from data_pipeline.chat import ChatRenderer
    from data_pipeline.tokenizer import Llama3Tokenizer, TiktokenTokenizer, write_tiktoken_model

    table = tmp_path / "tokenizer.model"
    write_tiktoken_model(Llama3Tokenizer(), table)
    table.write_bytes(b"".join(table.read_bytes().splitlines(keepends=True)[:344]))
    ours = TiktokenTokenizer(table)
    cfg = tiny_hf()
    cfg.text_config.vocab_size = cfg.image_token_index = 600
    hf = tmp_path / "hf"
    transformers.MllamaForConditionalGeneration(cfg).save_pretrained(hf)
    run = tmp_path / "run"
    import_hf(hf, run / "checkpoints" / "step-1", progress=False)
    model = yaml.safe_load((run / "checkpoints" / "step-1" / "model.yaml").read_text())
    del model["defaults"]
    (run / ".hydra").mkdir()
    (run / ".hydra" / "config.yaml").write_text(yaml.safe_dump({
        "model": model, "data": {"source": "jsonl", "path": "chat.jsonl", "format": "chat",
                                 "tokenizer": {"kind": "tiktoken", "path": str(table)}}}))
    assert hf_main(["export", str(run), str(tmp_path / "out"), "--no-progress"]) == 0
    assert (tmp_path / "out" / "chat_template.json").is_file()
    processor = transformers.AutoProcessor.from_pretrained(tmp_path / "out")
    assert type(processor).__name__ == "MllamaProcessor" and processor.image_token_id == 600
    assert processor.tokenizer.eos_token == "<|eot_id|>"
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": " What is this? "}]},
                {"role": "assistant", "content": "A cat, 2 years old."}]
    text = processor.apply_chat_template(messages)
    got = processor.tokenizer(text, add_special_tokens=False)["input_ids"]
    want = ChatRenderer(ours).render_batch([(("user", "<|image|> What is this? "),
                                             ("assistant", "A cat, 2 years old."))], marker_id=600)[0][0]
    assert got == want.tolist()


@pytest.mark.parametrize("family", ["llama", "mllama"])
def test_special_tokens_only_for_the_llama3_vocabulary(family):
    """Export's token ids (moved from the driver into each converter): Llama 3's for a
    128256-token vocabulary, in the config (Mllama: its text_config) and generation_config;
    none claimed for another vocabulary (Mllama: no pad row, which transformers would build)."""
    from pretrain.model import get_family

    conv = get_family(family).hf
    for vocab, want in ((128256, (128000, 128001)), (300, None)):
        args = dataclasses.replace(TINY, vocab_size=vocab) if family == "mllama" else \
            get_family("llama").args(vocab_size=vocab)
        cfg = conv.hf_config_from_args(args)
        text = cfg["text_config"] if family == "mllama" else cfg
        gen = conv.generation_config(args)
        if want:
            assert (text["bos_token_id"], text["eos_token_id"]) == want and gen["bos_token_id"] == want[0]
            assert gen["temperature"] == 0.6 and gen["top_p"] == 0.9
        else:
            assert text.get("eos_token_id") is None and text.get("pad_token_id") is None and gen == {}


def test_an_export_that_fails_midway_leaves_nothing(imported, tmp_path, monkeypatch):
    """A disk that fills on the second shard: the error propagates, no folder and no .partial."""
    import safetensors.torch

    from pretrain.interop.hf import export_hf

    real, calls = safetensors.torch.save_file, []

    def full_disk(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        real(tensors, path, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    with pytest.raises(OSError, match="No space left"):
        export_hf(imported[0], tmp_path / "out", max_shard_size=300_000, progress=False)
    assert len(calls) == 2 and not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


# -- hostile folders: each refused naming the file, the key and both values, exit 4, nothing written
def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _shard_of(folder: Path, key: str) -> Path:
    return folder / json.loads((folder / INDEX).read_text())["weight_map"][key]


KEY = "language_model.model.layers.2.self_attn.k_proj.weight"  # as save_pretrained names it


def _import_fails(capsys, folder: Path, out: Path, *patterns: str) -> str:
    assert hf_main(["import", str(folder), str(out), "--no-progress"]) == 4
    err = capsys.readouterr().err
    for p in patterns:
        assert p in err, (p, err)
    assert not out.exists() and not out.with_name(out.name + ".partial").exists()
    return err


def test_a_weight_of_the_wrong_shape_names_file_key_and_shapes(hf_folder, tmp_path):
    """Through the CLI: exit 4, the shard, the key, both shapes (ours: [16, 64], one kv head)."""
    from safetensors.torch import load_file, save_file

    bad = _copy(hf_folder[0], tmp_path / "bad")
    f = _shard_of(bad, KEY)
    tensors = load_file(f)
    tensors[KEY] = torch.zeros(32, 64)
    save_file(tensors, str(f), metadata={"format": "pt"})
    proc = cli("import", bad, tmp_path / "ck", check=False)
    assert proc.returncode == 4, proc.stderr[-2000:]
    assert (f"{f}: {KEY} (our layers.2.attention.wk.weight) has shape [32, 64] but this model expects [16, 64]"
            in proc.stderr), proc.stderr[-2000:]
    assert not (tmp_path / "ck").exists() and not (tmp_path / "ck.partial").exists()
    # The patch convolution is compared in its own (4-d) shape.
    shutil.rmtree(bad)
    bad = _copy(hf_folder[0], tmp_path / "bad")
    key = "vision_model.patch_embedding.weight"
    f = _shard_of(bad, key)
    tensors = load_file(f)
    tensors[key] = tensors[key].reshape(32, -1)
    save_file(tensors, str(f), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"patch_embedding.weight \(our vision.patch_embed.weight\) has shape "
                                              r"\[32, 588\] but this model expects \[32, 3, 14, 14\]"):
        import_hf(bad, tmp_path / "ck", progress=False)


def test_a_missing_or_truncated_shard_or_tensor_is_named(hf_folder, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    # A tensor in neither the index nor its shard: the key is named.
    bad = _copy(hf_folder[0], tmp_path / "gone")
    f = _shard_of(bad, KEY)
    tensors = load_file(f)
    del tensors[KEY]
    save_file(tensors, str(f), metadata={"format": "pt"})
    index = json.loads((bad / INDEX).read_text())
    del index["weight_map"][KEY]
    (bad / INDEX).write_text(json.dumps(index))
    _import_fails(capsys, bad, tmp_path / "ck", "no weight 'model.language_model.layers.2.self_attn.k_proj.weight'")
    # Listed by the index, absent from its shard: the shard and the key.
    bad = _copy(hf_folder[0], tmp_path / "unlisted")
    f = _shard_of(bad, KEY)
    save_file({k: v for k, v in load_file(f).items() if k != KEY}, str(f), metadata={"format": "pt"})
    _import_fails(capsys, bad, tmp_path / "ck", f"{f}: cannot read", "k_proj.weight")
    # A shard cut short (a download that stopped): the shard is named.
    bad = _copy(hf_folder[0], tmp_path / "cut")
    f = _shard_of(bad, KEY)
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    _import_fails(capsys, bad, tmp_path / "ck", f"{f}: not a readable safetensors file")
    # An index listing a shard that is not there.
    f.unlink()
    _import_fails(capsys, bad, tmp_path / "ck", f"{f}: missing (listed for")


@pytest.mark.parametrize("edit,message", [
    (lambda c: c["vision_config"].update(vision_output_dim=96),
     "vision_config.vision_output_dim=96 disagrees with the encoder: vision_config.hidden_size=32 x "
     "(1 + 3 intermediate_layers_indices) = 128"),
    (lambda c: c.update(image_token_index=128256),
     "image_token_index=128256 is not supported: this model's <|image|> token is the first id past the "
     "vocabulary (text_config.vocab_size=300)"),
    (lambda c: c["text_config"]["rope_parameters"].update(rope_type="yarn"),
     "text_config.rope_parameters.rope_type='yarn' is not supported"),
    (lambda c: c["vision_config"].update(hidden_act="quick_gelu"), "vision_config.hidden_act='quick_gelu'"),
    (lambda c: c["text_config"].update(tie_word_embeddings=True), "text_config.tie_word_embeddings=True"),
    (lambda c: c["vision_config"].update(image_size=[28, 56]), "vision_config.image_size=[28, 56]"),
    (lambda c: c["vision_config"].update(num_hidden_layers=2048),  # past any published size: never built
     "vision_config.num_hidden_layers (model.vision_layers)=2048, expected an integer in [1, 1024]"),
    (lambda c: c["vision_config"].update(intermediate_layers_indices=[1, 2, 9]),
     "vision_config.intermediate_layers_indices (model.intermediate_layers)=[1, 2, 9] must be increasing"),
], ids=["vision_output_dim", "image_token_index", "rope_type", "hidden_act", "tied", "image_size", "huge",
        "intermediate_layers"])
def test_a_config_this_model_cannot_be_is_refused_naming_the_key(hf_folder, tmp_path, capsys, edit, message):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").symlink_to(tmp_path / "config.json")
    for f in hf_folder[0].iterdir():
        if f.name != "config.json":
            (bad / f.name).symlink_to(f)
    cfg = json.loads((hf_folder[0] / "config.json").read_text())
    edit(cfg)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    err = _import_fails(capsys, bad, tmp_path / "ck", f"{bad / 'config.json'}", message)
    assert "Traceback" not in err


def test_init_from_a_folder_of_another_model_names_both_values(hf_folder):
    """The configured model must be the folder's: each difference named, before any weight moves."""
    args = dataclasses.replace(TINY, cross_attention_layers=[1, 4], vision_global_layers=1)
    model = build_mllama(args, rope_cache_len=64, device="cpu")
    model.init_weights(seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError, match=r"model.cross_attention_layers=\[1, 4\] but config.json has "
                                              r"text_config.cross_attention_layers=\[1, 3\]; model.vision_global_"
                                              r"layers=1 but config.json has vision_config.num_global_layers=2"):
        load_hf_weights(model, hf_folder[0], args)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items() if not k.startswith("rope_"))


# -- model.init_from a Llama 3.1 text folder: the decoder's self-attention layers from it
def _text_config(**over):
    """transformers' LlamaConfig of TINY's text part: its 3 self-attention layers (5 less the
    cross-attention layers 1 and 3), its dims, heads, vocabulary and rope."""
    cfg = dict(vocab_size=300, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=1,
               intermediate_size=96, max_position_embeddings=64, tie_word_embeddings=False, rms_norm_eps=1e-5,
               rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 16})
    return transformers.LlamaConfig(**{**cfg, **over})


def _save_text_model(path: Path, **over):
    torch.manual_seed(1)
    model = transformers.LlamaForCausalLM(_text_config(**over)).float().eval()
    with torch.no_grad():  # norms off 1, so a norm left at its init shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    model.save_pretrained(path, max_shard_size="200KB")
    return model


@pytest.fixture(scope="module")
def text_folder(tmp_path_factory):
    """(folder, model): a random LlamaForCausalLM of TINY's text part, saved sharded."""
    path = tmp_path_factory.mktemp("llama_text") / "hf"
    return path, _save_text_model(path)


def test_init_from_a_llama_text_folder_fills_the_self_attention_layers(text_folder):
    """Text layer j -> the j-th self-attention layer (0, 2, 4 of TINY), q/k rows permuted as
    the Llama converter does; the embedding's first 300 rows, the norm and the head are the
    text model's; the cross-attention layers, the projector, the vision tower and the 8
    image rows of the embedding keep the seeded init. With the gates shut (their init), the
    model computes the text model's logits on text."""
    from pretrain.model.llama.hf import args_from_hf_config as llama_args
    from pretrain.model.llama.hf import hf_to_ours as llama_to_ours

    path, hf = text_folder
    model = build_mllama(TINY, rope_cache_len=64, device="cpu")
    model.init_weights(seed=0)
    fresh = {k: v.clone() for k, v in model.named_parameters()}
    load_hf_weights(model, path, TINY, chunk_bytes=50_000)  # several chunks
    text = llama_to_ours(hf.state_dict(), llama_args(hf.config.to_dict()))
    got = dict(model.named_parameters())
    layer_of = {0: 0, 2: 1, 4: 2}  # ours -> the text model's
    for name, p in got.items():
        parts = name.split(".")
        if name == "tok_embeddings.weight":
            assert torch.equal(p[:300], text[name]) and torch.equal(p[300:], fresh[name][300:]), name
        elif name in ("norm.weight", "output.weight"):
            assert torch.equal(p, text[name]), name
        elif parts[0] == "layers" and int(parts[1]) in layer_of:
            assert torch.equal(p, text[".".join(["layers", str(layer_of[int(parts[1])]), *parts[2:]])]), name
        else:  # cross-attention layers 1 and 3, vision.*, projector.*
            assert parts[0] in ("vision", "projector") or int(parts[1]) in (1, 3), name
            assert torch.equal(p, fresh[name]), name
    tokens = image_batch()[0][2:3]
    with torch.no_grad():
        ours = model(tokens, *(torch.zeros(1, *x.shape[1:], dtype=x.dtype) for x in image_batch()[1:]))
        want = hf(input_ids=tokens).logits
    assert (ours - want).abs().max().item() <= 1e-5


@pytest.mark.parametrize("over,message", [
    ({"num_hidden_layers": 4}, "model.n_layers=5 less 2 model.cross_attention_layers leaves 3 self-attention layers "
                               "but config.json has num_hidden_layers=4"),
    ({"hidden_size": 32, "intermediate_size": 48}, "model.dim=64 but config.json has hidden_size=32"),
    ({"vocab_size": 320}, "model.vocab_size=300 but config.json has vocab_size=320"),
], ids=["layers", "dim", "vocab"])
def test_init_from_a_text_folder_that_does_not_fit_names_both_values(tmp_path, over, message):
    """Refused before any weight moves, naming the folder's config.json and both values."""
    path = tmp_path / "hf"
    _save_text_model(path, **over)
    model = build_mllama(TINY, rope_cache_len=64, device="cpu")
    model.init_weights(seed=0)
    before = {k: v.clone() for k, v in model.named_parameters()}
    with pytest.raises(CheckpointError) as e:
        load_hf_weights(model, path, TINY)
    assert f"{path / 'config.json'}: a llama text model that cannot start this mllama model" in str(e.value)
    assert message in str(e.value), str(e.value)
    assert all(torch.equal(v, before[k]) for k, v in model.named_parameters())


def test_a_text_folder_is_no_lora_base(text_folder, tmp_path):
    """LoRA keeps every base weight frozen, so a text folder would leave the image side at
    its random init: validation refuses it as model.init_from (an 11B folder is fine), and
    export refuses it as --base."""
    from pretrain.validate import ConfigError, validate_job
    from tests.conftest import compose_job

    lora = ["model=mllama_debug", "finetune.lora.rank=4", "finetune.lora.target_modules=[attention]"]
    with pytest.raises(ConfigError, match=r"model.init_from=.*: a llama text model's folder, which holds only part "
                                          r"of a mllama model: LoRA"):
        validate_job(compose_job(*lora, f"model.init_from={text_folder[0]}"), 1)
    validate_job(compose_job("model=mllama_debug", f"model.init_from={text_folder[0]}"), 1)  # without LoRA: fine
    from pretrain.interop.hf import _lora_checkpoint

    with pytest.raises(CheckpointError, match="a llama text model, which holds only part of this mllama model"):
        _lora_checkpoint(tmp_path, {"lora": {"base": str(text_folder[0])}}, {}, TINY, None)


def test_the_adapter_recipe_from_a_text_folder_on_two_fsdp_ranks(text_folder, imported, tmp_path, tok_cache):
    """Meta's adapter recipe (``model.init_from=<Llama 3.1 folder>``, the text tower frozen)
    on two FSDP ranks: the first loss is the text model's on the same two batches (the
    gates shut, the image side adds nothing); the step-1 checkpoint holds the text model's
    weights in the self-attention layers and the embedding's first rows, and the seeded
    init in the embedding's image rows (kept through the gathered shards)."""
    import torch.distributed.checkpoint as dcp
    import torch.nn.functional as F

    from data_pipeline.loader import LoaderSpec, RankLoader
    from parallel.env import LaunchEnv
    from pretrain.model.llama.hf import args_from_hf_config as llama_args
    from pretrain.model.llama.hf import hf_to_ours as llama_to_ours
    from pretrain.tokenizers import build_sources, image_spec, load_tokenizer

    path, hf = text_folder
    run, proc = _imported_model_run(tmp_path, imported, [f"model.init_from={path}", "finetune.freeze=[text]",
                                                         "train.local_batch_size=1"], tok_cache, nproc=2,
                                    launcher="torchrun")
    assert "(a llama text model: " in proc.stderr + proc.stdout
    (row,) = read_metrics(run)
    cfg = load_job_config(run / ".hydra" / "config.yaml")
    t, d = cfg.train, cfg.data
    sources, weights, _ = build_sources(d, images=True)  # as build_job: an image-text family
    tok = load_tokenizer(d, sources, LaunchEnv(0, 1, 0, 1, "127.0.0.1", 0, "single"))
    batches = []
    for rank in range(2):
        loader = RankLoader(sources, weights, tok, LoaderSpec(
            seq_len=t.seq_len, local_batch_size=t.local_batch_size, dp_rank=rank, dp_world=2,
            num_workers=d.num_workers, seed=t.seed, shuffle=d.shuffle, grad_accum_steps=t.grad_accum_steps,
            streams_per_row=d.streams_per_row, positions=d.document_masking, sft_packing=d.sft_packing,
            max_length=d.max_length, image=image_spec(cfg)))
        try:
            batches.append(next(loader))
        finally:
            loader.close()
    tokens = torch.cat([b["input_ids"] for b in batches])
    labels = torch.cat([b["labels"] for b in batches])
    with torch.no_grad():
        want = F.cross_entropy(hf(input_ids=tokens).logits.flatten(0, 1), labels.flatten()).item()
    assert math.isclose(row["loss"], want, rel_tol=1e-5), (row["loss"], want)
    # The frozen text tower as loaded, read back from the sharded checkpoint.
    ck = run / "checkpoints" / "step-1"
    names = ["tok_embeddings.weight", "layers.2.attention.wq.weight", "layers.4.feed_forward.w2.weight",
             "norm.weight", "output.weight"]
    meta = dcp.FileSystemReader(str(ck)).read_metadata().state_dict_metadata
    state = {"model": {n: torch.empty(tuple(meta[f"model.{n}"].size)) for n in names}}
    dcp.load(state, checkpoint_id=str(ck), no_dist=True)
    saved = state["model"]
    text = llama_to_ours(hf.state_dict(), llama_args(hf.config.to_dict()))
    fresh = build_mllama(TINY, rope_cache_len=64, device="cpu")
    fresh.init_weights(seed=t.seed)
    assert torch.equal(saved["tok_embeddings.weight"][:300], text["tok_embeddings.weight"])
    assert torch.equal(saved["tok_embeddings.weight"][300:], fresh.tok_embeddings.weight[300:].detach())
    for ours, theirs in (("layers.2.attention.wq.weight", "layers.1.attention.wq.weight"),
                         ("layers.4.feed_forward.w2.weight", "layers.2.feed_forward.w2.weight"),
                         ("norm.weight", "norm.weight"), ("output.weight", "output.weight")):
        assert torch.equal(saved[ours], text[theirs]), ours
