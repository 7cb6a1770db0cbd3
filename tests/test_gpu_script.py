"""``benchmarks/gpu.sh --cpu-dry-run``: every step of the GPU script, with tiny shapes on the
CPU, so that the script is right before it meets a GPU."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STEPS = (
    "smollm2_attribution",
    "smollm2_head_sweep",
    "llama7b_load",
    "llama7b_ffn_attribution",
    "llama7b_head_sweep",
)


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_gpu_script_dry_run(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    env.pop("MECHCNA_TEST_DEVICE", None)
    run = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu.sh"), str(out), "--cpu-dry-run"],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    names = {p.name for p in out.iterdir()}
    assert {"gpu.log", "gpu_tests.txt", "gpu_bench.json", "gpu_bench.md", "summary.md"} <= names
    summary = (out / "summary.md").read_text()
    assert "gpu tests: exit 0:" in summary and " passed" in summary and "failed" not in summary
    results = json.loads((out / "gpu_bench.json").read_text())
    assert results["dry_run"] is True
    for step in STEPS:
        figures = results["steps"][step]
        assert "error" not in figures and "skipped" not in figures, (step, figures)
    att = results["steps"]["smollm2_attribution"]
    assert att["max_abs_diff_vs_literal"] < 1e-4 and att["top20_ffn_same_as_literal"]
    sweep = results["steps"]["smollm2_head_sweep"]
    assert sweep["same_correctness_as_hooks"] and sweep["max_abs_logprob_diff_vs_hooks"] < 1e-4
    assert (
        results["steps"]["llama7b_ffn_attribution"]["max_abs_diff_vs_fp32_literal_2_layers"] < 1e-4
    )
    assert "| llama7b_head_sweep |" in (out / "gpu_bench.md").read_text()


def test_gpu_script_usage():
    run = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu.sh")], capture_output=True,
                         text=True)  # fmt: skip
    assert run.returncode == 2 and "usage" in run.stderr
