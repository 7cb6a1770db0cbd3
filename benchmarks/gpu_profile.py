"""Where a warm single-prompt attribution spends its time on a GPU (SmolLM2-135M, fp32).

    python benchmarks/gpu_profile.py OUTDIR [--model smollm2-135m] [--device cuda]

Times, one prompt at a time after a warm-up, ``neuron_importance`` and
``attention_neuron_importance`` with ``method="certified"`` (the default) and
``method="exact"``, and the vectorised literal method, then profiles one warm certified call
with ``torch.profiler`` (CPU and CUDA) and ``cProfile``. Writes ``OUTDIR/gpu_profile.json``
and the profiler tables ``OUTDIR/profile_ops.txt`` and ``OUTDIR/profile_python.txt``.
"""

import argparse
import cProfile
import io
import json
import pstats
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402

import mechcna  # noqa: E402
from mechcna.engine.blocks import BlockCache  # noqa: E402

PROMPTS = ["The capital of France is", "Tim Duncan plays the sport of", "3+5=",
           "The Eiffel Tower is in the city of", "The sum of 4 and 3 is"]  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--prompts", nargs="*", default=None, help="default: five knowledge prompts")
    args = ap.parse_args()
    prompts = args.prompts or PROMPTS
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dev = args.device

    def sync() -> None:
        if dev.startswith("cuda"):
            torch.cuda.synchronize()

    def timed(fn) -> float:
        sync()
        t = time.perf_counter()
        fn()
        sync()
        return time.perf_counter() - t

    model = mechcna.load_model(args.model, device=dev)
    cache = BlockCache(budget=24 * 2**30, disk=False)
    res: dict = {"model": args.model, "device": dev}
    for method in ("certified", "exact"):
        for kind, fn in (("ffn", mechcna.neuron_importance),
                         ("attention", mechcna.attention_neuron_importance)):  # fmt: skip
            fn(model, prompts[:1], cache=cache, method=method)  # warm-up (rows, kernels)
            ts = [timed(lambda p=p, f=fn, m=method: f(model, [p], cache=cache, method=m))
                  for p in prompts]  # fmt: skip
            res[f"{kind}_{method}_warm_s"] = sorted(ts)[len(ts) // 2]
            res[f"{kind}_{method}_batch5_s"] = timed(
                lambda f=fn, m=method: f(model, prompts, cache=cache, method=m)
            )
    from gpu_bench import literal_all_layers

    tokens = model.to_tokens(prompts[0])[0]
    literal_all_layers(model, tokens)
    res["literal_all_neurons_s"] = timed(lambda: literal_all_layers(model, tokens))
    (out / "gpu_profile.json").write_text(json.dumps(res, indent=2))
    print(json.dumps(res, indent=2))

    acts = [torch.profiler.ProfilerActivity.CPU]
    if dev.startswith("cuda"):
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=acts) as prof:
        mechcna.neuron_importance(model, [prompts[1]], cache=cache)
        sync()
    ops = prof.key_averages()
    text = ops.table(sort_by="self_cpu_time_total", row_limit=30)
    if dev.startswith("cuda"):
        text += "\n\n" + ops.table(sort_by="self_cuda_time_total", row_limit=20)
    (out / "profile_ops.txt").write_text(text)
    print(text[:6000])
    pr = cProfile.Profile()
    pr.enable()
    mechcna.neuron_importance(model, [prompts[2]], cache=cache)
    sync()
    pr.disable()
    s = io.StringIO()
    pstats.Stats(pr, stream=s).sort_stats("cumulative").print_stats(40)
    (out / "profile_python.txt").write_text(s.getvalue())
    print(s.getvalue()[:5000])


if __name__ == "__main__":
    main()
