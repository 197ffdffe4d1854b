# imgpipe: `make run` and `make test` do all set-up on a fresh machine.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
NETNS := scripts/in-loopback-netns
ENGINE := scripts/with-engine
PYTEST_ARGS ?=
# Which images `make images` builds; names and tags come from src/imgpipe/containers/catalog.py
# (override with IMGPIPE_REGISTRY, IMGPIPE_IMAGE_TAG or IMGPIPE_{CPU,RAY,GPU,SERVE}_IMAGE).
IMAGE_KINDS ?= cpu ray gpu serve
# The model race's real sets (bench/race/real_sets.py): two from PyPI packages, four from npm and Debian ones.
RACE_SETS ?= digits,lfw,fashion,cvdigits,quickdraw,dogscats
IMAGE_ARGS ?=
PACKAGE ?= out/imgpipe.yaml

.PHONY: install run test lint bench bench-scale bench-download bench-peers bench-race bench-train-step bench-train-phases images images-push compile clean-data ui-pictures help image-tools run-containers test-containers test-faults test-slow cluster-build cluster-up cluster-down test-cluster test-review

help:
	@echo "make run    install into $(VENV), then run the pipeline end to end on the embedded sample data"
	@echo "make test   install into $(VENV), then run the test suite"
	@echo "make lint   ruff check, ruff format --check, hadolint"
	@echo "make bench  run the benchmarks in bench/ (results: docs/benchmarks.md)"
	@echo "make bench-scale  every step at 4k, 32k and 128k generated images: peak RSS and CPU per image"
	@echo "make bench-download  a bucket prefix fetched by imgpipe, a boto3 loop and aws s3 sync (10k, 100k objects)"
	@echo "make bench-peers  imgpipe against FFCV, torchvision, HF datasets, MosaicML Streaming, WebDataset, Ray Data, a Pool, cleanvision"
	@echo "make bench-race   imgpipe's defaults against torchvision's reference recipes on six real sets (RACE_SETS; bench/race/real_sets.py; about 2 hours)"
	@echo "make bench-train-step  the whole train step on CPU by loader engine and row cache (~12 min)"
	@echo "make bench-train-phases  where a cold train step's time goes, by phase, at 500 / 5k / 50k images"
	@echo "make images build and tag the step images through DOCKER_HOST (IMAGE_KINDS=\"$(IMAGE_KINDS)\")"
	@echo "make images-push  build, then push them"
	@echo "make run-containers  the pipeline with each step in its image, resize on a 2-container Ray cluster"
	@echo "make test-containers the container tests (fails when no engine answers)"
	@echo "make test-faults    the reliability suite: S3 faults, kill -9, two writers, fuzzing (docs/reliability.md)"
	@echo "make test-slow      the slow integration tests make test leaves out (@pytest.mark.slow)"
	@echo "make compile    compile the Kubeflow pipeline to $(PACKAGE)"
	@echo "make cluster-build  build the cluster's binaries from upstream's Go modules into the cache (cluster/; ~20 min cold)"
	@echo "make cluster-up     start the cluster in a network namespace of its own (docs/cluster.md)"
	@echo "make test-cluster   the tests against the running cluster (each skips with one line when it is not up)"
	@echo "make test-review    the label review loop with a real Label Studio and a reviewer in Chromium"
	@echo "make ui-pictures    refresh docs/img/kfp-ui-*.png: a person's path through KFP's UI on the running cluster"
	@echo "make cluster-down   stop it: no process, mount, cgroup or state left"
	@echo "make clean-data     remove .data/ (make run's object store, runs and logs)"

# Re-install only when the dependency list changes. The images' pins (docker/constraints.txt)
# hold here too, so the tests run the versions the images ship, whatever the index has since.
$(STAMP): pyproject.toml docker/constraints.txt src/imgpipe/data/_jpeg_region.c
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip setuptools wheel
	$(BIN)/python -m pip install -q -e '.[dev]' --constraint docker/constraints.txt
	touch $(STAMP)

install: $(STAMP)

run: install
	$(NETNS) $(BIN)/imgpipe run --config configs/local.yaml

# img2dataset writes sources for tests/data/test_img2dataset_sources.py from its own venv: it pins
# webdataset<0.3 and albumentations<2, older than this venv's.
IMG2DATASET := $(VENV)/img2dataset/bin/python
$(IMG2DATASET):
	$(PY) -m venv $(VENV)/img2dataset
	$(IMG2DATASET) -m pip install -q img2dataset==1.47.0

