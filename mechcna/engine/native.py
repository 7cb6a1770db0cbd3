"""A small C kernel for the raw moments of int16 rows (issue 20, speed), built on first use.

The certified engine's most frequent reduction is ``m_n[b, i] = sum_j p[b, j] y[i, j]^n``
(``n = 1, 2, 3``) over a layer's stored int16 rows ``y`` and the base distributions ``p``
(float64) of a few prompts (:mod:`mechcna.engine.moments`). ``torch.compile`` turns it into a
loop that converts and multiplies each entry in registers, but it keeps one dependency chain
per moment and re-reads ``p`` for every row: about 2.8 cycles per stored entry on an AVX2
host. This kernel converts a chunk of a row (512 entries) to ``y, y^2, y^3`` in float64 once,
then sums them against each prompt's ``p`` with several independent fused multiply-adds:
the same terms, fewer instructions.

**Same certificate.** ``y^2`` and ``y^3`` are exact in float64 (``|y| <= 32767``); each term
``p_j y_j^n`` is added with one rounding (a fused multiply-add rounds once, a product and a
sum twice); the sum over the vocabulary is taken in some order (per-lane partial sums,
per-chunk totals). :func:`mechcna.engine.moments.gamma` bounds any such order, so the bounds
of :func:`mechcna.engine.moments.moment_errors` hold unchanged.

**Build.** The C source below is compiled once per machine with the C compiler of the
platform (``$CC``, else ``cc``; ``-O3 -march=native``) into
``$MECHCNA_CACHE_DIR/native`` (else ``$XDG_CACHE_HOME/mechcna/native``, else
``~/.cache/mechcna/native``), named by a hash of the source, the flags, the compiler and the
CPU's feature flags (a cache shared by different machines never loads a library built for
another CPU). It is loaded with :mod:`ctypes`; rows are split among
``torch.get_num_threads()`` Python threads (a ctypes call releases the GIL). When there is no
compiler, the build fails, or ``MECHCNA_COMPILE=0``/``MECHCNA_NATIVE=0`` is set, the callers
use the ``torch.compile`` loop or eager chunks: same values to rounding, same certificate.
"""

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from mechcna._types import Float, Int, Tensor

_log = logging.getLogger(__name__)

#: the most prompts one kernel call serves (its accumulators live on the stack)
MAX_BATCH = 64

