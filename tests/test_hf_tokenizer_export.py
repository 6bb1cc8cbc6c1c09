"""The tokenizer beside an exported model (``data_pipeline.tokenizer.export_hf_tokenizer``,
``pretrain.interop.hf.export_processor_files``): what ``transformers.AutoTokenizer`` loads from the
folder encodes text to the run's ids. Llama 3's bundled vocabulary converted whole (its
ranks as a byte-level BPE; a few hundred texts, the 256 special tokens, the chat
template against the trainer's chat rendering), a tiktoken rank table, a tokenizer.json
copied with ``<|image|>`` (ids padded up to it), and a text run's export that writes its
BPE, or warns naming the file it cannot find and writes the weights all the same; a
checkpoint saved by a training run carries its own copy of the BPE (exported without its
run dir), and ``pipeline("text-generation")`` generates from the export."""
import importlib
import json
import logging
import random
import shutil
import time
from pathlib import Path

import pytest

transformers = pytest.importorskip("transformers")

from data_pipeline.chat import render_llama3  # noqa: E402
from data_pipeline.tokenizer import (HFTokenizer, Llama3Tokenizer, TiktokenTokenizer,  # noqa: E402
                                     export_hf_tokenizer, llama3_special_tokens, train_bpe, write_tiktoken_model)


def _texts(n_random: int = 300) -> list:
    """Lines of real source and prose (this interpreter's standard library), unicode of
    many scripts, whitespace runs, digits, and random strings over an alphabet that
    stresses the split pattern."""
    texts = [
        "Hello world! It's a test, isn't it? WE'LL SEE; they'd've said 'no'.",
        "  leading spaces\n\n\ttabs\r\n\r\nwindows lines   \n",
        "Ünïcödé — naïve café, Straße, Ελληνικά, русский, עברית, العربية, हिन्दी",
        "日本語のテキスト、中文文本，한국어 텍스트。",
        "emoji 🤖🎉 👩‍👩‍👧‍👦 🇫🇷 e\u0301 zero\u200bwidth \U0001f600\U0001f601",
        "1234567890 3.14159 -42 1e-5 0x1F 2024-09-25 1,000,000",
        "a" * 700 + " " + "ab" * 300,
        "", " ", "\n", "<|begin_of_text|> and <|eot_id|> as plain text",
    ]
    for name in ("textwrap", "json", "random"):  # a few stdlib modules: code, docstrings, comments
        lines = Path(importlib.import_module(name).__file__).read_text().splitlines(keepends=True)
        texts += ["".join(lines[i:i + 7]) for i in range(0, min(len(lines), 420), 7)]
    rng = random.Random(0)
    alphabet = "abc XYZ éß日本🤖1234567.,;'!?-_\n\r\t  ́"
    texts += ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 80))) for _ in range(n_random)]
    return texts


def _as_text(theirs, text: str) -> list:
    """transformers' ids of ``text`` read as plain text, as the trainer reads a document
    (no bos added, special-token strings not parsed)."""
    return theirs(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]


@pytest.fixture(scope="module")
def llama3(tmp_path_factory):
    """(our tokenizer, transformers' from the exported folder, seconds the export took)."""
    out = tmp_path_factory.mktemp("llama3_tok")
    ours = Llama3Tokenizer()
    start = time.perf_counter()
    export_hf_tokenizer(ours, out, chat=True)
    took = time.perf_counter() - start
    return ours, transformers.AutoTokenizer.from_pretrained(out), took


