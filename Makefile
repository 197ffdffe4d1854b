# imgpipe: `make run` and `make test` do all set-up on a fresh machine.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
NETNS := scripts/in-loopback-netns
PYTEST_ARGS ?=

.PHONY: install run test lint bench images clean-data help

help:
	@echo "make run    install into $(VENV), then run the pipeline end to end on the embedded sample data"
	@echo "make test   install into $(VENV), then run the test suite"
	@echo "make lint   ruff (and hadolint on docker/ when present)"
	@echo "make bench  run the benchmarks in bench/ (results: docs/benchmarks.md)"

# Re-install only when the dependency list changes.
$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip setuptools wheel
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

run: install
	$(NETNS) $(BIN)/imgpipe run --config configs/local.yaml

test: install
	$(NETNS) $(BIN)/python -m pytest $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check src tests bench

bench: install
	$(NETNS) $(BIN)/python bench/clean.py

clean-data:
	rm -rf .data
