# Two commands from a fresh clone: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo sweep-demo test lint bench install clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -U pip

$(STAMP): $(BIN)/python pyproject.toml constraints.txt
	$(BIN)/pip install -c constraints.txt -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check .

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q --timeout=3600 --durations=12 tests

demo: $(STAMP)
	$(BIN)/python -m pipeline.demo

sweep-demo: $(STAMP)
	$(BIN)/python -m pipeline.tune.demo

bench: $(STAMP)
	$(BIN)/python benchmarks/model_step.py --quick

clean:
	rm -rf $(VENV) build *.egg-info
