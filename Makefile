# One command each: `make demo` runs the whole job on a synthetic corpus; `make test` runs the suite.
# Both create .venv and install what they need. TORCH can be overridden (e.g. TORCH="torch" on a GPU box);
# the default takes the local CPU build on our machines and never pulls CUDA packages.
PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install test demo bench reproduce clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

test: install
	$(PY) -m pytest -q -p no:cacheprovider tests

demo: install
	$(PY) -m usjepa.demo --out demo_out

bench: install
	$(PY) -m benchmarks.run_all --out bench_out

# ingest ../shared/realdata -> MAE teacher -> SALT students -> probe (CPU size; --quick, --preset vitb16)
reproduce: install
	$(PY) -m benchmarks.reproduce --out repro_out

clean:
	rm -rf demo_out bench_out repro_out runs .pytest_cache
