"""The arithmetic paper's applications (Figure 2, Tables 9-13) on the shipped model or SmolLM2.

Run (the numbers in docs/applications.md come from these commands; heavy, so under the lock):

    flock /tmp/mechcna-heavy.lock .venv/bin/python examples/applications.py --model shipped
    flock /tmp/mechcna-heavy.lock .venv/bin/python examples/applications.py --model smollm2

Writes ``<out>/results.json``, one CSV per table and a self-contained HTML report
(:mod:`mechcna.report.page`), and prints the tables as Markdown.
"""

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).parent))

import mechcna
from mechcna.applications.bias import gender_bias_experiment
from mechcna.applications.lora import LoraSweep, lora_layer_sweep
from mechcna.applications.lora_analysis import (
    coefficient_increase_per_case,
    coefficient_increase_table,
    coefficient_table,
    compare_lora,
)
from mechcna.applications.pruning import pruning_experiment
from mechcna.reproduce.application_claims import application_claims
from mechcna.reproduce.core import claims_frame
from mechcna.tasks import occupations
from mechcna.tasks.arithmetic import arithmetic_problems

PAPER = {
    "figure2": "original 62.96%; LoRA layers 1-9 about 90%, falling from layer 10",
    "table10": {"1-9": [42, 49, 57, 59], "10-16": [29, 36, 44, 53], "17-30": [2, 11, 14, 28]},
    "table11": {"origin": 62.9, "lora": 89.3, "lora_pruned_cna": 82.3, "lora_pruned_random": 17.1},
    "table13": {"total": (1.26, 0.81), "woman": (1.45, 1.04), "man": (1.08, 0.59)},
}
ENGLISH = [
    "The cat sat on the mat and looked out of the window.",
    "Paris is the capital of France and a popular tourist destination.",
    "Water boils at one hundred degrees Celsius at sea level.",
    "She opened the book and began to read the first chapter.",
    "The train to London leaves at nine o'clock every morning.",
    "Plants need sunlight, water and air to grow.",
    "He bought a loaf of bread and some milk at the shop.",
    "The meeting was postponed until next Tuesday afternoon.",
    "Mount Everest is the highest mountain in the world.",
    "Children were playing football in the park after school.",
    "The museum is closed on Mondays and public holidays.",
    "A week has seven days and a year has twelve months.",
    "The river flows through the valley towards the sea.",
    "They planted tomatoes and beans in the garden this spring.",
    "The computer restarted after installing the update.",
    "Music can change the mood of a room in seconds.",
]
SETTINGS = {
    "shipped": dict(
        layers=[0, 1, 2, 3], templates=[1, 2, 3, 4], train_pairs=400, test_pairs=60, steps=300,
        lr=3e-3, rank=8,
        batch_size=32, cna_cases=24, prune_layers=[2, 3], prune_k=4, prune_pairs=None,
        prune_templates=[1, 2, 3, 4], groups=None,
    ),
    "smollm2": dict(
        # template 3 only: SmolLM2's tokenizer merges "=-" (template 4, negative answers) into
        # one token, and template 3 is the shortest sentence (CPU time per step)
        layers=[1, 9, 24], templates=[3], train_pairs=300, test_pairs=16, steps=30,
        lr=2e-3, rank=8, batch_size=16, cna_cases=4, prune_layers=list(range(16, 30)), prune_k=60,
        prune_pairs=2, prune_templates=[4],
        groups={"1-9": range(1, 10), "10-16": range(10, 17), "17-29": range(17, 30)},
    ),
}  # fmt: skip
# the same on 2-digit multiplication, which the shipped model half knows (0.60 held-out
# accuracy), unlike negative differences, which it never saw in training
SETTINGS["shipped-mul"] = SETTINGS["shipped"] | {"model": "shipped", "operations": ["*"]}


def load(name: str):
    if name == "shipped":
        return mechcna.load_model("mechcna/arith-small")
    from _smollm2 import load_smollm2

    return load_smollm2()


def emit(*parts: object) -> None:
    sys.stdout.write(" ".join(map(str, parts)) + "\n")
    sys.stdout.flush()


