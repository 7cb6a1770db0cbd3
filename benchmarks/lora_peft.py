"""Benchmark: peft's ``target_parameters`` LoRA vs mechcna's hand-written LoRA
(mechcna.applications.lora).

Run on demand (needs ``pip install "peft>=0.17"``; not a mechcna dependency):
``.venv/bin/python benchmarks/lora_peft.py``

On the shipped model (``mechcna/arith-small``), LoRA on layer 1's ``W_Q``, ``_W_V`` and ``W_O``:

1. peft as documented: ``get_peft_model(model, LoraConfig(target_parameters=[...]))``, then a
   forward pass. Records the error and the adapter shapes peft created.
2. peft with a shim that passes TransformerLens's keyword-only ``query_input`` positionally:
   equality with the original at initialisation, and the time of forward+backward steps.
3. mechcna.applications.lora (``torch.nn.utils.parametrize``): the same checks, same batch, same
steps.
"""

import copy
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mechcna import arithmetic_dataset, load_model
from mechcna.applications.lora import attach_lora
from mechcna.interventions.prompts import prepare_prompts, single_token_ids

PARAMS = ["blocks.1.attn.W_Q", "blocks.1.attn._W_V", "blocks.1.attn.W_O"]


class Shim(nn.Module):
    """Calls a peft-wrapped attention with ``query_input`` as its first positional argument."""

    def __init__(self, wrapped: nn.Module) -> None:
        super().__init__()
        self.wrapped = wrapped

    def forward(self, query_input, key_input, value_input, **kw):
        return self.wrapped(query_input, key_input=key_input, value_input=value_input, **kw)


def steps(model, params, tokens, pos, target, n=50):
    opt = torch.optim.AdamW(params, lr=1e-3)
    rows = torch.arange(len(tokens))
    start = time.perf_counter()
    for _ in range(n):
        loss = nn.functional.cross_entropy(model(tokens)[rows, pos], target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return (time.perf_counter() - start) / n


def main() -> None:
    torch.set_num_threads(1)
    import peft
    from peft import LoraConfig, get_peft_model

    model = load_model("mechcna/arith-small")
    data = arithmetic_dataset("+", 2, n_pairs=8, tokenizer=model)[:32]
    batch = prepare_prompts(model, data.prompts)
    target = single_token_ids(model, data.targets)
    tokens, pos = batch.tokens, batch.positions
    with torch.no_grad():
        ref = model(tokens)
    print(f"peft {peft.__version__}, torch {torch.__version__}, batch {tuple(tokens.shape)}")
    cfg = LoraConfig(r=8, lora_alpha=16, target_modules=[], target_parameters=PARAMS)
    pm = get_peft_model(copy.deepcopy(model), cfg)
    shapes = {n: tuple(p.shape) for n, p in pm.named_parameters() if p.requires_grad}
    print("peft adapter shapes:", shapes)
    try:
        pm(tokens)
        print("peft plain forward: ok")
    except TypeError as e:
        print("peft plain forward fails:", e)
    inner = pm.base_model.model
    inner.blocks[1].attn = Shim(inner.blocks[1].attn)
    with torch.no_grad():
        print("peft+shim, untrained, max |logit diff|:", float((pm(tokens) - ref).abs().max()))
    p_params = [p for p in pm.parameters() if p.requires_grad]
    t_peft = steps(pm, p_params, tokens, pos, target)
    own = copy.deepcopy(model)
    adapters = attach_lora(own, 1, ("q", "v", "o"), rank=8, alpha=16)
    with torch.no_grad():
        print("mechcna, untrained, max |logit diff|:", float((own(tokens) - ref).abs().max()))
    o_params = [p for a in adapters.values() for p in (a.down, a.up)]
    t_own = steps(own, o_params, tokens, pos, target)
    n_p, n_o = sum(p.numel() for p in p_params), sum(p.numel() for p in o_params)
    print(f"trainable parameters: peft {n_p}, mechcna {n_o}")
    print(f"step time: peft+shim {1e3 * t_peft:.1f} ms, mechcna {1e3 * t_own:.1f} ms, "
          f"ratio {t_peft / t_own:.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
