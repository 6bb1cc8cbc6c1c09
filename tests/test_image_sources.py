"""Sources of image-text documents (``SourceSpec.image_field``): caption records of JSONL,
Parquet and saved ``datasets`` (image values as paths, bytes, {bytes, path} or lists of
them, relative paths resolved against the record's file or the dataset folder), chat
records with images, image folders with caption sidecars; malformed values and marker
counts skipped with a reason; ``read_one`` gives the payload iteration gave; without
``image_field`` every source yields what it yielded before."""
import gzip
import io
import json
import uuid

import pytest

from data_pipeline.records import IMAGE_TEXT, ChatRecord, Record
from data_pipeline.sources import SourceSpec, build_source, file_dir, resolve_image_path

M = IMAGE_TEXT


@pytest.fixture(scope="module")
def png():
    from PIL import Image

    b = io.BytesIO()
    Image.new("RGB", (2, 1), (255, 0, 0)).save(b, "PNG")
    return b.getvalue()


def norm(p):
    """A payload as comparable values."""
    refs = lambda items: [(r.where, r.path, r.data) for r in items]  # noqa: E731
    if isinstance(p, Record):
        return ("record", tuple(p.texts), refs(p.items), p.where)
    if isinstance(p, ChatRecord):
        return ("chat", p.messages, refs(p.items), p.where)
    return p


def read_all(src):
    """(payloads normalized, [(where, reason)] skipped), and read_one agrees with each."""
    out, skips = [], []
    for unit in src.units:
        for cursor, _, payload in src.iter_docs(unit, 0, lambda w, r: skips.append((w, r))):
            out.append(norm(payload))
            assert norm(src.read_one(unit, cursor)) == out[-1]
    return out, skips


