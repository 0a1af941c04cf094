# GPT-2 in Python with Numba, llm.c style. `make help` lists the targets.
# Every target runs in a virtual environment: the active one ($$VIRTUAL_ENV), else the
# project's own .venv, made on first use (a system Python may refuse pip installs).
VENV ?= $(or $(VIRTUAL_ENV),.venv)
PYTHON := $(VENV)/bin/python
PIP := $(PYTHON) -m pip
BOOTSTRAP_PYTHON ?= python3
# Offline copies of tinyshakespeare.txt and gpt2.tiktoken: ../shared/data when it exists.
DATA_MIRROR ?= $(shell [ -d ../shared/data ] && cd ../shared/data && pwd)
export DATA_MIRROR
TRAIN_OUT ?= data/train_124M
TRAIN_FLAGS ?=
VAL_BIN := data/tinyshakespeare/tiny_shakespeare_val.bin
REFERENCE := data/gpt2_124M.bin data/gpt2_124M_debug_state.bin
# This environment pins OpenBLAS to its Haswell kernels (a workaround for old builds);
# numpy's current OpenBLAS runs about 1.7x faster on this CPU without the pin.
NO_BLAS_PIN := env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE

.PHONY: help venv install install-test data train test pytest parity reference bench profile plot addition fineweb gpt2-124m gpu-check clean

help:  ## this list
	@grep -E '^[a-z0-9-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

$(PYTHON):
	$(BOOTSTRAP_PYTHON) -m venv $(VENV)

venv: $(PYTHON)  ## create the virtual environment .venv (unless one is active)

install: $(PYTHON)  ## install the run-time packages (requirements.txt) into the environment if missing
	@$(PYTHON) -c "import numpy, numba, tiktoken, requests, tqdm, matplotlib; assert tuple(map(int, numpy.__version__.split('.')[:2])) < (2, 5)" 2>/dev/null \
		|| { echo "installing requirements.txt (numpy, numba, tiktoken, ...) into $(VENV): a minute or two the first time"; \
		     $(PIP) install -r requirements.txt; }

install-test: install  ## install the test packages too (pytest, PyTorch 2.13 CPU, transformers, mpi4py, pyarrow)
	@$(PYTHON) -c "import pytest, torch, transformers, safetensors, mpi4py, pyarrow" 2>/dev/null \
		|| { echo "installing requirements-test.txt (pytest, PyTorch CPU, transformers, mpi4py, Open MPI, pyarrow) into $(VENV): several minutes the first time"; \
		     $(PIP) install -r requirements-test.txt; }

data: install  ## tokenize tinyshakespeare into data/tinyshakespeare/*.bin (and keep the BPE ranks at data/gpt2.tiktoken)
	$(PYTHON) prepro_tinyshakespeare.py

train: data  ## train GPT-2 124M from scratch, llm.c's CPU defaults, into data/train_124M (TRAIN_FLAGS="...", TRAIN_OUT=DIR)
	@echo "$(NO_BLAS_PIN) $(PYTHON) train_gpt2.py -o $(TRAIN_OUT) $(TRAIN_FLAGS)"
	@$(NO_BLAS_PIN) $(PYTHON) train_gpt2.py -o $(TRAIN_OUT) $(TRAIN_FLAGS) || { status=$$?; [ $$status -gt 2 ] \
		|| echo "(make train: flags for train_gpt2.py go in TRAIN_FLAGS=\"...\", e.g. TRAIN_FLAGS=--resume; the folder in TRAIN_OUT=DIR)"; \
		exit $$status; }

reference: install-test data  ## dump the PyTorch reference for GPT-2 124M (checkpoint, debug state, recipe)
	@if [ -f data/gpt2_124M_debug_state.bin.json ] && [ -f data/gpt2_124M.bin ]; then echo "reference exists: $(REFERENCE)"; \
	else $(PYTHON) dev/torch_reference.py --depth 12 --tokens $(VAL_BIN); fi

parity: reference  ## python test_gpt2.py on GPT-2 124M against the PyTorch reference
	$(PYTHON) test_gpt2.py

pytest: install-test data  ## the pytest suite
	$(PYTHON) -m pytest -q tests

test: parity pytest  ## everything: the 124M parity check, then the pytest suite

bench: install-test  ## benchmark our step against PyTorch's (see dev/bench.py --help)
	$(NO_BLAS_PIN) $(PYTHON) dev/bench.py

profile: data  ## time per layer kind for 124M at B=4, T=64
	$(NO_BLAS_PIN) $(PYTHON) train_gpt2.py -x 6 -v 0 -s 0 --profile

plot:  ## loss curves of data/train_124M/log.jsonl (TRAIN_OUT=DIR: another run's) to loss.png beside it
	$(PYTHON) dev/plot_log.py $(TRAIN_OUT)/log.jsonl -o $(TRAIN_OUT)/loss.png

addition: install  ## the masked-loss example: learn a+b=c, then report accuracy
	$(PYTHON) dev/addition.py

fineweb: install  ## the GPT-2 124M reproduction's data: FineWeb sample-10BT shards and HellaSwag val (installs requirements-data.txt)
	@$(PYTHON) -c "import datasets, pyarrow" 2>/dev/null \
		|| { echo "installing requirements-data.txt (datasets, pyarrow) into $(VENV)"; $(PIP) install -r requirements-data.txt; }
	$(PYTHON) prepro_fineweb.py
	$(PYTHON) prepro_hellaswag.py

gpt2-124m:  ## GPT-2 124M on FineWeb, llm.c's recipe, on this machine's GPUs (scripts/run_gpt2_124M.sh; data first, see README)
	PYTHON=$(PYTHON) bash scripts/run_gpt2_124M.sh

gpu-check:  ## on an NVIDIA machine: fp32/TF32/bf16/fp8 parity, loss curves, determinism, benchmarks (dev/gpu_check.sh)
	bash dev/gpu_check.sh

clean:  ## remove Python and Numba caches (keeps data/ and .venv)
	rm -rf __pycache__ */__pycache__ .pytest_cache
