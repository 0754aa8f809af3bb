# Two entry points, both self-contained on a fresh machine with Python 3.11 + pip:
#   make demo   -- set up .venv and run the demo
#   make test   -- set up .venv, lint, run the default test suite
# torch is pinned here (not in pyproject) so pip never swaps the build on disk for another one.
# On aarch64 use: make TORCH="torch==2.9.1 torchvision==0.24.1" test
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.14.1 torchvision==0.29.1
PY := $(VENV)/bin/python

.PHONY: demo test test-kernels lint venv

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[test,lapx,hf,diffusers]'
	touch $@

venv: $(VENV)/.installed

# Fashion-MNIST for the demo: Debian's package when we are root with apt-get (failure is fine:
# permask then looks in $$PERMASK_DATA and finally downloads through torchvision).
demo: venv
	@if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || \
		{ apt-get update -q >/dev/null 2>&1 && \
		  apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1; } || true; \
	fi
	$(if $(PERMASK_DATA),PERMASK_DATA=$(PERMASK_DATA) )$(PY) -m permask demo --out runs/demo

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: lint
	$(PY) -m pytest -q

# The outcome tests (what training and alignment reach: accuracies, barriers, recovery) once
# more under a second CPU capability, so a test that holds only on this machine's float kernels
# is caught on any machine: CAP (default: `default`, the plain C++ kernels) unless that is the
# machine's own, then nothing to compare against.
CAP ?= default
test-kernels: venv
	@own=$$($(PY) -c "import torch; print(torch.backends.cpu.get_cpu_capability().lower())"); \
	if [ "$$own" = "$(CAP)" ]; then \
		echo "test-kernels: this CPU's capability is already $(CAP); nothing to compare"; \
	else \
		echo "test-kernels: outcome tests under ATEN_CPU_CAPABILITY=$(CAP) (this CPU: $$own)"; \
		ATEN_CPU_CAPABILITY=$(CAP) $(PY) -m pytest -q -m "outcome and not slow"; \
	fi