def jsonl(path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wt") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


CAPTIONS = [
    {"image": "img/a.png", "text": "a cat"},
    {"image": "../top.png", "text": "up one"},
    {"image": ["img/a.png", "/abs/b.png"], "text": f"x {M} y {M}"},
    {"image": "s3://bkt/k.png", "text": "remote"},
    {"image": {"bytes": None, "path": "./img/c.png"}, "text": "a dict"},
    {"text": "plain"},
    {"image": None, "text": "null image"},
    {"image": [], "text": "no images"},
    {"image": 5, "text": "a number"},
    {"image": {"foo": 1}, "text": "a dict without bytes or path"},
    {"image": ["img/a.png", 3], "text": "junk in a list"},
    {"image": "", "text": "an empty path"},
    {"image": {"bytes": "abc", "path": None}, "text": "string bytes"},
    {"image": "img/a.png", "text": f"{M} two markers {M}"},
]


@pytest.mark.parametrize("name", ["x.jsonl", "x.jsonl.gz"])
def test_jsonl_caption_records(tmp_path, name):
    f = tmp_path / "d" / "sub" / name
    jsonl(f, CAPTIONS)
    src = build_source(SourceSpec("jsonl", str(tmp_path / "d"), image_field="image"))
    got, skips = read_all(src)
    sub, d = str(tmp_path / "d" / "sub"), str(tmp_path / "d")
    wheres = _jsonl_wheres(f) if name == "x.jsonl" else [f"{f}:{i + 1}" for i in range(len(CAPTIONS))]
    assert got == [
        ("record", ("", "a cat"), [(wheres[0], f"{sub}/img/a.png", None)], wheres[0]),
        ("record", ("", "up one"), [(wheres[1], f"{d}/top.png", None)], wheres[1]),
        ("record", ("x ", " y ", ""), [(wheres[2], f"{sub}/img/a.png", None), (wheres[2], "/abs/b.png", None)],
         wheres[2]),
        ("record", ("", "remote"), [(wheres[3], "s3://bkt/k.png", None)], wheres[3]),
        ("record", ("", "a dict"), [(wheres[4], f"{sub}/img/c.png", None)], wheres[4]),
        "plain", "null image", "no images",
    ]
    assert skips == [
        (wheres[8], "image 'image' is int, not an image (a path, bytes, {bytes, path} or a list of them)"),
        (wheres[9], "image 'image' holds neither bytes nor a path"),
        (wheres[10], "image 'image'[1] is int, not an image (a path, bytes, {bytes, path} or a list of them)"),
        (wheres[11], "image 'image' is an empty path"),
        (wheres[12], "image 'image': bytes is str, not bytes"),
        (wheres[13], f"2 {M} in the text for 1 images"),
    ]
    assert list(src.iter_texts())[:3] == ["a cat", "up one", "x  y "]


def _jsonl_wheres(f):
    out, pos = [], 0
    for line in f.read_bytes().splitlines(keepends=True):
        out.append(f"{f}@byte{pos}")
        pos += len(line)
    return out


def test_without_image_field_payloads_are_texts_as_before(tmp_path):
    jsonl(tmp_path / "x.jsonl", CAPTIONS)
    got, skips = read_all(build_source(SourceSpec("jsonl", str(tmp_path / "x.jsonl"))))
    assert got == [r["text"] for r in CAPTIONS] and skips == []


def test_relative_paths_resolve_against_remote_folders():
    assert resolve_image_path("img/a.png", "s3://bucket/dir") == "s3://bucket/dir/img/a.png"
    assert resolve_image_path("../a.png", "s3://bucket/dir/sub") == "s3://bucket/dir/a.png"
    assert resolve_image_path("a.png", "https://host/data") == "https://host/data/a.png"
    for kept in ("/abs/a.png", "s3://other/a.png", "http://h/a.png", "file:///x/a.png", "memory://m/a.png"):
        assert resolve_image_path(kept, "s3://bucket/dir") == kept
    assert resolve_image_path("./img/../b.png", "/data/set") == "/data/set/b.png"
    import fsspec

    fs, root = fsspec.core.url_to_fs("s3://bucket/dir/x.jsonl")
    assert file_dir(fs, root) == "s3://bucket/dir"


def test_jsonl_on_a_remote_filesystem_resolves_to_urls():
    import fsspec

    name = f"imgtest-{uuid.uuid4().hex}"
    fs = fsspec.filesystem("memory")
    try:
        with fs.open(f"/{name}/sub/x.jsonl", "w") as f:
            f.write(json.dumps({"image": ["img/a.png", "/abs/b.png"], "text": "hi"}) + "\n")
        src = build_source(SourceSpec("jsonl", f"memory://{name}/", image_field="image"))
        got, _ = read_all(src)
        where = f"/{name}/sub/x.jsonl@byte0"
        assert got == [("record", ("", "", "hi"), [(where, f"memory:///{name}/sub/img/a.png", None),
                                                   (where, "/abs/b.png", None)], where)]
        with fs.open(f"/{name}/pics/a.png", "wb") as f:
            f.write(b"png")
        with fs.open(f"/{name}/pics/a.txt", "wb") as f:
            f.write(b"caption")
        got, _ = read_all(build_source(SourceSpec("image_folder", f"memory://{name}/pics", image_field="image")))
        assert got == [("record", ("", "caption"), [(f"/{name}/pics/a.png", f"memory:///{name}/pics/a.png", None)],
                        f"/{name}/pics/a.png")]
    finally:
        fs.rm(f"/{name}", recursive=True)


def test_parquet_image_columns(tmp_path, png):
    import pyarrow as pa
    import pyarrow.parquet as pq

    big = png + b"\0" * 2000
    d = tmp_path / "pq"
    (d / "sub").mkdir(parents=True)
    pq.write_table(pa.table({"text": ["red", "no image", "too big", f"{M} and {M}"],
                             "image": pa.array([png, None, big, png], pa.binary())}), d / "a.parquet")
    struct = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    pq.write_table(pa.table({"text": ["by path", "by bytes", "neither"],
                             "image": pa.array([{"bytes": None, "path": "img/a.png"},
                                                {"bytes": png, "path": "ignored.png"},
                                                {"bytes": None, "path": None}], struct)}), d / "sub" / "b.parquet")
    pq.write_table(pa.table({"text": ["only text"]}), d / "c.parquet")
    pq.write_table(pa.table({"text": [f"{M} vs {M}", "one list"],
                             "image": pa.array([["img/a.png", "/abs/b.png"], []], pa.list_(pa.string()))}),
                   d / "d.parquet")
    pq.write_table(pa.table({"text": ["a number"], "image": pa.array([7], pa.int64())}), d / "e.parquet")
    src = build_source(SourceSpec("parquet", str(d), image_field="image", max_doc_bytes=1000))
    got, skips = read_all(src)
    w = lambda f, row: f"{d / f}#rowgroup0:row{row}"  # noqa: E731
    assert got == [
        ("record", ("", "red"), [(w("a.parquet", 0), None, png)], w("a.parquet", 0)),
        "no image",
        "only text",
        ("record", ("", " vs ", ""), [(w("d.parquet", 0), f"{d}/img/a.png", None), (w("d.parquet", 0), "/abs/b.png",
                                                                                       None)], w("d.parquet", 0)),
        "one list",
        ("record", ("", "by path"), [(w("sub/b.parquet", 0), f"{d}/sub/img/a.png", None)], w("sub/b.parquet", 0)),
        ("record", ("", "by bytes"), [(w("sub/b.parquet", 1), None, png)], w("sub/b.parquet", 1)),
    ]
    assert skips == [
        (w("a.parquet", 2), f"image 'image': an image of {len(big)} bytes, longer than data.max_doc_bytes=1000"),
        (w("a.parquet", 3), f"2 {M} in the text for 1 images"),
        (w("e.parquet", 0), "image 'image' is int, not an image (a path, bytes, {bytes, path} or a list of them)"),
        (w("sub/b.parquet", 2), "image 'image' holds neither bytes nor a path"),
    ]
    plain, _ = read_all(build_source(SourceSpec("parquet", str(d), max_doc_bytes=1000)))
    assert plain == ["red", "no image", "too big", f"{M} and {M}", "only text", f"{M} vs {M}", "one list",
                     "a number", "by path", "by bytes", "neither"]


def test_saved_datasets_image_features(tmp_path, png, monkeypatch):
    """An ``Image`` feature is read undecoded ({bytes, path}: save_to_disk embeds the
    files' bytes), a list of images likewise; a {bytes, path} struct with paths only
    resolves them against the dataset folder. Rows are read a few at a time (2 here)."""
    import datasets

    from data_pipeline import sources

    monkeypatch.setattr(sources, "_HF_IMAGE_ROWS", 2)
    d = tmp_path / "ds"
    (d / "img").mkdir(parents=True)
    (d / "img" / "a.png").write_bytes(png)
    big = {"bytes": png + b"\0" * 2000, "path": None}
    features = datasets.Features({
        "text": datasets.Value("string"), "image": datasets.Image(), "images": datasets.List(datasets.Image()),
        "ref": {"bytes": datasets.Value("binary"), "path": datasets.Value("string")}})
    monkeypatch.chdir(d)  # the paths below, for save_to_disk to embed
    ds = datasets.Dataset.from_dict({
        "text": ["red", "from a file", "text only", f"{M} vs {M}", "too big"],
        "image": [{"bytes": png, "path": None}, "img/a.png", None, None, big],
        "images": [[], None, [], ["img/a.png", {"bytes": png, "path": None}], []],
        "ref": [{"bytes": None, "path": "img/a.png"}, {"bytes": None, "path": "../up.png"},
                {"bytes": None, "path": None}, {"bytes": png, "path": "x.png"}, {"bytes": None, "path": "/abs.png"}],
    }, features=features)
    ds.save_to_disk(str(d))
    w = lambda row: f"{d}:row{row}"  # noqa: E731
    spec = dict(rows_per_unit=3, max_doc_bytes=1000)
    got, skips = read_all(build_source(SourceSpec("hf_dataset", str(d), image_field="image", **spec)))
    assert got == [("record", ("", "red"), [(w(0), None, png)], w(0)),
                   ("record", ("", "from a file"), [(w(1), None, png)], w(1)),
                   "text only", f"{M} vs {M}"]
    assert skips == [(w(4), f"image 'image': an image of {len(png) + 2000} bytes, longer than "
                      "data.max_doc_bytes=1000")]
    got, skips = read_all(build_source(SourceSpec("hf_dataset", str(d), image_field="images", **spec)))
    assert got == ["red", "from a file", "text only",
                   ("record", ("", " vs ", ""), [(w(3), None, png)] * 2, w(3)), "too big"]
    got, skips = read_all(build_source(SourceSpec("hf_dataset", str(d), image_field="ref", **spec)))
    assert got == [("record", ("", "red"), [(w(0), f"{d}/img/a.png", None)], w(0)),
                   ("record", ("", "from a file"), [(w(1), f"{tmp_path}/up.png", None)], w(1)),
                   ("record", ("", "too big"), [(w(4), "/abs.png", None)], w(4))]
    assert skips == [(w(2), "image 'ref' holds neither bytes nor a path"), (w(3), f"2 {M} in the text for 1 images")]
    src = build_source(SourceSpec("hf_dataset", str(d), **spec))
    assert read_all(src) == (["red", "from a file", "text only", f"{M} vs {M}", "too big"], [])
    src = build_source(SourceSpec("hf_dataset", str(d), image_field="no_such_column", **spec))
    assert read_all(src) == (["red", "from a file", "text only", f"{M} vs {M}", "too big"], [])


def chat(user, assistant="ok", **extra):
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}], **extra}