def md(frame: pd.DataFrame, index: bool = False) -> str:
    """A Markdown table (floats to 3 decimals)."""
    f = frame.reset_index() if index else frame
    fmt = [f"{v:.3f}" if isinstance(v, float) else str(v) for v in f.to_numpy().ravel()]
    rows = [fmt[i : i + f.shape[1]] for i in range(0, len(fmt), f.shape[1])]
    lines = ["| " + " | ".join(map(str, f.columns)) + " |", "|" + "---|" * f.shape[1]]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", choices=sorted(SETTINGS), default="shipped")
    ap.add_argument("--out", default=None)
    ap.add_argument("--stages", default="lora,cna,prune,bias")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--layers", type=int, nargs="+", default=None, help="override LoRA layers")
    ap.add_argument("--progress", action="store_true")
    ap.add_argument("--quick", action="store_true", help="tiny settings, to check the script")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    s = dict(SETTINGS[args.model])
    if args.layers:
        s["layers"] = args.layers
    if args.quick:
        s |= dict(train_pairs=30, test_pairs=5, steps=3, cna_cases=3, prune_pairs=2)
        s["layers"] = s["layers"][:2]
    out = Path(args.out or f"docs/applications/{args.model}")
    out.mkdir(parents=True, exist_ok=True)
    stages = set(args.stages.split(","))
    results: dict = {"model": args.model, "settings": {k: str(v) for k, v in s.items()}}
    walls: dict[str, float] = {}
    tables: dict[str, pd.DataFrame] = {}
    t0 = time.perf_counter()
    model = load(s.get("model", args.model))
    walls["load"] = time.perf_counter() - t0
    data_kw = dict(tokenizer=model, nonnegative_subtraction=False, templates=s["templates"])
    ops = s.get("operations", ["+", "-"])
    train = mechcna.arithmetic_dataset(
        ops, 2, n_pairs=s["train_pairs"], split="train", seed=1, **data_kw
    )
    test = mechcna.arithmetic_dataset(
        ops, 2, n_pairs=s["test_pairs"], split="heldout", seed=2, **data_kw
    )
    results["data"] = {"train_cases": len(train), "test_cases": len(test), "operations": ops}
    lora_kw = {k: s[k] for k in ("steps", "lr", "rank", "batch_size")}
    lora_kw |= {"seed": 0, "targets": ("q", "k", "v", "o")}
    if not stages & {"lora", "cna", "prune"}:
        _bias(args, model, test, tables, results, walls)
        return _finish(out, model, tables, results, walls, None)
    if "lora" in stages:
        t0 = time.perf_counter()
        sweep = lora_layer_sweep(
            model, s["layers"], train, test=test, keep_models=False, progress=args.progress,
            **lora_kw,
        )  # fmt: skip
        walls["figure2"] = time.perf_counter() - t0
        sweep = _merge_sweeps(out / "lora_sweep.pt", sweep)
        torch.save(sweep, out / "lora_sweep.pt")  # for later stages (--stages cna,prune)
        fig2 = sweep.to_frame()
        tables["figure2"] = fig2
        results["original_accuracy"] = sweep.original_accuracy
        results["figure2"] = fig2.to_dict("records")
        results["lora_settings"] = sweep.runs[0].settings
        emit("## Figure 2\noriginal accuracy", round(sweep.original_accuracy, 3))
        emit(md(fig2))
        _save(out, tables, results, walls)  # kept if a later stage is cut short
    else:
        sweep = torch.load(out / "lora_sweep.pt", weights_only=False)
    best = max(sweep.runs, key=lambda r: r.accuracy_after)
    if "cna" in stages:
        t0 = time.perf_counter()
        cases = test.filter(template=s["templates"][-1], step=0)
        pick = torch.randperm(len(cases), generator=torch.Generator().manual_seed(0))
        cases = [cases[int(i)] for i in pick[: s["cna_cases"] - 1]]
        prompts = ["3+5=", *[c.prompt for c in cases]]
        targets = ["8", *[c.target for c in cases]]
        comps = {}
        for run in sweep.runs:
            lora_model = run.apply_to(model)
            comps[run.layers[0]] = compare_lora(model, lora_model, prompts, targets)
            del lora_model
        walls["tables9_10"] = time.perf_counter() - t0
        t9 = coefficient_table(comps, prompt=0, k=3, rank_by=best.layers[0])
        t10 = coefficient_increase_table(comps, groups=s["groups"])
        tables["table9"], tables["table10"] = t9, t10
        results["table9"] = t9.to_dict("records")
        results["table10"] = t10.reset_index().to_dict("records")
        # per case, for the verdicts (mechcna.reproduce.application_claims)
        results["n_layers"] = int(model.cfg.n_layers)
        results["table10_per_case"] = {
            l: {k: v.tolist() for k, v in coefficient_increase_per_case(c).items()}
            for l, c in comps.items()
        }
        emit("## Table 9 (coefficients on 3+5=; neurons ranked by LoRA layer", best.layers[0], ")")
        emit(md(t9))
        emit("## Table 10 (% coefficient increase of the top-K CNA neurons)")
        emit(md(t10, index=True))
        _save(out, tables, results, walls)  # kept if a later stage is cut short
    if "prune" in stages:
        t0 = time.perf_counter()
        lora_model = best.apply_to(model)
        prune_ds = mechcna.arithmetic_dataset(
            ["+", "-", "*", "/"], 1, s["prune_templates"], s["prune_pairs"], tokenizer=model,
            seed=3,
        )  # fmt: skip
        comp = compare_lora(model, lora_model, prune_ds.prompts, prune_ds.targets)
        walls["table11_cna"] = time.perf_counter() - t0
        res = pruning_experiment(
            model, comp.comparison, s["prune_layers"], best.layers[0], train, test,
            lora_accuracy=best.accuracy_after, k=s["prune_k"], progress=args.progress, **lora_kw,
        )  # fmt: skip
        walls["table11"] = time.perf_counter() - t0
        t11 = res.to_frame()
        tables["table11"] = t11
        results["table11"] = {
            "accuracy": res.accuracy, "n_pruned": res.n_pruned, "n_total": res.n_total,
            "pruned_share": res.pruned_share, "cna_cases": len(prune_ds),
            "lora_layer": best.layers[0], "wall_s": res.wall_s,
            "correct": {k: [int(c) for c in v] for k, v in res.correct.items()},
        }  # fmt: skip
        emit(
            f"## Table 11 (LoRA layer {best.layers[0]}; pruned {res.n_pruned}/{res.n_total} = "
            f"{100 * res.pruned_share:.1f}% of layers {res.layers}; {len(prune_ds)} CNA cases)"
        )
        emit(md(t11))
        _save(out, tables, results, walls)  # kept if a later stage is cut short
        del lora_model
    if "bias" in stages:
        _bias(args, model, test, tables, results, walls)
    return _finish(out, model, tables, results, walls, sweep)


