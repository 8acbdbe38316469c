# igw: the verbs people type. Everything runs from a venv the Makefile makes itself.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STATE_DIR ?= .igw
PROTO_OUT ?= clients
PROTO_FILES := $(shell find protos -name '*.proto' | sort)
CHECKOV_VERSION ?= 3.3.30
CHECKOV := .tools/checkov/bin/checkov

.PHONY: venv run test test-fast proto proto-check proto-lint proto-breaking proto-breaking-parent lint check bench bench-quick clean \
	lint-deploy deploy-pin deploy-rules image-tools image-base image image-test

# The runtime (.), the agent client (./clients), the dev package (./dev) and the dev extra's tools.
$(VENV)/.installed: pyproject.toml clients/pyproject.toml dev/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ./clients -e ./dev -e '.[dev]'
	touch $@

venv: $(VENV)/.installed

run: venv
	$(VENV)/bin/igw pki init --dir $(STATE_DIR)/pki
	$(VENV)/bin/igw up --state-dir $(STATE_DIR) --demo

test: venv $(CHECKOV)
	$(PY) -m pytest -q --durations=25

test-fast: venv
	$(PY) -m pytest -q tests/unit

proto: venv
	$(PY) -m grpc_tools.protoc -Iprotos --python_out=$(PROTO_OUT) --pyi_out=$(PROTO_OUT) \
		--grpc_python_out=$(PROTO_OUT) $(PROTO_FILES)

# Regenerates the stubs into a scratch directory and fails if they differ from the committed ones.
proto-check: venv
	@tmp=$$(mktemp -d) && trap 'rm -rf "$$tmp"' EXIT && \
	$(PY) -m grpc_tools.protoc -Iprotos --python_out=$$tmp --pyi_out=$$tmp --grpc_python_out=$$tmp $(PROTO_FILES) && \
	for f in $$(cd $$tmp && find igw -type f -name '*_pb2*'); do \
		cmp -s "$$tmp/$$f" "$(PROTO_OUT)/$$f" || { echo "proto drift: $(PROTO_OUT)/$$f differs from protoc output; run make proto"; exit 1; }; \
	done && \
	for f in $$(cd $(PROTO_OUT) && find igw -type f -name '*_pb2*' ! -path '*/__pycache__/*'); do \
		[ -f "$$tmp/$$f" ] || { echo "proto drift: $(PROTO_OUT)/$$f has no .proto source"; exit 1; }; \
	done && echo "proto-check: generated stubs match protos/"

# buf (from npm, pinned) lints the contract; proto-breaking compares it with BASE (a git ref).
BUF_VERSION ?= 1.75.0
BUF := .tools/node_modules/.bin/buf
BASE ?= main
$(BUF):
	npm install --silent --no-audit --no-fund --prefix .tools @bufbuild/buf@$(BUF_VERSION)

proto-lint: $(BUF)
	$(BUF) lint

# Pre-1.0 the contract may still break on purpose; run this on a branch to see what a change breaks.
proto-breaking: $(BUF)
	$(BUF) breaking --against '.git#ref=$(BASE)'

# CI: the contract at HEAD breaks nothing its parent commit published (a clone without history says so).
proto-breaking-parent: $(BUF)
	@if git rev-parse --verify -q HEAD~1 >/dev/null; then \
		echo "$(BUF) breaking --against '.git#ref=HEAD~1'"; $(BUF) breaking --against '.git#ref=HEAD~1'; \
	else echo "proto-breaking-parent: this clone has no parent commit to compare the contract with"; fi

# What CI runs before the tests: lint, types and the contract checks.
check: lint proto-check proto-lint proto-breaking-parent lint-deploy

lint: venv
	$(VENV)/bin/ruff check services clients dev tests bench
	$(VENV)/bin/mypy

bench: venv
	$(PY) -m bench run

bench-quick: venv
	$(PY) -m bench run --quick