def test_llama3_export_encodes_every_text_as_the_bundled_vocabulary(llama3):
    ours, theirs, took = llama3
    print(f"Llama 3 vocabulary -> tokenizer.json: {took:.1f} s")
    texts = _texts()
    assert len(texts) > 400
    got = theirs(texts, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    for text, ids in zip(texts, got):
        assert ids == ours.encode(text), text
    # Special-token strings in a text: ours reads them as text (split_special_tokens above);
    # transformers by default as the special tokens, as with Meta's tokenizer.json.
    assert theirs("<|eot_id|>x", add_special_tokens=False)["input_ids"] == [128009, *ours.encode("x")]
    for text in [t for t in texts if "<|" not in t][:40]:
        assert theirs(text)["input_ids"] == [ours.bos_id, *ours.encode(text)]  # bos in front, as Meta's
        assert theirs.decode(ours.encode(text)) == text
    # The 256 special tokens at their ids; bos and eos (a chat model's: <|eot_id|>) as Meta's Instruct.
    for name in llama3_special_tokens():
        assert theirs.convert_tokens_to_ids(name) == ours.special_id(name), name
    assert (theirs.bos_token, theirs.eos_token) == ("<|begin_of_text|>", "<|eot_id|>")
    assert theirs.bos_token_id == 128000 and theirs.eos_token_id == 128009
    assert len(theirs) == ours.vocab_size == 128256


def test_the_chat_template_renders_as_the_trainer(llama3):
    """transformers' ``apply_chat_template`` gives the tokens of data_pipeline.chat's
    rendering (contents stripped, tool results as ipython), plus the assistant header when
    asked for a reply."""
    ours, theirs, _ = llama3
    convs = [
        [{"role": "user", "content": "Hi there!"}, {"role": "assistant", "content": "Hello. How can I help?"}],
        [{"role": "system", "content": "  Be brief.\n"}, {"role": "user", "content": "2+2=?"},
         {"role": "assistant", "content": "4"}, {"role": "tool", "content": '{"result": 4}'},
         {"role": "assistant", "content": " Done — ✓ 日本 "}],
    ]
    for conv in convs:
        want = render_llama3(conv, ours)[0].tolist()
        got = theirs.apply_chat_template(conv)
        got = got["input_ids"] if hasattr(got, "keys") else got
        assert got == want
        prompt = theirs.apply_chat_template(conv, add_generation_prompt=True)
        prompt = prompt["input_ids"] if hasattr(prompt, "keys") else prompt
        assert prompt == want + [128006, *ours.encode("assistant"), 128007, *ours.encode("\n\n")]


def test_a_tiktoken_rank_table_exports_with_image_tokens_padded(tmp_path):
    """Meta's tokenizer.model form (here the first 3000 Llama 3 ranks: a smaller table with
    the same rules): the export encodes as tiktoken does; ``<|image|>`` goes at the model's
    id, ids between the table's end and it are ``<|reserved_N|>`` (a tokenizer.json cannot
    skip ids)."""
    full = tmp_path / "tokenizer.model"
    write_tiktoken_model(Llama3Tokenizer(), full)
    small = tmp_path / "small.model"
    small.write_bytes(b"".join(full.read_bytes().splitlines(keepends=True)[:3000]))
    ours = TiktokenTokenizer(small)
    assert ours.vocab_size == 3256
    for image_id in (3256, 3260):
        out = tmp_path / f"out{image_id}"
        export_hf_tokenizer(ours, out, image_token_id=image_id)
        theirs = transformers.AutoTokenizer.from_pretrained(out)
        for text in _texts(100):
            assert _as_text(theirs, text) == ours.encode(text), text
        assert theirs.convert_tokens_to_ids("<|image|>") == image_id and len(theirs) == image_id + 1
        assert theirs.convert_tokens_to_ids("<|eot_id|>") == ours.special_id("<|eot_id|>") == 3009
        assert [theirs.convert_ids_to_tokens(i) for i in range(3256, image_id)] == [
            f"<|reserved_{i}|>" for i in range(3256, image_id)]
        assert theirs.eos_token == "<|end_of_text|>"  # not a chat run: the base model's eos
    # A table that skips a rank is refused, naming the file.
    gappy = tmp_path / "gappy.model"
    lines = full.read_bytes().splitlines(keepends=True)[:300]
    gappy.write_bytes(b"".join(lines[:100] + lines[101:]))
    with pytest.raises(ValueError, match=f"tokenizer {gappy}: no token of rank"):
        export_hf_tokenizer(TiktokenTokenizer(gappy), tmp_path / "gappy")
    assert not (tmp_path / "gappy").exists() or not any((tmp_path / "gappy").iterdir())


@pytest.fixture(scope="module")
def bpe(tmp_path_factory) -> HFTokenizer:
    """A small trained BPE (fewer tokens than asked: 274 of 300 on this corpus)."""
    path = tmp_path_factory.mktemp("bpe") / "bpe.json"
    return train_bpe(["hello world foo bar baz qux"] * 50 + ["über straße ✓"] * 5, 300, path)


def test_a_tokenizer_json_is_copied_with_its_image_token(bpe, tmp_path):
    """As it is when nothing is added (byte for byte); with ``<|image|>`` past its tokens,
    the ids up to it padded. Refused, naming the token: an image id that is another token's,
    or a tokenizer.json that has <|image|> elsewhere."""
    export_hf_tokenizer(bpe, tmp_path / "plain")
    assert (tmp_path / "plain" / "tokenizer.json").read_bytes() == Path(bpe.path).read_bytes()
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path / "plain")
    assert theirs("hello über ✓", add_special_tokens=False)["input_ids"] == bpe.encode("hello über ✓")
    assert "chat_template" not in json.loads((tmp_path / "plain" / "tokenizer_config.json").read_text())
    n = bpe.vocab_size
    assert n < 300
    export_hf_tokenizer(bpe, tmp_path / "image", image_token_id=300)
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path / "image")
    assert theirs.convert_tokens_to_ids("<|image|>") == 300 and len(theirs) == 301
    assert theirs.convert_ids_to_tokens(n) == f"<|reserved_{n}|>"
    text = "foo <|image|> bar"
    assert theirs(text, add_special_tokens=False)["input_ids"] == [*bpe.encode("foo "), 300, *bpe.encode(" bar")]
    with pytest.raises(ValueError, match=rf"{bpe.path} has {n} tokens: id 5 \(the model's <\|image\|>\) is its "
                                         rf"token '.+'"):
        export_hf_tokenizer(bpe, tmp_path / "taken", image_token_id=5)
    moved = HFTokenizer(tmp_path / "image" / "tokenizer.json")
    with pytest.raises(ValueError, match=r"has <\|image\|> at id 300, the model's image token is id 310"):
        export_hf_tokenizer(moved, tmp_path / "moved", image_token_id=310)
    for refused in ("taken", "moved"):
        assert not (tmp_path / refused / "tokenizer.json").exists()


