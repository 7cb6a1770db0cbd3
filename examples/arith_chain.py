"""The four-stage arithmetic chain on the shipped model (ARITH sections 3-4, docs/methods.md 6-8).

Run: ``.venv/bin/python examples/arith_chain.py [--head L.H] > docs/arith_chain.md``

1. prediction by arithmetic heads: the head sweep over held-out addition cases;
2. prediction enhancing: CNA against the chosen head, the top neurons with their tokens, the
   mask / keep / random table (Table 5), the lowest-neuron ablation (Table 6) and the
   value-to-key inner products among the top neurons;
3. transfer by shallow attention: which source positions and heads feed the top CNA neuron's
   keys;
4. feature enhancing by shallow FFN neurons: attention-transformed tokens of the operands and
   the zero-shot search for hidden-interpretable shallow neurons with its masking experiment.
"""

import argparse
import sys

import torch

import mechcna
from mechcna.analyses.case_ablation import lowest_neuron_table, mask_keep_table
from mechcna.analyses.comparative import cna_table, compare_neurons, value_key_products
from mechcna.analyses.key_scores import head_scores, source_position_scores
from mechcna.analyses.shallow import hidden_interpretable_neurons, mask_experiment
from mechcna.analyses.transfer import ffn_keys, transform_through_attention
from mechcna.tasks.arithmetic import ArithmeticDataset


