# Every target builds its own virtual environment (.venv) on first use; nothing
# is installed by hand. torch is pinned to the CPU build on local disk through
# constraints.txt.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
PYTEST := $(BIN)/python -m pytest -p no:cacheprovider --durations=15

.PHONY: demo test stress-test lint types drift unit property integration bench soak chaos fuzz proto clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/paramserver demo

test: lint types drift unit property integration

# `make test` while two busy processes load the CPU: the suite must hold on a busy machine.
stress-test: $(STAMP)
	$(BIN)/python scripts/busy.py 2 -- $(MAKE) test

lint: $(STAMP)
	$(BIN)/ruff check .

types: $(STAMP)
	$(BIN)/mypy

drift: $(STAMP)
	$(BIN)/python scripts/gen_proto.py --check

unit: $(STAMP)
	$(PYTEST) tests/unit

property: $(STAMP)
	HYPOTHESIS_PROFILE=ci $(PYTEST) tests/property

integration: $(STAMP)
	$(PYTEST) tests/integration

BENCH_STAMP := $(VENV)/.bench-stamp
$(BENCH_STAMP): $(STAMP)
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev,bench]'
	touch $(BENCH_STAMP)

# Side by side with the floor and Flower (installed into its own venv on first use).
bench: $(BENCH_STAMP)
	$(BIN)/python benchmarks/bench.py

# 1000 rounds against a real server: RSS slope, threads, descriptors.
soak: $(STAMP)
	$(BIN)/python benchmarks/soak.py --rounds 1000 --clients 4 --json benchmarks/results/soak.json

# The chaos cases of tests/integration/test_chaos.py, repeated.
chaos: $(STAMP)
	$(BIN)/python benchmarks/chaos.py --repeat 5

# The fuzz targets of tests/property with 2,000 examples each (new ones on every run).
fuzz: $(STAMP)
	HYPOTHESIS_PROFILE=fuzz $(PYTEST) tests/property/test_fuzz_decoders.py --timeout 3000

proto: $(STAMP)
	$(BIN)/python scripts/gen_proto.py

clean:
	rm -rf $(VENV) build src/*.egg-info .mypy_cache .ruff_cache .hypothesis
