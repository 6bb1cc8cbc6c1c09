"""data_pipeline.images against transformers' Mllama preprocessing: pixels, aspect ratio
ids and masks of 20 varied images (and two at the published 560), the cross-attention
mask of single and packed documents, bad files refused as BadImage, collate's padding."""
import io
import json
import struct
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image
from transformers import AutoImageProcessor
from transformers.models.mllama.image_processing_pil_mllama import (MllamaImageProcessorPil,
                                                                    get_image_size_fit_to_canvas,
                                                                    get_optimal_tiled_canvas)
from transformers.models.mllama.processing_mllama import (convert_sparse_cross_attention_mask_to_dense,
                                                          get_cross_attention_token_mask)

from data_pipeline.graph import stack_items
from data_pipeline.images import (BadImage, ImageSpec, aspect_ratios_for, best_canvas, collate,
                                  cross_attention_mask, fit_to_canvas, load_image, normalize_tiles, tile_image)
from pretrain.model.mllama.hf import preprocessor_config  # the family's converter writes it

IMG = 99  # the image marker in these token rows; text tokens are below it
T = 4  # max tiles
SPEC = ImageSpec(image_token_id=IMG, tile_size=28, max_tiles=T, aspect_ratios=aspect_ratios_for(T), max_images=3)
BIG = ImageSpec(image_token_id=IMG, tile_size=560, max_tiles=T, aspect_ratios=aspect_ratios_for(T), max_images=1)


def _encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _images(seed: int = 0) -> dict:
    """name -> file bytes: every mode transformers' convert_to_rgb treats differently, and
    sizes around the tile (28) and the 4-tile canvas (at most 112 on a side)."""
    rng = np.random.default_rng(seed)

    def rgb(w, h):
        return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))

    def grey(w, h):
        return Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8))

    rgba = Image.fromarray(rng.integers(0, 256, (33, 45, 4), dtype=np.uint8))
    pal = rgb(60, 40).quantize(16)
    # A few colours only, so that many pixels equal the tRNS colour (turned white).
    few = Image.fromarray((rng.integers(0, 4, (31, 50, 3)) * 80).astype(np.uint8))
    gif = rgb(25, 61).quantize(8)
    return {
        "rgb_1x1": _encode(rgb(1, 1), "PNG"),
        "wide_2000x50": _encode(rgb(2000, 50), "PNG"),
        "tall_40x1500": _encode(rgb(40, 1500), "JPEG", quality=90),
        "tile_28x28": _encode(rgb(28, 28), "PNG"),
        "small_L_10x17": _encode(grey(10, 17), "PNG"),
        "over_canvas_150x130": _encode(rgb(150, 130), "JPEG"),
        "rgba_45x33": _encode(rgba, "PNG"),
        "palette_60x40": _encode(pal, "PNG"),
        "palette_trns": _encode(pal, "PNG", transparency=3),
        "LA_30x50": _encode(rgba.convert("LA"), "PNG"),
        "L_jpeg_70x20": _encode(grey(70, 20), "JPEG"),
        "cmyk_jpeg_33x66": _encode(rgb(33, 66).convert("CMYK"), "JPEG"),
        "two_tiles_56x28": _encode(rgb(56, 28), "PNG"),
        "near_tile_29x27": _encode(rgb(29, 27), "PNG"),
        "thin_1x300": _encode(grey(1, 300), "PNG"),
        "thin_300x1": _encode(rgb(300, 1), "PNG"),
        "big_140x140": _encode(rgb(140, 140), "JPEG"),
        "bilevel_37x23": _encode(grey(37, 23).convert("1"), "PNG"),
        "rgb_trns_50x31": _encode(few, "PNG", transparency=(80, 0, 160)),
        "gif_trns_25x61": _encode(gif, "GIF", transparency=2),
    }


def _hf(spec: ImageSpec) -> MllamaImageProcessorPil:
    return MllamaImageProcessorPil(size={"height": spec.tile_size, "width": spec.tile_size},
                                   max_image_tiles=spec.max_tiles, image_mean=list(spec.mean),
                                   image_std=list(spec.std))


def _ours(data: bytes, spec: ImageSpec):
    item = tile_image(load_image(data, spec), spec)
    return normalize_tiles(item["tiles"], int(item["n_tiles"]), spec), item


@pytest.fixture(scope="module")
def files():
    return _images()


@pytest.fixture(scope="module")
def hf_out(files):
    """transformers on the files as Pillow opens them (mode P, LA, RGBA...: its own RGB
    conversion runs), one image per sample."""
    raw = [[Image.open(io.BytesIO(d))] for d in files.values()]
    return _hf(SPEC).preprocess(raw)


