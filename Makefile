# Two targets do all set-up on a fresh machine: `make test` and `make repro`.
# Both create .venv if missing and install the pinned environment (torch 2.13.0 via constraints.txt).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PIP_INSTALL := $(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt

.PHONY: install test repro rehearse bench bench-flops bench-prefill clean-venv

install: $(STAMP)

$(STAMP): requirements.txt requirements-nodeps.txt constraints.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP_INSTALL) -r requirements.txt
	$(PIP_INSTALL) --no-deps -r requirements-nodeps.txt
	$(PIP_INSTALL) --no-deps -e .
	touch $(STAMP)

test: $(STAMP)
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) -m pytest -q

# The main job: every experiment of the testbed profile through DVC (dvc.yaml calls `python`, so the
# venv goes first on PATH).
repro: $(STAMP)
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(VENV)/bin/dvc repro

# The paper profile on CPU stand-ins through DVC (pipeline/rehearse.py): every stage and model, a skipped
# model, 2 processes = 1, kill and resume. Report in rehearsal/report, checks in rehearsal/checks/summary.md.
rehearse: $(STAMP)
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(PY) -m pipeline.rehearse

bench: $(STAMP)
	$(PY) benchmarks/estimators.py

# The FLOPs ledger of the paper's models (benchmarks/results/flops.{csv,md}) and the measured prefill
# of LLaVA-1.5-7B's shapes with random weights (benchmarks/results/prefill.{json,md}); README "Efficiency".
bench-flops: $(STAMP)
	$(PY) benchmarks/flops.py

bench-prefill: $(STAMP)
	$(PY) benchmarks/prefill.py

clean-venv:
	rm -rf $(VENV)
