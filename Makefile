# igw: the verbs people type. Everything runs from a venv the Makefile makes itself.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STATE_DIR ?= .igw
PROTO_OUT ?= clients
PROTO_FILES := $(shell find protos -name '*.proto' | sort)

.PHONY: venv run test test-fast proto proto-check proto-lint proto-breaking lint check bench bench-quick clean

$(VENV)/.installed: pyproject.toml clients/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ./clients -e '.[dev]'
	touch $@

venv: $(VENV)/.installed

run: venv
	$(VENV)/bin/igw pki init --dir $(STATE_DIR)/pki
	$(VENV)/bin/igw up --state-dir $(STATE_DIR) --demo

test: venv
	$(PY) -m pytest -q

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

# What CI runs before the tests: lint, types and the contract checks.
check: lint proto-check proto-lint

lint: venv
	$(VENV)/bin/ruff check services clients tests bench
	$(VENV)/bin/mypy

bench: venv
	$(PY) -m bench run

bench-quick: venv
	$(PY) -m bench run --quick

clean:
	rm -rf $(VENV) $(STATE_DIR) .pytest_cache .tools