def test_images_match_transformers(files, hf_out):
    assert len(files) == 20
    modes = {Image.open(io.BytesIO(d)).mode for d in files.values()}
    assert {"RGB", "L", "RGBA", "P", "LA", "CMYK", "1"} <= modes
    worst = 0.0
    for j, (name, data) in enumerate(files.items()):
        px, item = _ours(data, SPEC)
        ref = hf_out["pixel_values"][j, 0]
        assert px.dtype == np.float32 and px.shape == ref.shape == (T, 3, 28, 28), name
        diff = float(np.abs(px - ref).max())
        worst = max(worst, diff)
        assert diff <= 1e-5, (name, diff)
        n = int(item["n_tiles"])
        assert n == hf_out["num_tiles"][j][0], name
        assert int(item["ratio_id"]) == hf_out["aspect_ratio_ids"][j, 0], name
        assert (np.arange(T) < n).astype(np.int64).tolist() == hf_out["aspect_ratio_mask"][j, 0].tolist(), name
        assert item["tiles"].dtype == np.uint8 and not item["tiles"][n:].any(), name
        assert not px[n:].any(), name  # exact zeros past the image's tiles
    print(f"max abs pixel difference vs transformers (tile 28): {worst}")
    # Every grid that these sizes reach, not one shape repeated.
    assert len(set(hf_out["aspect_ratio_ids"][:, 0].tolist())) >= 6


def test_published_tile_size_560():
    rng = np.random.default_rng(1)
    files = [_encode(Image.fromarray(rng.integers(0, 256, (700, 900, 3), dtype=np.uint8)), "JPEG"),
             _encode(Image.fromarray(rng.integers(0, 256, (300, 1200, 4), dtype=np.uint8)), "PNG")]
    ref = _hf(BIG).preprocess([[Image.open(io.BytesIO(d))] for d in files])
    for j, d in enumerate(files):
        px, item = _ours(d, BIG)
        diff = float(np.abs(px - ref["pixel_values"][j, 0]).max())
        print(f"max abs pixel difference vs transformers (tile 560): {diff}")
        assert diff <= 1e-5
        assert int(item["ratio_id"]) == ref["aspect_ratio_ids"][j, 0]
        assert int(item["n_tiles"]) == ref["num_tiles"][j][0]
    assert [int(_ours(d, BIG)[1]["ratio_id"]) for d in files] == [6, 3]  # 2x2 and 1x3 grids


def test_alpha_is_composited_on_white(files):
    """transformers' convert_to_rgb blends transparency onto white (not Pillow's plain
    convert("RGB"), which drops alpha): the pixels must be the blended ones."""
    im = Image.open(io.BytesIO(files["rgba_45x33"]))
    a = np.asarray(im).astype(np.float64)
    want = np.round(a[..., :3] * a[..., 3:] / 255 + 255 * (1 - a[..., 3:] / 255))
    got = np.asarray(load_image(files["rgba_45x33"], SPEC)).astype(np.float64)
    assert np.abs(got - want).max() <= 1  # Pillow's integer blend rounds its own way
    assert np.abs(got - a[..., :3]).max() > 100  # not the alpha-dropping conversion
    trns = np.asarray(load_image(files["rgb_trns_50x31"], SPEC))
    src = np.asarray(Image.open(io.BytesIO(files["rgb_trns_50x31"])))
    hit = (src == (80, 0, 160)).all(-1)
    assert hit.any() and (trns[hit] == 255).all() and (trns[~hit] == src[~hit]).all()


def test_canvas_rules_match_transformers():
    rng = np.random.default_rng(2)
    sizes = [(int(h), int(w)) for h, w in rng.integers(1, 400, (1500, 2))]
    sizes += [(h, w) for h in (1, 27, 28, 29, 55, 56, 57, 84, 112, 113) for w in (1, 28, 56, 84, 112, 140, 2000)]
    for h, w in sizes:
        for tile in (28, 30):
            spec = ImageSpec(IMG, tile, T, aspect_ratios_for(T), 1)
            ch, cw = get_optimal_tiled_canvas(h, w, T, tile)
            r, c = spec.aspect_ratios[best_canvas(h, w, spec)]
            assert (r * tile, c * tile) == (ch, cw), (h, w, tile)
            assert fit_to_canvas(h, w, ch, cw, tile) == get_image_size_fit_to_canvas(h, w, ch, cw, tile), (h, w)


