"""Slow, literal reference implementations following the papers' code step by step.

Kept deliberately independent of mechcna's projection and engine: every score is computed
by materialising the augmented residuals, applying the final norm with the frozen scale,
the full unembedding and a log-softmax, one prompt and one layer at a time.
"""

import torch


def frozen_bs(model, vectors, scale, paper_compat=False):
    """bs(v): the final norm with a frozen scale, then the unembedding."""
    x = vectors
    norm = model.cfg.normalization_type
    if norm in ("LN", "LNPre"):
        x = x - x.mean(-1, keepdim=True)
    x = x / scale
    if norm in ("LN", "RMS"):
        x = x * model.ln_final.w
    if norm == "LN" and not paper_compat:
        x = x + model.ln_final.b
    logits = x @ model.W_U
    if not paper_compat:
        logits = logits + model.b_U
    return logits


def _run(model, tokens):
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens[None])
    return logits[0], cache


@torch.no_grad()
def literal_ffn_scores(model, tokens, target=None, paper_compat=False, layers=None):
    """[layer, neuron] log-prob increases for one unpadded prompt (last position); only the
    given ``layers`` (in that order) when given."""
    logits, cache = _run(model, tokens)
    T = len(tokens) - 1
    w = int(logits[T].argmax()) if target is None else target
    s = cache["ln_final.hook_scale"][0, T, 0]
    out = []
    for l in range(model.cfg.n_layers) if layers is None else layers:
        base = cache[f"blocks.{l}.hook_resid_mid"][0, T]
        m = cache[f"blocks.{l}.mlp.hook_post"][0, T]
        subvalues = m[:, None] * model.blocks[l].mlp.W_out  # [neuron, d_model]
        augmented = base[None] + subvalues
        lp = torch.log_softmax(frozen_bs(model, augmented, s, paper_compat), -1)[:, w]
        lp0 = torch.log_softmax(frozen_bs(model, base, s, paper_compat), -1)[w]
        out.append(lp - lp0)
    return torch.stack(out), w


@torch.no_grad()
def literal_attention_scores(model, tokens, target=None, paper_compat=False, layers=None):
    """[layer, pos, head, d_head] log-prob increases for one unpadded prompt; only the given
    ``layers`` (in that order) when given."""
    logits, cache = _run(model, tokens)
    T = len(tokens) - 1
    w = int(logits[T].argmax()) if target is None else target
    s = cache["ln_final.hook_scale"][0, T, 0]
    H = model.cfg.n_heads
    out = []
    for l in range(model.cfg.n_layers) if layers is None else layers:
        base = cache[f"blocks.{l}.hook_resid_pre"][0, T]
        alpha = cache[f"blocks.{l}.attn.hook_pattern"][0, :, T, :]  # [head, pos]
        v = cache[f"blocks.{l}.attn.hook_v"][0]  # [pos, kv_head, d_head]
        v = v.repeat_interleave(H // v.shape[1], dim=1)  # [pos, head, d_head]
        subvalues = alpha.T[:, :, None] * v  # [pos, head, d_head]
        W_O = model.blocks[l].attn.W_O  # [head, d_head, d_model]
        vectors = subvalues[..., None] * W_O[None]  # [pos, head, d_head, d_model]
        augmented = base + vectors
        lp = torch.log_softmax(frozen_bs(model, augmented, s, paper_compat), -1)[..., w]
        lp0 = torch.log_softmax(frozen_bs(model, base, s, paper_compat), -1)[w]
        out.append(lp - lp0)
    return torch.stack(out), w


@torch.no_grad()
def literal_layer_scores(model, tokens, target=None, paper_compat=False):
    """[layer, 2] (attention, FFN) log-prob increases."""
    logits, cache = _run(model, tokens)
    T = len(tokens) - 1
    w = int(logits[T].argmax()) if target is None else target
    s = cache["ln_final.hook_scale"][0, T, 0]

    def lp(x):
        return torch.log_softmax(frozen_bs(model, x, s, paper_compat), -1)[w]

    rows = []
    for l in range(model.cfg.n_layers):
        pre = cache[f"blocks.{l}.hook_resid_pre"][0, T]
        mid = cache[f"blocks.{l}.hook_resid_mid"][0, T]
        attn = cache[f"blocks.{l}.hook_attn_out"][0, T]
        mlp = cache[f"blocks.{l}.hook_mlp_out"][0, T]
        rows.append(torch.stack([lp(pre + attn) - lp(pre), lp(mid + mlp) - lp(mid)]))
    return torch.stack(rows), w


@torch.no_grad()
def literal_head_scores(model, tokens, target=None, paper_compat=False):
    """[layer, head] log-prob increases of z @ W_O on resid_pre."""
    logits, cache = _run(model, tokens)
    T = len(tokens) - 1
    w = int(logits[T].argmax()) if target is None else target
    s = cache["ln_final.hook_scale"][0, T, 0]
    out = []
    for l in range(model.cfg.n_layers):
        pre = cache[f"blocks.{l}.hook_resid_pre"][0, T]
        z = cache[f"blocks.{l}.attn.hook_z"][0, T]  # [head, d_head]
        heads = torch.stack([z[h] @ model.blocks[l].attn.W_O[h] for h in range(z.shape[0])])
        lp = torch.log_softmax(frozen_bs(model, pre + heads, s, paper_compat), -1)[:, w]
        lp0 = torch.log_softmax(frozen_bs(model, pre, s, paper_compat), -1)[w]
        out.append(lp - lp0)
    return torch.stack(out), w
