# One command each on a fresh machine: `make demo`, `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup test lint demo bench bench-serve gpu-check clean

setup: $(STAMP)

# torch is pinned to the CPU build that lies on disk here; a bare `torch` would pull a multi-GB CUDA build.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

test: setup
	$(PY) -m pytest -q -rs tests

lint: setup
	$(VENV)/bin/ruff check .

DEMO_MODEL := out/gemma3-270m-int8-head4-fast

# The embedded real Gemma 3 270M (a base model: --raw, no chat template), exported once, then run.
demo: setup
	test -f $(DEMO_MODEL)/manifest.json || $(VENV)/bin/gemma3-export --size 270m --precision int8-head4-fast --out $(DEMO_MODEL)
	$(VENV)/bin/gemma3-run --model $(DEMO_MODEL) --raw --temperature 0 --max-new-tokens 48 \
		-p "The three most important inventions of the industrial revolution were"

bench: setup
	$(PY) -m bench.run

# gemma3-serve against llama.cpp's server, 1/2/4/8 streaming clients: bench/results/serve.json.
bench-serve: setup
	$(PY) -m bench.serve

# The attention kernel on this machine's NVIDIA GPU (exit 2 without one): bench/results/gpu-check.json.
gpu-check:
	$(PY) -m bench.gpu

clean:
	rm -rf $(VENV) .pytest_cache
