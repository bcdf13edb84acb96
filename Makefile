# Two commands on a fresh machine:  `make demo`  and  `make test`.
# TORCH pins the CPU wheel that lies on the project's own machines; elsewhere pass
# e.g. `make demo TORCH=torch` (or any torch build that fits your hardware).
PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
PY      = $(VENV)/bin/python
STAMP   = $(VENV)/.perft-installed

.PHONY: install demo test lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

# The demo's numbers depend on the thread count and on the CPU kernels torch and MKL pick;
# these pin both (one thread, AVX2 code paths), so the table is the README's on any x86-64
# machine with AVX2 and the pinned torch.
DEMO_ENV = OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 MKL_CBWR=AVX2 ATEN_CPU_CAPABILITY=avx2

demo: $(STAMP)
	$(DEMO_ENV) $(VENV)/bin/perft demo --threads 1

test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile tests

lint: $(STAMP)
	$(VENV)/bin/ruff check perft tests benchmarks

bench: $(STAMP)
	$(PY) benchmarks/step_time.py --quick   # full runs: docs/benchmarks.md, "Reproduce"

clean:
	rm -rf $(VENV) build *.egg-info
