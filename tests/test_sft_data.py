"""Supervised fine-tuning data: Llama 3 chat rendering checked token by token, loss masks
(labels are -100 exactly off assistant tokens), packing and padding through the real
loader, truncation and bad-record counts, exact resume and resharding, config rules."""
import gzip
import json
import logging
import random
from collections import Counter

import numpy as np
import pytest
import torch

from conftest import compose_job
from data_pipeline.chat import IGNORE_INDEX, PAD_KEY, ChatPacker, render_llama3, shifted_labels
from data_pipeline.loader import LoaderSpec, RankLoader
from data_pipeline.sources import SourceSpec, build_source
from data_pipeline.stream import SlotStream, UnitPlan, fresh_slot_state, key_cursor, key_unit, reshard
from data_pipeline.tokenizer import Llama3Tokenizer
from pretrain.validate import ConfigError, validate_job

# Llama 3's special token ids (Meta's tokenizer), written out rather than looked up.
BOT, START, END, EOT, EOS = 128000, 128006, 128007, 128009, 128001
WORDS = "alpha beta gamma delta river stone cloud forest ember lantern harbor meadow quartz willow".split()


@pytest.fixture(scope="module")
def llama3():
    return Llama3Tokenizer()


def expected_render(messages, tok):
    """(ids, trained) built piece by piece as Meta's ChatFormat does, independently of
    data_pipeline.chat: bos, then per message start, role, end, "\\n\\n", content.strip(),
    eot; trained = an assistant message's content and eot."""
    ids, trained = [BOT], [False]
    for m in messages:
        head = [START, *tok.encode(m["role"]), END, *tok.encode("\n\n")]
        body = [*tok.encode(m["content"].strip()), EOT]
        ids += head + body
        trained += [False] * len(head) + [m["role"] == "assistant"] * len(body)
    return ids, trained


def make_convs(n, seed=0, max_words=12):
    rng = random.Random(seed)

    def words():
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, max_words)))

    out = []
    for i in range(n):
        msgs = [{"role": "system", "content": f"conv {i} system"}] if i % 3 == 0 else []
        for turn in range(rng.randint(1, 2)):
            msgs += [{"role": "user", "content": f"conv {i} turn {turn} asks {words()}?"},
                     {"role": "assistant", "content": f"conv {i} turn {turn} says {words()}."}]
        out.append({"messages": msgs, "id": i})
    return out


def write_chat(path, records, raw_lines=()):
    """JSONL of ``records`` (raw byte lines inserted at their given indices); returns
    byte offset -> record for the parsed ones."""
    lines = [json.dumps(r).encode() for r in records]
    for idx, raw in sorted(raw_lines):
        lines.insert(idx, raw)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\n".join(lines) + b"\n")
    by_offset, pos = {}, 0
    raws = {raw for _, raw in raw_lines}
    it = iter(records)
    for line in lines:
        if line not in raws:
            by_offset[pos] = next(it)
        pos += len(line) + 1
    return by_offset


def loader(src, tok, mode, *, seq_len=128, lbs=2, lanes=1, workers=0, shuffle=False, max_length=-1):
    return RankLoader([src], [1.0], tok, LoaderSpec(
        seq_len=seq_len, local_batch_size=lbs, dp_rank=0, dp_world=1, num_workers=workers, seed=0,
        shuffle=shuffle, streams_per_row=lanes, positions=True, sft_packing=mode, max_length=max_length))


def segments(doc_row):
    """[(key, start, end)] runs of a row of document keys."""
    out, start = [], 0
    for i in range(1, len(doc_row) + 1):
        if i == len(doc_row) or doc_row[i] != doc_row[start]:
            out.append((int(doc_row[start]), start, i))
            start = i
    return out


# -- rendering -----------------------------------------------------------------------------

