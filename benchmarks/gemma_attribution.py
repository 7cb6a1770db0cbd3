"""Benchmark on Gemma 3 270M (262,144-token vocabulary): all FFN neurons against the literal.

Issue 25's target: all-FFN ``neuron_importance``, second single-prompt call, at least 10x
the vectorised literal in the same run, peak memory under 8 GB. Measured in one run, fp32,
torch's default thread count:

* the literal method (``tests/gemma_reference.py``: every neuron's contribution through the
  post-feedforward norm added to the base, frozen final norm, full unembedding,
  log-softmax), timed on ``--literal-layers`` and scaled to all 18 layers;
* ``neuron_importance`` with the default cache: one layer's FFN rows are 2048 x 262144
  (1 GiB as int16, 19.3 GB for 18 layers), more than the default budget (half the available
  memory) and the default disk cache (16 GiB), so no rows are kept and every call computes
  only the rows the second-order expansion cannot certify (``k2`` from a ``d_model x
  d_model`` covariance per prompt and layer); first, second and third prompts;
* with ``--disk-bytes N`` (e.g. 40G) the disk cache may hold all 18 layers: the first call
  fills it, later calls read int16 rows (from the page cache where it holds them); with
  ``--disk-dir DIR`` as well, a folder already filled (e.g. by ``mechcna reproduce``) is read
  from the first call on;
* max |fast - literal| on the literal layers; peak resident memory (VmHWM) of the process.

Run under the shared lock::

    flock /tmp/mechcna-heavy.lock .venv/bin/python benchmarks/gemma_attribution.py
"""

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

import mechcna  # noqa: E402
from mechcna import neuron_importance  # noqa: E402
from mechcna.engine.blocks import BlockCache  # noqa: E402
from tests.gemma_reference import Literal  # noqa: E402

PROMPTS = ["The capital of France is", "Tim Duncan plays the sport of",
           "The Eiffel Tower is in the city of"]  # fmt: skip


def memory() -> str:
    with open("/proc/self/status") as f:
        got = {line.split(":")[0]: int(line.split()[1]) / 2**20 for line in f
               if line.startswith(("VmHWM", "RssAnon", "RssFile"))}  # fmt: skip
    return ", ".join(f"{k} {v:.2f} GB" for k, v in got.items())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--literal-layers", type=int, nargs="*", default=[3, 15])
    ap.add_argument("--disk-bytes", help="let the disk cache hold every layer (e.g. 40G)")
    ap.add_argument(
        "--disk-dir",
        help="use this disk-cache folder (e.g. one a reproduce run filled) instead of a fresh "
        "scratch folder, and keep it",
    )
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    folder = args.disk_dir or tempfile.mkdtemp(prefix="mechcna-gemma-")
    if args.disk_bytes:
        os.environ["MECHCNA_DISK_CACHE_BYTES"] = args.disk_bytes
    print(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {platform.machine()}, "
          f"{os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"load {os.getloadavg()}")  # fmt: skip
    model = mechcna.load_model("gemma-3-270m")
    L = model.cfg.n_layers
    cache = BlockCache(disk=folder)
    mode = f"disk cache up to {args.disk_bytes}" if args.disk_bytes else "default cache"
    print(f"{mode}: budget {cache.budget / 2**30:.1f} GiB; {memory()}", flush=True)
    calls = []
    for i, prompt in enumerate(PROMPTS):
        t = time.perf_counter()
        res = neuron_importance(model, prompt, cache=cache)
        calls.append(time.perf_counter() - t)
        cert = res.stats.certified_fraction if res.stats is not None else float("nan")
        print(f"call {i + 1} ({prompt!r}): {calls[-1]:.2f} s, {cert:.1%} certified; "
              f"{memory()}", flush=True)  # fmt: skip
    lit = Literal(model, PROMPTS[-1])
    t = time.perf_counter()
    worst = 0.0
    for l in args.literal_layers:
        vectors, _ = lit.mlp(l)
        mid = lit.act(f"blocks.{l}.hook_resid_mid")[lit.T]
        want = lit.logprob(mid + vectors) - lit.logprob(mid)
        worst = max(worst, float((want - res.scores[0, l]).abs().max()))
    per_layer = (time.perf_counter() - t) / len(args.literal_layers)
    literal = per_layer * L
    print(f"literal: {per_layer:.2f} s per layer on layers {args.literal_layers}, "
          f"x {L} layers = {literal:.1f} s")  # fmt: skip
    for i, c in enumerate(calls):
        print(f"call {i + 1}: {c:.2f} s -> {literal / c:.1f}x the literal")
    print(f"max |fast - literal| on layers {args.literal_layers}: {worst:.2e}; "
          f"{memory()}; load {os.getloadavg()}")  # fmt: skip
    if not args.disk_dir:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
