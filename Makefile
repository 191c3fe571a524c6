# Two targets do all set-up on a fresh machine: `make test` and `make repro`.
# Both create .venv if missing and install the pinned environment (torch 2.13.0 via constraints.txt).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PIP_INSTALL := $(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt

.PHONY: install test repro bench clean-venv

install: $(STAMP)

$(STAMP): requirements.txt constraints.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP_INSTALL) -r requirements.txt
	$(PIP_INSTALL) --no-deps -e .
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

# The main job. Until the DVC pipeline lands this is the estimator benchmark.
repro: $(STAMP)
	$(PY) benchmarks/estimators.py

bench: $(STAMP)
	$(PY) benchmarks/estimators.py

clean-venv:
	rm -rf $(VENV)
