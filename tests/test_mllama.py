"""Llama 3.2 Vision (Mllama): published parameter counts on meta, and our forward against
transformers' MllamaForConditionalGeneration at odd tiny shapes (1 kv head, head_dim 16,
2 tiles, 3 aspect ratios, cross-attention at 2 of 5 layers, every gate and norm set away
from its init so every path carries signal). Text that sees no image follows Meta's
reference, where transformers differs (its issue 39379): there the references are Meta's
rule itself and transformers' text-only forward."""
import dataclasses

import pytest
import torch

from pretrain.model.family import count_parameters
from pretrain.model.llama.args import RopeScaling
from pretrain.model.mllama.args import MllamaArgs
from pretrain.model.mllama.hf import hf_to_ours
from pretrain.model.mllama.model import build_mllama



@pytest.mark.parametrize("model_file,expected", [("llama3_2_11b_vision", 10_670_220_835),
                                                 ("llama3_2_90b_vision", 88_593_355_323)], ids=["11b", "90b"])
def test_published_parameter_counts_on_meta(model_file, expected):
    """The model files' architectures on the meta device: transformers' counts for the same
    configs (MllamaForConditionalGeneration, meta-llama/Llama-3.2-{11,90}B-Vision)."""
    from conftest import compose_job
    from pretrain.model import family_of

    args = compose_job(f"model={model_file}").model
    assert isinstance(args, MllamaArgs) and family_of(args).name == "mllama"
    with torch.device("meta"):
        model = family_of(args).build(args, 8192)
    assert all(p.is_meta for p in model.parameters())
    assert count_parameters(model) == expected


def tiny_hf():
    from transformers import MllamaConfig

    vc = dict(hidden_size=32, num_hidden_layers=5, num_global_layers=2, attention_heads=2, intermediate_size=64,
              vision_output_dim=32 * 4, image_size=28, patch_size=14, max_num_tiles=2,
              intermediate_layers_indices=[1, 2, 4], supported_aspect_ratios=[[1, 1], [1, 2], [2, 1]])
    tc = dict(vocab_size=300, hidden_size=64, num_hidden_layers=5, num_attention_heads=4, num_key_value_heads=1,
              intermediate_size=96, cross_attention_layers=[1, 3], bos_token_id=1, eos_token_id=2, pad_token_id=3,
              rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                               "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
              max_position_embeddings=64)
    return MllamaConfig(vision_config=vc, text_config=tc, image_token_index=300)


TINY = MllamaArgs(dim=64, n_layers=5, n_heads=4, n_kv_heads=1, ffn_hidden_dim=96, vocab_size=300,
                  rope_scaling=RopeScaling(factor=8.0, original_max_position_embeddings=16), max_position_embeddings=64,
                  cross_attention_layers=[1, 3], vision_dim=32, vision_layers=5, vision_global_layers=2,
                  vision_heads=2, vision_ffn_hidden_dim=64, image_size=28, patch_size=14, max_num_tiles=2,
                  supported_aspect_ratios=[[1, 1], [1, 2], [2, 1]], intermediate_layers=[1, 2, 4])


def image_batch():
    """Row 0: an image of 1 tile seen by every token; row 1: an image of 2 tiles seen by
    every token; row 2: text only; row 3: an image of 2 tiles whose ``<|image|>`` is token
    ``LATE``, seen from there on (the tokens before it see no image)."""
    g = torch.Generator().manual_seed(1)
    b, s = 4, 12
    tokens = torch.randint(0, TINY.vocab_size, (b, s), generator=g)
    tokens[:2, 0] = TINY.image_token_id
    tokens[3, LATE] = TINY.image_token_id
    pixels = torch.randn(b, 1, 2, 3, 28, 28, generator=g)
    pixels[0, 0, 1] = 0
    pixels[2] = 0
    ar_ids = torch.tensor([[1], [2], [0], [3]])
    ar_mask = torch.tensor([[[1, 0]], [[1, 1]], [[0, 0]], [[1, 1]]])
    cam = torch.zeros(b, s, 1, 2, dtype=torch.long)
    cam[0, :, 0, 0] = 1
    cam[1, :, 0, :] = 1
    cam[3, LATE:, 0, :] = 1
    return tokens, pixels, ar_ids, ar_mask, cam


