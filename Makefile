# tierstack: `make run` starts the stack, `make test` checks everything. Both set themselves up.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
BUF_VERSION := 1.75.0
BUF := .tools/node_modules/.bin/buf
CODE := server client tools tests examples

.PHONY: install tools gen lint test run bench clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

install: $(BIN)/.installed

$(BUF):
	npm install --prefix .tools --no-audit --no-fund --silent @bufbuild/buf@$(BUF_VERSION)

tools: $(BUF)

gen: install
	$(BIN)/python tools/gen_protos.py

lint: install tools
	$(BIN)/ruff check $(CODE)
	$(BIN)/ruff format --check $(CODE)
	$(BIN)/mypy
	$(BUF) lint

test: lint
	$(BIN)/python -m pytest

run: install
	$(BIN)/tierstack up

bench: install
	$(BIN)/python -m pip install --quiet -e '.[bench]'
	$(BIN)/python -m tools.bench.bench_execute
	$(BIN)/python -m tools.bench.bench_orchestrate
	$(BIN)/python -m tools.bench.bench_coordinate
	$(BIN)/python -m tools.bench.bench_limits

clean:
	rm -rf $(VENV) .tools .tierstack .mypy_cache .ruff_cache .pytest_cache .hypothesis
