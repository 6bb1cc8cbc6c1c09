"""MFU's numerator and denominator: Llama 3.2 1B's and Llama 3.2 11B Vision's FLOPs per
token worked out by hand from their published shapes (the latter also counted by torch's
FlopCounterMode), and the GPU peak table's lookup by device name."""
import pytest

from conftest import REPO
from pretrain.config import load_model_file
from pretrain.observe.flops import gpu_peak_tflops, peak_flops
from pretrain.model.llama import flops_per_token
from pretrain.model.llama.args import LlamaArgs


def _load_1b() -> LlamaArgs:
    return load_model_file(REPO / "configs" / "model" / "llama3_2_1b.yaml")


def test_llama3_2_1b_flops_per_token_by_hand():
    args = _load_1b()
    assert (args.dim, args.n_layers, args.n_heads, args.n_kv_heads, args.resolved_head_dim,
            args.ffn_hidden_dim, args.vocab_size, args.tie_embeddings) == (
            2048, 16, 32, 8, 64, 8192, 128256, True)

    # Matmul params per layer: wq 2048x(32*64), wk 2048x(8*64), wv 2048x(8*64), wo (32*64)x2048,
    # w1 and w3 2048x8192, w2 8192x2048.
    attn = 2048 * 2048 + 2048 * 512 + 2048 * 512 + 2048 * 2048  # 10,485,760
    ffn = 3 * 2048 * 8192                                         # 50,331,648
    head = 2048 * 128256  # tied: the one embedding matrix, counted once as the output matmul
    matmul = 16 * (attn + ffn) + head
    assert matmul == 1_235_746_816
    # = the published 1,235,814,400 parameters less the RMSNorm weights (2 per layer + final).
    assert matmul == 1_235_814_400 - (16 * 2 + 1) * 2048

    for seq, attn_flops, total in ((2048, 805_306_368, 8_219_787_264),
                                   (8192, 3_221_225_472, 10_635_706_368)):
        assert 12 * 16 * 32 * 64 * seq == attn_flops  # QK^T and AV, fwd+bwd, no causal halving
        assert 6 * matmul + attn_flops == total
        assert flops_per_token(args, seq) == total
    # LoRA rank 16 on all seven linears: r x (in + out) each, per layer; the frozen base
    # has no weight gradients (4 x its matmuls), the adapters train (6 x theirs).
    lora = 16 * 16 * (2 * (2048 + 2048) + 2 * (2048 + 512) + 2 * (2048 + 8192) + (8192 + 2048))
    assert lora == 11_272_192  # the README's figure for the 1B
    assert flops_per_token(args, 2048, lora_params=lora) == 4 * matmul + 6 * lora + 805_306_368 == 5_815_926_784


def test_peak_table_by_device_name():
    import torch

    assert gpu_peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert gpu_peak_tflops("NVIDIA A100 80GB PCIe") == 312.0
    assert gpu_peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert gpu_peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert gpu_peak_tflops("NVIDIA H100 NVL") == 835.0
    assert gpu_peak_tflops("NVIDIA H200") == 989.0
    assert gpu_peak_tflops("NVIDIA H200 NVL") == 835.0
    assert gpu_peak_tflops("NVIDIA B200") == 2250.0
    assert gpu_peak_tflops("Tesla V100-SXM2-16GB") is None
    assert peak_flops(torch.device("cpu"), 123.0) == 123e12  # logging.peak_tflops wins


def _load_11b_vision():
    return load_model_file(REPO / "configs" / "model" / "llama3_2_11b_vision.yaml")


