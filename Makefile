# The two commands a new user runs (see README.md):
#   make demo   install into .venv if needed, then a short 2-process pretraining run on the shipped sample
#               (again: it resumes with --auto_resume, finds the run finished and says so)
#   make test   install into .venv if needed, then the test suite (real ColossalAI plugins on CPU)

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
NPROC ?= 2

.PHONY: install demo test test-fast lint format clean

$(STAMP): requirements.txt requirements-colossalai.txt pyproject.toml
	@echo "Installing into $(VENV) (first time: about 2-3 minutes)..."
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --no-compile -r requirements.txt
	@# colossalai pins torch<=2.5.1 and ~100 packages; install it alone so pip keeps our pinned stack.
	$(BIN)/pip install --quiet --no-compile --no-deps -r requirements-colossalai.txt
	@# Byte-compiled once here on every core (pip compiles its 15,000 files one by one on one core). As pip
	@# does, a file that does not compile (a package's Python 2 test data) is left to import as source.
	-@$(BIN)/python -m compileall -q -j 0 $(VENV)/lib > /dev/null
	@# llama_recipe itself, editable as a plain path entry (compat): scripts and tests import it from this checkout.
	$(BIN)/pip install --quiet --no-deps --no-build-isolation --config-settings editable_mode=compat -e .
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/torchrun --standalone --nproc_per_node $(NPROC) pretrain.py \
		-c tiny -p zero2 -d data/redpajama-sample -l 256 -b 4 --max_steps 40 -s 4 --lr 3e-3 \
		-i 20 -o runs/demo/checkpoints -t runs/demo/tensorboard --auto_resume

test: $(STAMP)
	$(BIN)/python -m pytest

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not multiprocess"

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff check --fix . && $(BIN)/ruff format .

clean:
	rm -rf runs .pytest_cache .ruff_cache
