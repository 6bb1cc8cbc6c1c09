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
from pretrain.hf import import_hf, load_hf_weights  # noqa: E402
from pretrain.hf import main as hf_main  # noqa: E402
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
    from pretrain.hf import check_args_match
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


def test_init_from_starts_at_transformers_loss_and_the_run_exports(hf_folder, imported, tmp_path, tok_cache):
    """A run of the imported model.yaml (``model=`` from a config dir) with
    model.init_from=<folder>: its first loss is transformers' on the same first batch (a
    text batch: no images, so every cross-attention layer adds nothing, as in
    transformers); its checkpoint exports back to transformers."""
    import torch.nn.functional as F

    from data_pipeline.loader import LoaderSpec, RankLoader
    from parallel.env import LaunchEnv
    from pretrain.tokenizers import build_sources, load_tokenizer

    path, hf = hf_folder
    conf = tmp_path / "conf" / "model"
    conf.mkdir(parents=True)
    shutil.copy(imported[0] / "model.yaml", conf / "imported_mllama.yaml")
    run = tmp_path / "run"
    proc = run_job(run, [f"hydra.searchpath=[file://{tmp_path / 'conf'}]", "model=imported_mllama",
                         f"model.init_from={path}", "data.glob=json/*.py", "data.tokenizer.vocab_size=300",
                         "data.num_workers=0", "train.seq_len=32", "train.local_batch_size=2", "train.steps=1",
                         "logging.every=1", "logging.tensorboard=false", "checkpoint.interval=1"],
                   tok_cache=tok_cache, tiny=False)
    assert "initialized weights from Hugging Face folder" in proc.stderr + proc.stdout
    (row,) = read_metrics(run)
    # The run's first batch, rebuilt from its saved config as build_job builds its loader.
    cfg = load_job_config(run / ".hydra" / "config.yaml")
    assert cfg.model.family == "mllama" and cfg.model.init_from == str(path)
    t, d = cfg.train, cfg.data
    sources, weights, _ = build_sources(d)
    tok = load_tokenizer(d, sources, LaunchEnv(0, 1, 0, 1, "127.0.0.1", 0, "single"))
    loader = RankLoader(sources, weights, tok, LoaderSpec(
        seq_len=t.seq_len, local_batch_size=t.local_batch_size, dp_rank=0, dp_world=1, num_workers=d.num_workers,
        seed=t.seed, shuffle=d.shuffle, grad_accum_steps=t.grad_accum_steps, streams_per_row=d.streams_per_row,
        positions=d.document_masking, sft_packing=d.sft_packing, max_length=d.max_length))
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

    from pretrain.hf import export_hf

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