# ---- container image (see docs/deploy.md and ../shared/notes/containers.md) -------------------------
VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml | head -n1)
COMMIT := $(shell git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)
IMAGE ?= localhost/igw:$(VERSION)
# The Containerfile defaults to python:3.11-slim; no registry is reachable here, so the Makefile makes
# a base from Debian packages (mmdebstrap) and passes it in. Set BASE_IMAGE to use your own.
BASE_IMAGE ?= localhost/igw-base:bookworm
DEBIAN_SUITE ?= bookworm
CONTAINERS_CONF_FILE := $(CURDIR)/.tools/containers.conf
PODMAN := CONTAINERS_CONF=$(CONTAINERS_CONF_FILE) podman
HOST_CA ?= /etc/ssl/certs/ca-certificates.crt

# checkov (the Kubernetes policy linter) in its own venv: its pins must not bend the project's.
$(CHECKOV):
	$(PYTHON) -m venv .tools/checkov
	.tools/checkov/bin/pip install -q checkov==$(CHECKOV_VERSION)

# After editing deploy/k8s/base/config/router.yaml: refresh the digest pin beside it.
deploy-pin:
	cd deploy/k8s/base/config && sha256sum router.yaml | cut -d' ' -f1 > router.yaml.sha256

# After editing deploy/prometheus/igw-rules.yaml: rebuild the PrometheusRule from it.
deploy-rules: venv
	$(PY) deploy/prometheus/build_rules.py

# Dockerfile lint (hadolint from PyPI, in the dev extra).
lint-deploy: venv
	$(VENV)/bin/hadolint Containerfile

# podman (with runc) and mmdebstrap from Debian, when missing.
image-tools:
	@command -v podman >/dev/null && command -v runc >/dev/null && command -v mmdebstrap >/dev/null || { \
		apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q podman runc mmdebstrap; }

# Project-local podman settings: runc (crun refuses this cgroup layout), pinned rlimits, file events.
$(CONTAINERS_CONF_FILE):
	@mkdir -p $(dir $@)
	@n=$$(ulimit -Hn); printf '%s\n' '[containers]' \
		"default_ulimits = [\"nofile=$$n:$$n\", \"nproc=32768:32768\"]" \
		'[engine]' 'runtime = "runc"' 'cgroup_manager = "cgroupfs"' 'events_logger = "file"' > $@

image-base: image-tools $(CONTAINERS_CONF_FILE)
	@if [ "$(BASE_IMAGE)" = "localhost/igw-base:$(DEBIAN_SUITE)" ] && ! $(PODMAN) image exists $(BASE_IMAGE); then \
		set -e; mkdir -p build; \
		mmdebstrap --quiet --variant=minbase --include=python3,python3-venv,ca-certificates \
			$(DEBIAN_SUITE) build/igw-base.tar; \
		$(PODMAN) import --change 'CMD ["/bin/bash"]' --change 'ENV LANG=C.UTF-8' build/igw-base.tar $(BASE_IMAGE); \
		rm -f build/igw-base.tar; \
	fi

image: image-base lint-deploy
	$(PODMAN) build -f Containerfile -t $(IMAGE) \
		--build-arg BASE_IMAGE=$(BASE_IMAGE) --build-arg VERSION=$(VERSION) --build-arg COMMIT=$(COMMIT) \
		$(if $(wildcard $(HOST_CA)),-v $(HOST_CA):/run/host-ca.crt:ro --build-arg PIP_CERT=/run/host-ca.crt) .

# The three services from the image: read-only, non-root, host network, against an embedded Postgres on
# TCP; migrations as a one-off job container; real calls through the router; then everything stops.
image-test: image venv
	IGW_IMAGE=$(IMAGE) CONTAINERS_CONF=$(CONTAINERS_CONF_FILE) $(PY) -m pytest -q tests/image

clean:
	rm -rf $(VENV) $(STATE_DIR) .pytest_cache .tools build
