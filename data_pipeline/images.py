"""Images for image-text models that read tiled pictures (``ImageSpec``, given by the model
family): bytes -> checked RGB image -> uint8 tiles, and a batch's tiles and marker tokens
-> the model's pixel values, aspect ratios and masks.

The rules are transformers' (``MllamaImageProcessor`` with its PIL backend, and
``MllamaProcessor``'s cross-attention mask), reproduced here without importing it: the
data pipeline stays free of transformers and of model code. The work is split in two so
that read-ahead holds small arrays: a loader thread decodes, resizes and tiles an image
into uint8 (``load_image`` + ``tile_image``, 4x smaller than float32), and ``collate``
normalizes a whole batch and builds the masks over its packed rows.

Deliberate differences from transformers, all on padding only:

- ``aspect_ratio_mask`` is all 0 for an absent image (transformers sets tile 0 to 1 for
  every padded image slot); real images get the same mask.
- ``collate`` drops an image whose marker is the window's last token: that token is a
  label only, so no input token could see the image.
"""
from __future__ import annotations

import io
import math
import re
from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Dict, List, Sequence, Tuple

import numpy as np
from PIL import Image

# Llama 3.2 Vision's preprocessor_config.json: OpenAI CLIP's mean and std.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# transformers rescales with a multiplication by this Python float (its rescale_factor),
# not a division by 255: the float32 values differ in the last bit otherwise.
RESCALE_FACTOR = 1 / 255

# PIL's resampling filter id that transformers' config names ("resample": 2).
BILINEAR = 2


def aspect_ratios_for(max_tiles: int) -> Tuple[Tuple[int, int], ...]:
    """The (rows, cols) tile grids of at most ``max_tiles`` tiles, in transformers' order
    (``get_all_supported_aspect_ratios``; rows first): the published list for 4 tiles is
    ((1, 1), (1, 2), (1, 3), (1, 4), (2, 1), (2, 2), (3, 1), (4, 1))."""
    return tuple((r, c) for r in range(1, max_tiles + 1) for c in range(1, max_tiles + 1) if r * c <= max_tiles)


@dataclass(frozen=True)
class ImageSpec:
    """How images become model inputs. ``aspect_ratios`` are (rows, cols) tile grids; a
    grid's aspect ratio id is its index + 1 (0 = no image). ``max_pixels`` bounds
    width x height before any pixel is decoded (a decompression bomb is refused)."""

    image_token_id: int
    tile_size: int
    max_tiles: int
    aspect_ratios: Tuple[Tuple[int, int], ...]
    max_images: int
    mean: Tuple[float, ...] = CLIP_MEAN
    std: Tuple[float, ...] = CLIP_STD
    channels: int = 3
    max_pixels: int = 89_478_485

    def __post_init__(self):
        # Configs hand lists (JSON, YAML): store tuples so that the spec stays hashable.
        object.__setattr__(self, "aspect_ratios", tuple(tuple(int(x) for x in r) for r in self.aspect_ratios))
        object.__setattr__(self, "mean", tuple(float(x) for x in self.mean))
        object.__setattr__(self, "std", tuple(float(x) for x in self.std))
        for name in ("tile_size", "max_tiles", "max_images", "max_pixels"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"ImageSpec.{name}={getattr(self, name)} must be >= 1")
        if self.channels != 3:  # load_image always makes RGB
            raise ValueError(f"ImageSpec.channels={self.channels}: only 3 (RGB) is supported")
        if not self.aspect_ratios:
            raise ValueError("ImageSpec.aspect_ratios is empty: at least one (rows, cols) grid is needed")
        for r in self.aspect_ratios:
            if len(r) != 2 or min(r) < 1 or r[0] * r[1] > self.max_tiles:
                raise ValueError(f"ImageSpec.aspect_ratios holds {list(r)}: each must be [rows, cols] >= 1 with "
                                 f"rows x cols <= max_tiles={self.max_tiles}")
        if len(set(self.aspect_ratios)) != len(self.aspect_ratios):
            raise ValueError(f"ImageSpec.aspect_ratios has duplicates: {[list(r) for r in self.aspect_ratios]}")
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ValueError(f"ImageSpec.mean/std need {self.channels} values each, got {len(self.mean)} and "
                             f"{len(self.std)}")
        if min(self.std) <= 0:
            raise ValueError(f"ImageSpec.std={list(self.std)} must be > 0")

    def to_dict(self) -> dict:
        """JSON-ready (lists, not tuples)."""
        d = asdict(self)
        d["aspect_ratios"] = [list(r) for r in self.aspect_ratios]
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d


