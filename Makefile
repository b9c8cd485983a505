# Thin wrappers over the `gemma-quant` CLI. `make setup` builds the environment in .venv.
VENV    ?= .venv
PYTHON  ?= python3
RECIPE  ?= tiny-e2b-w4a16
BIN     := $(VENV)/bin

.PHONY: setup plan quantize test notebooks clean

setup: $(VENV)/.installed

# torch first, on its own: `pip install torch==2.13.0` takes the local CPU build where the
# machine has one (as CI does), and the CUDA build from PyPI elsewhere.
$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[dev]"
	touch $@

plan: setup
	$(BIN)/gemma-quant plan $(RECIPE)

quantize: setup
	$(BIN)/gemma-quant quantize $(RECIPE)

test: setup
	$(BIN)/python -m pytest -q

# JupyterLab on notebooks/, in the project environment: the `notebooks` extra (JupyterLab is not
# in `dev`) installed into .venv once, against the same constraints as the tested set.
notebooks: $(VENV)/.notebooks
	$(BIN)/jupyter lab notebooks/

$(VENV)/.notebooks: $(VENV)/.installed
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[dev,notebooks]"
	touch $@

clean:
	rm -rf runs
