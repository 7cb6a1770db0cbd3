"""Hugging Face checkpoints to :class:`HookedTransformer`, offline, one table of families.

TransformerLens's own loader works from official model names only (and reaches the hub). This
module builds the :class:`HookedTransformerConfig` from a Hugging Face config's fields and
converts the weights with TransformerLens's per-family converters, so local checkpoints and
GGUF files (see :mod:`mechcna.models.gguf`) load without a network.

Families (``model_type``): ``gpt2``, ``llama`` (tied embeddings included), ``mistral``,
``qwen2`` (query/key/value biases), ``gemma2``, ``gemma3_text`` (Gemma 3 text models: QK-norm,
local/global layers with their own RoPE bases) and ``gpt_neox`` (Pythia). Gemma's embedding
scaling by ``sqrt(d_model)`` is folded into ``W_E`` by TransformerLens's converter; its
sandwich norms and soft caps are analysed as :mod:`mechcna.models.architecture` describes.
Parallel-block GPT-NeoX loads with exact logits, but its analyses are refused by
:class:`~mechcna.models.architecture.Architecture` (parallel attention/MLP has no
``resid_mid``).

Example:
    >>> from transformers import LlamaConfig
    >>> hf_config_to_tl(LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
    ...     num_attention_heads=4, vocab_size=60)).original_architecture
    'LlamaForCausalLM'
"""

from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import torch

from mechcna.errors import UnsupportedArchitectureError
from mechcna.models.backend import HookedTransformer, HookedTransformerConfig, Model

#: Hugging Face ``model_type`` -> TransformerLens ``original_architecture``.
FAMILIES: dict[str, str] = {
    "gpt2": "GPT2LMHeadModel",
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM",
    "gpt_neox": "GPTNeoXForCausalLM",
}


def _unsupported(kind: Any, why: str = "") -> UnsupportedArchitectureError:
    known = ", ".join(repr(k) for k in FAMILIES)
    return UnsupportedArchitectureError(
        f"Hugging Face model_type {kind!r} is not supported{why}; mechcna converts {known}"
    )


def _rope_theta(hf: Any, default: float = 10000.0) -> float:
    theta = getattr(hf, "rope_theta", None)
    if theta is None:
        params = getattr(hf, "rope_parameters", None) or {}
        theta = params.get("rope_theta", default)
    return float(theta)


def _check_rope_scaling(hf: Any) -> None:
    scaling = getattr(hf, "rope_scaling", None)
    params = getattr(hf, "rope_parameters", None) or {}
    kind = (scaling or {}).get("rope_type") or params.get("rope_type", "default")
    if kind not in ("default", None):
        raise _unsupported(hf.model_type, f" with rope scaling {kind!r}")


def _head_dim(hf: Any) -> int:
    return getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads


def _gated_rms(hf: Any, architecture: str) -> dict[str, Any]:
    """Fields shared by the Llama-like families (RMSNorm, rotary, gated MLP)."""
    _check_rope_scaling(hf)
    n_heads = hf.num_attention_heads
    d_head = _head_dim(hf)
    n_kv = getattr(hf, "num_key_value_heads", None) or n_heads
    return {
        "d_model": hf.hidden_size,
        "d_head": d_head,
        "n_heads": n_heads,
        "d_mlp": hf.intermediate_size,
        "n_layers": hf.num_hidden_layers,
        "n_ctx": min(hf.max_position_embeddings, 4096),
        "eps": hf.rms_norm_eps,
        "d_vocab": hf.vocab_size,
        "act_fn": getattr(hf, "hidden_act", None) or hf.hidden_activation,
        "n_key_value_heads": n_kv if n_kv != n_heads else None,
        "normalization_type": "RMS",
        "positional_embedding_type": "rotary",
        "rotary_adjacent_pairs": False,
        "rotary_dim": d_head,
        "rotary_base": _rope_theta(hf),
        "final_rms": True,
        "gated_mlp": True,
        "original_architecture": architecture,
    }


def _sliding(hf: Any, n_ctx: int) -> dict[str, Any]:
    """Sliding-window attention as TransformerLens's local attention (per-layer pattern)."""
    window = getattr(hf, "sliding_window", None)
    if not window or window >= n_ctx:
        return {}
    types = getattr(hf, "layer_types", None) or ["sliding_attention"] * hf.num_hidden_layers
    pattern = ["local" if t == "sliding_attention" else "global" for t in types]
    return {"use_local_attn": True, "window_size": window, "attn_types": pattern}