_SOURCE = r"""
#include <stdint.h>
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif
#define MAXB 64

/* The moments of one row under NB (1 to 4) distributions pp[0..NB-1]: res[3 * b + n - 1] =
   sum_j pp[b][j] row[j]^n. Each entry is converted and raised to its powers in registers
   once for the NB prompts; each term is one fused multiply-add (one rounding). */
static inline __attribute__((always_inline)) void
row_block(const int16_t* row, int64_t V, const double* const* pp, const int NB, int third,
          double* res) {
    int64_t j = 0;
    double s[4][3] = {{0}};
#if defined(__AVX2__) && defined(__FMA__)
    __m256d a[4][3];
    for (int b = 0; b < NB; b++)
        for (int n = 0; n < 3; n++) a[b][n] = _mm256_setzero_pd();
    for (; j + 4 <= V; j += 4) {
        __m128i w = _mm_loadl_epi64((const __m128i*)(row + j));
        __m256d y = _mm256_cvtepi32_pd(_mm_cvtepi16_epi32(w));
        __m256d y2 = _mm256_mul_pd(y, y);
        for (int b = 0; b < NB; b++) {
            __m256d p = _mm256_loadu_pd(pp[b] + j);
            a[b][0] = _mm256_fmadd_pd(p, y, a[b][0]);
            a[b][1] = _mm256_fmadd_pd(p, y2, a[b][1]);
        }
        if (third) {
            __m256d y3 = _mm256_mul_pd(y2, y);
            for (int b = 0; b < NB; b++)
                a[b][2] = _mm256_fmadd_pd(_mm256_loadu_pd(pp[b] + j), y3, a[b][2]);
        }
    }
    for (int b = 0; b < NB; b++)
        for (int n = 0; n < 3; n++) {
            double lanes[4];
            _mm256_storeu_pd(lanes, a[b][n]);
            s[b][n] = (lanes[0] + lanes[1]) + (lanes[2] + lanes[3]);
        }
#endif
    for (; j < V; j++) {
        double y = (double)row[j], y2 = y * y, y3 = y2 * y;
        for (int b = 0; b < NB; b++) {
            s[b][0] += pp[b][j] * y;
            s[b][1] += pp[b][j] * y2;
            s[b][2] += pp[b][j] * y3;
        }
    }
    for (int b = 0; b < NB; b++)
        for (int n = 0; n < 3; n++) res[3 * b + n] = s[b][n];
}

/* Raw moments of the int16 rows r0..r1-1 of y (row length V; with idx, the rows idx[r0..r1-1])
   under the B distributions p (B x V, float64): out[(n - 1) * B * ld + b * ld + r] =
   sum_j p[b, j] y[row r, j]^n for n = 1, 2 and, when third, 3. The vocabulary is taken in
   blocks whose B rows of p stay in the cache (512 KB) while every row passes; each block's
   sums are added to out. Returns 0, or -1 when B is out of range. */
int moments_i16(const int16_t* y, int64_t V, int64_t r0, int64_t r1, const double* p,
                int64_t B, int third, double* out, int64_t ld, const int64_t* idx) {
    if (B < 1 || B > MAXB) return -1;
    int64_t JB = ((int64_t)1 << 16) / B;
    JB = JB < 256 ? 256 : (JB / 4) * 4;
    for (int64_t n = 0; n < 3; n++)
        for (int64_t b = 0; b < B; b++)
            for (int64_t r = r0; r < r1; r++) out[n * B * ld + b * ld + r] = 0.0;
    for (int64_t j0 = 0; j0 < V; j0 += JB) {
        int64_t w = V - j0 < JB ? V - j0 : JB;
        for (int64_t r = r0; r < r1; r++) {
            const int16_t* row = y + (idx ? idx[r] : r) * V + j0;
            for (int64_t b0 = 0; b0 < B; b0 += 4) {
                const double* pp[4];
                double res[12];
                int nb = B - b0 < 4 ? (int)(B - b0) : 4;
                for (int b = 0; b < nb; b++) pp[b] = p + (b0 + b) * V + j0;
                switch (nb) {
                    case 1: row_block(row, w, pp, 1, third, res); break;
                    case 2: row_block(row, w, pp, 2, third, res); break;
                    case 3: row_block(row, w, pp, 3, third, res); break;
                    default: row_block(row, w, pp, 4, third, res); break;
                }
                for (int b = 0; b < nb; b++) {
                    out[(b0 + b) * ld + r] += res[3 * b];
                    out[B * ld + (b0 + b) * ld + r] += res[3 * b + 1];
                    if (third) out[2 * B * ld + (b0 + b) * ld + r] += res[3 * b + 2];
                }
            }
        }
    }
    return 0;
}
"""

_FLAGS = ["-O3", "-march=native", "-fPIC", "-shared", "-fno-math-errno"]

_state: dict[str, object] = {}
_lock = threading.Lock()
_pool: tuple[int, ThreadPoolExecutor] | None = None


def _disabled() -> bool:
    off = ("0", "false", "no", "off")
    return (
        os.environ.get("MECHCNA_COMPILE", "1").strip().lower() in off
        or os.environ.get("MECHCNA_NATIVE", "1").strip().lower() in off
    )


def build_dir() -> Path:
    """Where built kernels are kept (see the module docstring)."""
    env = os.environ.get("MECHCNA_CACHE_DIR")
    if env:
        return Path(env) / "native"
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "mechcna" / "native"


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def _compiler() -> str | None:
    cc = os.environ.get("CC") or "cc"
    return shutil.which(cc) or shutil.which("gcc") or shutil.which("clang")