class BadImage(ValueError):
    """An image that cannot be used; the message is the reason (the record is skipped)."""


# --- decoding ---------------------------------------------------------------------------

_PIL_PIXELS = re.compile(r"\((\d+) pixels\)")


def _too_large(spec: ImageSpec, err: Exception, size: str = "the image") -> BadImage:
    """Pillow's own decompression-bomb check fired in ``Image.open`` before the size could
    be read here (it warns above ``PIL.Image.MAX_IMAGE_PIXELS`` and refuses above twice
    that). Say it in terms of our bound; the width and height are not known."""
    m = _PIL_PIXELS.search(str(err))
    n = int(m.group(1)) if m else None
    if n is not None and n > spec.max_pixels:
        return BadImage(f"{n} pixels > data.max_image_pixels={spec.max_pixels}")
    # Within our bound but over Pillow's process-wide one (or warnings made errors): say
    # which knob refused it rather than pretending it was ours.
    return BadImage(f"{size} refused by Pillow's decompression-bomb check ({err}); PIL.Image.MAX_IMAGE_PIXELS="
                    f"{Image.MAX_IMAGE_PIXELS} is below data.max_image_pixels={spec.max_pixels}")


def _to_rgb(im: Image.Image) -> Image.Image:
    """transformers' ``convert_to_rgb``: any transparency (an alpha band, or a palette's or
    a grey/RGB image's ``transparency`` colour) is composited onto white; every other mode
    (L, P, CMYK, 1, I;16, ...) goes through Pillow's ``convert("RGB")``."""
    if "A" in im.getbands() or im.info.get("transparency") is not None:
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im.convert("RGB")


# The formats a picture may have: the common raster ones (a phone camera's MPO opens as JPEG). Not
# every format Pillow knows: EPS would run Ghostscript, and rarer decoders are more attack
# surface than data.
FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF")