LATE = 5  # image_batch's row 3: the position of its <|image|>


def open_gates_hf():
    """transformers' tiny Mllama with every gate opened (it starts them at 0) and the
    norms moved off 1, so every path carries signal."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    hf = transformers.MllamaForConditionalGeneration(tiny_hf()).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "gate" in name:
                p.uniform_(-1.2, 1.2)
            elif p.dim() == 1 and "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return hf


def metas_rule(hf):
    """``hf`` patched to Meta's reference rule (llama-models, models/llama3/multimodal/
    model.py: ``CrossAttention`` multiplies its output by ``full_text_row_masked_out_mask``
    before the gated residual). transformers 5 applies that mask to the MLP output only
    (its issue 39379), so text before its image attends uniformly over the image tokens;
    the patch is that one multiplication, on the cross-attention's output (``wo`` has no
    bias, so after ``wo`` equals before it)."""
    for layer in hf.model.language_model.layers:
        if not hasattr(layer, "cross_attn"):
            continue
        def forward(*args, _layer=layer, _inner=layer.forward, **kw):
            rows = kw["full_text_row_masked_out_mask"]
            attn, real = _layer.cross_attn, type(_layer.cross_attn).forward
            attn.forward = lambda *a, **k: (lambda o: (o[0] * rows[:, 0], o[1]))(real(attn, *a, **k))
            try:
                return _inner(*args, **kw)
            finally:
                del attn.forward
        layer.forward = forward
    return hf


def ours_from(hf, args=TINY):
    ours = build_mllama(args, rope_cache_len=64, device="cpu")
    ours.load_state_dict(hf_to_ours(hf.state_dict(), args), strict=True)
    ours.init_buffers()
    return ours


def test_logits_and_image_states_match_transformers():
    """Rows where every token sees its image (1 tile, 2 tiles): logits within 1e-4 of
    transformers (measured 3.6e-7), the projected image states too (8.3e-7); the text-only
    row equals transformers' forward without images, which skips the cross-attention
    layers. The row whose image comes late follows Meta's rule, not transformers': within
    1e-4 of transformers patched to Meta's rule (every token, before and after the image),
    its tokens before the image equal transformers' text-only forward of them, and
    unpatched transformers differs there (the two references disagree on that row only)."""
    hf = open_gates_hf()
    ours = ours_from(hf)
    tokens, pixels, ar_ids, ar_mask, cam = image_batch()
    with torch.no_grad():
        want = hf(input_ids=tokens[:2], pixel_values=pixels[:2], aspect_ratio_ids=ar_ids[:2],
                  aspect_ratio_mask=ar_mask[:2], cross_attention_mask=cam[:2]).logits
        got = ours(tokens, pixels, ar_ids, ar_mask, cam)
        assert (got[:2] - want).abs().max().item() <= 1e-4
        hf_states = hf.model.multi_modal_projector(hf.model.vision_model(
            pixel_values=pixels[:2], aspect_ratio_ids=ar_ids[:2], aspect_ratio_mask=ar_mask[:2]).last_hidden_state)
        states = ours.image_states(pixels[:2], ar_ids[:2], ar_mask[:2])
        assert (states - hf_states.reshape(states.shape)).abs().max().item() <= 1e-4
        assert (got[2] - hf(input_ids=tokens[2:3]).logits[0]).abs().max().item() <= 1e-4

        late = dict(input_ids=tokens[3:], pixel_values=pixels[3:], aspect_ratio_ids=ar_ids[3:],
                    aspect_ratio_mask=ar_mask[3:], cross_attention_mask=cam[3:])
        as_transformers = hf(**late).logits[0]
        assert (got[3] - metas_rule(hf)(**late).logits[0]).abs().max().item() <= 1e-4
        prefix = hf(input_ids=tokens[3:, :LATE]).logits[0]
        assert (got[3, :LATE] - prefix).abs().max().item() <= 1e-4
        assert (got[3, :LATE] - as_transformers[:LATE]).abs().max().item() > 1e-3
        # The gates matter: closing them moves the image rows' logits.
        for name, p in ours.named_parameters():
            if name.endswith(("attn_gate.weight", "ffn_gate.weight")) and not name.startswith("vision."):
                p.zero_()
        assert (ours(tokens, pixels, ar_ids, ar_mask, cam)[:2] - got[:2]).abs().max().item() > 1e-3


def rule_batch(args, g):
    """Two image slots per sample (``args.max_images`` = 2): row 0 one image (1 tile) seen
    from token 4 on, its second slot padded; row 1 text only; row 2 two images (2 tiles
    from token 3 on, 1 tile from token 8 on); row 3 one image seen by the last token only.
    Returns (inputs with pixels drawn from ``g`` in every slot, padded ones included, the
    (B, S) map of tokens that see a tile)."""
    b, s = 4, 12
    tokens = torch.randint(0, args.vocab_size, (b, s), generator=g)
    ar_ids = torch.tensor([[1, 0], [0, 0], [2, 1], [3, 0]])
    ar_mask = torch.tensor([[[1, 0], [0, 0]], [[0, 0], [0, 0]], [[1, 1], [1, 0]], [[1, 1], [0, 0]]])
    cam = torch.zeros(b, s, 2, 2, dtype=torch.long)
    cam[0, 4:, 0, 0] = 1
    cam[2, 3:, 0, :] = 1
    cam[2, 8:, 1, 0] = 1
    cam[3, s - 1:, 0, :] = 1
    for row, img, at in ((0, 0, 4), (2, 0, 3), (2, 1, 8), (3, 0, s - 1)):
        tokens[row, at] = args.image_token_id
    pixels = torch.randn(b, 2, 2, 3, 28, 28, generator=g)
    return (tokens, pixels, ar_ids, ar_mask, cam), cam.flatten(2).any(-1)


def test_text_that_sees_no_image_does_not_depend_on_the_pixels():
    """Meta's rule itself, in one process: two forwards that differ only in the pixels (of
    every slot, padded ones included) give the same logits, bit for bit, at every token that
    sees no tile (text before its image, a text-only row, the tokens before an image seen by
    the last token only, beside a padded slot), and different ones where a tile is seen.
    ``tests/mllama_rule_worker.py`` checks the same under TP 2 and PP 2."""
    args = dataclasses.replace(TINY, max_images=2)
    ours = ours_from(open_gates_hf(), args)
    g = torch.Generator().manual_seed(3)
    (tokens, pixels, ar_ids, ar_mask, cam), sees = rule_batch(args, g)
    with torch.no_grad():
        a = ours(tokens, pixels, ar_ids, ar_mask, cam)
        b = ours(tokens, torch.randn(pixels.shape, generator=g), ar_ids, ar_mask, cam)
    assert 0 < int(sees.sum()) < sees.numel()
    assert torch.equal(a[~sees], b[~sees])
    assert (a[sees] - b[sees]).abs().amax(-1).min().item() > 1e-4  # every seeing token reads its pixels


def test_inputs_are_shaped_by_the_config_alone():
    """A batch without images gets zero pixels, ids and masks of the configured shapes (so
    every rank and stage sees the same); a batch with images of another shape is refused,
    naming the key and both shapes."""
    from pretrain.model.mllama import inputs

    args = dataclasses.replace(TINY, max_images=2)
    tokens = torch.randint(0, 300, (3, 12))
    got = inputs({"input_ids": tokens}, torch.device("cpu"), args)
    assert [tuple(x.shape) for x in got] == [(3, 12), (3, 2, 2, 3, 28, 28), (3, 2), (3, 2, 2), (3, 12, 2, 2)]
    assert all(x.abs().sum() == 0 for x in got[1:]) and torch.equal(got[0], tokens)
    model = build_mllama(args, rope_cache_len=64, device="cpu")
    model.init_weights()
    assert tuple(model(*got).shape) == (3, 12, 300)
    bad = {"input_ids": tokens, "pixel_values": torch.zeros(3, 1, 2, 3, 28, 28), "aspect_ratio_ids": torch.zeros(3, 1),
           "aspect_ratio_mask": torch.zeros(3, 1, 2), "cross_attention_mask": torch.zeros(3, 12, 1, 2)}
    ids = {**bad, "pixel_values": torch.zeros(3, 2, 2, 3, 28, 28), "aspect_ratio_ids": torch.tensor([[0, 1], [2, 3], [4, 0]]),
           "aspect_ratio_mask": torch.zeros(3, 2, 2), "cross_attention_mask": torch.zeros(3, 12, 2, 2)}
    with pytest.raises(ValueError, match=r"aspect_ratio_ids'\] holds 0..4, expected 0 \(no image\) to 3"):
        inputs(ids, torch.device("cpu"), args)
    with pytest.raises(ValueError, match=r"batch\['pixel_values'\] has shape \(3, 1, 2, 3, 28, 28\), expected "
                                         r"\(3, 2, 2, 3, 28, 28\)"):
        inputs(bad, torch.device("cpu"), args)


def test_no_intermediate_layers():
    """``model.intermediate_layers=[]`` passes the checks: the encoder's final output alone
    (vision_output_dim = vision_dim) feeds the projector."""
    from pretrain.model.mllama import check, inputs

    args = dataclasses.replace(TINY, intermediate_layers=[])
    assert list(check(args)) == [] and args.vision_output_dim == args.vision_dim
    model = build_mllama(args, rope_cache_len=64, device="cpu")
    model.init_weights()
    x = inputs({"input_ids": torch.zeros(2, 8, dtype=torch.long)}, torch.device("cpu"), args)
    assert tuple(model.image_states(*x[1:4]).shape) == (2, 2 * 5, 64)


def test_an_mllama_file_cannot_train_as_llama():
    """``model=mllama_debug model.family=llama`` would train a text-only Llama and ignore
    every vision field (MllamaArgs extends LlamaArgs): refused, naming model.family."""
    from conftest import compose_job
    from pretrain.validate import ConfigError, validate_job

    with pytest.raises(ConfigError, match="pick a model file of that family") as e:
        validate_job(compose_job("model=mllama_debug", "model.family=llama"), 1)
    assert e.value.key == "model.family"
    validate_job(compose_job("model=mllama_debug"), 1)


def test_text_that_sees_no_image_does_not_depend_on_the_pixels_under_tp_and_pp():
    """The rule under TP 2 + SP (the mask applied to a rank's heads) and PP 2 (the mask
    crosses the stage boundary): the trainer's step evaluates the loss of the tokens that
    see no tile for two pixel sets, bit-equal; the loss of the tokens that see one moves."""
    from conftest import run_worker

    rows = {r["layout"]: r for r in run_worker("mllama_rule_worker.py")}
    assert sorted(rows) == ["pp2-1f1b", "tp2+sp"]
    for r in rows.values():
        assert r["unseen"][0] == r["unseen"][1], r
        assert abs(r["seen"][0] - r["seen"][1]) > 1e-5, r


# -- positions and document masking ------------------------------------------------------

PACK = dataclasses.replace(TINY, n_layers=4, cross_attention_layers=[1, 3], max_images=2)  # 2 equal pipeline halves


def open_gates_model(args=PACK, seed=0):
    """Our tiny Mllama from its own init, every gate opened and every norm moved off 1, so
    every path (self-attention, cross-attention, both MLPs) carries signal."""
    model = build_mllama(args, rope_cache_len=64, device="cpu")
    model.init_weights(seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "gate" in name:
                p.copy_(torch.rand(p.shape, generator=g) * 2.4 - 1.2)
            elif p.dim() == 1 and "norm" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model.eval()


def sample(args, g, length, image_at, aspect_ratio_id):
    """One sample alone in a row of its own: ``length`` tokens with ``<|image|>`` at
    ``image_at``, its image (of ``aspect_ratio_id``'s tiles) in slot 0 and seen from there on
    (text before it sees nothing), the other slots padded."""
    tiles = args.supported_aspect_ratios[aspect_ratio_id - 1]
    n_tiles = tiles[0] * tiles[1]
    i, t = args.max_images, args.max_num_tiles
    tokens = torch.randint(0, args.vocab_size, (1, length), generator=g)
    tokens[0, image_at] = args.image_token_id
    pixels = torch.zeros(1, i, t, args.num_channels, args.image_size, args.image_size)
    pixels[0, 0, :n_tiles] = torch.randn(n_tiles, args.num_channels, args.image_size, args.image_size, generator=g)
    ar_ids = torch.zeros(1, i, dtype=torch.long)
    ar_ids[0, 0] = aspect_ratio_id
    ar_mask = torch.zeros(1, i, t, dtype=torch.long)
    ar_mask[0, 0, :n_tiles] = 1
    cam = torch.zeros(1, length, i, t)
    cam[0, image_at:, 0, :n_tiles] = 1
    return tokens, pixels, ar_ids, ar_mask, cam


def pack(samples):
    """The samples in one row, sample k's image in slot k (its mask moved there): as the
    data side packs several samples per row. Returns (inputs, positions restarting at each
    sample, document ids 0, 1, ...)."""
    tokens = torch.cat([s[0] for s in samples], dim=1)
    pixels, ar_ids, ar_mask = (torch.zeros_like(samples[0][k]) for k in (1, 2, 3))
    cams = []
    for k, (_, px, ids, am, cam) in enumerate(samples):
        pixels[:, k], ar_ids[:, k], ar_mask[:, k] = px[:, 0], ids[:, 0], am[:, 0]
        moved = torch.zeros_like(cam)
        moved[:, :, k] = cam[:, :, 0]
        cams.append(moved)
    lengths = [s[0].shape[1] for s in samples]
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    doc_ids = torch.cat([torch.full((n,), k) for k, n in enumerate(lengths)])[None]
    return (tokens, pixels, ar_ids, ar_mask, torch.cat(cams, dim=1)), positions, doc_ids


def test_packed_samples_equal_each_sample_alone():
    """Document masking: two samples with their own images (a 1-tile image at token 2 of 7,
    a 2-tile one at token 1 of 5) packed in one row, positions restarting at the second and
    document ids 0/1, give each sample's logits alone in its row (every token, before and
    after its image). Without the document ids (causal over the whole row) the second
    sample reads the first: its logits move."""
    model = open_gates_model()
    g = torch.Generator().manual_seed(5)
    a, b = sample(PACK, g, 7, 2, 1), sample(PACK, g, 5, 1, 2)
    packed, positions, doc_ids = pack([a, b])
    with torch.no_grad():
        alone = torch.cat([model(*a), model(*b)], dim=1)
        got = model(*packed, positions, doc_ids)
        causal = model(*packed, positions)
        blind = model(*packed[:4], torch.zeros_like(packed[4]), positions, doc_ids)
    assert (got - alone).abs().max().item() <= 1e-5  # measured 1.5e-7
    seen = packed[4].flatten(2).any(-1)
    assert (blind - got)[seen].abs().amax(-1).min().item() > 1e-3  # each sample's image is in its logits
    assert (causal[:, :7] - alone[:, :7]).abs().max().item() <= 1e-5  # the first sample sees only itself anyway
    assert (causal[:, 7:] - alone[:, 7:]).abs().amax(-1).min().item() > 1e-3  # every token of the second moves


def test_positions_are_honoured():
    """Positions index the RoPE tables: None equals 0..S-1 bit for bit; a gap in them moves
    the logits after the gap (RoPE is relative: before it nothing moves); a uniform shift
    moves nothing beyond rounding (no stage assumes the window starts at 0)."""
    model = open_gates_model()
    (tokens, *rest), sees = rule_batch(PACK, torch.Generator().manual_seed(3))
    x = (tokens, *rest)
    b, s = tokens.shape
    arange = torch.arange(s).expand(b, -1).contiguous()
    gap = arange.clone()
    gap[:, 6:] += 5
    with torch.no_grad():
        default = model(*x)
        assert torch.equal(model(*x, arange), default)
        moved = model(*x, gap)
        shifted = model(*x, arange + 7)
    assert torch.equal(moved[:, :6], default[:, :6])
    assert (moved[:, 6:] - default[:, 6:]).abs().amax(-1).min().item() > 1e-4
    assert (shifted - default).abs().max().item() <= 1e-4
    with pytest.raises(IndexError):  # the first stage indexes what it was given
        model(*x, arange + 64)


def stages(model):
    """The model cut into the 2 pipeline stages the trainer builds (``parallel.pp.build_stage``):
    layers 0-1 (a self- and a cross-attention layer) with the vision tower and the
    embedding, layers 2-3 with the norm and the head."""
    import copy

    from parallel.pp import build_stage
    from pretrain.model.mllama import LAYOUT

    return [build_stage(copy.deepcopy(model), LAYOUT, k, 2) for k in range(2)]


def test_pipeline_stages_pass_positions_and_document_ids_on():
    """Two stages equal the whole model with (positions, doc_ids), positions alone, and
    neither (the triple of before). The first stage passes on exactly what it received:
    (h, images, mask[, positions[, doc_ids]]), positions and ids int64 and contiguous. A
    later stage clamps positions to its RoPE tables (pipelining infers its shapes on
    uninitialised tensors); the first does not."""
    model = open_gates_model()
    first, last = stages(model)
    assert first.vision is not None and first.norm is None and last.vision is None and last.norm is not None
    assert sorted(first.layers) == ["0", "1"] and sorted(last.layers) == ["2", "3"]
    g = torch.Generator().manual_seed(5)
    packed, positions, doc_ids = pack([sample(PACK, g, 7, 2, 1), sample(PACK, g, 5, 1, 2)])
    # A second row: the same images and masks, the text reversed.
    packed = (torch.cat([packed[0], packed[0].flip(1)]), *(torch.cat([x, x]) for x in packed[1:]))
    positions, doc_ids = positions.expand(2, -1).contiguous(), doc_ids.expand(2, -1).contiguous()
    with torch.no_grad():
        for extra in ((positions, doc_ids), (positions,), ()):
            mid = first(*packed, *extra)
            assert len(mid) == 3 + len(extra)
            assert mid[2].is_floating_point() and torch.equal(mid[2], packed[4])
            for got, want in zip(mid[3:], extra):
                assert got.dtype == torch.int64 and got.is_contiguous() and torch.equal(got, want)
            whole = model(*packed, *extra)
            assert (last(*mid) - whole).abs().max().item() <= 1e-5
        # Shape inference on a later stage: positions past the tables are clamped, not an error.
        h, images, mask = first(*packed)
        assert tuple(last(h, images, mask, positions + 1000, doc_ids).shape) == (2, 12, PACK.vocab_size)
        with pytest.raises(IndexError):
            first(*packed, positions + 1000, doc_ids)


def test_inputs_with_document_masking():
    """A batch with ``positions`` (data.document_masking) gets (positions, doc_ids) after the
    five image inputs, int64 and contiguous, with images or without (zero fallback); without
    positions the five inputs alone, as before. The family takes data.document_masking."""
    from conftest import compose_job
    from pretrain.model.mllama import FAMILY, inputs
    from pretrain.validate import validate_job

    args = PACK
    cpu = torch.device("cpu")
    tokens = torch.randint(0, 300, (3, 12))
    positions = torch.cat([torch.arange(5), torch.arange(7)]).int().expand(3, -1)  # int32, not contiguous
    doc_ids = torch.cat([torch.zeros(5, dtype=torch.long), torch.ones(7, dtype=torch.long)]).expand(3, -1)
    assert not positions.is_contiguous() and not doc_ids.is_contiguous()
    batch = {"input_ids": tokens, "positions": positions, "doc_ids": doc_ids}
    images = dict(zip(("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask", "cross_attention_mask"),
                      (t[:3] for t in rule_batch(args, torch.Generator().manual_seed(3))[0][1:])))
    for extra in ({}, images):
        got = inputs({**batch, **extra}, cpu, args)
        assert len(got) == 7
        for x, want in zip(got[5:], (positions, doc_ids)):
            assert x.dtype == torch.int64 and x.is_contiguous() and torch.equal(x, want.long())
        assert len(inputs({"input_ids": tokens, **extra, "positions": None, "doc_ids": doc_ids}, cpu, args)) == 5
    with pytest.raises(ValueError, match=r"batch\['doc_ids'\] has shape \(3, 11\), expected \(3, 12\)"):
        inputs({**batch, "doc_ids": doc_ids[:, :11]}, cpu, args)
    assert FAMILY.document_masking
    validate_job(compose_job("model=mllama_debug", "data.document_masking=true"), 1)
