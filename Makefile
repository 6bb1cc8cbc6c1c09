# `make demo` and `make test` work on a fresh machine: each creates .venv when missing,
# installs the project (torch pinned to the 2.13.0 CPU wheel) and runs.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Two test workers (pytest-xdist), whole files per worker (their module fixtures stay
# shared): most tests wait on one subprocess at a time, so one worker leaves a core idle.
PYTEST_WORKERS ?= 2
PYTEST_ARGS ?= --durations=25 -rs -n $(PYTEST_WORKERS) --dist loadfile

.PHONY: demo demo-vision test test-titan install clean

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

# torchtitan interop against torchtitan's own code, in a venv of its own (torchtitan pins
# datasets<4.8); PRETRAIN_TEST_REQUIRE_TITAN=1 makes a missing torchtitan fail, not skip.
TITAN_VENV ?= .venv-titan
TITAN_STAMP := $(TITAN_VENV)/.installed

$(TITAN_STAMP): pyproject.toml requirements/cpu-constraints.txt
	test -x $(TITAN_VENV)/bin/python || $(PYTHON) -m venv $(TITAN_VENV)
	$(TITAN_VENV)/bin/python -m pip install -q --upgrade pip
	$(TITAN_VENV)/bin/python -m pip install -q -c requirements/cpu-constraints.txt -e '.[dev,titan]'
	touch $(TITAN_STAMP)

test-titan: $(TITAN_STAMP)
	PRETRAIN_TEST_REQUIRE_TITAN=1 $(TITAN_VENV)/bin/python -m pytest -q -rs --durations=10 tests/test_titan.py

clean:
	rm -rf $(VENV) $(TITAN_VENV) outputs multirun
