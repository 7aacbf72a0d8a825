# Two commands do everything on a fresh machine (Debian/Ubuntu, Python 3.11):
#   make run   - set up .venv, then train a trainable MoG prior (IP + LC) on 8gaussians through Ray Train
#   make test  - set up .venv, then run the whole test suite (unit + end-to-end)
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export RAY_AUTH_MODE ?= disabled
export RAY_TRAIN_ENABLE_PRINT_PATCH ?= 0
export PYTHONDONTWRITEBYTECODE = 1

.PHONY: run test test-fast bench setup clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

run: $(STAMP)
	$(PY) -m jobs.train --preset 8gaussians/mog-ip-lc --quick --workers 2 --output-dir runs/quick-8gaussians-mog-ip-lc

test: $(STAMP)
	$(PY) -m pytest -q --durations=20

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not e2e" --durations=20

bench: $(STAMP)
	$(PY) -m jobs.bench

clean:
	rm -rf runs mlflow.db mlruns .pytest_cache
