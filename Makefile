# Two targets do all set-up on a fresh machine: `make test` and `make repro`.
# Both create .venv if missing and install the pinned environment (torch 2.13.0 via constraints.txt).
# `make rehearse` uses an environment of its own, .venv-rehearse (requirements-rehearse.txt: torchvision and
# qwen-vl-utils for lmms-eval's Qwen2.5-VL backend, hence the CUDA build of torch 2.13.0; ~6 GB, ~6 min).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PIP_INSTALL := $(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt
REHEARSE_VENV ?= .venv-rehearse
REHEARSE_PY := $(REHEARSE_VENV)/bin/python
REHEARSE_STAMP := $(REHEARSE_VENV)/.installed
REHEARSE_PIP := $(REHEARSE_PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt

.PHONY: install install-rehearse test repro rehearse paper bench bench-flops bench-prefill clean-venv

install: $(STAMP)

$(STAMP): requirements.txt requirements-nodeps.txt constraints.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP_INSTALL) -r requirements.txt
	$(PIP_INSTALL) --no-deps -r requirements-nodeps.txt
	$(PIP_INSTALL) --no-deps -e .
	touch $(STAMP)

# requirements.txt and requirements-rehearse.txt in one resolution (its torch line excludes the CPU build).
install-rehearse: $(REHEARSE_STAMP)

$(REHEARSE_STAMP): requirements.txt requirements-nodeps.txt requirements-rehearse.txt constraints.txt pyproject.toml
	test -x $(REHEARSE_PY) || $(PYTHON) -m venv $(REHEARSE_VENV)
	$(REHEARSE_PIP) -r requirements.txt -r requirements-rehearse.txt
	$(REHEARSE_PIP) --no-deps -r requirements-nodeps.txt
	$(REHEARSE_PIP) --no-deps -e .
	touch $(REHEARSE_STAMP)

test: $(STAMP)
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) -m pytest -q

# The main job: every experiment of the testbed profile through DVC (dvc.yaml calls `python`, so the
# venv goes first on PATH).
repro: $(STAMP)
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(VENV)/bin/dvc repro

# The paper profile on CPU stand-ins through DVC (pipeline/rehearse.py): every stage and model, a skipped
# model, 2 processes = 1, kill and resume. Report in rehearsal/report, checks in rehearsal/checks/summary.md.
# Its own environment, .venv-rehearse: lmms-eval's Qwen2.5-VL backend needs torchvision (requirements-rehearse.txt).
rehearse: $(REHEARSE_STAMP)
	PATH="$(CURDIR)/$(REHEARSE_VENV)/bin:$$PATH" $(REHEARSE_PY) -m pipeline.rehearse

# The paper profile on this machine's GPUs (pipeline/gpus.py): one DVC worker per GPU (per paper.num_processes
# GPUs), each running the next out-of-date GPU stage; then the rest (efficiency, results, ablation, report).
# README "Reproducing the paper on GPUs". GPUS=0,1,2,3 (CUDA_VISIBLE_DEVICES values). The environment is
# .venv-rehearse's: the CUDA build of torch 2.13.0 with torchvision and qwen-vl-utils (Qwen2.5-VL).
GPUS ?= 0
paper: $(REHEARSE_STAMP)
	PATH="$(CURDIR)/$(REHEARSE_VENV)/bin:$$PATH" $(REHEARSE_PY) -m pipeline.gpus --params paper/params.yaml --gpus $(GPUS)

bench: $(STAMP)
	$(PY) benchmarks/estimators.py

# The FLOPs ledger of the paper's models (benchmarks/results/flops.{csv,md}) and the measured prefill
# of LLaVA-1.5-7B's shapes with random weights (benchmarks/results/prefill.{json,md}); README "Efficiency".
bench-flops: $(STAMP)
	$(PY) benchmarks/flops.py

bench-prefill: $(STAMP)
	$(PY) benchmarks/prefill.py

clean-venv:
	rm -rf $(VENV) $(REHEARSE_VENV)
