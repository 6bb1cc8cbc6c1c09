"""Model structure: published parameter counts from meta-device builds, init, GQA."""
import math

import pytest
import torch

from conftest import compose_job
from pretrain.model.llama import build_llama, count_parameters

def model_args(name: str):
    return compose_job(f"model={name}").model

@pytest.mark.parametrize("name,expected", [
    ("llama3_2_1b", 1_235_814_400),
    ("llama3_2_3b", 3_212_749_824),
    ("llama3_1_8b", 8_030_261_248),
    ("llama3_1_70b", 70_553_706_496),
])
def test_published_parameter_counts_on_meta(name, expected):
    model = build_llama(model_args(name), device="meta")
    assert all(p.is_meta for p in model.parameters())  # nothing allocated
    assert count_parameters(model) == expected

def test_published_hyperparameters():
    a = model_args("llama3_2_1b")
    assert (a.dim, a.n_layers, a.n_heads, a.n_kv_heads, a.ffn_hidden_dim) == (2048, 16, 32, 8, 8192)
    assert a.tie_embeddings and a.rope_scaling.factor == 32.0 and a.rope_theta == 500000.0
    b = model_args("llama3_1_8b")
    assert not b.tie_embeddings and b.rope_scaling.factor == 8.0 and b.ffn_hidden_dim == 14336

def test_init_weights_truncated_and_depth_scaled():
    a = model_args("debug")
    a.n_layers = 8
    model = build_llama(a, rope_cache_len=64)
    model.to_empty(device="cpu")
    model.init_weights(seed=3)
    std = a.init_std
    wq = model.layers["0"].attention.wq.weight
    wo = model.layers["0"].attention.wo.weight
    w2 = model.layers["5"].feed_forward.w2.weight
    assert wq.abs().max() <= 3 * std + 1e-7  # truncated at 3 std
    assert math.isclose(wq.std().item(), std * 0.9859, rel_tol=0.05)  # std of a 3-sigma truncation
    scaled = std / math.sqrt(2 * a.n_layers)
    assert math.isclose(wo.std().item(), scaled * 0.9859, rel_tol=0.05)
    assert math.isclose(w2.std().item(), scaled * 0.9859, rel_tol=0.05)
    assert torch.equal(model.norm.weight, torch.ones_like(model.norm.weight))
    # Same seed, same weights; another seed, other weights.
    again = build_llama(a, rope_cache_len=64)
    again.to_empty(device="cpu")
    again.init_weights(seed=3)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), again.parameters()))
    again.init_weights(seed=4)
    assert not torch.equal(model.tok_embeddings.weight, again.tok_embeddings.weight)

def test_causal_and_gqa_shapes():
    a = model_args("debug")
    model = build_llama(a, rope_cache_len=16)
    model.to_empty(device="cpu")
    model.init_weights()
    assert model.layers["0"].attention.wk.weight.shape == (a.n_kv_heads * a.dim // a.n_heads, a.dim)
    x = torch.randint(0, a.vocab_size, (2, 16))
    logits = model(x)
    assert logits.shape == (2, 16, a.vocab_size)
    # Causality: changing a later token leaves earlier logits unchanged.
    y = x.clone()
    y[:, 10] = (y[:, 10] + 1) % a.vocab_size
    logits2 = model(y)
    assert torch.allclose(logits[:, :10], logits2[:, :10], atol=1e-6)
    assert not torch.allclose(logits[:, 10:], logits2[:, 10:])
    # Explicit position ids equal to the default give the same result.
    pos = torch.arange(16).expand(2, 16)
    assert torch.allclose(model(x, position_ids=pos), logits, atol=1e-6)
