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

demo: $(STAMP)
	$(VENV)/bin/perft demo

test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile tests

lint: $(STAMP)
	$(VENV)/bin/ruff check perft tests benchmarks

bench: $(STAMP)
	$(PY) benchmarks/step_time.py --quick   # full runs: docs/benchmarks.md, "Reproduce"

clean:
	rm -rf $(VENV) build *.egg-info
