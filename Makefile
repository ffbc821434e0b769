# proxyfleet: `make run` starts everything locally, `make test` runs lint + the test suite.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup run proxy test lint fmt bench bench-store bench-visibility bench-queries bench-rules conformance-oracle clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

run: setup
	$(BIN)/proxyfleet up

proxy: setup
	$(BIN)/proxyfleet proxy

lint: setup
	$(BIN)/ruff check libs services tests bench
	$(BIN)/ruff format --check libs services tests bench
	$(BIN)/mypy libs services

fmt: setup
	$(BIN)/ruff format libs services tests bench
	$(BIN)/ruff check --fix libs services tests bench

test: lint
	$(BIN)/pytest -q

bench: setup
	$(BIN)/python bench/run.py

bench-store: setup
	$(BIN)/python bench/store_ingest.py

bench-visibility: setup
	$(BIN)/python bench/visibility.py

bench-queries: setup
	$(BIN)/python bench/queries.py

bench-rules: setup
	$(BIN)/python bench/rules.py

conformance-oracle: setup
	$(BIN)/python tests/conformance/oracle.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
