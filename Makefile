# Two entry points, both self-contained on a fresh machine with Python 3.11 + pip:
#   make demo   -- set up .venv and run the demo
#   make test   -- set up .venv, lint, run the default test suite
# torch is pinned here (not in pyproject) so pip never swaps the build on disk for another one.
# On aarch64 use: make TORCH="torch==2.9.1 torchvision==0.24.1" test
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.14.1 torchvision==0.29.1
PY := $(VENV)/bin/python

.PHONY: demo test lint venv

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[test]'
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(PY) examples/trace_resnet.py

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: lint
	$(PY) -m pytest -q
