import pytest
import torch

from mechcna import Architecture, MechcnaError, UnsupportedArchitectureError, load_model
from tests.helpers import build, gpt2_cfg


def test_gqa_values_expanded():
    model = build("llama")
    arch = Architecture(model)
    raw = model.blocks[0].attn._W_V  # [kv_head d_model d_head]
    assert raw.shape[0] == 2
    W_V = arch.W_V(0)
    assert W_V.shape == (4, 32, 8)
    torch.testing.assert_close(W_V[0], raw[0])
    torch.testing.assert_close(W_V[1], raw[0])
    torch.testing.assert_close(W_V[3], raw[1])


def test_facts(kind):
    model = build(kind)
    arch = Architecture(model)
    assert arch.final_norm == ("LN" if kind == "gpt2" else "RMS")
    assert arch.gated == (kind == "llama")
    assert (arch.W_gate(1) is None) == (kind == "gpt2")
    assert arch.W_out(1).shape == (arch.d_mlp, arch.d_model)
    assert arch.W_in(1).shape == (arch.d_model, arch.d_mlp)
    assert arch.W_O(1).shape == (arch.n_heads, arch.d_head, arch.d_model)
    assert arch.ln1_w(0).shape == (arch.d_model,)
    assert arch.ln_final_b.shape == (arch.d_model,)
    if kind == "llama":
        assert torch.equal(arch.ln_final_b, torch.zeros(arch.d_model))
        assert torch.equal(arch.b_out(0), model.blocks[0].mlp.b_out)


def test_out_of_range_errors():
    arch = Architecture(build("gpt2"))
    with pytest.raises(MechcnaError, match="layer 5 out of range"):
        arch.check_layer(5)
    with pytest.raises(MechcnaError, match="head 9 out of range"):
        arch.check_head(0, 9)
    with pytest.raises(MechcnaError, match="neuron 64 out of range"):
        arch.check_neuron(0, 64)
    with pytest.raises(MechcnaError, match="-1 does not mean the last"):
        arch.check_layer(-1)  # one rule for every index: negative is an error


def test_unsupported_architectures():
    with pytest.raises(UnsupportedArchitectureError, match="attention-only"):
        Architecture(load_model(gpt2_cfg(attn_only=True), device="cpu"))
    with pytest.raises(UnsupportedArchitectureError, match="parallel"):
        Architecture(load_model(gpt2_cfg(parallel_attn_mlp=True), device="cpu"))