def test_rendered_conversation_and_loss_mask_token_by_token(llama3):
    messages = [
        {"role": "system", "content": "You are terse.\n"},
        {"role": "user", "content": "  What is 2+2? Say <|eot_id|> literally.  "},
        {"role": "assistant", "content": "4. <|eot_id|>"},
        {"role": "user", "content": "And in words?"},
        {"role": "assistant", "content": "\nFour.\n\n"},
    ]
    ids, mask, truncated = render_llama3(messages, llama3)
    exp_ids, exp_mask = expected_render(messages, llama3)
    assert not truncated
    assert ids.tolist() == exp_ids  # the concatenation of the pieces, token for token
    assert mask.tolist() == exp_mask
    # The same text as Meta's template string; special-token text in a message stays text.
    template = "<|begin_of_text|>" + "".join(
        f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n{m['content'].strip()}<|eot_id|>" for m in messages)
    assert llama3.decode(ids) == template
    assert (ids == EOT).sum() == len(messages) and (ids == START).sum() == len(messages)
    assert (ids == BOT).sum() == 1 and ids[0] == BOT
    # Trained: exactly the assistant bodies and their closing eot (two messages).
    assert llama3.decode(ids[mask]) == "4. <|eot_id|><|eot_id|>Four.<|eot_id|>"

    labels = shifted_labels(ids[None], mask[None])[0]
    assert len(labels) == len(ids) - 1
    for i in range(len(labels)):  # every position: the next token where it is an assistant token
        if exp_mask[i + 1]:
            assert labels[i] == exp_ids[i + 1], i
        else:
            assert labels[i] == IGNORE_INDEX, i
    # The header's "\n\n" predicts the first assistant token; the last content token the eot.
    first = exp_mask.index(True)
    assert exp_ids[first - 1] == llama3.encode("\n\n")[0] and labels[first - 1] == exp_ids[first]
    assert labels[-1] == EOT

    cut, cut_mask, truncated = render_llama3(messages, llama3, max_length=20)
    assert truncated and cut.tolist() == exp_ids[:20] and cut_mask.tolist() == exp_mask[:20]
    assert not render_llama3(messages, llama3, max_length=len(exp_ids))[2]


def test_tool_role_uses_the_ipython_header_and_unknown_roles_fail(llama3):
    ids, mask, _ = render_llama3([("user", "q"), ("tool", "42"), ("assistant", "a")], llama3)
    assert "<|start_header_id|>ipython<|end_header_id|>\n\n42<|eot_id|>" in llama3.decode(ids)
    assert llama3.decode(ids[mask]) == "a<|eot_id|>"
    with pytest.raises(ValueError, match="'human'"):
        render_llama3([("human", "q")], llama3)


# -- through the loader --------------------------------------------------------------------

def test_pack_mode_windows_hold_whole_conversations_apart(tmp_path, llama3):
    convs = make_convs(40)
    by_offset = write_chat(tmp_path / "d" / "a.jsonl", convs)
    src = build_source(SourceSpec("jsonl", str(tmp_path / "d"), format="chat"))
    assert len(src.units) == 1
    ld = loader(src, llama3, "pack")
    order, trained = {0: [], 1: []}, 0
    for _ in range(8):
        b = next(ld)
        assert b["truncated"] == 0 and b["skipped"] == 0
        assert int(b["source_tokens"].sum()) == int((b["window_doc_ids"] != PAD_KEY).sum())
        win = torch.cat([b["input_ids"], b["labels"][:, -1:]], 1)  # the window but its last token
        for r in range(2):
            labels, keys = b["labels"][r], b["window_doc_ids"][r].numpy()
            # Every label is -100 or the next input token.
            assert bool(((labels[:-1] == IGNORE_INDEX) | (labels[:-1] == b["input_ids"][r, 1:])).all())
            full_mask = np.zeros(len(keys), dtype=bool)
            for n, (key, s, e) in enumerate(segments(keys)):
                if key == PAD_KEY:  # padding only at the end of a window
                    assert n > 0 and e == len(keys)
                    continue
                # A whole conversation (never split), bos first, positions restarting.
                rec = by_offset[int(key_cursor(key))]
                exp_ids, exp_mask = expected_render(rec["messages"], llama3)
                assert e - s == len(exp_ids)
                e_in = min(e, len(keys) - 1)  # the window's last token is only a label
                assert win[r, s:e_in].tolist() == exp_ids[:e_in - s]
                assert b["positions"][r, s:e_in].tolist() == list(range(e_in - s))
                full_mask[s:e] = exp_mask
                order[r].append(rec["id"])
                trained += sum(exp_mask)
            # Labels from the independently rendered pieces, position by position.
            exp_labels = [int(b["input_ids"][r, i + 1]) if full_mask[i + 1] else IGNORE_INDEX
                          for i in range(len(keys) - 2)]
            assert labels[:-1].tolist() == exp_labels
            last = segments(keys)[-1]
            if last[0] != PAD_KEY:  # a conversation ends the window: its eot is the last label
                assert labels[-1] == EOT
            else:
                assert labels[-1] == IGNORE_INDEX
    # Each row reads the conversations in file order (row 1: the next epoch of the one unit).
    for r in range(2):
        assert order[r] == list(range(len(order[r]))) and len(order[r]) >= 8
    assert trained > 0


def test_pad_mode_one_conversation_per_row(tmp_path, llama3):
    convs = make_convs(12)
    by_offset = write_chat(tmp_path / "a.jsonl", convs)
    src = build_source(SourceSpec("jsonl", str(tmp_path / "a.jsonl"), format="chat"))
    ld = loader(src, llama3, "pad", lbs=1)
    for i in range(12):
        b = next(ld)
        keys = b["window_doc_ids"][0]
        segs = segments(keys.numpy())
        assert len(segs) == 2 and segs[1][0] == PAD_KEY  # one conversation, then padding
        key, s, e = segs[0]
        rec = by_offset[int(key_cursor(key))]
        assert rec["id"] == i
        exp_ids, exp_mask = expected_render(rec["messages"], llama3)
        assert b["input_ids"][0, :e].tolist() == exp_ids
        assert (b["input_ids"][0, e:] == EOS).all()  # quicktok's Llama 3.0 names: pad = <|end_of_text|>
        labels = b["labels"][0]
        assert (labels[e - 1:] == IGNORE_INDEX).all()  # from the conversation's last token on
        assert labels[:e - 1].tolist() == [t if m else IGNORE_INDEX for t, m in zip(exp_ids[1:], exp_mask[1:])]
        assert int(b["source_tokens"][0]) == e


def test_truncation_is_counted(tmp_path, llama3):
    convs = make_convs(20, max_words=40)
    by_offset = write_chat(tmp_path / "a.jsonl", convs)
    src = build_source(SourceSpec("jsonl", str(tmp_path / "a.jsonl"), format="chat"))
    max_len = 48
    lengths = [len(expected_render(c["messages"], llama3)[0]) for c in convs]
    assert 0 < sum(n > max_len for n in lengths) < len(lengths)
    ld = loader(src, llama3, "pad", lbs=1, max_length=max_len)
    truncated = 0
    for i in range(len(convs)):
        b = next(ld)
        truncated += b["truncated"]
        assert truncated == sum(n > max_len for n in lengths[:i + 1])
        (key, s, e), *_ = segments(b["window_doc_ids"][0].numpy())
        exp_ids, exp_mask = expected_render(by_offset[int(key_cursor(key))]["messages"], llama3)
        assert e == min(lengths[i], max_len)
        assert b["input_ids"][0, :e].tolist() == exp_ids[:e]
    # Pack mode counts them too (each once, when packed).
    ld = loader(src, llama3, "pack", lbs=1, max_length=max_len)
    seen, truncated = [], 0
    for _ in range(6):
        b = next(ld)
        truncated += b["truncated"]
        seen += [k for k, _, _ in segments(b["window_doc_ids"][0].numpy()) if k != PAD_KEY]
    # Packed so far: the windows' conversations and at most one waiting for the next window.
    ids = [by_offset[int(key_cursor(k))]["id"] for k in seen]
    low = sum(lengths[i] > max_len for i in ids)
    assert low <= truncated <= low + 1
    with pytest.raises(ValueError, match="data.max_length=130"):
        loader(src, llama3, "pack", max_length=130)


def test_bad_records_are_skipped_counted_and_located(tmp_path, llama3, caplog):
    convs = make_convs(6)
    bad = [
        (1, b"{not json"),
        (2, json.dumps({"text": "plain"}).encode()),
        (3, json.dumps({"messages": "hi"}).encode()),
        (4, json.dumps({"messages": []}).encode()),
        (5, json.dumps({"messages": [{"role": "user"}, {"role": "assistant", "content": "a"}]}).encode()),
        (6, json.dumps({"messages": [{"role": "user", "content": ["x"]}]}).encode()),
        (7, json.dumps({"messages": [{"role": "user", "content": "only a question"}]}).encode()),
        (8, json.dumps({"messages": ["hi"]}).encode()),
    ]
    by_offset = write_chat(tmp_path / "d" / "a.jsonl", convs, bad)
    src = build_source(SourceSpec("jsonl", str(tmp_path / "d"), format="chat"))
    skips = []
    got = [m for u in src.units for _, _, m in src.iter_docs(u, 0, lambda w, r: skips.append((w, r)))]
    assert [list(m) for m in got] == [[(x["role"], x["content"]) for x in c["messages"]] for c in convs]
    reasons = [r for _, r in skips]
    assert len(skips) == 8 and all("a.jsonl@byte" in w for w, _ in skips)
    assert reasons[0].startswith("malformed JSON") and reasons[1] == "no field 'messages'"
    assert "not a list" in reasons[2] and reasons[3] == "empty conversation"
    assert "content is NoneType" in reasons[4] and "content is list" in reasons[5]
    assert "no assistant message" in reasons[6] and "message 0 is str" in reasons[7]

    # Through the loader: not fatal, counted in the batches' skipped, logged with the location.
    ld = loader(src, llama3, "pad", lbs=1)
    with caplog.at_level(logging.WARNING, logger="data_pipeline"):
        batches = [next(ld) for _ in range(len(convs))]
    ids = [by_offset[int(key_cursor(b["window_doc_ids"][0, 0]))]["id"] for b in batches]
    assert ids == list(range(len(convs)))
    assert sum(b["skipped"] for b in batches) == 8
    assert "skipped a record" in caplog.text and "a.jsonl@byte" in caplog.text

    # A gzip file locates by line; an unknown role stops with the file and line.
    lines = [json.dumps(c).encode() for c in convs[:2]] + [
        json.dumps({"messages": [{"role": "human", "content": "q"}, {"role": "assistant", "content": "a"}]}).encode()]
    (tmp_path / "z").mkdir()
    (tmp_path / "z" / "b.jsonl.gz").write_bytes(gzip.compress(b"\n".join([b"[1]"] + lines) + b"\n"))
    zsrc = build_source(SourceSpec("jsonl", str(tmp_path / "z"), format="chat"))
    skips.clear()
    with pytest.raises(ValueError, match=r"b\.jsonl\.gz:4: message 0 has role 'human'.*data\.format=chat"):
        for _ in zsrc.iter_docs(zsrc.units[0], 0, lambda w, r: skips.append((w, r))):
            pass
    assert skips == [(str(tmp_path / "z" / "b.jsonl.gz") + ":1", "no field 'messages'")]
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "c.jsonl").write_bytes(b"\n".join(lines[:2] + [b"", lines[2]]) + b"\n")
    psrc = build_source(SourceSpec("jsonl", str(tmp_path / "p"), format="chat", chunk_bytes=64))
    assert len(psrc.units) > 2  # the bad line is read from a byte range, not the file start
    with pytest.raises(ValueError, match=r"c\.jsonl:4: message 0 has role 'human'"):
        for u in psrc.units:
            list(psrc.iter_docs(u, 0, lambda *_: None))
    with pytest.raises(ValueError, match="data.format=chat: needs data.source=jsonl"):
        build_source(SourceSpec("text_folder", str(tmp_path / "p"), format="chat"))


