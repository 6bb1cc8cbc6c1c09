# `make demo` and `make test` work on a fresh machine: each creates .venv when missing,
# installs the project (torch pinned to the 2.13.0 CPU wheel) and runs.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Two test workers (pytest-xdist), whole files per worker (their module fixtures stay
# shared): most tests wait on one subprocess at a time, so one worker leaves a core idle.
PYTEST_WORKERS ?= 2
PYTEST_ARGS ?= --durations=25 -n $(PYTEST_WORKERS) --dist loadfile

.PHONY: demo demo-vision test install clean

install: $(STAMP)

$(STAMP): pyproject.toml requirements/cpu-constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c requirements/cpu-constraints.txt -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/torchrun --standalone --nproc_per_node 2 -m pretrain experiment=demo

# A tiny Llama 3.2 Vision model learns to caption pictures it draws (about 2.5 minutes).
demo-vision: $(STAMP)
	OMP_NUM_THREADS=2 $(BIN)/python -m pretrain.demo_vision --out outputs/demo_vision

test: $(STAMP)
	$(BIN)/python -m pytest -q $(PYTEST_ARGS) tests

clean:
	rm -rf $(VENV) outputs multirun
