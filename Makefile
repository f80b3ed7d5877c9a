VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# LeRobot's own dataset reader, for tests/embodied/test_lerobot_reader.py: its pins clash with ours (torch<2.11)
VENV_LEROBOT ?= .venv-lerobot
LEROBOT_REQUIREMENTS := tests/embodied/lerobot_reader/requirements.txt
LEROBOT_STAMP := $(VENV_LEROBOT)/.installed

.PHONY: install install-lerobot test demo bench bench-table lint clean

$(PY):
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

# torch first, pinned to the CPU build on disk; a looser pin pulls a multi-GB CUDA build
$(STAMP): $(PY) pyproject.toml
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# every package pinned, --no-deps (no resolver); pip is the main venv's, so the venv needs none of its own;
# torch is the CPU wheel on disk (see the requirements file). Bytecode: not all of it (--no-compile), only
# what the reader imports, written by a first import that also checks the venv (even where
# PYTHONDONTWRITEBYTECODE is set, which would otherwise recompile torch at every read)
$(LEROBOT_STAMP): $(LEROBOT_REQUIREMENTS) | $(STAMP)
	rm -rf $(VENV_LEROBOT)
	python3 -m venv --without-pip $(VENV_LEROBOT)
	$(VENV)/bin/pip --python $(VENV_LEROBOT)/bin/python install -q --no-deps --no-compile -r $(LEROBOT_REQUIREMENTS)
	env -u PYTHONDONTWRITEBYTECODE $(VENV_LEROBOT)/bin/python tests/embodied/lerobot_reader/read_lerobot.py
	touch $(LEROBOT_STAMP)

install-lerobot: $(LEROBOT_STAMP)

test: $(STAMP) $(LEROBOT_STAMP)
	LEROBOT_PYTHON=$(VENV_LEROBOT)/bin/python $(VENV)/bin/pytest -q --timeout=900 --durations=25 tests

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
