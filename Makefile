# Two entry points: `make quickstart` (set up, then run the quickstart sweep) and `make test`;
# `make test-fast` skips the slow tests, `make lint` runs ruff, `make typecheck` runs mypy and the import layers
# (CI runs lint, typecheck and test).
VENV ?= .venv
PY := $(VENV)/bin/python

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned: pip takes these builds from the project machines' local disk.
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

.PHONY: setup test test-fast lint typecheck quickstart
setup: $(VENV)/.installed

# Two workers, each a whole file at a time (a file's tests share its fixtures and its Ray, cluster or
# lab), the files with the most slow tests first: much of the suite waits on processes (drivers and
# trial workers starting one after another, the lab's SSH and health checks), so on 2 cores two streams
# keep both busy. (Three were tried: load ~7 and no faster than one, each worker with its own local Ray.)
XDIST := -n 2 --dist loadfile

test: setup
	$(PY) -m pytest $(XDIST)

# the edit loop: everything but the tests marked slow (process kills, Ctrl-C timing, 200 trials, clusters)
test-fast: setup
	$(PY) -m pytest $(XDIST) -m "not slow"

lint: setup
	$(VENV)/bin/ruff check .

# mypy (pydantic plugin; strict on the pure modules) and import-linter's layer contracts, both in pyproject.toml
typecheck: setup
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

quickstart: setup
	$(PY) -m cifar_ray.sweep sweeps/quickstart.yaml
