"""Small C kernels for the raw moments of int16 rows and the log-sum-exps of refined rows
(issue 20, speed), built on first use.

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

**Refined rows' log-sum-exps.** :func:`fine_logsumexp` serves the exact path's items whose
rows have a residual byte per entry (:meth:`mechcna.engine.rows.RowStore.fine_levels`): per
item two passes over the row, its maximum and then the sum of ``exp(s_j - max)``, with an
``exp`` of its own (Cody-Waite reduction, degree-13 polynomial in fused multiply-adds; relative
error within :data:`EXP_ULPS` units of roundoff, checked against 40-digit decimals in the
tests); :func:`lse_error` is what the certificate charges for it. Items are split among the
threads as the rows are above.

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
import math
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from mechcna._types import Bool, Float, Int, Tensor

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
   sum_j p[b, j] y[row r, j]^n for n = 1, 2 and, when third, 3. With want (r1 x B bytes, row r
   at want[r * B]), only the prompts b with want[r * B + b] != 0 are summed for row r, packed
   four at a time (the others stay 0; each prompt's sums are formed in the same order either
   way). The vocabulary is taken in blocks whose B rows of p stay in the cache (512 KB) while
   every row passes; each block's sums are added to out. Returns 0, or -1 when B is out of
   range. */
int moments_i16(const int16_t* y, int64_t V, int64_t r0, int64_t r1, const double* p,
                int64_t B, int third, double* out, int64_t ld, const int64_t* idx,
                const uint8_t* want) {
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
            int64_t list[MAXB], m = 0;
            for (int64_t b = 0; b < B; b++)
                if (!want || want[r * B + b]) list[m++] = b;
            for (int64_t b0 = 0; b0 < m; b0 += 4) {
                const double* pp[4];
                double res[12];
                int nb = m - b0 < 4 ? (int)(m - b0) : 4;
                for (int b = 0; b < nb; b++) pp[b] = p + list[b0 + b] * V + j0;
                switch (nb) {
                    case 1: row_block(row, w, pp, 1, third, res); break;
                    case 2: row_block(row, w, pp, 2, third, res); break;
                    case 3: row_block(row, w, pp, 3, third, res); break;
                    default: row_block(row, w, pp, 4, third, res); break;
                }
                for (int b = 0; b < nb; b++) {
                    int64_t q = list[b0 + b];
                    out[q * ld + r] += res[3 * b];
                    out[B * ld + q * ld + r] += res[3 * b + 1];
                    if (third) out[2 * B * ld + q * ld + r] += res[3 * b + 2];
                }
            }
        }
    }
    return 0;
}

/* exp(t) for t <= 0 (t below -700 taken as -700), relative error below EXP_ULPS units of
   float64 roundoff: t = k ln2 + r with |r| <= ln2/2 + tiny (Cody-Waite, two fused
   multiply-adds), exp(r) by its degree-13 Taylor polynomial (truncation about 6e-18
   relative), Horner's rule in fused multiply-adds, times 2^k built in the exponent bits. */
#define LOG2E 1.4426950408889634
#define LN2_HI 6.93147180369123816490e-01
#define LN2_LO 1.90821492927058770002e-10
static const double EXPC[14] = {
    1.0, 1.0, 1.0 / 2, 1.0 / 6, 1.0 / 24, 1.0 / 120, 1.0 / 720, 1.0 / 5040, 1.0 / 40320,
    1.0 / 362880, 1.0 / 3628800, 1.0 / 39916800, 1.0 / 479001600, 1.0 / 6227020800.0};

static inline double exp_s(double t) {
    t = t < -700.0 ? -700.0 : t;
    double k = __builtin_nearbyint(t * LOG2E);
    double r = __builtin_fma(-k, LN2_HI, t);
    r = __builtin_fma(-k, LN2_LO, r);
    double q = EXPC[13];
    for (int i = 12; i >= 0; i--) q = __builtin_fma(q, r, EXPC[i]);
    union { double d; int64_t i; } e;
    e.i = ((int64_t)k + 1023) << 52;
    return q * e.d;
}

#if defined(__AVX2__) && defined(__FMA__)
static inline __m256d exp_v(__m256d t) {
    t = _mm256_max_pd(t, _mm256_set1_pd(-700.0));
    __m256d k = _mm256_round_pd(_mm256_mul_pd(t, _mm256_set1_pd(LOG2E)),
                                _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256d r = _mm256_fnmadd_pd(k, _mm256_set1_pd(LN2_HI), t);
    r = _mm256_fnmadd_pd(k, _mm256_set1_pd(LN2_LO), r);
    __m256d q = _mm256_set1_pd(EXPC[13]);
    for (int i = 12; i >= 0; i--) q = _mm256_fmadd_pd(q, r, _mm256_set1_pd(EXPC[i]));
    __m256i ki = _mm256_cvtepi32_epi64(_mm256_cvtpd_epi32(k));
    ki = _mm256_slli_epi64(_mm256_add_epi64(ki, _mm256_set1_epi64x(1023)), 52);
    return _mm256_mul_pd(q, _mm256_castsi256_pd(ki));
}
/* four int16 or int8 entries to float64 (exact) */
#define LD16(p) _mm256_cvtepi32_pd(_mm_cvtepi16_epi32(_mm_loadl_epi64((const __m128i*)(p))))
static inline int32_t ld32(const int8_t* p) { int32_t v; __builtin_memcpy(&v, p, 4); return v; }
#define LD8(p) _mm256_cvtepi32_pd(_mm_cvtepi8_epi32(_mm_cvtsi32_si128(ld32(p))))
#endif

double exp_check(double t) { return exp_s(t); }

/* the vector exp on n values (n a multiple of 4 where AVX2 is built; else the scalar one) */
void exp_check_v(const double* t, int64_t n, double* out) {
    int64_t i = 0;
#if defined(__AVX2__) && defined(__FMA__)
    for (; i + 4 <= n; i += 4) _mm256_storeu_pd(out + i, exp_v(_mm256_loadu_pd(t + i)));
#endif
    for (; i < n; i++) out[i] = exp_s(t[i]);
}

/* logsumexp_j (z[b_i, j] + x_i (fine Y[r_i, j] + F[r_i, j])) for the items i0..i1-1 into
   out[i]: int16 rows Y and their int8 residuals F (row length V) read in place, z the base
   logits (float64, one row per prompt). The refined entry fine Y + F is exact in float64,
   s_j = fma(x, v_j, z_j) rounds once; two passes: the maximum m of s_j, then
   m + log(sum_j exp(s_j - m)) (the same s_j both times). */
void fine_lse(const double* z, int64_t V, const int16_t* Y, const int8_t* F, double fine,
              const int64_t* r, const int64_t* b, const double* x, int64_t i0, int64_t i1,
              double* out) {
    for (int64_t i = i0; i < i1; i++) {
        const int16_t* y = Y + r[i] * V;
        const int8_t* f = F + r[i] * V;
        const double* zb = z + b[i] * V;
        const double xi = x[i];
        double m = -__builtin_inf(), s = 0.0;
        int64_t j = 0;
#if defined(__AVX2__) && defined(__FMA__)
        const __m256d vf = _mm256_set1_pd(fine), vx = _mm256_set1_pd(xi);
        __m256d mx = _mm256_set1_pd(-__builtin_inf());
        for (; j + 4 <= V; j += 4) {
            __m256d v = _mm256_fmadd_pd(LD16(y + j), vf, LD8(f + j));
            mx = _mm256_max_pd(mx, _mm256_fmadd_pd(vx, v, _mm256_loadu_pd(zb + j)));
        }
        double lanes[4];
        _mm256_storeu_pd(lanes, mx);
        for (int l = 0; l < 4; l++) m = lanes[l] > m ? lanes[l] : m;
#endif
        for (int64_t k = j; k < V; k++) {
            double v = __builtin_fma((double)y[k], fine, (double)f[k]);
            double t = __builtin_fma(xi, v, zb[k]);
            m = t > m ? t : m;
        }
        j = 0;
#if defined(__AVX2__) && defined(__FMA__)
        const __m256d vm = _mm256_set1_pd(m);
        __m256d acc0 = _mm256_setzero_pd(), acc1 = _mm256_setzero_pd();
        for (; j + 8 <= V; j += 8) {
            __m256d v0 = _mm256_fmadd_pd(LD16(y + j), vf, LD8(f + j));
            __m256d v1 = _mm256_fmadd_pd(LD16(y + j + 4), vf, LD8(f + j + 4));
            __m256d s0 = _mm256_fmadd_pd(vx, v0, _mm256_loadu_pd(zb + j));
            __m256d s1 = _mm256_fmadd_pd(vx, v1, _mm256_loadu_pd(zb + j + 4));
            acc0 = _mm256_add_pd(acc0, exp_v(_mm256_sub_pd(s0, vm)));
            acc1 = _mm256_add_pd(acc1, exp_v(_mm256_sub_pd(s1, vm)));
        }
        _mm256_storeu_pd(lanes, _mm256_add_pd(acc0, acc1));
        s = (lanes[0] + lanes[1]) + (lanes[2] + lanes[3]);
#endif
        for (; j < V; j++) {
            double v = __builtin_fma((double)y[j], fine, (double)f[j]);
            s += exp_s(__builtin_fma(xi, v, zb[j]) - m);
        }
        out[i] = m + __builtin_log(s);
    }
}
"""

