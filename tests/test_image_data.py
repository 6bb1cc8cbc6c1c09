"""Image-text data through the loader: records with pictures made here (PNG/JPEG files
beside their JSONL, chat records, bad images of every kind) -> batches that hold the
model's image inputs (the batch contract of ``data_pipeline.images.collate``), with the
text loader's guarantees: bad records skipped and counted, samples that cannot fit dropped
and counted, exact resume (any worker count) and resharding to another DP degree."""
import io
import json
import logging

import numpy as np
import pytest
from PIL import Image

from data_pipeline.images import ImageSpec, load_image, normalize_tiles, tile_image
from data_pipeline.loader import LoaderSpec, RankLoader
from data_pipeline.sources import SourceSpec, build_source
from data_pipeline.stream import key_cursor, key_unit
from data_pipeline.tokenizer import Llama3Tokenizer

IMAGE_ID = 128256  # <|image|> of the published models: model.vocab_size, past the llama3 vocabulary
SPEC = ImageSpec(image_token_id=IMAGE_ID, tile_size=28, max_tiles=2, aspect_ratios=((1, 1), (1, 2), (2, 1)),
                 max_images=2)
SEQ = 40


@pytest.fixture(scope="module")
def llama3():
    return Llama3Tokenizer()


def picture(seed: int, w: int = 30, h: int = 20, fmt: str = "PNG") -> bytes:
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def write_records(root, n: int, bad: dict = (), extra: list = ()) -> None:
    """``n`` caption records ``{"image": "img/<i>.png", "text": "picture <i> ..."}``, the
    files beside them; ``bad`` maps a record index to the bytes its file holds instead
    (None: no file)."""
    (root / "img").mkdir(parents=True, exist_ok=True)
    bad = dict(bad)
    with open(root / "records.jsonl", "w") as f:
        for i in range(n):
            data = bad.get(i, picture(i, 20 + 7 * (i % 5), 15 + 11 * (i % 3)))
            if data is not None:
                (root / "img" / f"{i}.png").write_bytes(data)
            f.write(json.dumps({"image": f"img/{i}.png", "text": f"picture {i} shows noise"}) + "\n")
        for rec in extra:
            f.write(json.dumps(rec) + "\n")


def loader(root, tok, workers=0, rows=2, dp_rank=0, dp_world=1, streams=1, positions=True, fmt="text",
           sft_packing="pack", spec=SPEC, chunk_bytes=1 << 20):
    src = build_source(SourceSpec("jsonl", str(root / "records.jsonl"), image_field="image", format=fmt,
                                  chunk_bytes=chunk_bytes))
    return RankLoader([src], [1.0], tok, LoaderSpec(
        seq_len=SEQ, local_batch_size=rows, dp_rank=dp_rank, dp_world=dp_world, num_workers=workers, seed=3,
        shuffle=True, streams_per_row=streams, positions=positions, sft_packing=sft_packing, image=spec))


def take(ld, n):
    out = [next(ld) for _ in range(n)]
    return out