def test_collate_matches_transformers(files):
    """Rows of 2, 1 and 0 images through the loader's stack_items and collate: pixels and
    ids equal transformers' batch; the absent image slots are all zero (transformers'
    aspect_ratio_mask has a 1 on tile 0 there, ours none)."""
    names = [["rgba_45x33", "wide_2000x50"], ["palette_trns"], []]
    s1 = 16
    tokens = np.full((3, s1), 5, dtype=np.int64)
    tokens[0, [2, 9]] = IMG
    tokens[1, 4] = IMG
    doc_ids = np.zeros((3, s1), dtype=np.int64)
    items = [[tile_image(load_image(files[n], SPEC), SPEC) for n in row] for row in names]
    batch = {"tokens": tokens, "doc_ids": doc_ids, **stack_items(items, tokens, IMG)}
    assert batch["item_tiles"].shape == (3, 2, T, 28, 28, 3)  # I' = 2 < max_images = 3
    out = collate(batch, SPEC)
    assert out["pixel_values"].shape == (3, 3, T, 3, 28, 28) and out["pixel_values"].dtype == np.float32
    assert out["aspect_ratio_ids"].shape == (3, 3) and out["aspect_ratio_ids"].dtype == np.int64
    assert out["aspect_ratio_mask"].shape == (3, 3, T) and out["aspect_ratio_mask"].dtype == np.int64
    assert out["cross_attention_mask"].shape == (3, s1 - 1, 3, T)
    ref = _hf(SPEC).preprocess([[Image.open(io.BytesIO(files[n])) for n in row] for row in names[:2]])
    assert np.abs(out["pixel_values"][:2, :2] - ref["pixel_values"]).max() <= 1e-5
    assert (out["aspect_ratio_ids"][:2, :2] == ref["aspect_ratio_ids"]).all()
    for row, k in [(0, 0), (0, 1), (1, 0)]:
        assert (out["aspect_ratio_mask"][row, k] == ref["aspect_ratio_mask"][row, k]).all()
    assert ref["aspect_ratio_mask"][1, 1, 0] == 1 and not out["aspect_ratio_mask"][1, 1].any()
    for row, k in [(0, 2), (1, 1), (1, 2), (2, 0), (2, 1), (2, 2)]:  # absent: all zero
        assert not out["pixel_values"][row, k].any() and out["aspect_ratio_ids"][row, k] == 0
        assert not out["aspect_ratio_mask"][row, k].any() and not out["cross_attention_mask"][row, :, k].any()
    assert not out["cross_attention_mask"][2].any()
    want = cross_attention_mask(tokens[:, :-1], doc_ids[:, :-1], (out["aspect_ratio_mask"].sum(-1)), SPEC)
    assert (out["cross_attention_mask"] == want).all()
    n0 = int(items[0][0]["n_tiles"])
    assert out["cross_attention_mask"][0, 2:9, 0, :n0].all() and not out["cross_attention_mask"][0, :2].any()


def test_collate_without_images_and_limits(files):
    s1 = 9
    tokens = np.arange(2 * s1, dtype=np.int64).reshape(2, s1) % 50
    doc_ids = np.zeros((2, s1), dtype=np.int64)
    bare = collate({"tokens": tokens, "doc_ids": doc_ids, "item_positions": np.full((2, 1), -1)}, SPEC)
    shapes = {k: v.shape for k, v in bare.items()}
    assert shapes == {"pixel_values": (2, 3, T, 3, 28, 28), "aspect_ratio_ids": (2, 3), "aspect_ratio_mask": (2, 3, T),
                      "cross_attention_mask": (2, s1 - 1, 3, T)}
    assert not any(v.any() for v in bare.values())
    item = tile_image(load_image(files["big_140x140"], SPEC), SPEC)
    # Four images in a row: more than max_images=3.
    tokens4 = tokens.copy()
    tokens4[0, [1, 2, 3, 4]] = IMG
    with pytest.raises(ValueError, match="max_images"):
        collate({"tokens": tokens4, "doc_ids": doc_ids, **stack_items([[item] * 4, []], tokens4, IMG)}, SPEC)
    # A marker on the window's last token is a label only: its image is dropped.
    tokens2 = tokens.copy()
    tokens2[0, [3, s1 - 1]] = IMG
    out = collate({"tokens": tokens2, "doc_ids": doc_ids, **stack_items([[item, item], []], tokens2, IMG)}, SPEC)
    assert out["aspect_ratio_ids"][0].tolist() == [int(item["ratio_id"]), 0, 0]
    assert not out["pixel_values"][0, 1].any() and out["pixel_values"][0, 0].any()
    assert out["cross_attention_mask"][0, 3:, 0].sum() == (s1 - 1 - 3) * int(item["n_tiles"])
    # The tile count must be the grid's.
    batch = {"tokens": tokens2, "doc_ids": doc_ids, **stack_items([[item, item], []], tokens2, IMG)}
    batch["item_n_tiles"] = batch["item_n_tiles"] - 1
    with pytest.raises(ValueError, match="n_tiles"):
        collate(batch, SPEC)
    # Markers without images.
    with pytest.raises(ValueError, match="image markers"):
        collate({"tokens": tokens2, "doc_ids": doc_ids, "item_positions": np.full((2, 1), -1)}, SPEC)


