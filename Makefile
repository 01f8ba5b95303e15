# One command each: `make demo` runs the whole job on a synthetic corpus; `make test` runs the suite.
# Both create .venv and install what they need. TORCH can be overridden (e.g. TORCH="torch" on a GPU box);
# the default takes the local CPU build on our machines and never pulls CUDA packages. Every other package is
# installed at the version in requirements.lock (`make lock` refreshes it; `make test-latest` tries the newest).
PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
LOCK   := requirements.lock
LATEST := .venv-latest

.PHONY: install test test-latest lock demo bench reproduce clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -c $(LOCK) -e ".[dev]"
	touch $(STAMP)

test: install
	$(PY) -m pytest -q -p no:cacheprovider tests

# the suite against the newest versions pyproject's ranges allow, in a venv of its own (the lock untouched)
test-latest:
	$(PYTHON) -m venv $(LATEST)
	$(LATEST)/bin/python -m pip install -q "$(TORCH)"
	$(LATEST)/bin/python -m pip freeze | grep -i '^torch==' > $(LATEST)/torch.txt  # keep that build
	$(LATEST)/bin/python -m pip install -q --upgrade --upgrade-strategy eager -c $(LATEST)/torch.txt -e ".[dev]"
	$(LATEST)/bin/python -m pip freeze | grep -iE '^(numpy|numba|opencv|nvidia-dali|torch|scikit-learn|webdataset)=='
	$(LATEST)/bin/python -m pytest -q -p no:cacheprovider tests

# re-pin requirements.lock from pyproject.toml's ranges (network access to the package index)
lock: install
	$(PY) -m pip install -q uv
	$(PY) tools/lock.py

demo: install
	$(PY) -m usjepa.demo --out demo_out

bench: install
	$(PY) -m benchmarks.run_all --out bench_out

# ingest ../shared/realdata -> MAE teacher -> SALT students -> probe (CPU size; --quick, --preset vitb16)
reproduce: install
	$(PY) -m benchmarks.reproduce --out repro_out

clean:
	rm -rf demo_out bench_out repro_out runs .pytest_cache $(LATEST)
