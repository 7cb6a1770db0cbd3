"""The main demo: the papers' arithmetic pipeline on the model that ships with the package.

Offline, on ``mechcna/arith-small`` (trained by ``mechcna train-arithmetic``):

1. the residual self-check and held-out accuracy per cell;
2. the arithmetic-head sweep: which heads' zero-ablation hurts addition most;
3. log-probability-increase attribution on one prompt (layers, top FFN neurons);
4. Comparative Neuron Analysis against the top addition head over addition cases: the top
   CNA neurons with their tokens, and the mask / keep / random table (the paper's Table 5).

Figures are written as HTML files into ``out_dir`` (default ``runs/demo``).
"""

import io
import math
from pathlib import Path

import torch

from mechcna.attribution import layer_importance, neuron_importance
from mechcna.backend import Model
from mechcna.check import check_model
from mechcna.comparative import cna_table, compare_neurons, mask_keep_table
from mechcna.evaluation import evaluate_accuracy
from mechcna.heads import head_sweep
from mechcna.interventions import HeadAblation
from mechcna.models import SHIPPED_MODELS, load_model
from mechcna.plotting import experiment_bars
from mechcna.tasks.arithmetic import ArithmeticDataset, arithmetic_dataset


def _write(fig, out_dir: Path, name: str, out: io.StringIO) -> None:
    path = out_dir / f"{name}.html"
    fig.write_html(path, include_plotlyjs=True)
    out.write(f"  figure: {path}\n")


def run(
    model_name: str | None = None,
    progress: bool = True,
    out_dir: str | Path = "runs/demo",
    n_pairs: int = 40,
) -> str:
    """Run the demo and return its report as text."""
    with torch.no_grad():
        return _run(model_name, progress, Path(out_dir), n_pairs)


def _run(model_name: str | None, progress: bool, out_dir: Path, n_pairs: int) -> str:
    out = io.StringIO()
    out_path = out_dir
    out_path.mkdir(parents=True, exist_ok=True)
    model: Model = load_model(model_name or next(iter(SHIPPED_MODELS)), device="cpu")
    cfg = model.cfg
    out.write(
        f"== model {cfg.model_name}: {cfg.n_layers} layers x {cfg.n_heads} heads, d_model "
        f"{cfg.d_model}, {cfg.d_mlp} FFN neurons per layer, vocabulary {cfg.d_vocab}\n"
    )
    report = check_model(model)
    out.write(f"residual self-check passed (max relative error {report.max_error:.1e})\n")

    data = arithmetic_dataset(
        ["+", "-"], [1, 2], n_pairs=n_pairs, tokenizer=model.tokenizer, split="heldout", seed=0
    )
    acc = evaluate_accuracy(model, data, progress=progress)
    out.write(f"\n== held-out accuracy ({len(data)} teacher-forced cases)\n")
    cells = acc.to_frame(("operation", "digits"))
    out.write(cells.to_string(index=False) + "\n")
    _write(acc.plot(), out_path, "accuracy", out)

    sweep = head_sweep(model, data, progress=progress)
    out.write("\n== heads whose zero-ablation lowers accuracy most (paper Tables 1-2)\n")
    out.write(sweep.table(by="operation", k=3).to_string() + "\n")
    add = sweep.top(5, cell={"operation": "+"})
    out.write("top heads on addition:\n" + add.to_string(index=False) + "\n")
    layer, head = int(add.iloc[0]["layer"]), int(add.iloc[0]["head_index"])
    _write(sweep.plot(operation="+"), out_path, "head_sweep_addition", out)

    prompt = "3+5="
    layers = layer_importance(model, [prompt])
    target = layers.targets[0]
    out.write(
        f"\n== attribution on {prompt!r}: target {target!r}, "
        f"p = {math.exp(float(layers.final_logprob[0])):.3f}\n"  # type: ignore[index]
    )
    out.write("log-prob increase per layer (attention, FFN):\n")
    for l in range(cfg.n_layers):
        a, f = layers.scores[0, l].tolist()
        out.write(f"  layer {l}: attention {a:+.3f}  FFN {f:+.3f}\n")
    ffn = neuron_importance(model, [prompt])
    out.write("top FFN neurons:\n" + ffn.top(5, prompt=0).to_string(index=False) + "\n")
    _write(layers.plot(0), out_path, "layers", out)

    cases = data.filter(operation="+", digits=1)
    correct = evaluate_accuracy(model, cases, progress=False).correct
    kept = tuple(c for c, ok in zip(cases, correct.tolist(), strict=True) if ok)
    cases = ArithmeticDataset(kept, cases.policies)
    ablation = HeadAblation([(layer, head)])
    cna = compare_neurons(model, cases.prompts, ablation, cases.targets)
    out.write(
        f"\n== CNA against ablating head {layer}_{head} on {len(cases)} correct 1-digit "
        f"addition cases\n"
    )
    out.write(f"case {cases.prompts[0]!r} -> {cases.targets[0]!r}:\n")
    out.write(cna_table(model, cna, prompt=0, k=8).to_string(index=False) + "\n")
    out.write("neurons most often in a case's top-10:\n")
    out.write(cna.counts(10).head(8).to_string(index=False) + "\n")
    ks = [k for k in (50, 20, 10, 5) if k <= int(cfg.d_mlp or 0)]
    table = mask_keep_table(
        model, cases.prompts, cna, ks=ks, deep_layers=range(layer, cfg.n_layers),
        progress=progress,
    )  # fmt: skip
    out.write("accuracy decrease % (mask / keep / random) and coefficient decrease % (coef):\n")
    out.write(table.round(1).to_string() + "\n")
    _write(cna.plot(k=15), out_path, "cna", out)
    _write(experiment_bars(table, "mask / keep / random (Table 5)"), out_path, "mask_keep", out)
    return out.getvalue()
