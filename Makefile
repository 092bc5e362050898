# The README's commands. Each target sets itself up on a fresh machine: a virtual env with
# the CPU build of torch pinned (the package itself asks for a range, so GPU users get CUDA
# builds), the package with its test extras, and the Debian Fashion-MNIST files when apt is
# available (the demo falls back to synthetic data, and says so, where they are absent).

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.installed
FASHION_MNIST := /usr/share/datasets/fashion-mnist

.PHONY: demo test test-fast lint format bench system-deps clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check "$(TORCH)"
	$(BIN)/python -m pip install -q --disable-pip-version-check -e ".[dev]" "$(TORCH)"
	touch $(STAMP)

# Debian packages: Fashion-MNIST for the demo and the benchmarks, chromium for the report's
# browser test. Without root or apt they are skipped: the demo then uses synthetic data
# (and says so) and the browser test is skipped with its reason.
DEBS := dataset-fashion-mnist chromium

system-deps:
	@missing=""; \
	[ -d $(FASHION_MNIST) ] || missing="$$missing dataset-fashion-mnist"; \
	[ -x /usr/bin/chromium ] || missing="$$missing chromium"; \
	if [ -n "$$missing" ]; then \
	  if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	    echo "installing Debian packages:$$missing"; \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing >/dev/null 2>&1 || \
	      { apt-get update -q >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing >/dev/null 2>&1; } || \
	      echo "note: could not install$$missing; the tests and demo that need them say so"; \
	  else echo "note: missing Debian packages$$missing (not root or no apt); the tests and demo that need them say so"; fi; \
	fi

demo: $(STAMP) system-deps
	$(BIN)/probeserve demo --out demo-output

test: $(STAMP) system-deps
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not integration"

lint: $(STAMP)
	$(BIN)/ruff check probeserve tests jobs
	$(BIN)/ruff format --check probeserve tests jobs
	$(BIN)/mypy

format: $(STAMP)
	$(BIN)/ruff format probeserve tests jobs
	$(BIN)/ruff check --fix probeserve tests jobs

bench: $(STAMP) system-deps
	$(BIN)/python jobs/benchmarks/bench_shards.py
	$(BIN)/python jobs/benchmarks/bench_shards.py --readers --features 1024
	$(BIN)/python jobs/benchmarks/bench_extract.py
	$(BIN)/python jobs/benchmarks/bench_reducers.py
	$(BIN)/python jobs/benchmarks/bench_probe.py
	$(BIN)/python jobs/benchmarks/bench_probe.py lbfgs
	$(BIN)/python jobs/benchmarks/bench_probe_scale.py
	$(BIN)/python jobs/benchmarks/bench_ray.py
	$(BIN)/python jobs/benchmarks/bench_scale.py
	$(BIN)/python jobs/benchmarks/bench_images.py
	$(BIN)/python jobs/benchmarks/bench_science.py
	$(BIN)/python jobs/benchmarks/bench_watch_memory.py

clean:
	rm -rf demo-output .pytest_cache .ruff_cache