# -- a text run's export ----------------------------------------------------------------
@pytest.fixture
def text_run(tmp_path):
    """A run dir as a text run leaves it: ``.hydra/config.yaml`` (a tiny Llama, a BPE trained
    on a text folder and cached as the trainer caches it) and a checkpoint (a random tiny
    Llama imported: no training needed for the tokenizer's part). Returns (run, our tokenizer)."""
    import yaml

    from parallel.env import LaunchEnv
    from pretrain.config import load_job_config
    from pretrain.interop.hf import import_hf
    from pretrain.tokenizers import build_sources, load_tokenizer
    from tests.test_hf_io import save_hf

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for name in ("json", "textwrap"):
        shutil.copy(importlib.import_module(name).__file__, corpus / f"{name}.txt")
    run = tmp_path / "run"
    save_hf(tmp_path / "hf", tied=False)
    import_hf(tmp_path / "hf", run / "checkpoints" / "step-1", progress=False)
    args = yaml.safe_load((run / "checkpoints" / "step-1" / "model.yaml").read_text())
    args.pop("defaults")
    cfg = {"model": {**args, "family": "llama"},
           "data": {"source": "text_folder", "path": str(corpus), "glob": "*.txt",
                    "tokenizer": {"kind": "bpe", "vocab_size": 400, "cache_dir": str(tmp_path / "cache")}}}
    (run / ".hydra").mkdir()
    (run / ".hydra" / "config.yaml").write_text(yaml.safe_dump(cfg))
    job = load_job_config(run / ".hydra" / "config.yaml")
    tok = load_tokenizer(job.data, build_sources(job.data)[0], LaunchEnv(0, 1, 0, 1, "127.0.0.1", 0, "single"))
    return run, tok