_FLAGS = ["-O3", "-march=native", "-fPIC", "-shared", "-fno-math-errno"]
_LIBS = ["-lm"]

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
    key = "\n".join([_SOURCE, " ".join(_FLAGS + _LIBS), cc, platform.machine(), _cpu_flags()])
    digest = hashlib.blake2b(key.encode(), digest_size=10).hexdigest()
    target = build_dir() / f"moments-{digest}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            src = Path(tmp) / "moments.c"
            src.write_text(_SOURCE)
            out = Path(tmp) / "moments.so"
            done = subprocess.run(
                [cc, *_FLAGS, str(src), "-o", str(out), *_LIBS], capture_output=True, text=True
            )
            if done.returncode != 0:
                _log.warning("building the native moment kernel failed: %s", done.stderr[-500:])
                return None
            os.replace(out, target)  # atomic: a concurrent build writes the same file
    lib = ctypes.CDLL(str(target))
    fn = lib.moments_i16
    i64, dp = ctypes.c_int64, ctypes.c_void_p
    fn.argtypes = [dp, i64, i64, i64, dp, i64, ctypes.c_int, dp, i64, dp, dp]
    fn.restype = ctypes.c_int
    lse = lib.fine_lse
    lse.argtypes = [dp, i64, dp, dp, ctypes.c_double, dp, dp, dp, i64, i64, dp]
    lse.restype = None
    lib.exp_check.argtypes = [ctypes.c_double]
    lib.exp_check.restype = ctypes.c_double
    lib.exp_check_v.argtypes = [dp, i64, dp]
    lib.exp_check_v.restype = None
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
    want: Bool[Tensor, "batch n"] | None = None,
) -> tuple[Tensor, Tensor, Tensor | None] | None:
    """``(m1, m2, m3)``, each ``[batch, row]`` float64 (``m3`` only with ``third``): the raw
    moments ``p . y^n`` of the int16 rows ``y`` (CPU; with ``rows``, of the rows ``y[rows]``,
    read in place), or ``None`` when the kernel is not available or does not apply (then the
    caller uses another path). With ``want``, only the pairs (prompt, row) it marks are summed
    (the others are 0); a marked pair's sums are the same, bit for bit, as without it."""
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
    mask = None
    if want is not None:
        if want.shape != (B, n):
            return None
        mask = want.to(device="cpu", dtype=torch.uint8).T.contiguous()  # [row, prompt]
    out = torch.empty(3, B, n, dtype=torch.float64)
    if n == 0:
        return out[0], out[1], (out[2] if third else None)
    threads = max(1, min(torch.get_num_threads(), n))
    if mask is None:
        bounds = [n * t // threads for t in range(threads + 1)]
    else:  # balance the (prompt, row) pairs summed, not the rows
        work = (mask.sum(1, dtype=torch.int64) + 1).cumsum(0)
        cuts = torch.searchsorted(work, work[-1] * torch.arange(1, threads) // threads)
        bounds = [0, *cuts.tolist(), n]
    fn = lib.moments_i16
    ptr = None if index is None else index.data_ptr()
    wptr = None if mask is None else mask.data_ptr()
    args = (y.data_ptr(), V, p.data_ptr(), B, int(third), out.data_ptr(), n, ptr, wptr)

    def run(r0: int, r1: int) -> int:
        if r0 >= r1:
            return 0
        return fn(args[0], args[1], r0, r1, *args[2:])

    if threads == 1:
        codes = [run(0, n)]
    else:
        pool = _executor(threads)
        codes = list(pool.map(run, bounds[:-1], bounds[1:]))
    if any(codes):
        return None
    return out[0], out[1], (out[2] if third else None)


#: bound, in units of float64 roundoff, on the relative error of the kernel's ``exp`` (its
#: measured worst is below 2; see ``tests/test_engine_native.py``)
EXP_ULPS = 8


def lse_error(V: int) -> float:
    """Bound on the absolute error :func:`fine_logsumexp` adds beyond the rounding of ``s_j``,
    of ``s_j - max`` and of the final ``max + log(sum)`` (charged with the magnitudes of ``z``
    and ``x y`` by :func:`mechcna.engine.correction.fine_scores`) and of the sum over the
    vocabulary (``gamma(V)``): each ``exp`` within :data:`EXP_ULPS` units of roundoff
    (relative), so the sum within that relative error; the libm ``log`` of the sum
    (``1 <= sum <= V``) within one ulp, ``2 u log V``; terms below ``exp(-700)`` taken as
    ``exp(-700)`` (relative ``V exp(-700)``, far below one unit), and a unit to spare."""
    return 2.0**-53 * (EXP_ULPS + 2 * math.log(max(V, 2)) + 4)


def fine_logsumexp(
    z: Float[Tensor, "batch d_vocab"],
    Y: Int[Tensor, "row d_vocab"],
    F: Int[Tensor, "row d_vocab"],
    fine: float | int,
    x: Float[Tensor, " k"],
    b: Int[Tensor, " k"],
    r: Int[Tensor, " k"],
) -> Float[Tensor, " k"] | None:
    """``logsumexp_j(z[b_i, j] + x_i (fine Y[r_i, j] + F[r_i, j]))`` per item (float64; ``Y``
    int16 rows, ``F`` their int8 residuals, both read in place), or ``None`` when the kernel
    is not available or does not apply. Each ``s_j`` is one fused multiply-add of exact
    operands; the maximum is subtracted before the ``exp`` (error: :func:`lse_error`)."""
    n = len(x)
    V = z.shape[1] if z.ndim == 2 else 0
    if (
        any(t.device.type != "cpu" for t in (z, Y, F, x, b, r))
        or z.dtype != torch.float64
        or x.dtype != torch.float64
        or Y.dtype != torch.int16
        or F.dtype != torch.int8
        or Y.ndim != 2
        or Y.shape != F.shape
        or Y.shape[1] != V
        or not (len(b) == len(r) == n)
    ):
        return None
    lib = library()
    if lib is None:
        return None
    out = torch.empty(n, dtype=torch.float64)
    if n == 0:
        return out
    rows = r.to(torch.int64).contiguous()
    prompts = b.to(torch.int64).contiguous()
    if int(rows.min()) < 0 or int(rows.max()) >= Y.shape[0]:
        return None
    if int(prompts.min()) < 0 or int(prompts.max()) >= z.shape[0]:
        return None
    if not (bool(torch.isfinite(x).all()) and bool(torch.isfinite(z).all())):
        return None  # the kernel's maxima would drop a NaN: torch's loop propagates it
    z, Y, F, x = z.contiguous(), Y.contiguous(), F.contiguous(), x.contiguous()
    fn = lib.fine_lse
    head = (z.data_ptr(), V, Y.data_ptr(), F.data_ptr(), float(fine))
    tail = (rows.data_ptr(), prompts.data_ptr(), x.data_ptr())

    def run(i0: int, i1: int) -> None:
        fn(*head, *tail, i0, i1, out.data_ptr())

    threads = max(1, min(torch.get_num_threads(), n))
    if threads == 1:
        run(0, n)
    else:
        bounds = [n * t // threads for t in range(threads + 1)]
        list(_executor(threads).map(run, bounds[:-1], bounds[1:]))
    return out
