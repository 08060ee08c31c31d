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

.PHONY: demo test test-fast lint clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet '$(TORCH_SPEC)'
	$(BIN)/python -m pip install --quiet -e '.[dev,eval]'
	touch $@

demo: $(BIN)/.installed
	$(BIN)/factory run recipes/tiny.yaml

test: $(BIN)/.installed
	$(BIN)/python -m pytest -q tests

test-fast: $(BIN)/.installed
	$(BIN)/python -m pytest -q -m "not slow" tests

lint: $(BIN)/.installed
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) .factory *.egg-info