def test_llama3_2_11b_vision_flops_per_token_by_hand():
    """Llama 3.2 11B Vision at seq_len 8192, one image of 4 tiles per sample: every term
    from the published shape, written out here (not through mllama/flops.py's helpers)."""
    from pretrain.model.mllama.flops import breakdown
    from pretrain.model.mllama.flops import flops_per_token as mllama_fpt

    args = _load_11b_vision()
    assert (args.dim, args.n_layers, len(args.cross_attention_layers), args.n_heads, args.n_kv_heads,
            args.resolved_head_dim, args.ffn_hidden_dim, args.vocab_size) == (
            4096, 40, 8, 32, 8, 128, 14336, 128256)
    assert (args.vision_dim, args.vision_layers, args.vision_global_layers, args.vision_heads,
            args.vision_ffn_hidden_dim, args.image_size, args.patch_size, args.num_channels,
            args.max_num_tiles, args.max_images, args.vision_output_dim) == (
            1280, 32, 8, 16, 5120, 560, 14, 3, 4, 1, 7680)
    seq = 8192

    # -- text, per token ------------------------------------------------------------------
    # Self-attention layer: wq 4096x(32*128), wk and wv 4096x(8*128), wo (32*128)x4096,
    # SwiGLU w1, w3 4096x14336 and w2 14336x4096.
    self_layer = 4096 * 4096 + 2 * 4096 * 1024 + 4096 * 4096 + 3 * 4096 * 14336
    assert self_layer == 218_103_808
    # Cross-attention layer, on the token: wq and wo (its wk, wv run on the image states,
    # per tile below), the SwiGLU (on every token; masked after). q/k norms, gates: no matmul.
    cross_layer = 4096 * 4096 + 4096 * 4096 + 3 * 4096 * 14336
    assert cross_layer == 209_715_200
    head = 4096 * 128256  # untied output projection; the embedding lookup is a gather
    text_matmul = 32 * self_layer + 8 * cross_layer + head  # 32 = 40 layers - 8 cross
    assert text_matmul == 9_182_380_032
    # Attention scores, 12 x heads x head_dim per key (QK^T and PV, fwd + bwd, full matrix):
    self_scores = 12 * 32 * 128 * 8192 * 32     # causal self-attention over 8192 keys, 32 layers
    cross_scores = 12 * 32 * 128 * (4 * 1601) * 8  # every image state (4 tiles x 1601), 8 layers
    assert (self_scores, cross_scores) == (12_884_901_888, 2_518_155_264)
    text = 6 * text_matmul + self_scores + cross_scores
    assert text == 70_497_337_344

    # -- image, per tile --------------------------------------------------------------------
    # (560/14)^2 = 1600 patches + 1 class token = 1601 states; the encoder pads to 1608.
    patch_embed = 4 * 1600 * (3 * 14 * 14) * 1280  # pixels take no gradient: fwd + weight grad only
    # 32 local + 8 global layers on 1608 padded positions: q, k, v, o 1280x1280, fc1 and fc2 1280x5120.
    vision_layers = 6 * 1608 * 40 * (4 * 1280 * 1280 + 2 * 1280 * 5120)
    # Each of the tile's 1608 queries attends to all 4 x 1608 positions of the image, 40 layers,
    # heads x head_dim = 16 x 80 = 1280.
    vision_scores = 12 * 40 * 1280 * 1608 * (4 * 1608)
    projector = 6 * 1601 * 7680 * 4096  # 7680 = 1280 x (1 final + 5 intermediate layers)
    cross_kv = 6 * 1601 * 8 * 2 * 4096 * (8 * 128)  # each cross layer's wk and wv of the 1601 states
    assert (patch_embed, vision_layers, vision_scores, projector, cross_kv) == (
        4_816_896_000, 7_587_495_936_000, 6_354_527_846_400, 302_178_631_680, 644_647_747_584)
    per_tile = patch_embed + vision_layers + vision_scores + projector + cross_kv
    assert per_tile == 14_893_667_057_664
    image = 4 * per_tile // 8192  # 4 tiles of one image per sample, over its 8192 tokens
    assert 4 * per_tile % 8192 == 0 and image == 7_272_298_368
    total = text + image
    assert total == 77_769_635_712

    assert breakdown(args, seq) == {"text_per_token": text, "image_per_tile": per_tile, "tiles_per_sample": 4}
    assert mllama_fpt(args, seq) == total
    # LoRA (rank 16 on attention: 23,592,960 adapters): the base's weight matmuls count 4, not 6
    # (the patch embedding 2: forward only), attention scores 12, adapters 6.
    lora = 16 * (32 * (2 * (4096 + 4096) + 2 * (4096 + 1024)) + 8 * (2 * (4096 + 4096) + 2 * (4096 + 1024))
                 + 40 * 4 * (1280 + 1280))
    assert lora == 23_592_960
    tile_lora = (4 * (vision_layers + projector + cross_kv) // 6 + vision_scores + patch_embed // 2)
    lora_total = 4 * text_matmul + self_scores + cross_scores + 6 * lora + 4 * tile_lora // 8192
    assert mllama_fpt(args, seq, lora_params=lora) == lora_total == 58_156_207_552
    print(f"\nLlama 3.2 11B Vision, seq_len 8192, 1 image x 4 tiles: {total:,} FLOPs/token "
          f"= text {text:,} + image {image:,} ({per_tile:,} per tile x 4 / 8192); "
          f"LoRA r16 attention {lora_total:,}")


def test_llama3_2_11b_vision_image_flops_grow_per_tile():
    """1 tile vs 4 (same image size, seq_len 8192): the image side is counted per tile, and
    the encoder's attention over the whole image grows with the square of the tiles."""
    import dataclasses

    from pretrain.model.mllama.flops import breakdown
    from pretrain.model.mllama.flops import flops_per_token as mllama_fpt

    four = _load_11b_vision()
    one = dataclasses.replace(four, max_num_tiles=1, supported_aspect_ratios=[[1, 1]])
    b1, b4 = breakdown(one, 8192), breakdown(four, 8192)
    assert (b1["tiles_per_sample"], b4["tiles_per_sample"]) == (1, 4)
    # Per tile, only the encoder's attention changes: a query sees 1 x 1608 keys, not 4 x 1608.
    scores_1 = 12 * 40 * 1280 * 1608 * 1608  # 1,588,631,961,600
    assert b4["image_per_tile"] - b1["image_per_tile"] == 3 * scores_1
    # Per sample: 4 x the linear terms, 16 x the attention one (quadratic in the tiles).
    linear = b1["image_per_tile"] - scores_1
    assert 4 * b4["image_per_tile"] == 4 * linear + 16 * scores_1
    # Text: each cross-attention layer reads 4 x 1601 image states instead of 1601.
    assert b4["text_per_token"] - b1["text_per_token"] == 12 * 32 * 128 * 8 * 3 * 1601
    assert mllama_fpt(four, 8192) - mllama_fpt(one, 8192) == (
        12 * 32 * 128 * 8 * 3 * 1601 + (4 * b4["image_per_tile"] - b1["image_per_tile"]) / 8192)
    # By hand: linear = 14,893,667,057,664 - 6,354,527,846,400 per tile (the 4-tile figure less
    # its attention); 1 tile: linear + scores_1; 4 tiles: 4 x (linear + 4 x scores_1).
    assert linear == 8_539_139_211_264
    image_1, image_4 = b1["image_per_tile"] / 8192, 4 * b4["image_per_tile"] / 8192
    assert (image_1, image_4) == (1_236_300_192, 7_272_298_368)
    assert round(image_4 / image_1, 3) == 5.882  # not 4: the attention term is quadratic
    print(f"\n11B Vision image FLOPs/token at seq_len 8192: 1 tile {image_1:,.0f}, 4 tiles {image_4:,.0f} "
          f"(x{image_4 / image_1:.3f})")


def test_mllama_flops_equal_torch_flop_counter_at_11b():
    """Independent of the hand sums: torch's FlopCounterMode over one forward + backward of
    the 11B model built on meta (no memory) at seq_len 8192, attention by the math kernel
    (whose matmuls it counts), equals flops_per_token x 8192 exactly."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from pretrain.model.mllama import FAMILY

    args = _load_11b_vision()
    with torch.device("meta"):
        model = FAMILY.build(args, 8192)
    batch = {"input_ids": torch.zeros(1, 8192, dtype=torch.long, device="meta")}
    inputs = FAMILY.inputs(batch, torch.device("meta"), args)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(*inputs).float().sum().backward()
    assert counter.get_total_flops() == FAMILY.flops_per_token(args, 8192) * 8192 == 77_769_635_712 * 8192


@pytest.mark.parametrize("frozen", ["vision", "text"])
def test_mllama_flops_with_a_frozen_tower_equal_torch_flop_counter(frozen):
    """``finetune.freeze``: the 11B on meta with a tower frozen (the trainer's apply_freeze),
    one forward + backward under FlopCounterMode equals flops_per_token(frozen=...) x 8192
    exactly: frozen weights compute no weight gradient, and parts with nothing trainable
    upstream no backward at all. Counting as if everything trained overstates it by 13%
    ([vision]) and 28% ([text])."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from pretrain.freeze import apply_freeze
    from pretrain.model.mllama import FAMILY

    args = _load_11b_vision()
    with torch.device("meta"):
        model = FAMILY.build(args, 8192)
    apply_freeze(model, FAMILY, args, [frozen])
    batch = {"input_ids": torch.zeros(1, 8192, dtype=torch.long, device="meta")}
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(*FAMILY.inputs(batch, torch.device("meta"), args)).float().sum().backward()
    got = FAMILY.flops_per_token(args, 8192, frozen=(frozen,))
    assert counter.get_total_flops() == got * 8192
    assert FAMILY.flops_per_token(args, 8192) / got > 1.1
