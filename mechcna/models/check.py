"""Residual-stream self-check: does the model decompose the way attribution assumes?

:func:`check_model` runs a random prompt and verifies, layer by layer, that

1. embedding + every attention output + every MLP output reproduces the final residual;
2. per-head outputs ``z @ W_O`` plus ``b_O`` sum to each attention output;
3. per-neuron contributions ``post * W_out`` plus ``b_out`` sum to each MLP output;

and that every weight and activation is finite (a NaN never exceeds a tolerance, so without
this an all-NaN model would pass).

Under sandwich norms (Gemma 2 and 3) identities 2 and 3 are checked with the effective value
vectors of :class:`~mechcna.models.architecture.Architecture` (``W_O`` / ``W_out`` times the
post-norm weight) and coefficients divided by the post-norm's scale at each position, which is
how every attribution score decomposes these layers.

Every attribution score rests on these identities; a model whose hooks were patched, or an
architecture TransformerLens wires differently, fails here with the layer named.

Example:
    >>> report = check_model(model)   # doctest: +SKIP
    >>> report.max_error              # largest relative error seen
"""

from dataclasses import dataclass

import einops
import torch

from mechcna.errors import ModelCheckError, NonFiniteError
from mechcna.models.backend import Model
from mechcna.models.hooks import hook_name, post_scale_name
from mechcna.models.view import architecture


def require_finite_weights(model: Model) -> None:
    """Raise :class:`NonFiniteError` naming the first parameter holding NaN or inf."""
    for name, p in model.named_parameters():
        if not bool(torch.isfinite(p).all()):
            raise NonFiniteError(f"weight {name} holds NaN or infinite values")


def first_non_finite(acts: dict[str, torch.Tensor]) -> str | None:
    """The first name (in insertion order) whose tensor holds NaN or inf, else ``None``."""
    for name, t in acts.items():
        if not bool(torch.isfinite(t).all()):
            return name
    return None


@dataclass(frozen=True)
class CheckReport:
    """Largest relative error of each identity, and the tolerance used."""

    residual: float
    heads: float
    neurons: float
    tolerance: float

    @property
    def max_error(self) -> float:
        return max(self.residual, self.heads, self.neurons)


def _expect(got: torch.Tensor, want: torch.Tensor, tolerance: float, what: str) -> float:
    """The relative error of ``got`` against ``want``; a :class:`ModelCheckError` saying
    ``what`` failed when it exceeds ``tolerance``."""
    e = _rel(got, want)
    if e > tolerance:
        raise ModelCheckError(f"{what} (relative error {e:.2e} > {tolerance:.0e})")
    return e


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    scale = max(float(b.abs().max()), 1e-12)
    return float((a - b).abs().max()) / scale


def _finite_expected(cache) -> dict[str, torch.Tensor]:
    """The cached activations that must be finite (masked attention scores are ``-inf``)."""
    return {k: v for k, v in cache.items() if not k.endswith("attn_scores")}


def refuse_non_finite(model: Model, tokens: torch.Tensor, what: str) -> None:
    """Raise :class:`NonFiniteError` naming the first hook whose activation on ``tokens`` is
    NaN or infinite (called when an analysis's ``what`` came out non-finite)."""
    require_finite_weights(model)
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens)
    bad = first_non_finite(_finite_expected(cache))
    where = f"activation {bad}" if bad is not None else "the final logits"
    raise NonFiniteError(f"{what} is NaN or infinite: {where} is the first non-finite value")


def check_model(
    model: Model,
    tokens: torch.Tensor | None = None,
    *,
    seq_len: int = 6,
    seed: int = 0,
    tolerance: float | None = None,
) -> CheckReport:
    """Verify the residual-stream decomposition on a prompt; raise naming the failing layer.

    Args:
        model: the model to check.
        tokens: ``[batch, pos]`` tokens; default a random prompt of ``seq_len`` tokens.
        seed: seed for the random prompt.
        tolerance: max relative error (default 1e-4 for fp32 and wider types, 2e-2 below).

    Returns:
        A :class:`CheckReport` with the largest error of each identity.

    Raises:
        ModelCheckError: an identity fails; the message names the layer and the identity.
        NonFiniteError: a weight or activation is NaN or infinite (named).
        UnsupportedArchitectureError: the architecture is not supported at all.
    """
    arch = architecture(model)
    if tolerance is None:
        tolerance = 1e-4 if arch.dtype in (torch.float32, torch.float64) else 2e-2
    if tokens is None:
        gen = torch.Generator().manual_seed(seed)
        tokens = torch.randint(0, arch.d_vocab, (1, seq_len), generator=gen)
    tokens = tokens.to(arch.device)
    require_finite_weights(model)
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens)
    bad = first_non_finite(_finite_expected(cache))
    if bad is not None:
        raise NonFiniteError(f"activation {bad} holds NaN or infinite values")

    resid = cache[hook_name("embed")]
    if hook_name("pos_embed") in cache:
        resid = resid + cache[hook_name("pos_embed")]
    err_resid = err_heads = err_neurons = 0.0
    for layer in range(arch.n_layers):
        attn_out = cache[hook_name("attn_out", layer)]
        mlp_out = cache[hook_name("mlp_out", layer)]
        err_resid = max(err_resid, _expect(
            resid, cache[hook_name("resid_pre", layer)], tolerance,
            f"layer {layer}: embedding plus earlier attention and MLP outputs do not "
            "reproduce resid_pre",
        ))  # fmt: skip
        attn_s = mlp_s = torch.ones((), dtype=attn_out.dtype, device=attn_out.device)
        if arch.post_norms:  # the post-norms' scales, frozen per position: [batch pos 1]
            attn_s = cache[post_scale_name(layer, "ln1_post")]
            mlp_s = cache[post_scale_name(layer, "ln2_post")]
        heads = einops.einsum(
            cache[hook_name("z", layer)] / attn_s.unsqueeze(-1),
            arch.W_O(layer),
            "batch pos head_index d_head, head_index d_head d_model -> batch pos d_model",
        )
        err_heads = max(err_heads, _expect(
            heads + arch.b_O(layer) / attn_s, attn_out, tolerance,
            f"layer {layer}: per-head outputs (hook_z @ W_O + b_O) do not sum to the "
            "attention output hook_attn_out",
        ))  # fmt: skip
        neurons = einops.einsum(
            cache[hook_name("post", layer)] / mlp_s,
            arch.W_out(layer),
            "batch pos neuron, neuron d_model -> batch pos d_model",
        )
        err_neurons = max(err_neurons, _expect(
            neurons + arch.b_out(layer) / mlp_s, mlp_out, tolerance,
            f"layer {layer}: per-neuron contributions (hook_post * W_out + b_out) do not "
            "sum to the MLP output hook_mlp_out",
        ))  # fmt: skip
        resid = resid + attn_out + mlp_out
    err_resid = max(err_resid, _expect(
        resid, cache[hook_name("resid_post", arch.n_layers - 1)], tolerance,
        f"layer {arch.n_layers - 1}: the sum of all components does not reproduce the "
        "final residual",
    ))  # fmt: skip
    return CheckReport(err_resid, err_heads, err_neurons, tolerance)
