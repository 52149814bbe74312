# Two fresh-machine commands: `make demo` and `make test`. Both create .venv when missing.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast lint bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --no-cache-dir --upgrade pip

# --no-cache-dir: the install is ~2.2 GB; a pip cache would hold its downloads a second time (a CI run
# once failed with "No space left on device" during this step).
$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install -q --no-cache-dir -e ".[test,plot]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m examples.demo --out demo-out --overwrite

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

# ruff lint and formatting; .ci/run runs this before the tests.
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow" tests

bench: $(STAMP)
	$(BIN)/python bench/import.py && $(BIN)/python bench/expand.py && $(BIN)/python bench/train.py \
		&& $(BIN)/python bench/data.py && $(BIN)/python bench/attention.py && $(BIN)/python bench/train_cli.py

clean:
	rm -rf demo-out .pytest_cache
