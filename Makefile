# igw: the verbs people type. Everything runs from a venv the Makefile makes itself.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STATE_DIR ?= .igw
PROTO_OUT ?= clients
PROTO_FILES := $(shell find protos -name '*.proto' | sort)

.PHONY: venv run test test-fast proto proto-check lint bench bench-quick clean

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

lint: venv
	$(VENV)/bin/ruff check services clients tests bench
	$(VENV)/bin/mypy

bench: venv
	$(PY) -m bench run

bench-quick: venv
	$(PY) -m bench run --quick

clean:
	rm -rf $(VENV) $(STATE_DIR) .pytest_cache
