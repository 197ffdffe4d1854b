# imgpipe: `make run` and `make test` do all set-up on a fresh machine.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
NETNS := scripts/in-loopback-netns
PYTEST_ARGS ?=
# Which images `make images` builds; names and tags come from components/images.py
# (override with IMGPIPE_REGISTRY, IMGPIPE_IMAGE_TAG or IMGPIPE_{CPU,RAY,GPU}_IMAGE).
IMAGE_KINDS ?= cpu ray gpu
PACKAGE ?= out/imgpipe.yaml

.PHONY: install run test lint bench images images-push compile clean-data help

help:
	@echo "make run    install into $(VENV), then run the pipeline end to end on the embedded sample data"
	@echo "make test   install into $(VENV), then run the test suite"
	@echo "make lint   ruff (and hadolint on docker/ when present)"
	@echo "make bench  run the benchmarks in bench/ (results: docs/benchmarks.md)"
	@echo "make images build and tag the step images (docker; IMAGE_KINDS=\"$(IMAGE_KINDS)\")"
	@echo "make images-push  build, then push them"
	@echo "make compile    compile the Kubeflow pipeline to $(PACKAGE)"

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
	$(BIN)/ruff check src tests bench components pipelines
	$(BIN)/hadolint docker/*.Dockerfile

# Needs a Docker engine (BuildKit); the build context is the repository root (.dockerignore).
images: install
	$(BIN)/python -m components.images build $(IMAGE_KINDS)

images-push: install
	$(BIN)/python -m components.images build --push $(IMAGE_KINDS)

compile: install
	$(BIN)/imgpipe compile $(PACKAGE)

# The resize benchmark's real photographs come from scikit-image and scikit-learn (extra "bench").
bench: install
	$(BIN)/python -m pip install -q -e '.[dev,bench]'
	$(NETNS) $(BIN)/python bench/clean.py --classes 37 --per-class 100 --repeats 5
	$(NETNS) $(BIN)/python bench/resize.py --repeats 3
	$(NETNS) $(BIN)/python bench/loader.py --images 2000 --epochs 3

clean-data:
	rm -rf .data