def md(frame) -> str:
    return frame.to_markdown() if hasattr(frame, "to_markdown") else str(frame)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="mechcna/arith-small")
    p.add_argument("--head", default=None, help="LAYER.HEAD (default: the sweep's top head)")
    p.add_argument("--pairs", type=int, default=60)
    args = p.parse_args()
    torch.set_grad_enabled(False)
    out = sys.stdout.write
    model = mechcna.load_model(args.model, device="cpu")
    data = mechcna.arithmetic_dataset(
        ["+", "-"], [1, 2], n_pairs=args.pairs, tokenizer=model.tokenizer, split="heldout"
    )
    out(f"# The arithmetic chain on `{args.model}`\n\n")
    out(f"{len(data)} held-out teacher-forced cases (+ and -, 1 and 2 digits, 4 templates).\n\n")

    sweep = mechcna.head_sweep(model, data, progress=False)
    out("## 1. Arithmetic heads (zero-ablation, accuracy %)\n\n")
    out(sweep.table(by=["operation", "digits"], k=3).round(1).to_string() + "\n\n")
    add = sweep.top(model.cfg.n_layers * model.cfg.n_heads, cell={"operation": "+"})
    out("Relative accuracy decrease on addition, all heads:\n\n")
    cols = ["head", "accuracy", "base_accuracy", "relative_decrease"]
    out(add[cols].round(3).to_string(index=False) + "\n\n")
    median = float(add["relative_decrease"].median())
    if args.head:
        layer, head = (int(x) for x in args.head.split("."))
    else:
        layer, head = int(add.iloc[0]["layer"]), int(add.iloc[0]["head_index"])
    top_drop = float(add.set_index("head").loc[f"{layer}_{head}", "relative_decrease"])
    out(
        f"Chosen head **{layer}_{head}**: relative decrease {100 * top_drop:.1f}% on addition; "
        f"median head {100 * median:.1f}%.\n\n"
    )

    cases = data.filter(operation="+", digits=1)
    ok = mechcna.evaluate_accuracy(model, cases, progress=False).correct.tolist()
    cases = ArithmeticDataset(tuple(c for c, k in zip(cases, ok, strict=True) if k), cases.policies)
    cna = compare_neurons(
        model, cases.prompts, mechcna.HeadAblation([(layer, head)]), cases.targets
    )
    out(f"## 2. CNA against head {layer}_{head} ({len(cases)} correct 1-digit addition cases)\n\n")
    out(f"Case `{cases.prompts[0]}` -> `{cases.targets[0]}` (paper Table 4):\n\n")
    out(cna_table(model, cna, prompt=0, k=10).round(3).to_string(index=False) + "\n\n")
    out("Neurons most often in a case's top-10, with their tokens:\n\n")
    counts = cna.counts(10).head(10)
    counts["tokens"] = [
        ", ".join(mechcna.top_tokens(model, (int(l), int(n)), 8).top()["token"])
        for l, n in zip(counts["layer"], counts["neuron"], strict=True)
    ]
    out(counts.round(3).to_string(index=False) + "\n\n")
    ks = (100, 50, 30, 20, 10)
    deep = range(layer, model.cfg.n_layers)
    table = mask_keep_table(model, cases.prompts, cna, ks=ks, deep_layers=deep, progress=False)
    out(
        "Accuracy decrease % when each case's top-K CNA neurons are zeroed (mask), when every "
        f"other neuron of layers {deep.start}-{deep.stop - 1} is zeroed (keep), for K random "
        "neurons of those layers (random), and the coefficient decrease % (coef) "
        "(paper Table 5):\n\n"
    )
    out(table.round(1).to_string() + "\n\n")
    out("Lowest-layer neuron ablation: decrease % of the other top-K coefficients (Table 6):\n\n")
    out(lowest_neuron_table(model, cases.prompts, cna, ks=ks).round(1).to_string() + "\n\n")
    top_neurons = [(int(l), int(n)) for l, n in zip(counts["layer"], counts["neuron"], strict=True)]
    vk = value_key_products(model, top_neurons[:6], key="both")
    out("Value-to-key inner products among the most frequent top neurons (PE-DAG):\n\n")
    out(vk.to_frame().head(8).round(3).to_string(index=False) + "\n\n")

    prompt = cases.prompts[0]
    best = cna.top(1, prompt=0)
    nl, nk = int(best["layer"].iloc[0]), int(best["neuron"].iloc[0])
    keys = ffn_keys(model, nl, nk)
    out(f"## 3. Transfer: what feeds neuron {nl}_{nk}'s keys in `{prompt}`\n\n")
    src = source_position_scores(model, prompt, layer, keys)
    out(f"Attention layer {layer} output by source position:\n\n")
    out(src.to_frame().round(4).to_string(index=False) + "\n\n")
    pos = int(src.to_frame().sort_values("total", ascending=False)["value"].iloc[0])
    hs = head_scores(model, prompt, layer, keys, source_position=pos)
    out(f"Heads of layer {layer} at source position {pos}:\n\n")
    out(hs.to_frame().round(4).to_string(index=False) + "\n\n")

    out("## 4. Feature enhancing: operands read through attention (paper Table 7)\n\n")
    for tok in ("3", "5", "three"):
        try:
            t = transform_through_attention(model, tok, path=[(layer, head, 0)])
        except mechcna.MechcnaError as err:
            out(f"`{tok}`: {err}\n\n")
            continue
        out(f"`{tok}` through head {layer}_{head}:\n\n")
        out(t.tokens(8).to_frame().to_string(index=False) + "\n\n")
    if layer > 0:
        # The vocabulary has 99 tokens, so the paper's top-50 would be half of it: read the
        # top-10 tokens instead and raise the thresholds.
        search = hidden_interpretable_neurons(
            model, neuron_layers=range(layer), attention_layers=range(layer + 1), top=10,
            thresholds=(2, 4, 6, 8),
        )  # fmt: skip
        out("Zero-shot search for hidden-interpretable shallow neurons, top-10 tokens:\n\n")
        out(search.summary().to_string(index=False) + "\n\n")

        def evaluate(m, interventions) -> float:
            return mechcna.evaluate_accuracy(m, cases, interventions, progress=False).accuracy

        exp = mask_experiment(model, search, evaluate)
        out(exp.to_frame().round(3).to_string(index=False) + "\n\n")
    else:
        out("The chosen head is in layer 0: no shallow FFN layer precedes it.\n\n")


if __name__ == "__main__":
    main()
