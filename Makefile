# Thin aliases. `make demo` and `make test` each run `setup` first when needed, so on a fresh machine
# either one is the only command.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.aigc-installed
# CPU-only machines get the CPU build of torch first, so nothing pulls a multi-GB CUDA build. On a CPU
# machine without a local wheel, add: TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu".
# GPU machines (nvidia-smi present) take torch from PyPI, which is the CUDA build.
HAS_GPU := $(shell command -v nvidia-smi 2>/dev/null)
ifeq ($(HAS_GPU),)
TORCH_SPEC ?= torch==2.13.0
export DS_ACCELERATOR ?= cpu
else
TORCH_SPEC ?= torch>=2.13,<2.15
endif
TORCH_PIP_ARGS ?=
export TORCH_EXTENSIONS_DIR ?= $(HOME)/.cache/aigc/torch_extensions
PYTEST_ARGS ?=

.PHONY: setup demo finetune test unit lint clean
setup: $(STAMP)

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)" $(TORCH_PIP_ARGS)
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

demo: setup  ## the whole loop on the embedded default: search, report, winner, Serve, sample requests
	$(PY) jobs/pipeline.py --config jobs/configs/pipeline-tiny-cpu.yaml

finetune: setup
	$(PY) jobs/finetune.py --config jobs/configs/tiny-cpu.yaml

test: setup  ## the whole suite: unit and integration (real Ray, DeepSpeed, HTTP)
	$(PY) -m pytest $(PYTEST_ARGS)

unit: setup
	$(PY) -m pytest -m "not integration" $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check lib jobs tune serve tests bench

clean:
	rm -rf $(VENV) .pytest_cache
