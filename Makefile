# qwen-sft-pipeline: `make demo` runs the whole pipeline offline on CPU; `make test` runs the tests.
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
PIP     = $(PY) -m pip
STAMP   = $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: install demo test test-slow test-all bench lock clean

# the exact versions of requirements/lock.txt (`make lock` refreshes it from the ranges in pyproject.toml)
$(STAMP): pyproject.toml requirements/torch.txt requirements/lock.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	# torch first, pinned: the CPU build on disk here, the CUDA build on a GPU box
	$(PIP) install --quiet -r requirements/torch.txt
	$(PIP) install --quiet -r requirements/lock.txt
	$(PIP) install --quiet --no-deps -e ".[dev,eval,bench]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/qwen-sft run --config configs/demo.yaml

test: $(STAMP)
	$(VENV)/bin/pytest -m "not slow" $(PYTEST_ARGS)

test-slow: $(STAMP)
	$(VENV)/bin/pytest -m slow $(PYTEST_ARGS)

test-all: $(STAMP)
	$(VENV)/bin/pytest $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) bench/peers.py
	$(PY) bench/loss_micro.py
	$(PY) bench/generate.py
	$(PY) bench/pipeline.py

# torch stays out of the lock (requirements/torch.txt): its build, and so its dependencies, differ by machine
lock: $(STAMP)
	$(PIP) install --quiet pip-tools
	$(VENV)/bin/pip-compile --quiet --strip-extras --no-emit-index-url --no-emit-find-links --extra dev \
	    --extra eval --extra bench -c requirements/torch.txt --unsafe-package torch -o requirements/lock.txt pyproject.toml

clean:
	rm -rf .qwen-sft mlruns .pytest_cache
