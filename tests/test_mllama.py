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