def _build() -> ctypes.CDLL | None:
    cc = _compiler()
    if cc is None:
        _log.info("no C compiler found: the moments of int16 rows use torch.compile")
        return None
    key = "\n".join([_SOURCE, " ".join(_FLAGS), cc, platform.machine(), _cpu_flags()])
    digest = hashlib.blake2b(key.encode(), digest_size=10).hexdigest()
    target = build_dir() / f"moments-{digest}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            src = Path(tmp) / "moments.c"
            src.write_text(_SOURCE)
            out = Path(tmp) / "moments.so"
            done = subprocess.run(
                [cc, *_FLAGS, str(src), "-o", str(out)], capture_output=True, text=True
            )
            if done.returncode != 0:
                _log.warning("building the native moment kernel failed: %s", done.stderr[-500:])
                return None
            os.replace(out, target)  # atomic: a concurrent build writes the same file
    lib = ctypes.CDLL(str(target))
    fn = lib.moments_i16
    i64, dp = ctypes.c_int64, ctypes.c_void_p
    fn.argtypes = [dp, i64, i64, i64, dp, i64, ctypes.c_int, dp, i64, dp]
    fn.restype = ctypes.c_int
    return lib


def library() -> ctypes.CDLL | None:
    """The built kernel, or ``None`` (disabled, no compiler, or a failed build: then every later
    call in this process returns ``None`` at once)."""
    if _disabled():
        return None
    with _lock:
        if "lib" not in _state:
            try:
                _state["lib"] = _build()
            except OSError as err:  # unwritable cache directory, a library that will not load
                _log.warning("native moment kernel unavailable (%s)", err)
                _state["lib"] = None
        lib = _state["lib"]
    return lib if isinstance(lib, ctypes.CDLL) else None


def _executor(threads: int) -> ThreadPoolExecutor:
    global _pool
    with _lock:
        if _pool is None or _pool[0] != threads:
            if _pool is not None:
                _pool[1].shutdown(wait=False)
            _pool = (threads, ThreadPoolExecutor(threads, thread_name_prefix="mechcna-moments"))
        return _pool[1]


def moments_int16(
    p: Float[Tensor, "batch d_vocab"],
    y: Int[Tensor, "row d_vocab"],
    third: bool,
    rows: Int[Tensor, " n"] | None = None,
) -> tuple[Tensor, Tensor, Tensor | None] | None:
    """``(m1, m2, m3)``, each ``[batch, row]`` float64 (``m3`` only with ``third``): the raw
    moments ``p . y^n`` of the int16 rows ``y`` (CPU; with ``rows``, of the rows ``y[rows]``,
    read in place), or ``None`` when the kernel is not available or does not apply (then the
    caller uses another path)."""
    B, V = p.shape
    if (
        y.dtype != torch.int16
        or y.device.type != "cpu"
        or p.device.type != "cpu"
        or p.dtype != torch.float64
        or y.ndim != 2
        or y.shape[1] != V
        or not 1 <= B <= MAX_BATCH
    ):
        return None
    lib = library()
    if lib is None:
        return None
    y = y.contiguous()
    p = p.contiguous()
    index = None
    if rows is not None:
        index = rows.to(device="cpu", dtype=torch.int64).contiguous()
        if len(index) and not (0 <= int(index.min()) and int(index.max()) < y.shape[0]):
            return None
    n = y.shape[0] if index is None else len(index)
    out = torch.empty(3, B, n, dtype=torch.float64)
    if n == 0:
        return out[0], out[1], (out[2] if third else None)
    threads = max(1, min(torch.get_num_threads(), n))
    bounds = [n * t // threads for t in range(threads + 1)]
    fn = lib.moments_i16
    ptr = None if index is None else index.data_ptr()
    args = (y.data_ptr(), V, p.data_ptr(), B, int(third), out.data_ptr(), n, ptr)

    def run(r0: int, r1: int) -> int:
        return fn(args[0], args[1], r0, r1, args[2], args[3], args[4], args[5], args[6], args[7])

    if threads == 1:
        codes = [run(0, n)]
    else:
        pool = _executor(threads)
        codes = list(pool.map(run, bounds[:-1], bounds[1:]))
    if any(codes):
        return None
    return out[0], out[1], (out[2] if third else None)
