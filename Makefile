# One command each, on a fresh machine: `make test`, `make demo`.
# Both create .venv if missing and install hcx with its test extras (.[test]: the eval
# extras, pytest, trl). Machines without
# an NVIDIA GPU get the CPU build of torch 2.13.0 (never the multi-GB CUDA wheels).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.hcx-installed
TORCH_CPU ?= torch==2.13.0

.PHONY: install test test-fast demo bench clean chromium

$(STAMP): pyproject.toml setup.py
	@test -x $(PY) || python3 -m venv $(VENV)
	@if ! command -v nvidia-smi >/dev/null 2>&1; then \
		echo "no GPU: installing CPU $(TORCH_CPU)"; $(PY) -m pip install -q "$(TORCH_CPU)"; fi
	$(PY) -m pip install -q -e ".[test]"
	@touch $(STAMP)

install: $(STAMP)

# Two pytest workers (pytest-xdist), a test file to a worker (--dist loadfile: a file's
# module fixtures, such as a test server or a shared training run, stay in one process;
# session fixtures are built once per worker). Most tests wait on subprocesses, process
# start-up and disk, so two workers on 2 cores finish the suite in ~60% of the serial time
# (docs/benchmarks.md). TEST_WORKERS=0 runs it serially.
TEST_WORKERS ?= 2
PYTEST := $(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile

test: $(STAMP) chromium
	$(PYTEST) -q -rs --durations=15 tests

test-fast: $(STAMP)
	$(PYTEST) -q -m "not slow" tests

demo: $(STAMP)
	$(VENV)/bin/hcx run recipes/pipeline/demo.yaml

bench: $(STAMP)
	$(PY) bench/train_throughput.py recipes/tiny.yaml
	$(PY) bench/generate_throughput.py recipes/tiny.yaml
	$(PY) bench/eval_throughput.py recipes/tiny.yaml

# Headless Chromium and a Hangul font for tests/evaluation/test_report.py (renders report.html);
# installed quietly when missing, as root or with passwordless sudo; otherwise that test skips.
chromium:
	@if ! command -v chromium >/dev/null 2>&1 || ! fc-list :lang=ko 2>/dev/null | grep -q .; then \
		if ! command -v apt-get >/dev/null 2>&1; then SUDO=skip; \
		elif [ "$$(id -u)" = 0 ]; then SUDO=; \
		elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then SUDO="sudo -n"; \
		else SUDO=skip; fi; \
		if [ "$$SUDO" = skip ]; then \
			echo "chromium/fonts-nanum missing (needs root + apt-get): the report rendering test will skip"; \
		else \
			echo "installing chromium and fonts-nanum (apt-get, ~125 MB)"; \
			{ $$SUDO apt-get update -qq && \
			  $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
				chromium fonts-nanum; } >/dev/null 2>&1 \
			|| echo "apt-get install chromium fonts-nanum failed: the report rendering test will skip"; \
		fi; \
	fi

clean:
	rm -rf runs .pytest_cache