def test_resume_gives_the_same_next_batches(tmp_path, llama3):
    write_chat(tmp_path / "d" / "a.jsonl", make_convs(60, seed=3))
    src = build_source(SourceSpec("jsonl", str(tmp_path / "d"), format="chat", chunk_bytes=1500))
    assert len(src.units) > 4
    for mode in ("pack", "pad"):
        ref = loader(src, llama3, mode, lbs=2, lanes=2, shuffle=True)
        want = [next(ref) for _ in range(9)]
        a = loader(src, llama3, mode, lbs=2, lanes=2, shuffle=True)
        for _ in range(4):
            next(a)
        saved = json.loads(json.dumps([a.state_dict()]))  # through JSON, as in a checkpoint
        a.close()
        assert any(fr for row in saved[0]["rows"] for st in row["slots"] for fr in st["packer"]) or mode == "pad"
        for workers in ((0, 1) if mode == "pack" else (0,)):
            b = loader(src, llama3, mode, lbs=2, lanes=2, shuffle=True, workers=workers)
            b.load_rank_states(saved)
            for i in range(4, 9):
                got = next(b)
                for k in ("input_ids", "labels", "doc_ids", "positions", "window_doc_ids", "source_tokens"):
                    assert torch.equal(got[k], want[i][k]), (mode, workers, i, k)
                assert (got["skipped"], got["truncated"]) == (want[i]["skipped"], want[i]["truncated"])
            b.close()