# The serving runtime (imgpipe.serving.runtime, the serve image) from its own venv: kserve 0.20 needs
# pandas<3, where this venv and the step images have pandas 3. The images' pins hold here too; the
# tests import its kserve-free half (imgpipe.serving.model) here and start the server with this python.
SERVE := $(VENV)/serve/bin/python
SERVE_STAMP := $(VENV)/serve/.installed
$(SERVE_STAMP): pyproject.toml docker/constraints.txt src/imgpipe/data/_jpeg_region.c
	$(PY) -m venv $(VENV)/serve
	$(SERVE) -m pip install -q --upgrade pip setuptools wheel
	$(SERVE) -m pip install -q -e '.[serve]' --constraint docker/constraints.txt
	touch $(SERVE_STAMP)

# The container suite (make test-containers) needs an engine and images; the reliability suite
# (make test-faults) takes about eight minutes; the slow integration tests (make test-slow) repeat
# what a faster test here covers. Each has its own target; the quick reliability tests (hostile parameters, storage policy)
# run here too.
# Spread over the machine's cores, a test file per worker (module fixtures stay shared); the 20
# slowest tests and the total time are printed at the end.
TEST_WORKERS ?= auto
test: install $(IMG2DATASET) $(SERVE_STAMP)
	$(NETNS) env IMGPIPE_IMG2DATASET_PYTHON=$(abspath $(IMG2DATASET)) IMGPIPE_SERVE_PYTHON=$(abspath $(SERVE)) $(BIN)/python -m pytest -m "not containers and not slow and not cluster and not review and (not faults or quick)" -n $(TEST_WORKERS) --dist loadfile --durations=20 $(PYTEST_ARGS)

# The tests marked slow (whole-pipeline variants, Ray Data prediction cases, DDP variants, the
# export under onnxruntime 1.15.0, the one tritonserver 23.05 bundles: installed here, outside the
# loopback-only namespace the tests run in).
# Label Studio for the review loop's live test (issue 85): PyPI's server in a venv of its own (its
# Django and pins are its own), started on loopback by tests/review_live with a database of its own.
LABEL_STUDIO := $(VENV)/labelstudio/bin/label-studio
LABEL_STUDIO_PIN := label-studio==$(shell . cluster/versions.env && echo $$LABEL_STUDIO_VERSION)
$(LABEL_STUDIO):
	python3 -m venv $(VENV)/labelstudio
	$(VENV)/labelstudio/bin/python -m pip install -q $(LABEL_STUDIO_PIN)

# The loop with a real Label Studio and a reviewer in Chromium (Debian's chromium, chromium-driver):
# an audit's suspects published, three labels corrected in the browser, imported, and the next clean
# run using them. Not part of make test; the export/import logic is, against recorded payloads.
test-review: install $(LABEL_STUDIO)
	$(NETNS) env IMGPIPE_LABEL_STUDIO=$(abspath $(LABEL_STUDIO)) $(BIN)/python -m pytest -m review tests/review_live $(PYTEST_ARGS)

ORT115 := $(VENV)/ort115/bin/python
$(ORT115):
	$(PY) -m venv $(VENV)/ort115
	$(ORT115) -m pip install -q onnxruntime==1.15.0 "numpy<2"

test-slow: install $(ORT115)
	$(NETNS) env IMGPIPE_ORT115_PYTHON=$(abspath $(ORT115)) $(BIN)/python -m pytest -m "slow and not containers" $(PYTEST_ARGS)

