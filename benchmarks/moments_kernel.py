"""Benchmark of the engine's moment reduction over one layer of int16 rows (issue 20).

Times, in one run and for the same inputs, the three ways :mod:`mechcna.engine.moments` can
form ``p . y^n`` (n = 1, 2, 3) over a SmolLM2-sized layer (1,536 rows x 49,152 tokens, or
``--rows``/``--vocab``):

* the C kernel of :mod:`mechcna.engine.native` (the default where it builds);
* the ``torch.compile`` loop over int32 pairs (the default before it, and the fallback);
* the chunked float64 matrix products (the eager path, and the path for large batches).

It prints the best of ``--repeat`` CPU (process) times and wall times per batch size, the ratios
against the compiled loop, and the largest relative difference between the paths. Run on a
quiet machine, under the shared lock::

    flock /tmp/mechcna-heavy.lock .venv/bin/python benchmarks/moments_kernel.py --threads 1
"""

import argparse
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from mechcna.engine import moments, native


def best(fn, repeat: int) -> tuple[float, float]:
    fn()  # warm-up (compiles the torch loop once per process)
    cpu, wall = float("inf"), float("inf")
    for _ in range(repeat):
        c, w = time.process_time(), time.perf_counter()
        fn()
        cpu, wall = min(cpu, time.process_time() - c), min(wall, time.perf_counter() - w)
    return cpu, wall


def compiled(p: torch.Tensor, y: torch.Tensor, third: bool):
    """The torch.compile loop over int32 pairs, bypassing the C kernel."""
    if "packed" not in moments._fused:
        moments._fused["packed"] = torch.compile(moments._packed_kernel, dynamic=True)
    w = y.view(torch.int32)
    return moments._fused["packed"](p[:, 0::2].contiguous(), p[:, 1::2].contiguous(), w, third)


def chunked(p: torch.Tensor, y: torch.Tensor, third: bool):
    chunk = max(32, moments.CHUNK_ELEMENTS // y.shape[1])
    parts = [moments.raw_moments(p, y[i : i + chunk], third) for i in range(0, len(y), chunk)]
    return [torch.cat([q[n] for q in parts], 1) for n in (0, 2)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=1536)
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--batches", type=int, nargs="*", default=[1, 4, 16, 32, 64])
    ap.add_argument("--threads", type=int, default=0, help="0: torch's default")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    assert native.library() is not None, "the C kernel did not build here"
    g = torch.Generator().manual_seed(0)
    y = torch.randint(-32767, 32768, (args.rows, args.vocab), generator=g, dtype=torch.int32)
    y = y.to(torch.int16)
    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, rows {args.rows} x {args.vocab}")  # fmt: skip
    print("prompts | C kernel cpu/wall s | compiled loop cpu/wall s | chunked cpu/wall s | "
          "kernel vs loop (cpu) | max rel diff")  # fmt: skip
    for B in args.batches:
        p = torch.softmax(torch.randn(B, args.vocab, generator=g, dtype=torch.float64) * 3, -1)
        k = best(lambda p=p: native.moments_int16(p, y, True), args.repeat)
        c = best(lambda p=p: compiled(p, y, True), args.repeat)
        e = best(lambda p=p: chunked(p, y, True), max(1, args.repeat - 1))
        a, b = native.moments_int16(p, y, True), compiled(p, y, True)
        assert a is not None
        pairs = [(u, v) for u, v in zip(a[1:], b[1:], strict=True) if u is not None]
        diff = max(float(((u - v).abs() / v.abs().clamp_min(1e-300)).max()) for u, v in pairs)
        print(f"{B} | {k[0]:.3f} / {k[1]:.3f} | {c[0]:.3f} / {c[1]:.3f} | {e[0]:.3f} / {e[1]:.3f}"
              f" | {c[0] / k[0]:.2f}x | {diff:.1e}")  # fmt: skip


if __name__ == "__main__":
    main()
