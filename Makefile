# proxyfleet: `make run` starts everything locally, `make test` runs lint + the test suite.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup browser mitm run proxy test lint fmt bench bench-store bench-store-pg bench-visibility bench-queries bench-rules bench-ui conformance-oracle clean

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

# The browser tests drive Debian's chromium (never a downloaded browser build): installed here
# when missing (as root, or through sudo); the tests fail, not skip, without it.
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends chromium; }
	@chromium --version 2>/dev/null | head -1

# mitmproxy in a venv of its own (bench/.venv-mitm): the benchmark's rival, and the HAR test
# checks that mitmproxy reads our HAR files
mitm: setup
	@test -x bench/.venv-mitm/bin/mitmdump || $(BIN)/python -c \
	  "import sys; sys.path.insert(0, 'bench'); from infra import ensure_mitmdump; ensure_mitmdump()"

test: lint browser mitm
	$(BIN)/pytest -q

bench: setup
	$(BIN)/python bench/run.py

bench-store: setup
	$(BIN)/python bench/store_ingest.py

# PostgreSQL: ingest with one and two stores, then list pages over 5M flows (the bench makes
# and drops databases of its own on the server FLEET_BENCH_PG names)
FLEET_BENCH_PG ?= postgresql://postgres@127.0.0.1:5432/postgres
bench-store-pg: setup
	$(BIN)/python bench/store_ingest.py --db $(FLEET_BENCH_PG) --skip-query
	$(BIN)/python bench/store_ingest.py --db $(FLEET_BENCH_PG) --skip-query --stores 2
	$(BIN)/python bench/store_ingest.py --db $(FLEET_BENCH_PG) --skip-ingest --db-flows 5000000

bench-visibility: setup
	$(BIN)/python bench/visibility.py

bench-queries: setup
	$(BIN)/python bench/queries.py

bench-rules: setup
	$(BIN)/python bench/rules.py

# the web UI in Debian's chromium: 1M flows in the store, 10 minutes of live traffic
bench-ui: setup browser
	$(BIN)/python bench/ui.py

conformance-oracle: setup
	$(BIN)/python tests/conformance/oracle.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
