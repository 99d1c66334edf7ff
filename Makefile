# The two commands a new user runs (see README.md):
#   make demo   install into .venv if needed, then a short 2-process pretraining run on the shipped sample
#               (again: it resumes with --auto_resume, finds the run finished and says so)
#   make test   install into .venv if needed, then the test suite (real ColossalAI plugins on CPU)

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
NPROC ?= 2

.PHONY: install demo test test-fast test-kit test-slurm lint format clean

$(STAMP): requirements.txt requirements-colossalai.txt pyproject.toml scripts/install.sh
	@echo "Installing into $(VENV) (first time: about 1-2 minutes)..."
	PYTHON=$(PYTHON) VENV=$(VENV) bash scripts/install.sh
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

test-kit: $(STAMP)  # the offline GPU kit built and installed into a fresh venv (left out of `make test`: 40-55 s)
	$(BIN)/python -m pytest -m wheelhouse

test-slurm: $(STAMP)  # the sbatch scripts under a real one-node Slurm (left out of `make test`: about 60 s)
	$(BIN)/python -m pytest -m slurm

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff check --fix . && $(BIN)/ruff format .

clean:
	rm -rf runs .pytest_cache .ruff_cache
