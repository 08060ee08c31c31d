# Two commands do everything on a fresh machine:
#   make demo   run the factory on its embedded default recipe
#   make test   run the test suite
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# The CPU build of torch, installed before anything that depends on torch so that pip
# never resolves a multi-GB CUDA build on a machine without a GPU. Override on GPU hosts:
#   make demo TORCH_SPEC='torch==2.13.0' PIP_EXTRA='--index-url ...'
TORCH_SPEC ?= torch==2.13.0

.PHONY: demo test lint clean

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

lint: $(BIN)/.installed
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) .factory *.egg-info