def test_a_text_run_exports_its_tokenizer_beside_the_weights(text_run, tmp_path, caplog):
    """A checkpoint that holds no tokenizer of its own (imported, or of an earlier version):
    the run dir's config and BPE cache give it; with them gone, a warning."""
    from pretrain.checkpoint import read_meta
    from pretrain.interop.hf import export_hf

    run, ours = text_run
    assert "tokenizer" not in read_meta(run / "checkpoints" / "step-1")
    export_hf(run, tmp_path / "out", progress=False)
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    for text in _texts(50):
        # A tokenizer.json's own special tokens are parsed in a text by ``tokenizers`` (ours)
        # as by transformers' default.
        assert theirs(text, add_special_tokens=False)["input_ids"] == ours.encode(text), text
    assert transformers.AutoConfig.from_pretrained(tmp_path / "out").model_type == "llama"
    assert not (tmp_path / "out" / "preprocessor_config.json").exists()  # a text model
    # The BPE cache deleted: the weights still export, a warning names the file it looked for.
    Path(ours.path).unlink()
    with caplog.at_level(logging.WARNING, logger="pretrain"):
        export_hf(run, tmp_path / "out2", progress=False)
    assert f"{ours.path}: missing" in caplog.text and "no tokenizer files written" in caplog.text
    assert {p.name for p in (tmp_path / "out2").iterdir()} == {"config.json", "generation_config.json",
                                                               "model.safetensors"}
    # No run config beside the checkpoint (a copied step dir): the same, naming config.yaml.
    caplog.clear()
    step = tmp_path / "copies" / "step-1"
    shutil.copytree(run / "checkpoints" / "step-1", step)
    with caplog.at_level(logging.WARNING, logger="pretrain"):
        export_hf(step, tmp_path / "out3", progress=False)
    assert f"{tmp_path / '.hydra' / 'config.yaml'}: missing, so the run's tokenizer is unknown" in caplog.text
    assert (tmp_path / "out3" / "model.safetensors").is_file()


def test_a_run_with_a_tokenizer_json_that_is_gone_warns_naming_it(text_run, tmp_path, caplog):
    """data.tokenizer.kind=hf with a path that no longer exists: the weights export, the
    warning names the path."""
    import yaml

    from pretrain.interop.hf import export_hf

    run = text_run[0]
    cfg = yaml.safe_load((run / ".hydra" / "config.yaml").read_text())
    cfg["data"]["tokenizer"] = {"kind": "hf", "path": str(tmp_path / "gone" / "tokenizer.json")}
    (run / ".hydra" / "config.yaml").write_text(yaml.safe_dump(cfg))
    with caplog.at_level(logging.WARNING, logger="pretrain"):
        export_hf(run, tmp_path / "out", progress=False)
    assert str(tmp_path / "gone" / "tokenizer.json") in caplog.text
    assert (tmp_path / "out" / "model.safetensors").is_file() and not (tmp_path / "out" / "tokenizer.json").exists()


# -- a checkpoint saved by a training run carries its tokenizer -------------------------
@pytest.fixture(scope="module")
def trained(shared_run, tmp_path_factory):
    """test_hf_io's short training run (shared; its BPE trained into the session's cache):
    (its newest checkpoint, the export of a copy of that checkpoint alone, with no run dir
    around it (as on another machine), the run's tokenizer)."""
    from data_pipeline.tokenizer import HFTokenizer
    from pretrain.checkpoint import read_meta
    from pretrain.interop.hf import export_hf
    from tests.test_hf_io import EXPORT_RUN

    step = sorted((shared_run(EXPORT_RUN)[0] / "checkpoints").glob("step-*"))[-1]
    ours = HFTokenizer(read_meta(step)["tokenizer"]["source"])  # the BPE the run trained, in its cache
    alone = tmp_path_factory.mktemp("elsewhere") / step.name
    shutil.copytree(step, alone)
    out = tmp_path_factory.mktemp("trained_export") / "hf"
    export_hf(alone, out, progress=False)
    return step, out, ours


