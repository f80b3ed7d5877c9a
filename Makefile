VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test demo bench bench-table lint clean

$(PY):
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

# torch first, pinned to the CPU build on disk; a looser pin pulls a multi-GB CUDA build
$(STAMP): $(PY) pyproject.toml
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(VENV)/bin/pytest -q --timeout=900 --durations=25 tests

demo: $(STAMP)
	$(VENV)/bin/adbray demo

# benchmarks run alone: each waits for the last one's load to fade, refuses a busy machine, and appends
# its result to benchmarks/results/<template>.jsonl; the table compares the latest results with the targets
bench: $(STAMP)
	for b in benchmarks/*.py; do $(PY) -m pipelines.bench wait-quiet && $(PY) $$b || exit 1; done
	$(PY) -m pipelines.bench table

bench-table: $(STAMP)
	$(PY) -m pipelines.bench table

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf runs .pytest_cache