# --- cross-attention mask ---------------------------------------------------------------

def _hf_doc(doc_tokens, tiles):
    """transformers' mask of one document alone: (len, images, T)."""
    sparse = get_cross_attention_token_mask(list(map(int, doc_tokens)), IMG)
    if not sparse:
        return np.zeros((len(doc_tokens), 0, T), dtype=np.int64)
    return convert_sparse_cross_attention_mask_to_dense([sparse], [list(tiles)], T, len(doc_tokens))[0]


@pytest.mark.parametrize("markers", [[], [0], [5], [11], [2, 7], [3, 4], [1, 2, 8], [10, 11], [0, 1, 2], [0, 6, 7]],
                         ids=lambda m: "markers=" + ",".join(map(str, m)) if m else "none")
def test_cross_attention_single_document(markers):
    s = 12
    tokens = np.arange(s, dtype=np.int64)[None] % 7
    tokens[0, markers] = IMG
    tiles = [(k % T) + 1 for k in range(len(markers))]
    n = np.zeros((1, SPEC.max_images), dtype=np.int64)
    n[0, :len(markers)] = tiles
    got = cross_attention_mask(tokens, np.full((1, s), 4, dtype=np.int64), n, SPEC)
    assert got.shape == (1, s, SPEC.max_images, T) and got.dtype == np.int64
    assert (got[0, :, :len(markers)] == _hf_doc(tokens[0], tiles)).all()
    assert not got[0, :, len(markers):].any()
    if markers:
        assert not got[0, :markers[0]].any() and got[0, markers[0], 0, 0] == 1


def test_cross_attention_packed_documents():
    """Random rows of several documents (consecutive markers often) and padding: each
    document's block equals transformers on that document alone, placed at its offset."""
    rng = np.random.default_rng(3)
    b, s, i_max = 200, 30, 4
    spec = ImageSpec(IMG, 28, T, aspect_ratios_for(T), i_max)
    tokens = rng.integers(0, 50, (b, s))
    doc_ids = np.empty((b, s), dtype=np.int64)
    n_tiles = np.zeros((b, i_max), dtype=np.int64)
    want = np.zeros((b, s, i_max, T), dtype=np.int64)
    seen_runs = 0
    for row in range(b):
        cuts = np.sort(rng.choice(np.arange(1, s), rng.integers(0, 5), replace=False))
        bounds = list(zip([0, *cuts], [*cuts, s]))
        pad = rng.random() < 0.3  # the last run is padding
        k = 0
        for d, (a, e) in enumerate(bounds):
            doc_ids[row, a:e] = -1 if pad and d == len(bounds) - 1 else 1000 * row + d
            if doc_ids[row, a] == -1:
                tokens[row, a:e] = 0
                continue
            for p in range(a, e):
                if k < i_max and rng.random() < (0.5 if p > a and tokens[row, p - 1] == IMG else 0.08):
                    tokens[row, p] = IMG
                    k += 1
            marks = np.flatnonzero(tokens[row, a:e] == IMG)
            k0 = k - len(marks)
            tiles = rng.integers(1, T + 1, len(marks))
            n_tiles[row, k0:k] = tiles
            want[row, a:e, k0:k] = _hf_doc(tokens[row, a:e], tiles)
            seen_runs += int((np.diff(marks) == 1).any())
    assert seen_runs > 10 and (doc_ids == -1).any() and (n_tiles > 0).sum() > 200
    got = cross_attention_mask(tokens, doc_ids, n_tiles, spec)
    assert (got == want).all()
    assert not got[doc_ids == -1].any()


def test_cross_attention_marker_in_padding():
    """A marker in padding (doc id -1) still counts as image k, but no token sees it."""
    tokens = np.array([[1, IMG, 2, 3, IMG, 0, 0]])
    docs = np.array([[5, 5, 5, 5, -1, -1, -1]])
    got = cross_attention_mask(tokens, docs, np.array([[2, 3, 0]]), SPEC)
    assert got[0, 1:4, 0, :2].all() and got[0, :, 0].sum() == 3 * 2
    assert not got[0, :, 1:].any() and not got[0, 4:].any() and not got[0, 0].any()