# Figures land in out/reliability/*.json; docs/reliability.md holds the table.
test-faults: install
	$(NETNS) $(BIN)/python -m pytest -m faults tests/faults $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check src tests bench components pipelines cluster/mlmd
	$(BIN)/ruff format --check src tests bench components pipelines cluster/mlmd
	$(BIN)/hadolint docker/Dockerfile
	$(BIN)/shellcheck -x cluster/*.sh cluster/kfp/*.sh cluster/kubectl cluster/in-netns scripts/*

# Needs a Docker-compatible engine (DOCKER_HOST; docs/containers.md). Builds use the
# host's network for pip, so they run outside the loopback-only namespace.
# Where no registry gives the base image, the build bootstraps one from Debian's packages with
# mmdebstrap (imgpipe.containers.build): installed here when missing, as cluster-build installs its own.
IMAGES_APT := mmdebstrap
image-tools:
	@dpkg -s $(IMAGES_APT) >/dev/null 2>&1 || { echo "make images: installing $(IMAGES_APT) (to build a base image from Debian's packages where none can be pulled)"; \
		$(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq $(IMAGES_APT) >/dev/null; }

images: install image-tools
	$(ENGINE) $(BIN)/imgpipe images build $(IMAGE_ARGS) $(IMAGE_KINDS)

images-push: install image-tools
	$(ENGINE) $(BIN)/imgpipe images build --push $(IMAGE_ARGS) $(IMAGE_KINDS)

# The same pipeline as `make run`, each step in its image as uid 10001; every container,
# the S3 server and the Ray cluster share one loopback-only network namespace.
run-containers: install
	$(NETNS) $(ENGINE) $(BIN)/imgpipe run --runner docker --config configs/local.yaml

test-containers: install
	$(NETNS) $(ENGINE) env IMGPIPE_REQUIRE_ENGINE=1 $(BIN)/python -m pytest -m containers tests/containers $(PYTEST_ARGS)

compile: install
	$(BIN)/imgpipe compile $(PACKAGE)

# The resize benchmark's real photographs come from scikit-image and scikit-learn (extra "bench").
bench: install
	$(BIN)/python -m pip install -q -e '.[dev,bench]'
	$(NETNS) $(BIN)/python bench/steps/clean.py --classes 37 --per-class 100 --repeats 3
	$(NETNS) $(BIN)/python bench/steps/resize.py --repeats 3 --cold
	$(NETNS) $(BIN)/python bench/steps/loader.py --images 2000 --epochs 3 --cold-repeats 2
	$(NETNS) $(BIN)/python bench/probes/crop_modes.py --classes 12 --per-class 80 --size 64 --epochs 12 --seeds 0,1
	$(NETNS) $(BIN)/python bench/race/pretrained.py --json bench/results/pretrained.json
	$(NETNS) $(BIN)/python bench/steps/step_report.py --repeats 3 --resize

# The model race (issues 49, 71): imgpipe train with its defaults against torchvision's IMAGENET1K_V2 recipe and the reference script's own defaults
# (bench/race/reference_recipe.py), cold, 3 seeds, on real sets that scikit-learn and scikit-image ship
# (extra "bench"). Figures: bench/results/reference.json, docs/img/reference.png, docs/benchmarks.md.
bench-race: install
	$(BIN)/python -m pip install -q -e '.[dev,bench]' --constraint docker/constraints.txt
	$(BIN)/python bench/race/packaged.py install
	$(NETNS) $(BIN)/python bench/race/reference.py --sets $(RACE_SETS) --seeds 0,1,2 --set-seeds lfw=0,1,2,3,4,5 --epochs 10 --ref-lrs 0.025,0.1 \
		--set-sizes quickdraw=32 --set-sizes dogscats=32 --json bench/results/reference.json --plot docs/img/reference.png

# Where a cold train step's time goes, by phase, at 500, 5,000 and 50,000 images (issue 71; bench/steps/train_phases.py).
bench-train-phases: install
	$(NETNS) $(BIN)/python bench/steps/train_phases.py --sizes 500,5000,50000 --epochs 10,10,1 \
		--json bench/results/train_phases.json --plot docs/img/train-phases.png

# The whole train step on the CPU by loader engine and row cache (issue 50): what the defaults are chosen by.
bench-train-step: install
	$(NETNS) $(BIN)/python bench/steps/train_step.py --images 1024 --size 96 --epochs 3 --json bench/results/train_step.json

# imgpipe's download of a bucket prefix against a boto3 loop and `aws s3 sync` (its own venv: the
# CLI pins botocore), 10k and 100k objects on a local S3 server; figures in docs/benchmarks.md.
AWSCLI := $(VENV)/awscli/bin/aws
$(AWSCLI):
	$(PY) -m venv $(VENV)/awscli
	$(VENV)/awscli/bin/python -m pip install -q awscli

bench-download: install $(AWSCLI)
	$(NETNS) $(BIN)/python bench/steps/download.py --objects 10000,100000 --repeats 2 --json bench/results/download.json

# imgpipe against the tools a user would pick instead (issue 39): the training loader against FFCV,
# torchvision ImageFolder, HF datasets, MosaicML Streaming and WebDataset; resize against Ray Data's
# canonical pipelines and a process pool; near-duplicates against cleanvision. Figures:
# bench/results/peers.json, docs/img/peers.png, docs/benchmarks.md. FFCV and MosaicML Streaming get
# their own venv: FFCV builds from its sdist against OpenCV and libjpeg-turbo (apt, installed when
# missing) and pulls opencv-python; Streaming pins numpy<2.2 and transformers<5 (huggingface-hub<1),
# which this venv's numpy and datasets exclude. Either may fail to install: the bench's rows say so.
PEERS_APT := libopencv-dev libturbojpeg0-dev pkg-config g++
PEERS_PY := $(VENV)/peers/bin/python
PEERS_STAMP := $(VENV)/peers/.installed
PEERS_PINS = "numpy<2.2" $(shell grep -E '^(torch|torchvision|pyarrow)==' docker/constraints.txt)
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
$(PEERS_STAMP): docker/constraints.txt
	-dpkg -s $(PEERS_APT) >/dev/null 2>&1 || ($(SUDO) apt-get update && $(SUDO) apt-get install -y $(PEERS_APT))
	$(PY) -m venv $(VENV)/peers
	$(PEERS_PY) -m pip install -q --upgrade pip setuptools wheel
	$(PEERS_PY) -m pip install -q $(PEERS_PINS)
	-$(PEERS_PY) -m pip install -q $(PEERS_PINS) ffcv==1.0.2
	-$(PEERS_PY) -m pip install -q $(PEERS_PINS) mosaicml-streaming==0.13.0
	touch $(PEERS_STAMP)

bench-peers: install $(PEERS_STAMP)
	$(BIN)/python -m pip install -q -e '.[dev,bench,peers]' --constraint docker/constraints.txt
	$(NETNS) env IMGPIPE_PEERS_PYTHON=$(abspath $(PEERS_PY)) $(BIN)/python bench/peers/peers.py --repeats 3 \
		--json bench/results/peers.json --plot docs/img/peers.png

# Every step as a fresh process at 4k, 32k and 128k generated photos (about 4 GB of archive
# at 128k under SCALE_ROOT, reused between runs); about 40 minutes on 2 cores with the
# first generation. Figures: bench/results/scale.json, docs/img/scale.png, docs/benchmarks.md.
SCALE_ROOT ?= /var/tmp/imgpipe-scale
SCALE_SIZES ?= 4000,32000,128000
bench-scale: install
	$(BIN)/python -m pip install -q -e '.[dev,bench]'
	$(NETNS) $(BIN)/python bench/scale/scale.py --sizes $(SCALE_SIZES) --root $(SCALE_ROOT) --repeats 3 \
		--json bench/results/scale.json --plot docs/img/scale.png

# The cluster tiers (issue 46; docs/cluster.md): real etcd, kube-apiserver, controllers, built
# from upstream's Go modules at the versions in cluster/versions.env into CLUSTER_CACHE (outside
# the repository), run inside a network and mount namespace of their own. Not part of make test.
# What the node runs beside the binaries built from Go modules (Debian's packages).
CLUSTER_APT := runc containernetworking-plugins iptables podman jq openssl mmdebstrap chromium chromium-driver
cluster-build:
	dpkg -s $(CLUSTER_APT) >/dev/null 2>&1 || ($(SUDO) apt-get update && $(SUDO) apt-get install -y $(CLUSTER_APT))
	bash cluster/build.sh $(GROUPS)
	bash cluster/images.sh build

cluster-up: cluster-build
	bash cluster/up.sh

cluster-down:
	bash cluster/down.sh

# Inside the cluster's network namespace when it is up (its API server is on 127.0.0.1 there);
# otherwise every test skips with the one line that says so.
test-cluster: install
	cluster/in-netns $(BIN)/python -m pytest -m cluster tests/cluster $(PYTEST_ARGS)

# The screenshots docs/ shows (docs/img/kfp-ui-*.png), refreshed by the UI test of a person's path
# through KFP's UI on the running cluster (make cluster-up first).
ui-pictures: install
	IMGPIPE_UI_PICTURES=$(CURDIR)/docs/img cluster/in-netns $(BIN)/python -m pytest -m cluster tests/cluster/test_kfp_ui.py -k uploads $(PYTEST_ARGS)

clean-data:
	rm -rf .data