def _gemma3(hf: Any) -> dict[str, Any]:
    """Gemma 3 text: sandwich norms, QK-norm, sliding (local) and full (global) layers with
    their own RoPE bases; RoPE scaling (the larger Gemma 3 models) is refused."""
    params = getattr(hf, "rope_parameters", None) or {}
    local = params.get("sliding_attention", {}) if isinstance(params, dict) else {}
    full = params.get("full_attention", {}) if isinstance(params, dict) else {}
    for p in (local, full):
        if p.get("rope_type", "default") != "default":
            raise _unsupported(hf.model_type, f" with rope scaling {p.get('rope_type')!r}")
    if getattr(hf, "use_bidirectional_attention", False):
        raise _unsupported(hf.model_type, " with bidirectional attention")
    fields = _gated_rms(hf, FAMILIES["gemma3_text"])
    fields |= {
        "rotary_base": float(full.get("rope_theta", getattr(hf, "rope_theta", 1e6))),
        "rotary_base_local": float(
            local.get("rope_theta", getattr(hf, "rope_local_base_freq", 10000.0))
        ),
        "attn_scale": float(hf.query_pre_attn_scalar) ** 0.5,
        "use_normalization_before_and_after": True,
        "use_qk_norm": True,
        "attn_scores_soft_cap": float(getattr(hf, "attn_logit_softcapping", None) or -1.0),
        "output_logits_soft_cap": float(getattr(hf, "final_logit_softcapping", None) or -1.0),
    }
    window = getattr(hf, "sliding_window", None)
    types = getattr(hf, "layer_types", None) or []
    if window and "sliding_attention" in types:  # TransformerLens masks local layers itself
        pattern = ["local" if t == "sliding_attention" else "global" for t in types]
        fields |= {"use_local_attn": True, "window_size": window, "attn_types": pattern}
    return fields


def hf_config_to_tl(hf_config: Any) -> HookedTransformerConfig:
    """Build a :class:`HookedTransformerConfig` from a Hugging Face config.

    Raises:
        UnsupportedArchitectureError: for families outside :data:`FAMILIES`, or options of a
            family that TransformerLens cannot reproduce (rope scaling, Qwen2 sliding windows).
    """
    kind = getattr(hf_config, "model_type", None)
    hf = hf_config
    if kind == "gpt2":
        fields: dict[str, Any] = {
            "d_model": hf.n_embd,
            "d_head": hf.n_embd // hf.n_head,
            "n_heads": hf.n_head,
            "d_mlp": hf.n_inner or 4 * hf.n_embd,
            "n_layers": hf.n_layer,
            "n_ctx": hf.n_positions,
            "eps": hf.layer_norm_epsilon,
            "d_vocab": hf.vocab_size,
            "act_fn": hf.activation_function,
            "use_attn_scale": getattr(hf, "scale_attn_weights", True),
            "scale_attn_by_inverse_layer_idx": hf.scale_attn_by_inverse_layer_idx,
            "normalization_type": "LN",
            "original_architecture": FAMILIES["gpt2"],
        }
    elif kind in ("llama", "qwen2", "mistral"):
        if getattr(hf, "mlp_bias", False) or getattr(hf, "attention_bias", False):
            raise _unsupported(kind, " with attention or MLP biases")
        fields = _gated_rms(hf, FAMILIES[kind])
        if kind == "qwen2" and getattr(hf, "use_sliding_window", False):
            raise _unsupported(kind, " with use_sliding_window=True")
        if kind == "mistral":
            fields |= _sliding(hf, fields["n_ctx"])
    elif kind == "gemma2":
        fields = _gated_rms(hf, FAMILIES[kind])
        fields |= {
            "attn_scale": float(hf.query_pre_attn_scalar) ** 0.5,
            "use_normalization_before_and_after": True,
            "attn_scores_soft_cap": float(hf.attn_logit_softcapping or -1.0),
            "output_logits_soft_cap": float(hf.final_logit_softcapping or -1.0),
        }
        fields |= _sliding(hf, fields["n_ctx"])
    elif kind == "gemma3_text":
        fields = _gemma3(hf)
    elif kind == "gpt_neox":
        _check_rope_scaling(hf)
        d_head = hf.hidden_size // hf.num_attention_heads
        params = getattr(hf, "rope_parameters", None) or {}
        pct = getattr(hf, "rotary_pct", None) or params.get("partial_rotary_factor", 1.0)
        fields = {
            "d_model": hf.hidden_size,
            "d_head": d_head,
            "n_heads": hf.num_attention_heads,
            "d_mlp": hf.intermediate_size,
            "n_layers": hf.num_hidden_layers,
            "n_ctx": min(hf.max_position_embeddings, 4096),
            "eps": hf.layer_norm_eps,
            "d_vocab": hf.vocab_size,
            "act_fn": hf.hidden_act,
            "parallel_attn_mlp": bool(getattr(hf, "use_parallel_residual", True)),
            "positional_embedding_type": "rotary",
            "rotary_adjacent_pairs": False,
            "rotary_dim": round(pct * d_head),
            "rotary_base": _rope_theta(hf, getattr(hf, "rotary_emb_base", 10000.0)),
            "normalization_type": "LN",
            "original_architecture": FAMILIES[kind],
        }
    else:
        raise _unsupported(kind)
    return HookedTransformerConfig(**fields)