@pytest.mark.parametrize("old,new", [(3, 2), (2, 3)])
def test_resharding_reads_every_conversation_once(tmp_path, llama3, old, new):
    convs = make_convs(50, seed=5)
    write_chat(tmp_path / "d" / "a.jsonl", convs)
    src = build_source(SourceSpec("jsonl", str(tmp_path / "d"), format="chat", chunk_bytes=1200))
    n_units, window = len(src.units), 129
    plan = UnitPlan(n_units, 0, 0, True)

    def streams(states):
        return [SlotStream([src], [plan], [1.0], llama3, window, st, sft_packing="pack") for st in states]

    lengths = {}
    for g in range(n_units * 6):
        for c, _, m in src.iter_docs(src.units[plan.unit(g)], 0, lambda *_: None):
            lengths[(g, c)] = len(render_llama3(m, llama3)[0])
    counts = Counter()

    def consume(ss, n):
        for _ in range(n):
            for s in ss:
                toks, keys, lens, mask = s.next_window()
                assert len(toks) == window and len(mask) == window
                for k, ln in zip(keys.tolist(), lens.tolist()):
                    if k != PAD_KEY:
                        counts[(int(key_unit(k)), int(key_cursor(k)))] += 1
                        assert ln == lengths[(int(key_unit(k)), int(key_cursor(k)))]  # whole

    ss = streams([fresh_slot_state(s, old, 1) for s in range(old)])
    consume(ss, 5)
    states = json.loads(json.dumps([s.state_dict() for s in ss]))
    consume(streams(reshard(states, new)), 60)
    epoch0 = [k for k in lengths if k[0] < n_units]
    assert all(counts[k] == 1 for k in epoch0) and max(counts.values()) == 1