def _merge_sweeps(path: Path, sweep: LoraSweep) -> LoraSweep:
    """Add the runs of an earlier process on other layers (same test set) to ``sweep``."""
    if not path.exists():
        return sweep
    old = torch.load(path, weights_only=False)
    if abs(old.original_accuracy - sweep.original_accuracy) > 1e-9:
        return sweep  # another test set: start afresh
    runs = {r.layers: r for r in old.runs} | {r.layers: r for r in sweep.runs}
    return replace(sweep, runs=tuple(runs[k] for k in sorted(runs)))


def _bias(args, model, test, tables, results, walls) -> None:
    t0 = time.perf_counter()
    if args.model.startswith("shipped"):
        templates = occupations.TEMPLATES
        probs = arithmetic_problems(["+", "-"], 2, n_pairs=20, split="heldout", seed=5)
        neutral = [
            f"{t.format(g=g)} {p}"
            for t in occupations.TEMPLATES[:2] for g in occupations.GENDERS
            for p in occupations.NEUTRAL
        ]  # fmt: skip
        text = [p.text + p.separator + p.answer for p in probs] + neutral
    else:
        from mechcna.applications.bias import PAPER_TEMPLATES

        templates, text = PAPER_TEMPLATES, ENGLISH
    res_b = gender_bias_experiment(
        model, templates=templates, cost_data=test, cost_text=text, n_random=3
    )
    walls["tables12_13"] = time.perf_counter() - t0
    t13 = res_b.metrics
    t12 = res_b.neurons.to_frame()
    tables["table12"], tables["table13"] = t12, t13
    gaps = res_b.gaps.pivot(index="profession", columns="model", values="gap")
    tables["bias_gaps"] = gaps
    results["table12"] = t12.to_dict("records")
    results["table13"] = t13.reset_index().to_dict("records")
    results["bias_settings"] = {k: v for k, v in res_b.settings.items() if k not in ("templates",)}
    results["bias_reduction_pct"] = res_b.reduction("abs_total")
    results["bias_reduction_signed_pct"] = res_b.reduction("signed_total")
    emit("## Table 12 (top neurons)")
    emit(md(t12))
    emit("## Table 13")
    emit(md(t13, index=True))
    emit("## per-profession gap (nats)")
    emit(md(gaps, index=True))