def test_batches_hold_each_samples_own_picture_and_the_model_inputs(tmp_path, llama3):
    """Every image in a batch is its record's file, decoded and tiled (the processor's rule,
    tested against transformers in test_images.py), at the position of its marker; the
    labels skip the image tokens, the padding and the next sample's <|begin_of_text|>."""
    write_records(tmp_path, 12)
    ld = loader(tmp_path, llama3)
    seen = 0
    for b in take(ld, 4):
        assert b["pixel_values"].shape == (2, 2, 2, 3, 28, 28) and b["cross_attention_mask"].shape == (2, SEQ, 2, 2)
        for q in range(2):
            ids, labels, docs = b["input_ids"][q], b["labels"][q], b["doc_ids"][q]
            marks = (ids == IMAGE_ID).nonzero().flatten().tolist()
            assert 1 <= len(marks) <= 2
            for k, at in enumerate(marks):
                i = key_cursor(docs[at].item())  # the record: its line offset -> read it back
                line = (tmp_path / "records.jsonl").read_bytes()[i:].split(b"\n")[0]
                rec = json.loads(line)
                n = int(rec["text"].split()[1])
                ref = tile_image(load_image((tmp_path / rec["image"]).read_bytes(), SPEC), SPEC)
                want = normalize_tiles(ref["tiles"], int(ref["n_tiles"]), SPEC)
                np.testing.assert_array_equal(b["pixel_values"][q, k].numpy(), want)
                assert b["aspect_ratio_ids"][q, k] == ref["ratio_id"]
                assert b["aspect_ratio_mask"][q, k].tolist() == [1] * int(ref["n_tiles"]) + [0] * (2 - int(ref["n_tiles"]))
                # Seen from its marker to its own sample's end, by nothing else.
                own = (docs == docs[at]).nonzero().flatten()
                sees = b["cross_attention_mask"][q, :, k, 0].nonzero().flatten().tolist()
                assert sees == list(range(at, own[-1].item() + 1)), n
                seen += 1
            assert all(labels[at - 1] == -100 for at in marks if at)  # an image token is never a target
            pad = docs == -1
            assert (labels[pad[1:].nonzero().flatten()] == -100).all() if pad.any() else True
        assert (b["aspect_ratio_ids"][b["aspect_ratio_ids"] != 0] > 0).all()
    assert seen >= 8
    ld.close()


