# Two commands do everything on a fresh machine (Debian/Ubuntu, Python 3.11):
#   make run   - set up .venv, then train a trainable MoG prior (IP + LC) on 8gaussians through Ray Train
#   make test  - set up .venv, then run the whole test suite (unit + end-to-end)
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export RAY_AUTH_MODE ?= token
export RAY_TRAIN_ENABLE_PRINT_PATCH ?= 0
export PYTHONDONTWRITEBYTECODE = 1

.PHONY: run test test-fast test-multinode bench setup fashion-mnist clean

setup: $(STAMP) fashion-mnist

# Offline Fashion-MNIST (SPEC 7.1): the Debian package ships the IDX files in /usr/share/datasets/fashion-mnist.
# Needs root (or sudo); without it set-up goes on with a warning and the tests that need the files skip.
fashion-mnist:
	@dpkg -s dataset-fashion-mnist >/dev/null 2>&1 || apt-get install -y dataset-fashion-mnist >/dev/null 2>&1 \
		|| (apt-get update -qq && apt-get install -y dataset-fashion-mnist) >/dev/null 2>&1 \
		|| sudo -n apt-get install -y dataset-fashion-mnist >/dev/null 2>&1 \
		|| echo "warning: could not install the Debian package dataset-fashion-mnist (needs root: apt-get install -y dataset-fashion-mnist); Fashion-MNIST tests will skip"

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

run: setup
	$(PY) -m jobs.train --preset 8gaussians/mog-ip-lc-selected --quick --workers 2 --output-dir runs/quick-8gaussians-mog-ip-lc-selected

# pytest-xdist: TEST_WORKERS processes; a module runs whole on one of them (its fixtures, its one Ray
# instance, once), the slowest modules first (tests/conftest.py). TEST_WORKERS=0: one process, in order.
TEST_WORKERS ?= 3
test: setup
	$(PY) -m pytest -q --durations=20 -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

test-fast: setup
	$(PY) -m pytest -q -m "not e2e" --durations=20

# a real 3-node Ray cluster on this machine (0-CPU head, two 1-CPU nodes): train, serve, sweep
test-multinode: $(STAMP)
	$(PY) -m pytest -q -s tests/test_e2e_multinode.py

bench: $(STAMP)
	$(PY) -m jobs.bench

clean:
	rm -rf runs mlflow.db mlruns .pytest_cache