def test_cross_attention_errors():
    tokens = np.array([[1, IMG, 2, IMG, 3]])
    docs = np.zeros_like(tokens)
    with pytest.raises(ValueError, match="image markers"):
        cross_attention_mask(tokens, docs, np.array([[2, 0, 0]]), SPEC)  # 2 markers, 1 image
    with pytest.raises(ValueError, match="image markers"):
        cross_attention_mask(tokens, docs, np.array([[2, 0, 1]]), SPEC)  # not the first two
    with pytest.raises(ValueError, match="more than max_images"):
        cross_attention_mask(np.array([[IMG] * 4]), np.zeros((1, 4)), np.array([[1, 1, 1]]), SPEC)


# --- bad files --------------------------------------------------------------------------

def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png_header(w: int, h: int) -> bytes:
    """A PNG whose IHDR claims w x h, with a few bytes of pixel data: only the header is real."""
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * 64)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def test_bad_files_raise_bad_image(files):
    jpeg, png = files["big_140x140"], files["tile_28x28"]
    mid = len(png) // 3
    cases = {
        "truncated jpeg": (jpeg[: len(jpeg) // 2], "truncated"),
        "truncated png": (png[: len(png) // 2], "truncated"),
        "zero bytes": (b"", "not an image"),
        "text": (b"hello, this is not an image at all\n" * 20, "not an image"),
        "corrupt png middle": (png[:mid] + bytes(200) + png[mid + 200:], "corrupt"),
        "corrupt jpeg middle": (jpeg[:mid] + b"\xff" * 300 + jpeg[mid + 300:], "corrupt"),
        "zero width header": (_png_header(0, 5), "not an image"),
    }
    for name, (data, why) in cases.items():
        with pytest.raises(BadImage, match=why):
            load_image(data, SPEC)
    for ok in (jpeg, png):  # the uncut files load
        assert load_image(ok, SPEC).mode == "RGB"


def test_pixel_bound_before_decoding():
    small = ImageSpec(IMG, 28, T, aspect_ratios_for(T), 1, max_pixels=1_000_000)
    # The header says 5000x5000 and no pixel data follows: refused before decoding (the
    # decode would say "truncated" or "corrupt").
    with pytest.raises(BadImage, match=r"^5000x5000 = 25000000 pixels > data.max_image_pixels=1000000$"):
        load_image(_png_header(5000, 5000), small)
    # Over Pillow's own hard bound (2 x PIL.Image.MAX_IMAGE_PIXELS): still a BadImage.
    with pytest.raises(BadImage, match=r"400000000 pixels > data.max_image_pixels=89478485"):
        load_image(_png_header(20000, 20000), SPEC)
    # Pillow's warning made an error: a BadImage too, never the warning.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(BadImage, match="pixels"):
            load_image(_png_header(10000, 10000), SPEC)
    with pytest.raises(TypeError):
        load_image("not bytes", SPEC)


# --- spec and config --------------------------------------------------------------------

def test_spec_and_preprocessor_config(tmp_path, files):
    spec = ImageSpec(IMG, 28, T, [[1, 1], [1, 2], [1, 3], [1, 4], [2, 1], [2, 2], [3, 1], [4, 1]], 2)
    assert spec == ImageSpec(IMG, 28, T, aspect_ratios_for(T), 2) and hash(spec)
    assert json.loads(json.dumps(spec.to_dict()))["aspect_ratios"][5] == [2, 2]
    assert ImageSpec(**spec.to_dict()) == spec
    for bad in ({"aspect_ratios": [[2, 3]]}, {"aspect_ratios": []}, {"channels": 1}, {"std": (1.0, 0.0, 1.0)},
                {"max_images": 0}):
        with pytest.raises(ValueError):
            ImageSpec(**{**spec.to_dict(), **bad})
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(preprocessor_config(spec)))
    loaded = AutoImageProcessor.from_pretrained(tmp_path)
    assert type(loaded).__name__.startswith("MllamaImageProcessor")
    saved = json.loads(loaded.to_json_string())
    for key, value in preprocessor_config(spec).items():
        if key != "processor_class":  # read by AutoProcessor, not kept by the image processor
            assert saved[key] == value, key
    im = Image.open(io.BytesIO(files["rgba_45x33"]))
    assert np.array_equal(loaded.preprocess([[im]])["pixel_values"][0, 0], _ours(files["rgba_45x33"], spec)[0])
    with pytest.raises(ValueError, match="max_image_tiles"):
        preprocessor_config(ImageSpec(IMG, 28, T, ((1, 1), (2, 2)), 1))
