"""Float64 literals for the engine's floating-point tests (issue 20).

Independent of the engine: every score is a full log-softmax over the vocabulary in float64,
from the same inputs the engine sees (activations of the model's own forward pass, upcast).
"""

import torch

from mechcna.engine.blocks import BlockCache, LayerRows, Projector
from mechcna.engine.rows import RowStore

U64 = torch.finfo(torch.float64).eps / 2
U32 = torch.finfo(torch.float32).eps / 2


@torch.no_grad()
def literal64_ffn(model, prompt: str, target: int | None = None) -> tuple[torch.Tensor, float]:
    """``([layer, neuron] float64 literal scores, magnitude)`` for one prompt (last position),
    target = ``target`` or the model's own top-1 (two tokens within an ulp of each other may
    each be the top-1 of one way of forming the logits: pass the one the engine scored);
    activations from the model's forward pass in its dtype,
    everything after them in float64. ``magnitude`` is the largest absolute logit any score
    involves (the scale of the rounding of an evaluation in the model's dtype)."""
    tokens = model.to_tokens(prompt)[0]
    logits, cache = model.run_with_cache(tokens[None])
    T = len(tokens) - 1
    w = int(logits[0, T].argmax()) if target is None else int(target)
    s = cache["ln_final.hook_scale"][0, T, 0].double()
    norm = model.cfg.normalization_type
    W_U = model.W_U.double()

    def bs(x):
        if norm in ("LN", "LNPre"):
            x = x - x.mean(-1, keepdim=True)
        x = x / s
        if norm in ("LN", "RMS"):
            x = x * model.ln_final.w.double()
        if norm == "LN":
            x = x + model.ln_final.b.double()
        return x @ W_U + model.b_U.double()

    out, big = [], 0.0
    for l in range(model.cfg.n_layers):
        base = cache[f"blocks.{l}.hook_resid_mid"][0, T].double()
        m = cache[f"blocks.{l}.mlp.hook_post"][0, T].double()
        aug = bs(base[None] + m[:, None] * model.blocks[l].mlp.W_out.double())
        z0 = bs(base)
        big = max(big, float(aug.abs().max()), float(z0.abs().max()))
        out.append(aug.log_softmax(-1)[:, w] - z0.log_softmax(-1)[w])
    return torch.stack(out), big


def engine_literal(z, M, W, a, target) -> torch.Tensor:
    """``[batch, extra, row]`` float64 literal of ``increase_from_rows`` on its inputs."""
    z, M, W, a = z.double(), M.double(), W.double(), a.double()
    U = W @ M  # [row, vocab]
    out = torch.empty_like(a)
    for b in range(z.shape[0]):
        lp0 = z[b].log_softmax(-1)[target[b]]
        for e in range(a.shape[1]):
            lg = z[b][None] + a[b, e][:, None] * U
            out[b, e] = lg.log_softmax(-1)[:, target[b]] - lp0
    return out


def layer_rows(M, W, storage: torch.dtype, path=None) -> LayerRows:
    """A :class:`LayerRows` over an arbitrary projector ``M`` and vectors ``W`` (in memory, or
    file-backed at ``path``)."""
    store = RowStore(W.shape[0], M.shape[1], storage, M.dtype, path)
    cache = BlockCache(disk=False, half=storage == torch.int16)
    return LayerRows(W, store, Projector(M, "test"), cache)


def error_ratio(got, ref, z, M, W, a, tol) -> float:
    """The largest ``|got - ref|`` over what the engine promises: ``tol`` (default for the
    dtype when ``None``) plus the final rounding to the compute dtype and float64 rounding of
    the largest logit the exact path sums (at most 1 when the promise holds)."""
    from mechcna.engine.expansion import default_tol

    t = default_tol(z.dtype) if tol is None else tol
    u = U32 if z.dtype == torch.float32 else U64
    U = W.double() @ M.double()
    big = float(z.double().abs().max()) + float(
        (a.double().abs().amax((0, 1)) * U.abs().amax(1)).max()
    )
    allowed = t + 2 * u * ref.abs() + 64 * U64 * big
    return float(((got.double() - ref).abs() / allowed).max())