def test_chat_records_with_images(tmp_path):
    f = tmp_path / "c" / "x.jsonl"
    jsonl(f, [
        {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": f"{M} what?"},
                      {"role": "assistant", "content": "a cat"}, {"role": "user", "content": f"and {M}"},
                      {"role": "assistant", "content": "a dog"}], "images": ["img/a.png", "s3://b/k.png"]},
        chat("no images"),
        chat("empty images", images=[]),
        chat(f"{M} {M}", images=["a.png"]),
        chat(f"{M}", assistant=f"here {M}", images=["a.png"]),
        chat(f"{M}", images=[{"bytes": None, "path": None}]),
        chat(f"{M} one", images={"bytes": None, "path": "one.png"}),
    ])
    src = build_source(SourceSpec("jsonl", str(f), format="chat", image_field="image"))
    got, skips = read_all(src)
    ws = _jsonl_wheres(f)
    c = str(tmp_path / "c")
    assert got == [
        ("chat", (("system", "be brief"), ("user", f"{M} what?"), ("assistant", "a cat"), ("user", f"and {M}"),
                  ("assistant", "a dog")), [(ws[0], f"{c}/img/a.png", None), (ws[0], "s3://b/k.png", None)], ws[0]),
        (("user", "no images"), ("assistant", "ok")),
        (("user", "empty images"), ("assistant", "ok")),
        ("chat", (("user", f"{M} one"), ("assistant", "ok")), [(ws[6], f"{c}/one.png", None)], ws[6]),
    ]
    assert skips == [(ws[3], f"2 {M} in the user messages for 1 images"),
                     (ws[4], f"message 1 (assistant) holds {M}: images belong in user messages"),
                     (ws[5], "image 'images'[0] holds neither bytes nor a path")]
    plain, skips = read_all(build_source(SourceSpec("jsonl", str(f), format="chat")))
    assert skips == [] and all(isinstance(p, tuple) and not isinstance(p[0], str) for p in plain) and len(plain) == 7
    jsonl(f, [{"messages": [{"role": "robot", "content": M}, {"role": "assistant", "content": "x"}], "images": ["a"]}])
    with pytest.raises(ValueError, match="x.jsonl:1: message 0 has role 'robot'"):
        read_all(build_source(SourceSpec("jsonl", str(f), format="chat", image_field="image")))