def load_image(data: bytes, spec: ImageSpec) -> Image.Image:
    """Bytes -> a fully decoded RGB image, or ``BadImage`` saying why not. The size is
    checked against ``spec.max_pixels`` from the header alone, before any pixel is
    decoded. Truncated files are refused (``ImageFile.LOAD_TRUNCATED_IMAGES`` is left
    alone: a half-grey image would train the model on a lie). EXIF orientation is not
    applied, as transformers does not apply it."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"load_image takes the file's bytes, got {type(data).__name__}")
    if len(data) == 0:
        raise BadImage("not an image (0 bytes)")
    try:
        # Reads the header only. Pillow's global bomb check may fire here first: it raises
        # DecompressionBombError, or DecompressionBombWarning where warnings are errors.
        im = Image.open(io.BytesIO(data), formats=FORMATS)
    except Image.UnidentifiedImageError:
        raise BadImage("not an image (cannot identify image file)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise _too_large(spec, e) from None
    except Exception as e:  # a malformed header: Pillow raises OSError, SyntaxError, struct.error...
        raise BadImage(f"not an image ({type(e).__name__}: {e})") from None
    with im:
        w, h = im.size
        if w <= 0 or h <= 0:
            raise BadImage(f"zero-size image ({w}x{h})")
        # Our bound decides for whatever Pillow let through. PIL.Image.MAX_IMAGE_PIXELS is
        # never changed here: it is process-wide and other threads read it.
        if w * h > spec.max_pixels:
            raise BadImage(f"{w}x{h} = {w * h} pixels > data.max_image_pixels={spec.max_pixels}")
        try:
            im.load()  # the whole decode; a truncated or corrupt stream fails here
            return _to_rgb(im)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:  # a later frame's size
            raise _too_large(spec, e, f"{w}x{h} ({w * h} pixels)") from None
        except Exception as e:  # input-driven: whatever Pillow raises is the file's fault
            if "truncated" in str(e):
                raise BadImage(f"truncated image ({e})") from None
            raise BadImage(f"corrupt image ({type(e).__name__}: {e})") from None


# --- tiling -----------------------------------------------------------------------------

def best_canvas(height: int, width: int, spec: ImageSpec) -> int:
    """Index in ``spec.aspect_ratios`` of the grid an image of this size is resized into
    (transformers' ``get_optimal_tiled_canvas`` over the spec's grids): each grid's scale
    is the smaller of its height and width ratios; the smallest scale >= 1 wins (the least
    upscaling), else the largest scale (the least downscaling); ties go to the smallest
    area, then to the first grid in the list."""
    t = spec.tile_size
    # Python float division of ints is the correctly rounded quotient, as numpy's float64
    # division is: the exact equality below picks the same ties as transformers.
    scales = [min(r * t / height, c * t / width) for r, c in spec.aspect_ratios]
    up = [s for s in scales if s >= 1]
    chosen = min(up) if up else max(scales)
    tied = [i for i, s in enumerate(scales) if s == chosen]
    return min(tied, key=lambda i: spec.aspect_ratios[i][0] * spec.aspect_ratios[i][1])  # first of min area


def fit_to_canvas(height: int, width: int, canvas_height: int, canvas_width: int, tile_size: int) -> Tuple[int, int]:
    """(new height, new width) of the resized image (transformers'
    ``get_image_size_fit_to_canvas``): the target is the image size clamped to
    [tile_size, canvas]; the binding side gets the target, the other keeps the aspect
    ratio (floored, at least 1 pixel)."""
    target_w = min(max(width, tile_size), canvas_width)
    target_h = min(max(height, tile_size), canvas_height)
    scale_h, scale_w = target_h / height, target_w / width
    if scale_w < scale_h:
        return min(math.floor(height * scale_w) or 1, target_h), target_w
    return target_h, min(math.floor(width * scale_h) or 1, target_w)


def tile_image(img: Image.Image, spec: ImageSpec) -> Dict[str, np.ndarray]:
    """An RGB image (``load_image``) -> ``{"tiles": uint8 (max_tiles, tile, tile, channels),
    "ratio_id": int64 scalar, "n_tiles": int64 scalar}``: resized (PIL bilinear, on uint8,
    as transformers' PIL backend) to fit the best grid, padded with 0 at the bottom and
    right, cut into tiles row by row; tiles past ``n_tiles`` are 0. Not normalized: that
    happens in ``collate`` (uint8 read-ahead is 4x smaller than float32)."""
    if img.mode != "RGB":
        raise ValueError(f"tile_image takes an RGB image (load_image's), got mode {img.mode!r}")
    w, h = img.size
    t = spec.tile_size
    k = best_canvas(h, w, spec)
    rows, cols = spec.aspect_ratios[k]
    new_h, new_w = fit_to_canvas(h, w, rows * t, cols * t, t)
    # transformers hands PIL the uint8 image and takes its uint8 result back (no float
    # round trip, no reducing_gap): the same call gives the same bytes.
    resized = np.asarray(img.resize((new_w, new_h), resample=Image.Resampling.BILINEAR))
    canvas = np.zeros((rows * t, cols * t, spec.channels), dtype=np.uint8)
    canvas[:new_h, :new_w] = resized
    n = rows * cols
    tiles = np.zeros((spec.max_tiles, t, t, spec.channels), dtype=np.uint8)
    # (rows*t, cols*t, C) -> (rows, t, cols, t, C) -> (rows, cols, t, t, C): row-major tiles.
    tiles[:n] = canvas.reshape(rows, t, cols, t, spec.channels).transpose(0, 2, 1, 3, 4).reshape(n, t, t, -1)
    return {"tiles": tiles, "ratio_id": np.array(k + 1, dtype=np.int64), "n_tiles": np.array(n, dtype=np.int64)}


# --- normalization ----------------------------------------------------------------------

@lru_cache(maxsize=16)
def _lut(mean: Tuple[float, ...], std: Tuple[float, ...]) -> np.ndarray:
    """(C, 256) float32: the normalized value of each byte per channel, by transformers'
    ops in its order and dtypes (uint8 -> float64 x 1/255 -> float32, then float32
    (x - mean) / std). Every element goes through the same IEEE operations, so a lookup
    equals transformers' result bit for bit, at a fraction of the cost."""
    x = (np.arange(256, dtype=np.float64) * RESCALE_FACTOR).astype(np.float32)
    m, s = np.asarray(mean, dtype=np.float32)[:, None], np.asarray(std, dtype=np.float32)[:, None]
    lut = (x[None, :] - m) / s
    lut.setflags(write=False)  # shared by every call (and thread)
    return lut


def normalize_tiles(tiles_uint8: np.ndarray, n_tiles: int, spec: ImageSpec) -> np.ndarray:
    """uint8 (T, H, W, C) tiles -> float32 (T, C, H, W): (x/255 - mean) / std for the first
    ``n_tiles`` tiles (their zero padding too, as transformers normalizes the padded
    canvas), exact zeros past them (transformers' ``pack_images``)."""
    tiles_uint8 = np.asarray(tiles_uint8)
    if tiles_uint8.dtype != np.uint8 or tiles_uint8.ndim != 4 or tiles_uint8.shape[-1] != spec.channels:
        raise ValueError(f"normalize_tiles takes uint8 (T, H, W, {spec.channels}) tiles, got {tiles_uint8.dtype} "
                         f"{tiles_uint8.shape}")
    t_all, h, w, c = tiles_uint8.shape
    n = int(n_tiles)
    if not 0 <= n <= t_all:
        raise ValueError(f"n_tiles={n} is outside [0, {t_all}]")
    out = np.empty((t_all, c, h, w), dtype=np.float32)
    _normalize_into(out, tiles_uint8, n, spec)
    return out


def _normalize_into(out: np.ndarray, tiles_uint8: np.ndarray, n: int, spec: ImageSpec) -> None:
    """``normalize_tiles`` written into ``out`` (T, C, H, W) float32, a view of the batch:
    one table lookup per channel (no index arrays, no temporary)."""
    lut = _lut(spec.mean, spec.std)
    for ch in range(out.shape[1]):
        np.take(lut[ch], tiles_uint8[:n, :, :, ch], out=out[:n, ch], mode="clip")
    out[n:] = 0


# --- masks ------------------------------------------------------------------------------

def _image_spans(markers: Sequence[int], doc_end: int) -> List[Tuple[int, int]]:
    """[start, end) of the tokens that see each image of one document (transformers'
    ``get_cross_attention_token_mask``): from its marker to the next marker, the last to
    the document's end; then, from the last back, an image whose marker is followed
    directly by another marker takes that next image's end, so a run of consecutive
    markers is seen together by the text after the run."""
    spans = [[p, q] for p, q in zip(markers, list(markers[1:]) + [doc_end])]
    last_end = doc_end
    for span in reversed(spans):
        if span[0] == span[1] - 1:
            span[1] = last_end
        last_end = span[1]
    return [(a, b) for a, b in spans]


def cross_attention_mask(tokens: np.ndarray, doc_ids: np.ndarray, n_tiles: np.ndarray, spec: ImageSpec) -> np.ndarray:
    """int64 (B, S, I, T) with I = ``spec.max_images``, T = ``spec.max_tiles``: 1 where
    token s of row b sees tile t of image k. Image k is the row's k-th marker
    (``spec.image_token_id``) and has ``n_tiles[b, k]`` tiles. The rule is
    transformers', applied to each document of the packed row on its own (a document is a
    run of equal ``doc_ids``; -1 is padding, which sees nothing): tokens before a
    document's first marker see no image, and no image is seen across documents."""
    tokens, doc_ids, n_tiles = np.asarray(tokens), np.asarray(doc_ids), np.asarray(n_tiles)
    if tokens.ndim != 2 or doc_ids.shape != tokens.shape:
        raise ValueError(f"tokens and doc_ids must be (B, S) alike, got {tokens.shape} and {doc_ids.shape}")
    b, s = tokens.shape
    i_max, t_max = spec.max_images, spec.max_tiles
    if n_tiles.shape != (b, i_max):
        raise ValueError(f"n_tiles has shape {n_tiles.shape}, expected {(b, i_max)} (rows, data.max_images)")
    if n_tiles.min(initial=0) < 0 or n_tiles.max(initial=0) > t_max:
        raise ValueError(f"n_tiles holds {n_tiles.min()}..{n_tiles.max()}, expected 0..{t_max} (max_tiles)")
    out = np.zeros((b, s, i_max, t_max), dtype=np.int64)
    for row in range(b):
        markers = np.flatnonzero(tokens[row] == spec.image_token_id)
        m = len(markers)
        if m > i_max:
            raise ValueError(f"row {row} holds {m} image markers, more than max_images={i_max}")
        present = n_tiles[row] > 0
        # Image k belongs to marker k: the m markers need exactly the first m images.
        if not present[:m].all() or present[m:].any():
            raise ValueError(f"row {row}: {m} image markers but images with tiles at "
                             f"{np.flatnonzero(present).tolist()} (expected the first {m})")
        if not m:
            continue
        ids = doc_ids[row]
        starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]])  # first token of each document
        ends = np.r_[starts[1:], s]
        doc_of = np.searchsorted(starts, markers, side="right") - 1
        for d in np.unique(doc_of):
            if ids[starts[d]] == -1:  # markers in padding: their images are seen by no token
                continue
            ks = np.flatnonzero(doc_of == d)
            for k, (a, e) in zip(ks, _image_spans(markers[ks].tolist(), int(ends[d]))):
                out[row, a:e, k, :n_tiles[row, k]] = 1
    return out


