# The two commands of the README: `make run` and `make test`. Each creates .venv if missing.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test demo bench gpu-check lint clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/vss serve

demo: $(STAMP)
	$(BIN)/vss demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy models adaptation/losses.py

bench: $(STAMP)
	$(BIN)/python bench/streaming.py

# On a CUDA machine: the gpu-marked tests + GPU numbers into var/gpu-report.json (<= 8 min); exits 2 without CUDA.
gpu-check: $(STAMP)
	$(BIN)/python bench/gpu.py -o var/gpu-report.json

clean:
	rm -rf $(VENV) .pytest_cache