def test_bad_images_are_skipped_counted_and_logged_without_crashing_a_worker(tmp_path, llama3, caplog):
    """Truncated JPEG, zero bytes, not an image, a missing file, a picture past
    data.max_image_pixels: each record skipped and counted, the first five logged with
    the file and record; the good ones train, with 2 worker threads."""
    jpeg = picture(50, 40, 40, "JPEG")
    bad = {1: jpeg[: len(jpeg) // 2], 3: b"", 5: b"this is text, not a picture", 7: None, 9: picture(51, 300, 300)}
    write_records(tmp_path, 14, bad)
    spec = ImageSpec(**{**SPEC.to_dict(), "max_pixels": 200 * 200})
    ld = loader(tmp_path, llama3, workers=2, spec=spec, rows=1)
    got = take(ld, 4)  # the first epoch's 9 good pictures, two per row: records 0..12
    ld.close()
    assert sum(b["skipped"] for b in got) == 5
    assert sum(int((b["aspect_ratio_ids"] != 0).sum()) for b in got) == 8
    # In process the skips are logged in reading order: the first five, with file and record.
    caplog.set_level(logging.WARNING, logger="data_pipeline")
    caplog.clear()
    ld = loader(tmp_path, llama3, workers=0, spec=spec, rows=1)
    take(ld, 4)
    ld.close()
    logged = [r.getMessage() for r in caplog.records if "skipped a record" in r.getMessage()]
    assert len(logged) == 5
    for (i, why), msg in zip(((1, "truncated"), (3, "0 bytes"), (5, "not an image"), (7, "No such file"),
                              (9, "max_image_pixels")), logged):
        assert f"img/{i}.png" in msg and why in msg and "records.jsonl@byte" in msg, (i, msg)


def test_samples_that_cannot_fit_are_dropped_and_counted(tmp_path, llama3):
    """A sample longer than a window, or with more images than a row holds
    (model.max_images), is dropped (data/dropped), never cut; a text-only record longer
    than a window is cut (truncated); packing never puts more than max_images in a row."""
    long_text = "word " * 200
    extra = [{"image": ["img/0.png", "img/1.png", "img/2.png"], "text": "three pictures"},
             {"image": "img/0.png", "text": long_text}, {"text": long_text}]
    write_records(tmp_path, 6, extra=extra)
    ld = loader(tmp_path, llama3, rows=1)
    dropped = truncated = 0
    for b in take(ld, 12):
        dropped += b["dropped"]
        truncated += b["truncated"]
        assert int((b["input_ids"] == IMAGE_ID).sum()) <= 2
        assert int((b["aspect_ratio_ids"] != 0).sum()) == int((b["input_ids"] == IMAGE_ID).sum())
    ld.close()
    assert dropped >= 2 and truncated >= 1


def test_chat_records_with_images_train_on_assistant_turns_only(tmp_path, llama3):
    write_records(tmp_path, 2)
    recs = [{"messages": [{"role": "user", "content": "<|image|>What is in this picture?"},
                          {"role": "assistant", "content": f"Noise number {i}."}], "images": [f"img/{i % 2}.png"]}
            for i in range(6)]
    (tmp_path / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    ld = loader(tmp_path, llama3, fmt="chat", sft_packing="pad", rows=2)
    b = next(ld)
    ld.close()
    for q in range(2):
        ids, labels = b["input_ids"][q], b["labels"][q]
        at = (ids == IMAGE_ID).nonzero().flatten().tolist()
        assert len(at) == 1
        trained = (labels != -100).nonzero().flatten()
        answer = llama3.decode(labels[trained].tolist())
        assert answer.startswith("Noise number") and answer.endswith("<|eot_id|>")
        assert trained.min() > at[0]  # nothing before the assistant turn is a target
        assert b["cross_attention_mask"][q, at[0]:, 0, 0].sum() > 0 and b["cross_attention_mask"][q, :at[0]].sum() == 0


def test_image_batches_resume_exactly_and_reshard_to_another_dp_degree(tmp_path, llama3):
    """Saved after 3 steps by 2 worker threads, resumed in process: the same batches, pixels
    included, bit for bit. Saved by 2 DP ranks x 2 rows, resumed by 1 rank x 3 rows: every
    sample of the epoch is read once, none twice."""
    write_records(tmp_path, 30)
    full = loader(tmp_path, llama3, workers=2, streams=2)
    want = take(full, 6)
    full.close()
    first = loader(tmp_path, llama3, workers=2, streams=2)
    take(first, 3)
    state = json.loads(json.dumps(first.state_dict()))  # as a checkpoint holds it: JSON, no pixels
    first.close()
    assert len(json.dumps(state)) < 20_000
    again = loader(tmp_path, llama3, workers=0, streams=2)
    again.load_rank_states([state])
    for a, b in zip(want[3:], take(again, 3)):
        for k in ("input_ids", "labels", "pixel_values", "aspect_ratio_ids", "cross_attention_mask"):
            assert bool((a[k] == b[k]).all()), k
    again.close()

    def samples(batches):
        out = []
        for b in batches:
            keys = b["window_doc_ids"]
            for q in range(len(keys)):
                ids = [k for k in keys[q].unique().tolist() if k >= 0]
                out += [(key_unit(k), key_cursor(k)) for k in ids]
        return out

    units = dict(chunk_bytes=300)  # ~5 records per unit: an epoch spread over the streams
    ranks = [loader(tmp_path, llama3, rows=2, dp_rank=r, dp_world=2, **units) for r in range(2)]
    before = samples([b for ld in ranks for b in take(ld, 2)])
    saved = [ld.state_dict() for ld in ranks]
    for ld in ranks:
        ld.close()
    one = loader(tmp_path, llama3, rows=3, **units)
    one.load_rank_states(saved)
    after = samples(take(one, 8))
    one.close()
    n_units = len(build_source(SourceSpec("jsonl", str(tmp_path / "records.jsonl"), chunk_bytes=300)).units)
    epoch = [s for s in before + after if s[0] < n_units]  # units g < N: the first epoch
    assert n_units > 4 and before and len(epoch) == len(set(epoch)) == 30


def test_a_tokenizer_may_count_the_image_token_at_its_id_only(tmp_path):
    """The published 11B tokenizer.json counts 128,257 tokens: its <|image|> is id
    model.vocab_size. Such a tokenizer is accepted for an image-text model; one with
    <|image|> at another id, or more tokens than that, is refused naming both."""
    from tokenizers import Tokenizer

    from data_pipeline.tokenizer import HFTokenizer, train_bpe
    from pretrain.build import check_vocabulary

    base = train_bpe([f"caption {i} of a picture" for i in range(50)], 300, tmp_path / "bpe.json")
    n = base.vocab_size
    raw = Tokenizer.from_file(str(tmp_path / "bpe.json"))
    raw.add_special_tokens(["<|image|>"])
    raw.save(str(tmp_path / "with_image.json"))
    tok = HFTokenizer(tmp_path / "with_image.json")
    assert tok.vocab_size == n + 1 and tok.special_id("<|image|>") == n
    spec = ImageSpec(**{**SPEC.to_dict(), "image_token_id": n})
    check_vocabulary(tok, n, spec)  # 128,256 + <|image|> at 128,256, in small
    with pytest.raises(ValueError, match=f"has {n + 1} tokens but model.vocab_size={n}"):
        check_vocabulary(tok, n, None)  # a text model does not count it
    other = ImageSpec(**{**SPEC.to_dict(), "image_token_id": n + 1})
    with pytest.raises(ValueError, match=f"<\\|image\\|> at id {n}, but the model's image token is model.vocab_size={n + 1}"):
        check_vocabulary(tok, n + 1, other)
    check_vocabulary(base, n, spec)  # a tokenizer without it: the id past its vocabulary


def test_hostile_paths_skip_their_record_and_a_corpus_of_none_stops(tmp_path, llama3):
    """A picture path with an unknown protocol, a NUL byte, a data: URL or a device is
    skipped like a missing file (never the loader's end); a corpus where no picture can be
    used stops with a DataError naming the last one instead of reading forever."""
    from data_pipeline import stream
    from data_pipeline.runs import DataError

    write_records(tmp_path, 8)
    lines = (tmp_path / "records.jsonl").read_text().splitlines()
    for i, bad in ((1, "foo://bar/x.png"), (3, "img\u0000.png"), (5, "data:image/png;base64,AAAA"),
                   (7, "/dev/zero")):
        rec = json.loads(lines[i])
        rec["image"] = bad
        lines[i] = json.dumps(rec)
    (tmp_path / "records.jsonl").write_text("\n".join(lines) + "\n")
    ld = loader(tmp_path, llama3, workers=2, rows=1)
    got = take(ld, 2)
    ld.close()
    assert sum(b["skipped"] for b in got) == 4 and sum(int((b["aspect_ratio_ids"] != 0).sum()) for b in got) == 4

    none = tmp_path / "none"
    none.mkdir()
    (none / "records.jsonl").write_text("".join(json.dumps({"image": f"missing/{i}.png", "text": "x"}) + "\n"
                                                for i in range(30)))
    old, stream.UNUSABLE_LIMIT = stream.UNUSABLE_LIMIT, 50
    try:
        ld = loader(none, llama3, rows=1)
        with pytest.raises(DataError, match="50 samples in a row could not be used .*missing/.*data.image_field"):
            next(ld)
        ld.close()
    finally:
        stream.UNUSABLE_LIMIT = old


def test_text_only_conversations_keep_the_image_text_and_validation_refuses_a_caption_as_path(tmp_path, llama3):
    from conftest import compose_job

    from data_pipeline.stream import Encoder, Unusable
    from pretrain.validate import ConfigError, validate_job

    enc = Encoder(llama3, SEQ + 1, chat=True, image=SPEC)
    (packed, n, items, _), = enc.encode([(("user", "what is <|image|>?"), ("assistant", "a tag: <|image|>"))])
    assert not isinstance(packed, Unusable) and items == [] and IMAGE_ID not in packed[0]
    assert "<|image|>" in llama3.decode(packed[0].tolist())
    with pytest.raises(ConfigError, match="data.image_field='text'"):
        validate_job(compose_job("model=mllama_debug", "data=jsonl", "data.path=/tmp", "data.image_field=text",
                                 "data.tokenizer.kind=bpe"), 1)
    with pytest.raises(ConfigError, match="data.source='image_folder'"):
        validate_job(compose_job("data=image_folder", "data.path=/tmp", "model=llama3_2_1b"), 1)
