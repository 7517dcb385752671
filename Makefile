# Two entry points: `make quickstart` (set up, then run the quickstart) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned: pip takes these builds from the project machines' local disk.
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

.PHONY: setup test quickstart
setup: $(VENV)/.installed

test: setup
	$(PY) -m pytest

quickstart: setup
	$(PY) -m cifar_ray.train --model netconv --data cifar10 --epochs 5 --batch-size 128 --optimizer sgd --lr 0.05 --momentum 0.9
