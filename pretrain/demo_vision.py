"""`make demo-vision`: a tiny Llama 3.2 Vision model learns to caption pictures it draws
itself, through the real image-text path (JSONL records, the loader's image decoding and
tiling, the trainer, DCP checkpoints), on CPU in a few minutes.

Each picture holds one or two shapes (circle, square, triangle) of four colours at random
places, captioned "a red circle and a blue square". A caption is mostly colour and shape
words that only the picture tells. After training, every checkpoint is evaluated on
held-out pictures twice: with the real images and with the images blanked (a grey picture
in their place, same captions); the caption loss with real images must end at least
``--min-gain`` (25%) below the blanked one."""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import numpy as np

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 230), "yellow": (235, 205, 30)}
SHAPES = ("circle", "square", "triangle")
SIZE = 28  # mllama_debug's tile: one tile per picture


def draw(rng: np.random.Generator, blank: bool = False, max_shapes: int = 2):
    """(PIL image, caption): one or two shapes (at most ``max_shapes``), never of the same
    colour and kind."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (SIZE, SIZE), (128, 128, 128) if blank else (255, 255, 255))
    d = ImageDraw.Draw(img)
    n = int(rng.integers(1, max_shapes + 1))
    picked: List[Tuple[str, str]] = []
    while len(picked) < n:
        c, s = str(rng.choice(list(COLOURS))), str(rng.choice(SHAPES))
        if (c, s) not in picked:
            picked.append((c, s))
    half = SIZE // 2
    cells = rng.permutation(4)[:n]  # quadrants, so two shapes never overlap
    for (colour, shape), cell in zip(picked, cells):
        r = int(rng.integers(4, 7))
        cx = (cell % 2) * half + int(rng.integers(r, half - r + 1))
        cy = (cell // 2) * half + int(rng.integers(r, half - r + 1))
        if blank:
            continue
        box = (cx - r, cy - r, cx + r, cy + r)
        if shape == "circle":
            d.ellipse(box, fill=COLOURS[colour])
        elif shape == "square":
            d.rectangle(box, fill=COLOURS[colour])
        else:
            d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=COLOURS[colour])
    return img, " and ".join(f"a {c} {s}" for c, s in picked)


def write_split(root: Path, name: str, n: int, seed: int, blank: bool = False, max_shapes: int = 2) -> Path:
    """``root/<name>/records.jsonl`` with ``n`` pictures in ``root/<name>/img/`` (paths
    relative to the records' file, as a user's data would be)."""
    out = root / name
    (out / "img").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    with open(out / "records.jsonl", "w") as f:
        for i in range(n):
            img, caption = draw(rng, blank, max_shapes)
            rel = f"img/{i:05d}.png"
            img.save(out / rel)
            f.write(json.dumps({"image": rel, "text": caption}) + "\n")
    return out / "records.jsonl"


def train_command(run_dir: Path, train: Path, held_out: Path, steps: int, tok_cache: Path,
                  overrides: Sequence[str] = ()) -> List[str]:
    return [sys.executable, "-m", "pretrain", "experiment=demo_vision", f"hydra.run.dir={run_dir}",
            f"data.path={train}", f"eval.data.path={held_out}", f"train.steps={steps}",
            f"data.tokenizer.cache_dir={tok_cache}", *overrides]


def caption_losses(run_dir: Path, records: Path, rows: int = 64) -> Dict[int, float]:
    """Per checkpoint step: the mean caption loss (image tokens and padding excluded) of the
    first ``rows`` windows of ``records``, the model rebuilt from the checkpoint."""
    import torch
    import torch.nn.functional as F
    from omegaconf import OmegaConf

    from data_pipeline.loader import LoaderSpec, RankLoader
    from pretrain.checkpoint import complete_checkpoints
    from pretrain.checkpoint.files import read_json
    from pretrain.interop.hf import _checkpoint_args, _load_model_tensors, _saved_metadata
    from pretrain.model import family_of
    from pretrain.tokenizers import build_sources, load_tokenizer
    from data_pipeline.images import ImageSpec
    from parallel.env import detect_launch_env

    cfg = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    # The run's tokenizer: a BPE is trained on (and cached by) the training records.
    tokenizer = load_tokenizer(cfg.data, build_sources(cfg.data, images=True)[0], detect_launch_env({}))
    cfg.data.path = str(records)
    ckpts = complete_checkpoints(run_dir / "checkpoints")
    metas = [(step, ckpt, read_json(ckpt / "meta.json", "meta.json")) for step, ckpt in ckpts]
    args = _checkpoint_args(metas[-1][1], metas[-1][2])
    family = family_of(args)
    sources, _, _ = build_sources(cfg.data, images=True)
    spec = LoaderSpec(seq_len=cfg.train.seq_len, local_batch_size=rows, dp_rank=0, dp_world=1, num_workers=0,
                      seed=0, shuffle=False, streams_per_row=1, positions=cfg.data.document_masking,
                      sft_packing=cfg.data.sft_packing,
                      image=ImageSpec(**family.image_spec(args), max_pixels=cfg.data.max_image_pixels))
    loader = RankLoader(sources, [1.0], tokenizer, spec)
    batch = next(loader)
    loader.close()
    out = {}
    for step, ckpt, meta in metas:
        model = family.build(args, cfg.train.seq_len)
        model.load_state_dict(_load_model_tensors(ckpt, _saved_metadata(ckpt, meta)), strict=True)
        model.init_buffers()
        model.eval()
        with torch.no_grad():
            logits = model(*family.inputs(batch, torch.device("cpu"), args))
            out[step] = F.cross_entropy(logits.flatten(0, 1).float(), batch["labels"].flatten(),
                                        ignore_index=-100).item()
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default="outputs/demo_vision", help="data, run dir and tokenizer cache go here")
    p.add_argument("--steps", type=int, default=200, help="training steps (train.steps)")
    p.add_argument("--train", type=int, default=2000, help="training pictures")
    p.add_argument("--held-out", type=int, default=128, help="held-out pictures")
    p.add_argument("--max-shapes", type=int, default=2, choices=(1, 2), help="shapes per picture, at most")
    p.add_argument("--min-gain", type=float, default=0.25,
                   help="the real-image caption loss must end this fraction below the blanked one")
    p.add_argument("overrides", nargs="*", help="more Hydra overrides for the training run (key=value)")
    a = p.parse_args(argv)
    root = Path(a.out).resolve()
    train = write_split(root / "data", "train", a.train, seed=1, max_shapes=a.max_shapes)
    held = write_split(root / "data", "held_out", a.held_out, seed=2, max_shapes=a.max_shapes)
    blank = write_split(root / "data", "held_out_blank", a.held_out, seed=2, blank=True, max_shapes=a.max_shapes)
    run_dir = root / "run"
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    subprocess.run(train_command(run_dir, train, held, a.steps, root / "tok", a.overrides), check=True, env=env)
    # Half as many rows as pictures: every row's stream has units of its own (loader.py).
    rows = max(1, a.held_out // 2)
    real, blanked = caption_losses(run_dir, held, rows), caption_losses(run_dir, blank, rows)
    print("held-out caption loss per checkpoint (nats/token): step | real images | images blanked")
    for step in sorted(real):
        print(f"  {step:5d} | {real[step]:.3f} | {blanked[step]:.3f}")
    last = max(real)
    gain = 1 - real[last] / blanked[last]
    print(f"the pictures lower the caption loss by {100 * gain:.1f}% (at least {100 * a.min_gain:.0f}% expected; "
          f"chance over {len(COLOURS) * len(SHAPES)} colour-shapes is ln {len(COLOURS) * len(SHAPES)} = "
          f"{math.log(len(COLOURS) * len(SHAPES)):.2f} per shape)")
    print(f"real_loss={real[last]:.6f} blank_loss={blanked[last]:.6f} gain={gain:.4f} steps={last}")
    return 0 if gain >= a.min_gain else 1


if __name__ == "__main__":
    sys.exit(main())
