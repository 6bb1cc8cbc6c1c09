"""Llama 3.2 Vision (Mllama), work in progress (issue 19): published parameter counts on
meta, and our forward against transformers' MllamaForConditionalGeneration at odd tiny
shapes (1 kv head, head_dim 16, 2 tiles, 3 aspect ratios, cross-attention at 2 of 5
layers, every gate and norm set away from its init so every path carries signal)."""
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
    """Row 0: an image of 1 tile seen by every token; row 1: an image of 2 tiles seen from
    token 3 on; row 2: text only."""
    g = torch.Generator().manual_seed(1)
    b, s = 3, 12
    tokens = torch.randint(0, TINY.vocab_size, (b, s), generator=g)
    tokens[:2, 0] = TINY.image_token_id
    pixels = torch.randn(b, 1, 2, 3, 28, 28, generator=g)
    pixels[0, 0, 1] = 0
    pixels[2] = 0
    ar_ids = torch.tensor([[1], [2], [0]])
    ar_mask = torch.tensor([[[1, 0]], [[1, 1]], [[0, 0]]])
    cam = torch.zeros(b, s, 1, 2, dtype=torch.long)
    cam[0, :, 0, 0] = 1
    cam[1, 3:, 0, :] = 1
    return tokens, pixels, ar_ids, ar_mask, cam


def test_logits_and_image_states_match_transformers():
    """A batch of an image of 1 tile (seen by every token), one of 2 tiles (seen from token
    3 on) and a text-only row: image rows' logits and the projected image states within
    1e-4 of transformers (measured 3.6e-7, 8.3e-7 for the vision output); the text-only row
    equals transformers' forward without images, which skips the cross-attention layers."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    hf = transformers.MllamaForConditionalGeneration(tiny_hf()).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():  # transformers starts every gate at 0: open them
            if "gate" in name:
                p.uniform_(-1.2, 1.2)
            elif p.dim() == 1 and "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    ours = build_mllama(TINY, rope_cache_len=64, device="cpu")
    ours.load_state_dict(hf_to_ours(hf.state_dict(), TINY), strict=True)
    ours.init_buffers()
    tokens, pixels, ar_ids, ar_mask, cam = image_batch()
    with torch.no_grad():
        want = hf(input_ids=tokens, pixel_values=pixels, aspect_ratio_ids=ar_ids, aspect_ratio_mask=ar_mask,
                  cross_attention_mask=cam).logits
        got = ours(tokens, pixels, ar_ids, ar_mask, cam)
        assert (got[:2] - want[:2]).abs().max().item() <= 1e-4
        hf_states = hf.model.multi_modal_projector(hf.model.vision_model(
            pixel_values=pixels[:2], aspect_ratio_ids=ar_ids[:2], aspect_ratio_mask=ar_mask[:2]).last_hidden_state)
        states = ours.image_states(pixels[:2], ar_ids[:2], ar_mask[:2])
        assert (states - hf_states.reshape(states.shape)).abs().max().item() <= 1e-4
        text_only = hf(input_ids=tokens[2:]).logits
        assert (got[2:] - text_only).abs().max().item() <= 1e-4
        # The gates matter: closing them moves the image rows' logits.
        for name, p in ours.named_parameters():
            if name.endswith(("attn_gate.weight", "ffn_gate.weight")) and not name.startswith("vision."):
                p.zero_()
        assert (ours(tokens, pixels, ar_ids, ar_mask, cam)[:2] - got[:2]).abs().max().item() > 1e-3


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