def test_image_folder(tmp_path, png):
    d = tmp_path / "imgs"
    (d / "sub").mkdir(parents=True)
    files = {"a.png": png, "a.txt": b"a red pixel", "sub/B.JPG": png, "sub/B.txt": f"cap {M} in".encode(),
             "c.webp": png, "d.png": png, "d.txt": b"", "e.gif": png, "e.txt": b"\xff\xfe bad", "f.png": b"",
             "g.TIFF": png, "g.txt": "é".encode() * 9, "notes.md": b"not an image", "h.txt": b"orphan"}
    for name, data in files.items():
        (d / name).write_bytes(data)
    with pytest.raises(ValueError, match="image_folder: image-text documents need a model that takes images"):
        build_source(SourceSpec("image_folder", str(d)))
    truncated = []
    src = build_source(SourceSpec("image_folder", str(d), image_field="image", max_doc_bytes=17))
    assert [u[0] for u in src.units] == [str(d / n) for n in ("a.png", "c.webp", "d.png", "e.gif", "g.TIFF",
                                                              "sub/B.JPG")]
    assert src.listing_skipped == [(str(d / "f.png"), "empty file")]
    got, skips = [], []
    for unit in src.units:
        for cursor, _, p in src.iter_docs(unit, 0, lambda w, r: skips.append((w, r)), truncated.append):
            got.append(norm(p))
            assert norm(src.read_one(unit, cursor)) == got[-1]
    p = lambda n: str(d / n)  # noqa: E731
    assert got == [("record", ("", "a red pixel"), [(p("a.png"), p("a.png"), None)], p("a.png")),
                   ("record", ("", "é" * 8), [(p("g.TIFF"), p("g.TIFF"), None)], p("g.TIFF")),
                   ("record", ("cap ", " in"), [(p("sub/B.JPG"), p("sub/B.JPG"), None)], p("sub/B.JPG"))]
    assert truncated == [p("g.TIFF")]
    assert skips == [(p("c.webp"), f"no caption file ({p('c.txt')})"), (p("d.png"), f"empty caption ({p('d.txt')})"),
                     (p("e.gif"), f"caption not UTF-8 ({p('e.txt')}: invalid byte at 0)")]
    assert list(src.iter_texts()) == ["a red pixel", "é" * 8, "cap  in"]
    with pytest.raises(FileNotFoundError, match="no matched file is a non-empty image"):
        build_source(SourceSpec("image_folder", str(d), glob="*.txt", image_field="image"))