# --- the batch --------------------------------------------------------------------------

def collate(batch: dict, spec: ImageSpec) -> dict:
    """The loader's numpy batch -> the model's image inputs (the batch contract), all numpy:
    ``pixel_values`` float32 (B, I, T, C, H, W), ``aspect_ratio_ids`` int64 (B, I),
    ``aspect_ratio_mask`` int64 (B, I, T), ``cross_attention_mask`` int64 (B, S, I, T),
    with I = ``spec.max_images``, T = ``spec.max_tiles``, S = the window - 1 (the mask is
    over the input tokens ``tokens[:, :-1]``).

    Reads ``tokens`` and ``doc_ids`` (B, S+1) and, per item (graph.stack_items of
    ``tile_image``'s dicts), ``item_positions`` (B, I') (-1 where absent), ``item_tiles``
    (B, I', T, H, W, C) uint8, ``item_ratio_id`` and ``item_n_tiles`` (B, I'). I' may be
    below I (padded up); the item keys may be missing (no image in the batch). Absent
    images are all zeros, their ``aspect_ratio_mask`` included (transformers puts a 1 on
    tile 0 of a padded image slot). An image whose marker is the window's last token (a
    label, not an input) is dropped: no input token can see it."""
    tokens, doc_ids = np.asarray(batch["tokens"]), np.asarray(batch["doc_ids"])
    if tokens.ndim != 2 or doc_ids.shape != tokens.shape or tokens.shape[1] < 2:
        raise ValueError(f"batch tokens/doc_ids must be (B, S+1) alike with S >= 1, got {tokens.shape} and "
                         f"{doc_ids.shape}")
    b, s = tokens.shape[0], tokens.shape[1] - 1
    i_max, t_max, c, px = spec.max_images, spec.max_tiles, spec.channels, spec.tile_size
    # Filled image by image (absent ones zeroed): a fresh np.zeros of a whole 11B batch
    # (120 MB for 8 rows) cost as much as normalizing its pictures.
    pixel_values = np.empty((b, i_max, t_max, c, px, px), dtype=np.float32)
    filled = np.zeros((b, i_max), dtype=bool)
    ratio_ids = np.zeros((b, i_max), dtype=np.int64)
    n_tiles = np.zeros((b, i_max), dtype=np.int64)

    if "item_tiles" in batch:
        pos = np.asarray(batch["item_positions"])
        tiles = np.asarray(batch["item_tiles"])
        rid = np.asarray(batch["item_ratio_id"])
        nt = np.asarray(batch["item_n_tiles"])
        ii = pos.shape[1] if pos.ndim == 2 else -1
        if pos.shape != (b, ii) or rid.shape != (b, ii) or nt.shape != (b, ii):
            raise ValueError(f"item_positions/item_ratio_id/item_n_tiles must be (B={b}, I') alike, got "
                             f"{pos.shape}, {rid.shape}, {nt.shape}")
        if tiles.shape != (b, ii, t_max, px, px, c) or tiles.dtype != np.uint8:
            raise ValueError(f"item_tiles is {tiles.dtype} {tiles.shape}, expected uint8 "
                             f"{(b, ii, t_max, px, px, c)} (max_tiles={t_max}, tile_size={px}, channels={c})")
        here = (pos >= 0) & (pos < s)  # a marker among the inputs
        if ii > i_max and here[:, i_max:].any():
            row = int(np.flatnonzero(here[:, i_max:].any(axis=1))[0])
            raise ValueError(f"row {row} holds {int(here[row].sum())} images, more than max_images={i_max}")
        for row, k in zip(*np.nonzero(here[:, :i_max])):
            n, r = int(nt[row, k]), int(rid[row, k])
            if not 1 <= r <= len(spec.aspect_ratios):
                raise ValueError(f"row {row} image {k}: aspect ratio id {r} outside 1..{len(spec.aspect_ratios)}")
            rows, cols = spec.aspect_ratios[r - 1]
            if n != rows * cols:
                raise ValueError(f"row {row} image {k}: n_tiles={n} but aspect ratio id {r} is a {rows}x{cols} grid")
            _normalize_into(pixel_values[row, k], tiles[row, k], n, spec)
            ratio_ids[row, k], n_tiles[row, k], filled[row, k] = r, n, True
    pixel_values[~filled] = 0

    return {
        "pixel_values": pixel_values,
        "aspect_ratio_ids": ratio_ids,
        "aspect_ratio_mask": (np.arange(t_max)[None, None, :] < n_tiles[:, :, None]).astype(np.int64),
        "cross_attention_mask": cross_attention_mask(tokens[:, :-1], doc_ids[:, :-1], n_tiles, spec),
    }
