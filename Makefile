# `make run` and `make test` each build .venv (once) and install what they need.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: run test lint bench clean

$(BIN)/activate-stamp: pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@

.venv: $(BIN)/activate-stamp

run: .venv
	$(BIN)/wurst-train

test: .venv
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

lint: .venv
	$(BIN)/ruff check .

clean:
	rm -rf outputs multirun .pytest_cache
