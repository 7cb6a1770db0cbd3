"""Throughput of ``head_sweep`` on a local Ray cluster against one process.

Runs every head over the first ``--cases`` cases of the 1-digit ``+`` set (template 1; or of a
mixed set, ``--set mixed``):

* one process with 1 and with 2 torch threads (``--threads``; the last is the reference);
* ``mechcna.distributed.head_sweep`` with 1 worker and with ``--workers`` workers of one thread
  each (a local cluster of that many CPUs), each timed after a warm-up call that starts the
  workers and loads their model replicas (the steady state of a long run).

Checks that every distributed result equals the single-process one (predictions and
correctness identical, log-probs to 1e-5), and reports cases per second, the ratio to the
baseline, and the per-task overhead (``wall x workers - time inside the tasks``, per task,
from :data:`mechcna.distributed.LAST_RUN`). Writes JSON to ``--out``. Heavy on SmolLM2: run it
under the shared lock::

    flock /tmp/mechcna-heavy.lock .venv/bin/python benchmarks/ray_head_sweep.py --model smollm2-135m
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import mechcna  # noqa: E402
from mechcna import distributed  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="mechcna/arith-small")
    ap.add_argument("--cases", type=int, default=64)
    ap.add_argument(
        "--set",
        choices=["plus1", "mixed"],
        default="plus1",
        help="plus1: 1-digit + template 1; mixed: + and -, 1-2 digits, 4 templates",
    )
    ap.add_argument(
        "--threads",
        type=int,
        nargs="+",
        default=[1, 2],
        help="threads of the one-process baselines (the last is the reference)",
    )
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=32, help="cases per pass (case shards)")
    ap.add_argument("--heads-per-pass", type=int, default=8)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    load = {"device": "cpu"}
    model = mechcna.load_model(args.model, **load)
    if args.set == "plus1":
        data = mechcna.arithmetic_dataset("+", 1, templates=1, n_pairs=None, tokenizer=model)
    else:
        data = mechcna.arithmetic_dataset(["+", "-"], [1, 2], n_pairs=200, tokenizer=model)
    prompts, targets = list(data.prompts)[: args.cases], list(data.targets)[: args.cases]
    opts = {"batch_size": args.batch_size, "heads_per_pass": args.heads_per_pass,
            "progress": False}  # fmt: skip
    n_heads = model.cfg.n_layers * model.cfg.n_heads
    out: dict = {"model": args.model, "set": args.set, "cases": len(prompts), "heads": n_heads,
                 **opts,
                 "load_start": os.getloadavg()}  # fmt: skip
    print(json.dumps(out), flush=True)

    want = None
    for threads in args.threads:
        torch.set_num_threads(threads)
        mechcna.head_sweep(model, prompts[:2], targets[:2], **opts)  # warm-up
        t = time.perf_counter()
        want = mechcna.head_sweep(model, prompts, targets, **opts)
        wall = time.perf_counter() - t
        out[f"one_process_{threads}_threads"] = {"wall_s": wall, "cases_per_s": len(prompts) / wall}
        print(json.dumps({f"one_process_{threads}_threads": wall}), flush=True)
    assert want is not None
    base = out[f"one_process_{args.threads[-1]}_threads"]["wall_s"]
    torch.set_num_threads(1)  # the driver only waits

    distributed.connect(num_cpus=args.workers)
    for workers in sorted({1, args.workers}):
        kw = {"load": load, "workers": workers, "case_shards": None, **opts}
        distributed.head_sweep(args.model, prompts[:2], targets[:2], **kw)  # start + load
        t = time.perf_counter()
        got = distributed.head_sweep(args.model, prompts, targets, **kw)
        wall = time.perf_counter() - t
        run = dict(distributed.LAST_RUN)
        same = bool(torch.equal(got.prediction, want.prediction)) and bool(
            torch.equal(got.correct, want.correct)
        )
        diff = float((got.logprob - want.logprob).abs().max())
        overhead = (run["wall_s"] * run["workers"] - run["task_s"]) / run["tasks"]
        rec = {
            "workers": workers,
            "threads_per_worker": 1,
            "wall_s": wall,
            "cases_per_s": len(prompts) / wall,
            "vs_one_process": base / wall,
            "tasks": run["tasks"],
            "task_s_sum": run["task_s"],
            "overhead_s_per_task": overhead,
            "overhead_fraction": overhead / (run["task_s"] / run["tasks"]),
            "identical_predictions": same,
            "max_abs_logprob_diff": diff,
        }
        out[f"ray_{workers}"] = rec
        print(json.dumps(rec), flush=True)
    out["load_end"] = os.getloadavg()
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