def test_chat_packer_pads_the_tail_and_keeps_order():
    p = ChatPacker(10, "pack", 0)
    for key, n in ((1, 4), (2, 5), (3, 3)):
        p.add(key, (np.arange(n) + 10 * key, np.ones(n, dtype=bool)), {"k": key})
    assert p.ready()
    toks, keys, lens, mask = p.cut()
    assert keys.tolist() == [1, 2, PAD_KEY] and lens.tolist() == [4, 5, 1] and not mask[-1]
    assert p.state_dict() == [{"key": 3, "ref": {"k": 3}}] and not p.ready()
    with pytest.raises(ValueError, match="does not fit"):
        p.add(4, (np.arange(11), np.ones(11, dtype=bool)), {})


# -- config --------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides,key", [
    (["data.format=chat"], "data.format"),  # stdlib is a text_folder source
    (["data=chat", "data.path=/d", "model=llama3_2_1b", "data.sft_packing=stack"], "data.sft_packing"),
    (["data=chat", "data.path=/d", "model=llama3_2_1b", "data.max_length=0"], "data.max_length"),
    (["data=chat", "data.path=/d", "model=llama3_2_1b", "train.seq_len=64", "data.max_length=66"], "data.max_length"),
    (["data=chat", "data.path=/d", "data.tokenizer.kind=bpe", "model=llama3_2_1b"], "data.tokenizer.kind"),
    (["data=jsonl", "data.path=/d", "model=llama3_2_1b", "data.format=json"], "data.format"),
])
def test_chat_config_rules(overrides, key):
    with pytest.raises(ConfigError) as e:
        validate_job(compose_job(*overrides), 1)
    assert e.value.key == key


def test_chat_config_composes():
    cfg = compose_job("data=chat", "data.path=/d", "model=llama3_2_1b", "train.seq_len=64", "data.max_length=65",
                      "data.sft_packing=pad")
    validate_job(cfg, 1)
    assert (cfg.data.format, cfg.data.source, cfg.data.document_masking) == ("chat", "jsonl", True)
    from pretrain.tokenizers import build_sources

    assert compose_job().data.format == "text" and compose_job().data.max_length == -1
    with pytest.raises(FileNotFoundError, match="data.path='/d'"):
        build_sources(cfg.data)
