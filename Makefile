# Two commands do everything on a fresh machine:
#   make demo        run the factory on its embedded default recipe
#   make test        run the whole test suite (make test-fast: the in-process tier, under 2 minutes)
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# torch is installed before anything that depends on it, pinned, so that pip never resolves
# a newer multi-GB build by itself. On the CPU machines this project is developed on, this
# version is a CPU wheel on disk; on a Linux GPU host PyPI's wheel of it is the CUDA build.
TORCH_SPEC ?= torch==2.13.0

.PHONY: demo test test-fast lint clean gpu-check gpu-wheels

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet '$(TORCH_SPEC)'
	$(BIN)/python -m pip install --quiet -e '.[dev,eval]'
	touch $@

demo: $(BIN)/.installed
	$(BIN)/factory run recipes/tiny.yaml

test: $(BIN)/.installed
	$(BIN)/python -m pytest -q --durations=15 tests

test-fast: $(BIN)/.installed
	$(BIN)/python -m pytest -q -m "not slow" tests

lint: $(BIN)/.installed
	$(BIN)/ruff check .

# On a GPU machine: bench/gpu_check.py with the machine's own torch, CUDA, transformers and Triton.
# What that Python lacks comes from .gpu-wheels/ (made on a networked machine with `make gpu-wheels`
# and carried with the checkout), installed into .gpu-venv/, a venv that sees the system's packages:
# pip installs only what is missing and never replaces the machine's numpy or torch.
# Without CUDA it says so and stops; `python bench/gpu_check.py --dry-run` rehearses it on a CPU.
GPU_PYTHON ?= python3
GPU_PACKAGES := pydantic pyyaml tqdm pytest matplotlib
gpu-check:
	@$(GPU_PYTHON) -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null || { \
		echo "gpu-check: $(GPU_PYTHON) sees no CUDA device (or has no torch): run it on a GPU machine." \
		"Rehearse it here with: $(BIN)/python bench/gpu_check.py --dry-run" >&2; exit 2; }
	@if [ -d .gpu-wheels ]; then \
		$(GPU_PYTHON) -m venv --system-site-packages --without-pip .gpu-venv && \
		.gpu-venv/bin/python -m pip install --quiet --no-index --find-links .gpu-wheels $(GPU_PACKAGES) \
		|| echo "gpu-check: .gpu-wheels/ does not install into $(GPU_PYTHON) (wheels for another Python?); going on with what it has"; \
	fi
	$$(if [ -x .gpu-venv/bin/python ]; then echo .gpu-venv/bin/python; else echo $(GPU_PYTHON); fi) bench/gpu_check.py

gpu-wheels: $(BIN)/.installed
	$(BIN)/python -m pip download --quiet --only-binary=:all: --python-version 3.12 \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
		--dest .gpu-wheels $(GPU_PACKAGES)

clean:
	rm -rf $(VENV) .factory *.egg-info
