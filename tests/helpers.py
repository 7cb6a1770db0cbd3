"""Shared test helpers: tiny GPT-2-like and Llama-like models built offline."""

import torch

from mechcna import load_model, word_level_tokenizer
from mechcna.models.backend import HookedTransformer, HookedTransformerConfig

WORDS = (
    (
        "the sum of and is what plus minus times divides difference between product ratio "
        "a man woman works as nurse driver Q A Tim Duncan plays sport basketball"
    ).split()
    + list("0123456789")
    + ["+", "-", "*", "/", "=", "?", ":"]
)


def tokenizer():
    return word_level_tokenizer(WORDS, name="mechcna-test")


def gpt2_cfg(**kw) -> HookedTransformerConfig:
    fields = dict(
        n_layers=2,
        d_model=32,
        n_heads=4,
        d_head=8,
        d_mlp=64,
        n_ctx=32,
        d_vocab=len(WORDS) + 4,
        act_fn="gelu_new",
        normalization_type="LN",
        original_architecture="GPT2LMHeadModel",
    )
    fields.update(kw)
    return HookedTransformerConfig(**fields)


def llama_cfg(**kw) -> HookedTransformerConfig:
    fields = dict(
        n_layers=2,
        d_model=32,
        n_heads=4,
        d_head=8,
        d_mlp=48,
        n_ctx=32,
        d_vocab=len(WORDS) + 4,
        act_fn="silu",
        normalization_type="RMS",
        positional_embedding_type="rotary",
        rotary_dim=8,
        gated_mlp=True,
        n_key_value_heads=2,
        final_rms=True,
        original_architecture="LlamaForCausalLM",
    )
    fields.update(kw)
    return HookedTransformerConfig(**fields)


def randomize_biases_and_norms(model: HookedTransformer, seed: int = 1) -> HookedTransformer:
    """Random init leaves biases at 0 and norm weights at 1; perturb them so tests see them."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.split(".")[-1] in (
                "b",
                "w",
                "b_in",
                "b_out",
                "b_O",
                "b_Q",
                "b_K",
                "b_V",
                "_b_K",
                "_b_V",
                "b_U",
            ):
                noise = torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p)
                p.add_(0.2 * noise)
    return model


def build(kind: str, dtype: torch.dtype = torch.float32, seed: int = 0, **kw) -> HookedTransformer:
    cfg = gpt2_cfg(**kw) if kind == "gpt2" else llama_cfg(**kw)
    model = load_model(cfg, device="cpu", dtype=dtype, tokenizer=tokenizer(), seed=seed)
    return randomize_biases_and_norms(model, seed)


PROMPTS = ["the sum of 3 and 5 is", "12+7=", "Tim Duncan plays the sport of"]