def converter(tl_cfg: HookedTransformerConfig) -> Callable[[Any, HookedTransformerConfig], dict]:
    """TransformerLens's weight converter for the family of ``tl_cfg``."""
    from transformer_lens.pretrained import weight_conversions as wc

    table = {
        "GPT2LMHeadModel": wc.convert_gpt2_weights,
        "LlamaForCausalLM": wc.convert_llama_weights,
        "MistralForCausalLM": wc.convert_mistral_weights,
        "Qwen2ForCausalLM": wc.convert_qwen2_weights,
        "Gemma2ForCausalLM": wc.convert_gemma_weights,
        "Gemma3ForCausalLM": wc.convert_gemma_weights,
        "GPTNeoXForCausalLM": wc.convert_neox_weights,
    }
    arch = tl_cfg.original_architecture
    if arch not in table:
        raise UnsupportedArchitectureError(f"no weight converter for {arch!r}")
    return table[arch]


def tl_state_dict(hf_model: Any, tl_cfg: HookedTransformerConfig) -> dict[str, torch.Tensor]:
    """The TransformerLens state dict of an in-memory Hugging Face model (no processing)."""
    with torch.no_grad():
        state = converter(tl_cfg)(hf_model, tl_cfg)
    return {k: v.detach() for k, v in state.items()}


def build_model(
    tl_cfg: HookedTransformerConfig,
    state_dict: dict[str, torch.Tensor],
    device: str | torch.device,
    dtype: torch.dtype,
    tokenizer: Any,
    processing: Any,
) -> Model:
    """A :class:`HookedTransformer` holding ``state_dict`` with ``processing`` applied.

    Raises:
        UnsupportedArchitectureError: the converted weights do not fit the model.
    """
    tl_cfg = HookedTransformerConfig.from_dict(
        {**tl_cfg.to_dict(), "device": str(device), "dtype": dtype, "init_weights": False}
    )
    model = HookedTransformer(tl_cfg, tokenizer=tokenizer, move_to_device=False)
    state = {k: v.to(dtype) for k, v in state_dict.items()}
    if processing.any:
        model.load_and_process_state_dict(state, **asdict(processing))
        return linear_layout(model.to(device))
    # Unprocessed: one load_state_dict call (TransformerLens's loader loads key by key, about
    # 500x slower on a 30-layer model); every parameter must be present.
    params = dict(model.named_parameters())
    for name, p in params.items():  # biases a converter leaves out are zero, as in TL
        if name not in state and name.split(".")[-1].lstrip("_").startswith("b"):
            state[name] = torch.zeros_like(p)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k in params]
    if missing or unexpected:
        raise UnsupportedArchitectureError(
            f"converted weights do not fit the {tl_cfg.original_architecture} model: "
            f"missing {missing[:5]}, unexpected {list(unexpected)[:5]}"
        )
    return linear_layout(model.to(device))


#: parameters TransformerLens multiplies as ``F.linear(x, W.T.contiguous())``; not the
#: unembedding, which it also copies: a column-major ``W_U`` raised the peak memory of Gemma 3
#: 270M's FFN attribution from 7.1 to 8.4 GB (cause not isolated)
_LINEAR_WEIGHTS = ("W_in", "W_gate", "W_out")


def linear_layout(model: Model) -> Model:
    """Store the MLP matrices TransformerLens's forward multiplies as
    ``F.linear(x, W.T.contiguous())`` (``W_in``, ``W_gate``, ``W_out``) column-major, so that
    ``W.T`` is contiguous already and a forward pass does not copy them (on SmolLM2 those
    copies took 0.22 s of a 0.45 s forward). The values and every product are unchanged:
    ``F.linear`` receives the same contiguous matrix."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2 and name.rsplit(".", 1)[-1] in _LINEAR_WEIGHTS and p.is_contiguous():
                p.data = p.data.t().contiguous().t()
    return model
