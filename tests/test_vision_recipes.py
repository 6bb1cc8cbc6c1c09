"""The Llama 3.2 Vision recipes as users launch them, with the model swapped for the tiny
``mllama_debug`` (composing with ``--cfg job`` skips validation, so each one trains):
chat SFT on records with pictures -> its HF export (weights, tokenizer with <|image|>,
preprocessor) -> LoRA from that folder -> the vision adapter pre-trained on captions from
it, the text frozen. Each reads real pictures (data/images) and keeps its recipe's settings."""
import json
from pathlib import Path

import pytest
import torch

from conftest import read_metrics, run_job
from datagen import write_image_records

transformers = pytest.importorskip("transformers")

TINY_VISION = ["model=mllama_debug", "train.seq_len=64", "train.local_batch_size=2", "train.steps=2",
               "train.grad_accum_steps=1", "parallel.activation_checkpoint=none", "logging.every=1",
               "logging.tensorboard=false", "checkpoint.interval=2", "data.num_workers=1"]


def _chat_records(root: Path, n: int) -> Path:
    captions = [json.loads(line) for line in (root / "records.jsonl").read_text().splitlines()]
    pictures = [c for c in captions if isinstance(c.get("image"), str)]
    with open(root / "chat.jsonl", "w") as f:
        for i in range(n):
            c = pictures[i % len(pictures)]
            f.write(json.dumps({"messages": [{"role": "user", "content": "<|image|>What is in this picture?"},
                                             {"role": "assistant", "content": c["text"]}],
                                "images": [c["image"]]}) + "\n")
    return root / "chat.jsonl"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """(caption records, chat records, tokenizer overrides): a small BPE with Llama 3's chat
    tokens (the bundled 128K vocabulary would make every step a 128K-wide head)."""
    from tokenizers import Tokenizer

    from data_pipeline.chat import END_HEADER, EOT, START_HEADER
    from data_pipeline.tokenizer import train_bpe

    root = tmp_path_factory.mktemp("vision_recipes")
    captions = write_image_records(root, 40, seed=5)
    chat = _chat_records(root, 40)
    texts = [json.loads(line).get("text", "") for line in captions.read_text().splitlines()]
    train_bpe(texts * 4 + ["What is in this picture?", "user assistant system"], 300, root / "bpe.json")
    tok = Tokenizer.from_file(str(root / "bpe.json"))
    tok.add_special_tokens([START_HEADER, END_HEADER, EOT])
    tok.save(str(root / "tokenizer.json"))
    vocab = tok.get_vocab_size(with_added_tokens=True)  # <|image|> is the next id
    return captions, chat, ["data.tokenizer.kind=hf", f"data.tokenizer.path={root / 'tokenizer.json'}",
                            f"model.vocab_size={vocab}"], vocab


def _run(run: Path, recipe: str, overrides, tok_cache):
    proc = run_job(run, [f"experiment={recipe}", *TINY_VISION, *overrides], tok_cache=tok_cache, tiny=False,
                   timeout=300)
    rows = read_metrics(run)
    assert len(rows) == 2 and all(r["data/images"] > 0 for r in rows) and rows[-1]["data/skipped"] == 0
    return proc, rows


def test_vision_recipes_sft_export_lora_and_adapter(data, tmp_path, tok_cache):
    from pretrain.config import load_job_config

    captions, chat, tok, vocab = data
    # 1. Chat SFT with pictures (the recipe's init_from is a published folder: none here).
    sft = tmp_path / "sft"
    _run(sft, "finetune_llama3_2_11b_vision_sft", ["model.init_from=null", f"data.path={chat}", *tok], tok_cache)
    cfg = load_job_config(sft / ".hydra" / "config.yaml")
    assert cfg.data.format == "chat" and cfg.data.document_masking and cfg.optim.lr == 1e-5
    assert cfg.parallel.activation_checkpoint == "none" and cfg.model.name == "mllama_debug"
    # 2. Its HF export loads as transformers' processor and model.
    out = tmp_path / "hf"
    from pretrain.interop.hf import main as hf_main

    assert hf_main(["export", str(sft), str(out), "--no-progress", "--dtype", "fp32"]) == 0
    proc = transformers.AutoProcessor.from_pretrained(out)
    assert type(proc).__name__ == "MllamaProcessor"
    assert proc.tokenizer.convert_tokens_to_ids("<|image|>") == vocab
    # 3. LoRA from the exported folder: adapters only in the checkpoint.
    lora = tmp_path / "lora"
    _run(lora, "finetune_llama3_2_11b_vision_lora", [f"model.init_from={out}", f"data.path={chat}", *tok], tok_cache)
    cfg = load_job_config(lora / ".hydra" / "config.yaml")
    assert cfg.finetune.lora.rank == 16 and cfg.finetune.lora.target_modules == ["all"]
    meta = json.loads((lora / "checkpoints" / "step-2" / "meta.json").read_text())
    assert meta.get("lora"), meta.keys()
    # 4. The adapter recipe from the same folder (an 11B-like folder, as a Llama 3.1 text
    # folder is tested in test_mllama_hf): captions, the text tower frozen.
    adapter = tmp_path / "adapter"
    proc, rows = _run(adapter, "pretrain_vision_adapter", [f"model.init_from={out}", f"data.path={captions}",
                                                           "data.glob=null", *tok], tok_cache)
    assert "frozen: text |" in proc.stderr + proc.stdout
    cfg = load_job_config(adapter / ".hydra" / "config.yaml")
    assert cfg.finetune.freeze == ["text"] and cfg.model.gate_init == 0.0 and cfg.data.format == "text"
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
