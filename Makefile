# ClassMesh developer commands. `make run` and `make test` do all set-up themselves.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
NPM_STAMP := node_modules/.installed
BUF := node_modules/.bin/buf

.PHONY: venv system-deps gen gen-files gen-check web lint test test-only test-gateway-node run bench clean

venv: $(STAMP) $(NPM_STAMP)

$(STAMP): pyproject.toml sdk/python/pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

$(NPM_STAMP): package.json package-lock.json
	npm install --no-audit --no-fund --loglevel=error
	touch $@

# Regenerate gen/python and gen/ts from proto/ (local plugins only).
SDK_GEN := sdk/python/classmesh_sdk/_generated.py

gen: venv
	$(BUF) lint
	$(MAKE) --no-print-directory gen-files
	$(MAKE) --no-print-directory web

gen-files:
	$(BUF) generate
	$(BUF) build -o -#format=binpb | $(BIN)/python tools/gen_sdk.py
	$(BIN)/ruff format -q $(SDK_GEN)

# Fails when regenerating would change gen/ (stale generated code).
gen-check: venv
	@tmp=$$(mktemp -d); cp -a gen "$$tmp/before"; cp $(SDK_GEN) "$$tmp/before/sdk_generated.py"; \
	$(MAKE) --no-print-directory gen-files >/dev/null 2>&1; cp $(SDK_GEN) gen/sdk_generated.py; \
	if ! diff -r -q "$$tmp/before" gen; then rm -f gen/sdk_generated.py; \
	  echo "generated code is stale: regenerated it now; review and commit gen/ and $(SDK_GEN)"; \
	  rm -rf "$$tmp"; exit 1; \
	fi; rm -f gen/sdk_generated.py; rm -rf "$$tmp"; echo "generated code is up to date"

# The web SDK (sdk/web: tsc type check and .d.ts, esbuild bundles) and the classroom page
# bundle it builds into the gateway's static/app.js (build output, git-ignored).
web: $(NPM_STAMP)
	node sdk/web/build.mjs

lint: venv
	$(BUF) lint
	$(BIN)/ruff check servers sdk tests bench tools
	$(BIN)/ruff format --check servers sdk tests bench tools
	$(BIN)/mypy

# Janus, Chromium and ChromeDriver for the media and browser tests (Debian packages).
system-deps:
	bash tools/system_deps.sh

test: venv system-deps gen-check lint test-only

test-only: venv system-deps web
	$(BIN)/pytest -q

# The Connect-ES suite (tests/node/, node --test) against a fresh `classmesh up` and its
# grpc-web gateway: pytest starts the mesh and runs Node, so `test-only` (the whole pytest
# run) already includes it; this target runs it alone.
test-gateway-node: venv
	$(BIN)/pytest -q tests/e2e/test_gateway.py -k node_suite

run: venv web
	$(BIN)/classmesh up

bench: venv
	@for f in bench/bench_*.py; do echo "== $$f"; $(BIN)/python $$f || exit 1; done
	@echo "== bench/gateway.py"; $(BIN)/python bench/gateway.py
	@echo "== bench/sfu.py --quick"; $(BIN)/python bench/sfu.py --quick

clean:
	rm -rf $(VENV) node_modules .mypy_cache .ruff_cache .pytest_cache