def test_a_trained_checkpoint_carries_its_tokenizer_to_the_export(trained, tmp_path, caplog):
    """A checkpoint holds a copy of the run's BPE (``tokenizer/tokenizer.json``, in the manifest
    with its size and CRC32) and meta.json records it: the checkpoint copied alone exports
    with its tokenizer, and so does its run dir with the BPE cache gone. A copy that is not
    the one written, or a meta.json that names another file, is refused."""
    import yaml

    from pretrain.checkpoint import CheckpointError, read_meta
    from pretrain.checkpoint.files import meta_text
    from pretrain.interop.hf import export_hf

    step, out, ours = trained
    meta = read_meta(step)
    assert meta["tokenizer"] == {"kind": "hf", "fingerprint": ours.fingerprint, "source": ours.path,
                                 "file": "tokenizer/tokenizer.json", "chat": False}
    assert (step / "tokenizer" / "tokenizer.json").read_bytes() == Path(ours.path).read_bytes()
    assert "tokenizer/tokenizer.json" in meta["files"]
    theirs = transformers.AutoTokenizer.from_pretrained(out)
    for text in _texts(50):
        assert theirs(text, add_special_tokens=False)["input_ids"] == ours.encode(text), text
    assert (out / "tokenizer.json").read_bytes() == Path(ours.path).read_bytes()
    # The run dir, its config naming a BPE cache that is gone: the checkpoint's copy is used.
    run = tmp_path / "run"
    shutil.copytree(step.parent.parent, run)
    cfg = yaml.safe_load((run / ".hydra" / "config.yaml").read_text())
    cfg["data"]["tokenizer"]["cache_dir"] = str(tmp_path / "empty_cache")
    (run / ".hydra" / "config.yaml").write_text(yaml.safe_dump(cfg))
    ck = run / "checkpoints" / step.name
    with caplog.at_level(logging.WARNING, logger="pretrain"):
        export_hf(run, tmp_path / "out", progress=False)
    assert "tokenizer" not in caplog.text
    assert (tmp_path / "out" / "tokenizer.json").read_bytes() == Path(ours.path).read_bytes()
    # A damaged copy: the export is refused, naming it (its CRC32, checked with the other files').
    copy = ck / "tokenizer" / "tokenizer.json"
    good = copy.read_bytes()
    copy.write_bytes(good.replace(b'"hello"', b'"hellO"') if b'"hello"' in good else good[:-2] + b" }")
    with pytest.raises(CheckpointError, match=f"{copy}: CRC32 differs"):
        export_hf(ck, tmp_path / "bad", progress=False)
    copy.write_bytes(good)
    # meta.json (its own CRC32 made right) naming a file outside the checkpoint: refused.
    for bad in ({"file": "../../../etc/hostname"}, {"kind": "bpe"}):
        (ck / "meta.json").write_text(meta_text({**meta, "tokenizer": {**meta["tokenizer"], **bad}}))
        with pytest.raises(CheckpointError, match="'tokenizer' is not a tokenizer record"):
            export_hf(ck, tmp_path / "bad", progress=False)


def test_a_text_generation_pipeline_generates_from_the_export(trained):
    """``pipeline("text-generation")`` loads the exported folder alone (model and tokenizer)
    and its greedy continuation is the model's own argmax, token after token, in our ids."""
    import torch

    _, out, ours = trained
    prompt = "def dumps(obj, *, skipkeys=False"
    gen = transformers.pipeline("text-generation", model=str(out), dtype=torch.float32, device="cpu")
    text = gen(prompt, max_new_tokens=8, do_sample=False)[0]["generated_text"]
    assert text.startswith(prompt) and len(text) > len(prompt), text
    model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = ours.encode(prompt)
    with torch.no_grad():
        for _ in range(8):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
            if ids[-1] == ours.eos_id:
                break
    assert text == ours.decode(ids)
