# Every target builds its own virtual environment (.venv) on first use; nothing
# is installed by hand. torch is pinned to the CPU build on local disk through
# constraints.txt.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
PYTEST := $(BIN)/python -m pytest -p no:cacheprovider

.PHONY: demo test lint types drift unit property integration proto clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/paramserver demo

test: lint types drift unit property integration

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

proto: $(STAMP)
	$(BIN)/python scripts/gen_proto.py

clean:
	rm -rf $(VENV) build src/*.egg-info .mypy_cache .ruff_cache .hypothesis
