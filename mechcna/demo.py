"""The main demo: what mechcna shows on the model that ships with the package.

Until the arithmetic model is trained and shipped, the demo builds a small seeded
random model offline and runs the parts of the pipeline that exist on it.
"""

import io

import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

from mechcna.architecture import Architecture
from mechcna.check import check_model
from mechcna.interventions import HeadAblation, intervene
from mechcna.models import SHIPPED_MODELS, load_model
from mechcna.tokenizer import word_level_tokenizer

_DEMO_WORDS = "the sum of and is plus minus what Q A".split() + list("0123456789+-*/=?:")


def _demo_model(name: str | None) -> HookedTransformer:
    if name is not None:
        return load_model(name, device="cpu")
    try:
        return load_model(next(iter(SHIPPED_MODELS)), device="cpu")
    except FileNotFoundError:
        cfg = HookedTransformerConfig(
            n_layers=4, d_model=64, n_heads=4, d_head=16, d_mlp=256, n_ctx=64,
            d_vocab=len(_DEMO_WORDS) + 4, act_fn="silu", normalization_type="RMS",
            positional_embedding_type="rotary", rotary_dim=16, gated_mlp=True,
            n_key_value_heads=2, original_architecture="LlamaForCausalLM",
            model_name="demo-random-llama",
        )  # fmt: skip
        return load_model(cfg, device="cpu", seed=0, tokenizer=word_level_tokenizer(_DEMO_WORDS))


def run(model_name: str | None = None, progress: bool = True) -> str:
    """Run the demo and return its report as text."""
    out = io.StringIO()
    model = _demo_model(model_name)
    arch = Architecture(model)
    out.write(
        f"model {model.cfg.model_name}: {arch.n_layers} layers, {arch.n_heads} heads, "
        f"d_model {arch.d_model}, {arch.d_mlp} FFN neurons per layer, norm {arch.final_norm}\n"
    )
    report = check_model(model)
    out.write(
        f"residual self-check passed: max relative error {report.max_error:.1e} "
        f"(residual {report.residual:.1e}, heads {report.heads:.1e}, "
        f"neurons {report.neurons:.1e})\n"
    )
    prompt = "3+5="
    tokens = model.to_tokens(prompt)
    with torch.no_grad():
        logp = model(tokens)[0, -1].log_softmax(-1)
        target = int(logp.argmax())
        out.write(
            f"prompt {prompt!r}: top-1 token {model.to_single_str_token(target)!r}, "
            f"log p = {float(logp[target]):.4f}\n"
        )
        drops = []
        for layer in range(arch.n_layers):
            for head in range(arch.n_heads):
                with intervene(model, HeadAblation([(layer, head)])):
                    lp = model(tokens)[0, -1].log_softmax(-1)[target]
                drops.append((float(lp - logp[target]), layer, head))
    drops.sort()
    out.write("heads whose zero-ablation lowers log p(target) most:\n")
    for delta, layer, head in drops[:5]:
        out.write(f"  head {layer}_{head}: delta log p = {delta:+.4f}\n")
    return out.getvalue()
