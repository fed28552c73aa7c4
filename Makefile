# Two entry points a newcomer needs: `make demo` and `make test`. Everything installs itself
# into .venv from PyPI; a fresh machine needs only Python 3.11+ and gcc.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test check lint types unit protos serve clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/privrank demo

# Every check, as CI runs it: lint, format, types, then the test suite.
test: $(STAMP) lint types unit

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

types: $(STAMP)
	$(BIN)/mypy

unit: $(STAMP)
	$(BIN)/pytest

protos: $(STAMP)
	$(BIN)/python -m grpc_tools.protoc -Iserver/api=protos/privrank/v1 \
		--python_out=. --grpc_python_out=. --pyi_out=. server/api/privrank.proto

serve: $(STAMP)
	$(BIN)/privrank serve

clean:
	rm -rf $(VENV) .privrank .pytest_cache .mypy_cache .ruff_cache
