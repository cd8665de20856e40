# One command each, on a fresh machine: `make test`, `make demo`.
# Both create .venv if missing and install hcx with its test extras. Machines without
# an NVIDIA GPU get the CPU build of torch 2.13.0 (never the multi-GB CUDA wheels).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.hcx-installed
TORCH_CPU ?= torch==2.13.0

.PHONY: install test test-fast demo bench clean

$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	@if ! command -v nvidia-smi >/dev/null 2>&1; then \
		echo "no GPU: installing CPU $(TORCH_CPU)"; $(PY) -m pip install -q "$(TORCH_CPU)"; fi
	$(PY) -m pip install -q -e ".[test]"
	@touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q -rs tests

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" tests

demo: $(STAMP)
	$(VENV)/bin/hcx data prepare recipes/tiny.yaml
	$(VENV)/bin/hcx pretrain recipes/tiny.yaml

bench: $(STAMP)
	$(PY) bench/train_throughput.py recipes/tiny.yaml
	$(PY) bench/generate_throughput.py recipes/tiny.yaml

clean:
	rm -rf runs .pytest_cache
