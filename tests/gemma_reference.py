"""A slow, literal reference for Gemma's sandwich norms and soft cap (fp64 tests and the
real Gemma 3 270M test).

Everything is recomputed from the modules' own weights: a post-norm's scale from the raw
(pre-norm) layer output, the final norm's from the final residual, and the soft cap by hand;
none of mechcna's capture, projection or engine code is used.
"""

import torch


def _rms_scale(x, eps):
    return (x.pow(2).mean(-1, keepdim=True) + eps).sqrt()


class Literal:
    """One prompt, its last position ``T``: everything recomputed from module weights."""

    @torch.no_grad()
    def __init__(self, model, prompt: str):
        self.model = model
        tokens = model.to_tokens(prompt)
        with torch.no_grad():
            self.logits, self.cache = model.run_with_cache(tokens)
        self.T = tokens.shape[1] - 1
        self.target = int(self.logits[0, self.T].argmax())
        self.eps = model.cfg.eps
        final = self.cache[f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"][0, self.T]
        self.final = final
        self.s_final = _rms_scale(final, self.eps)

    def act(self, name):
        return self.cache[name][0]

    @torch.no_grad()
    def logprob(self, x, chunk: int = 256):
        """log p(target | x) through the frozen final RMSNorm, W_U and the soft cap (rows of a
        ``[..., d_model]`` batch ``chunk`` at a time)."""
        if x.ndim > 1 and x[..., 0].numel() > chunk:
            rows = x.reshape(-1, x.shape[-1])
            parts = [self.logprob(rows[i : i + chunk]) for i in range(0, len(rows), chunk)]
            return torch.cat(parts).reshape(x.shape[:-1])
        m = self.model
        logits = (x / self.s_final * m.ln_final.w) @ m.W_U + m.b_U
        c = m.cfg.output_logits_soft_cap
        if c > 0:
            logits = c * torch.tanh(logits / c)
        return torch.log_softmax(logits, -1)[..., self.target]

    @torch.no_grad()
    def mlp(self, l):
        """Per-neuron residual contributions at T, and the post-norm scale."""
        block = self.model.blocks[l]
        post = self.act(f"blocks.{l}.mlp.hook_post")[self.T]
        raw = post @ block.mlp.W_out + block.mlp.b_out
        s = _rms_scale(raw, self.eps)
        return post[
            :, None
        ] * block.mlp.W_out * block.ln2_post.w / s, block.mlp.b_out * block.ln2_post.w / s

    @torch.no_grad()
    def attention(self, l):
        """Per-attention-neuron contributions [pos, head, d_head, d_model] at T, and b_O's."""
        block, H = self.model.blocks[l], self.model.cfg.n_heads
        pattern = self.act(f"blocks.{l}.attn.hook_pattern")[:, self.T]  # head pos
        v = self.act(f"blocks.{l}.attn.hook_v")  # pos kv d_head
        v = v.repeat_interleave(H // v.shape[1], dim=1)
        coef = pattern.T[:, :, None] * v  # pos head d_head
        raw = torch.einsum("phd,hdm->m", coef, block.attn.W_O) + block.attn.b_O
        s = _rms_scale(raw, self.eps)
        vectors = coef[..., None] * block.attn.W_O[None] * block.ln1_post.w / s
        return vectors, block.attn.b_O * block.ln1_post.w / s
