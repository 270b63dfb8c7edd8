# Set-up is part of every target: a fresh clone needs only python3 (3.10+) and make.
# torch is installed first and pinned, so that pip takes the CPU build and never
# resolves a multi-GB CUDA build for an unpinned requirement.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
TORCH  ?= torch==2.13.0

.PHONY: demo test clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.runtime: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e .
	touch $@

$(VENV)/.test: pyproject.toml $(VENV)/.runtime
	$(BIN)/pip install -q -e '.[test]'
	touch $@

# The main job: offline, on small random checkpoints this project builds itself.
demo: $(VENV)/.runtime
	$(BIN)/moee demo

# The whole test suite.
test: $(VENV)/.test
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) demo-checkpoints
