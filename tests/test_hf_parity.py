"""Our Llama equals transformers' LlamaForCausalLM after our converter, in fp32."""
import pytest
import torch

transformers = pytest.importorskip("transformers")

from pretrain.model.llama.hf import args_from_hf_config, hf_config_from_args, hf_to_ours, ours_to_hf
from pretrain.model.llama import build_llama


def _hf_model(tied: bool):
    cfg = dict(
        vocab_size=320,
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=3,
        num_attention_heads=8,
        num_key_value_heads=2,  # GQA: 4 query heads per kv head
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        # original_max_position_embeddings (32) < test sequence (96): the scaled band matters.
        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                          high_freq_factor=4.0, original_max_position_embeddings=32),
        max_position_embeddings=256,
        tie_word_embeddings=tied,
        attention_bias=False,
        mlp_bias=False,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg)).float().eval()
    # Randomize norms too, so a swapped norm would show.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model, cfg


@pytest.mark.parametrize("tied", [True, False], ids=["tied-3.2", "untied-3.1"])
def test_logits_match_transformers(tied):
    hf, cfg = _hf_model(tied)
    args = args_from_hf_config(cfg)
    assert args.tie_embeddings is tied and args.rope_scaling.original_max_position_embeddings == 32
    ours = build_llama(args, rope_cache_len=128, device="meta")
    ours.to_empty(device="cpu")
    ours.init_buffers()
    missing, unexpected = ours.load_state_dict(hf_to_ours(hf.state_dict(), args), strict=False)
    assert not unexpected
    assert not missing
    assert (ours.output is None) is tied
    ours.eval()
    tokens = torch.randint(0, cfg["vocab_size"], (2, 96), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(tokens).logits
        got = ours(tokens)
    diff = (ref - got).abs().max().item()
    assert diff <= 1e-4, f"max |logits diff| = {diff}"
    # And the conversion is exact both ways.
    back = ours_to_hf(ours.state_dict(), args)
    hf_sd = {k: v for k, v in hf.state_dict().items() if not k.endswith("inv_freq")}
    if tied:
        hf_sd.pop("lm_head.weight", None)
    assert back.keys() == hf_sd.keys()
    for k in hf_sd:
        assert torch.equal(back[k], hf_sd[k]), k
    assert args_from_hf_config(hf_config_from_args(args)) == args


def test_scaled_rope_differs_from_plain():
    """Guard that the scaling path is exercised: positions past the original context
    would give different logits without it."""
    from pretrain.model.llama import llama3_inv_freq
    from pretrain.model.llama.args import RopeScaling

    plain = llama3_inv_freq(64, 500000.0, None)
    scaled = llama3_inv_freq(64, 500000.0, RopeScaling(8.0, 1.0, 4.0, 32))
    assert torch.equal(plain[:1], scaled[:1])  # high frequencies are kept
    assert torch.allclose(scaled[-1], plain[-1] / 8.0)  # low frequencies divided by factor