def _save(out, tables, results, walls) -> dict:
    """Merge the numbers so far into ``results.json`` (stages may run as separate processes)
    and write each table's CSV."""
    path = out / "results.json"
    old = json.loads(path.read_text()) if path.exists() else {}
    merged = old | results
    merged["wall_s"] = old.get("wall_s", {}) | walls
    path.write_text(json.dumps(merged, indent=1, default=str))
    for name, t in tables.items():
        t.to_csv(out / f"{name}.csv")
    return merged


def _finish(out, model, tables, results, walls, sweep) -> int:
    """Save, then rebuild the report from every stage's CSVs."""
    merged = _save(out, tables, results, walls)
    verdicts = claims_frame(application_claims(merged))  # n, interval, verdict per claim
    verdicts.to_csv(out / "verdicts.csv", index=False)
    emit("## Verdicts\n" + md(verdicts.drop(columns=["paper"])))
    every = {
        name: pd.read_csv(out / f"{name}.csv", index_col=0)
        for name in CAPTIONS
        if (out / f"{name}.csv").exists()
    }
    if sweep is None and (out / "lora_sweep.pt").exists():
        sweep = torch.load(out / "lora_sweep.pt", weights_only=False)
    _report(model, out, every, merged, sweep)
    emit("wall times (s):", {k: round(v, 1) for k, v in walls.items()})
    return 0


CAPTIONS = {
    "figure2": ("accuracy per LoRA layer", "ARITH Fig. 2"),
    "table9": ("coefficients of the top CNA neurons on 3+5=", "ARITH Table 9"),
    "table10": ("% coefficient increase of top-K CNA neurons", "ARITH Table 10"),
    "table11": ("CNA-guided vs random pruning", "ARITH Table 11"),
    "table12": ("gender-bias neurons", "ARITH Table 12"),
    "table13": ("bias before/after zeroing", "ARITH Table 13"),
    "bias_gaps": ("per-profession gap", "ARITH Table 23"),
}


def _report(model, out: Path, tables, results, sweep) -> None:
    from mechcna.report.page import Provenance, Report

    report = Report(
        f"Applications of CNA on {results['model']}",
        Provenance.from_model(model, seed=0, command="examples/applications.py"),
        intro="LoRA per attention layer, CNA of LoRA, CNA-guided pruning, gender-bias editing.",
    )
    report.section("Figure 2 and Tables 9-13", PAPER["figure2"])
    if sweep is not None:
        report.figure(sweep.plot(), "accuracy after LoRA on one layer", paper_ref="ARITH Fig. 2")
    for name, t in tables.items():
        cap, ref = CAPTIONS[name]
        report.table(
            t, cap, paper_ref=ref, name=name, index=name in ("table10", "table13", "bias_gaps")
        )
    report.write(out / "report")


if __name__ == "__main__":
    raise SystemExit(main())
